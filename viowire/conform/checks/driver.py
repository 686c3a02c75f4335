"""The driver viowire ships, the same sequence as Linux's virtio_mmio, end to end (§3.1.1)."""

from __future__ import annotations

import asyncio
import contextlib

from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.client.errors import VirtioError
from viowire.client.mmio import VirtioMmioDevice
from viowire.conform.checks.common import check, fail
from viowire.conform.dut import IO_DEVICES, Dut
from viowire.conform.model import Outcome, passed
from viowire.virtio.constants import DeviceId


@check(
    "driver.linux-flow",
    "3.1.1",
    "viowire's Linux-equivalent driver attaches, does I/O through interrupts and detaches",
    devices=IO_DEVICES,
)
async def driver_linux_flow(dut: Dut) -> Outcome:
    dev = VirtioMmioDevice(
        dut.bus, dut.base, dut.info.irq, dut.memory, dut.allocator, size=dut.info.size
    )
    try:
        async with asyncio.timeout(3 * dut.options.io_timeout):
            if dut.device_id == DeviceId.BLOCK:
                drv = await BlockDriver.attach(dev)
                await drv.read(0, 4096)
                await drv.flush()
                serial = await drv.get_id()
                what = f"read 4 KiB, flush, serial {serial!r}"
            else:
                drv = await EntropyDriver.attach(dev)
                what = f"read {len(await drv.read(256))} random bytes"
            features = dev.negotiated_features
            await drv.detach()
    except VirtioError as exc:
        raise fail(f"the driver failed: {exc}") from None
    except TimeoutError:
        raise fail(
            "the driver's requests were not completed through interrupts within "
            f"{3 * dut.options.io_timeout:g} s"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await dev.del_vqs()
        dut.install_irq()
    return passed(f"attach (probe, features {features:#x}), {what}, detach")
