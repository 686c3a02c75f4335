"""The driver viowire ships, the same sequence as Linux's virtio_mmio, end to end (§3.1.1)."""

from __future__ import annotations

import asyncio
import contextlib

from viowire import registry
from viowire.client.drivers.generic import GenericDriver, Used
from viowire.client.errors import VirtioError
from viowire.client.mmio import VirtioMmioDevice
from viowire.conform.checks.common import check, fail
from viowire.conform.dut import Dut
from viowire.conform.model import Outcome, passed
from viowire.device import SampleRequest

RECEIVE_BUFFERS = 4  # posted on the sample request's receive queue, if it names one


@check(
    "driver.linux-flow",
    "3.1.1",
    "viowire's Linux-equivalent driver attaches, sends a correct request through interrupts "
    "and detaches",
    io=True,
    window=False,
)
async def driver_linux_flow(dut: Dut) -> Outcome:
    sample = dut.sample
    assert sample is not None
    dev = dut.transport()
    try:
        async with asyncio.timeout(3 * dut.options.io_timeout):
            drv = await _attach(dut, dev)
            if sample.receive_queue is not None:
                await drv.post(sample.receive_queue, sample.receive_size, RECEIVE_BUFFERS)
            used = await drv.request(
                sample.queue, out=sample.readable_buffers, in_sizes=sample.writable_sizes
            )
            features = dev.negotiated_features
            await drv.detach()
    except VirtioError as exc:
        raise fail(f"the driver failed: {exc}") from None
    except TimeoutError:
        raise fail(
            "the driver's request was not completed through interrupts within "
            f"{3 * dut.options.io_timeout:g} s"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await dev.del_vqs()
        dut.install_irq()
    if problem := _judge(sample, used):
        raise fail(f"the driver's request came back wrong: {problem}")
    return passed(
        f"attach (probe, features {features:#x}), a request on queue {sample.queue} "
        f"({used.written} bytes written), detach"
    )


async def _attach(dut: Dut, dev: VirtioMmioDevice) -> GenericDriver:
    """The type's own driver when it is built on GenericDriver (it negotiates the type's
    features, as Linux's would), else GenericDriver for the type."""
    own = registry.driver_for(dut.device_id)
    if isinstance(own, type) and issubclass(own, GenericDriver):
        return await own.attach(dev)
    return await GenericDriver.attach(dev, device_type=dut.device_type)


def _judge(sample: SampleRequest, used: Used) -> str:
    """What is wrong with the answer to the sample request ("" if nothing)."""
    if used.written < sample.min_written:
        return f"used.len {used.written}, below the {sample.min_written} byte(s) it must write"
    if sample.status is not None and used.data[-1:] != bytes([sample.status]):
        return f"status byte {used.data[-1]:#x}, expected {sample.status:#x}"
    return ""
