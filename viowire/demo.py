"""``viowire demo``: a server on a private Unix socket and a client driving every device.

It shows, in a few seconds, the whole virtio-mmio driver flow the Linux kernel runs: probe,
reset, status handshake, feature negotiation, queue setup, DRIVER_OK, I/O completed by
interrupts, and teardown, with the register accesses of the setup and teardown phases printed by
their spec names.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from viowire import registry
from viowire.client.connection import Connection, DeviceInfo, connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.client.mmio import VirtioMmioDevice
from viowire.client.trace import TracingBus
from viowire.server.platform import PlatformSpec
from viowire.server.private import private_server
from viowire.virtio.constants import feature_names


def say(text: str = "") -> None:
    print(text, flush=True)


async def demo(spec: PlatformSpec | None = None) -> int:
    """Run the demo on ``spec``'s devices (default: blk and rng, legacy and modern); returns a
    process exit code (0 when every device did its job)."""
    async with private_server(spec or PlatformSpec.default()) as url:
        say(f"server: listening on {url}")
        async with await connect(url, memory="shared") as conn:
            say(
                f"client: session {conn.session_id:#x}, guest RAM "
                f"{conn.ram.size >> 20} MiB at {conn.ram.base:#x} ({conn.memory_mode}, memfd)"
            )
            platform = await conn.platform()
            for info in platform:
                say(f"  {info.base:#x} irq {info.irq:2}  {info.name} (Version {info.version})")
            failures = 0
            for info in platform:
                failures += not await _drive(conn, info)
    say()
    say(
        "demo: every device went through probe, I/O and teardown"
        if not failures
        else f"demo: {failures} device(s) failed"
    )
    return 1 if failures else 0


async def _drive(conn: Connection, info: DeviceInfo) -> bool:
    driver_class = registry.driver_for(info.device_id)
    say()
    say(
        f"== {info.name} at {info.base:#x}, IRQ {info.irq}, "
        f"{'legacy (Version 1)' if info.version == 1 else 'modern (Version 2)'}"
    )
    if driver_class is None:
        say("   no driver for this device type; skipped")
        return True
    bus = TracingBus(conn, info.base, info.size, say)
    dev = await conn.attach(info, bus=bus)
    say("-- probe, reset, ACKNOWLEDGE, DRIVER, features, queues, DRIVER_OK")
    driver = await driver_class.attach(dev)
    names = feature_names(driver.negotiated_features, registry.feature_bits(info.device_id))
    say(f"   negotiated: {' '.join(names)}")
    bus.enabled = False
    interrupts = _count_interrupts(dev)
    try:
        if isinstance(driver, BlockDriver):
            ok = await _blk_io(driver)
        elif isinstance(driver, EntropyDriver):
            ok = await _rng_io(driver)
        else:
            say("-- I/O: none that the demo knows for this device type")
            ok = True
    finally:
        await interrupts.finish()
    say(f"   interrupts taken: {interrupts.count}")
    say("-- teardown")
    bus.enabled = True
    await driver.detach()
    return ok


class _count_interrupts:
    """Counts the device's interrupts while I/O runs, through the user-facing iterator."""

    def __init__(self, dev: VirtioMmioDevice) -> None:
        self.count = 0
        # Subscribed here, not in the task: an interrupt before the task first runs counts too.
        self._interrupts = dev.interrupts()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        async for _status in self._interrupts:
            self.count += 1

    async def finish(self) -> None:
        """Stop, once every interrupt taken so far is counted (the last request's interrupt
        may still wait in the subscription when its I/O returns)."""
        self._interrupts.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._task, 5)


async def _blk_io(blk: BlockDriver) -> bool:
    capacity = blk.capacity
    say(
        f"-- I/O: capacity {capacity} sectors ({capacity * 512 >> 20} MiB), "
        f"serial {await blk.get_id()!r}"
    )
    size, chunk = 1 << 20, 32 << 10
    data = os.urandom(size)
    start = time.perf_counter()
    await asyncio.gather(
        *(blk.write(off, data[off : off + chunk]) for off in range(0, size, chunk))
    )
    await blk.flush()
    wrote = time.perf_counter() - start
    start = time.perf_counter()
    parts = await asyncio.gather(*(blk.read(off, chunk) for off in range(0, size, chunk)))
    read = time.perf_counter() - start
    ok = b"".join(parts) == data
    say(f"   wrote 1 MiB as {size // chunk} concurrent requests + FLUSH: {wrote * 1e3:.1f} ms")
    say(f"   read it back: {read * 1e3:.1f} ms, {'verified' if ok else 'MISMATCH'}")
    return ok


async def _rng_io(rng: EntropyDriver) -> bool:
    data = await rng.read(32)
    say(f"-- I/O: 32 bytes of entropy: {data.hex()}")
    return len(data) == 32 and len(set(data)) > 1
