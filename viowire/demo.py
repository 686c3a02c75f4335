"""``viowire demo``: a server on a private Unix socket and a client driving every device.

It shows, in a few seconds, the whole virtio-mmio driver flow the Linux kernel runs: probe,
reset, status handshake, feature negotiation, queue setup, DRIVER_OK, I/O completed by
interrupts, and teardown, with the register accesses of the setup and teardown phases printed by
their spec names. The I/O: a disk is written and read back, entropy is read, and a net device
sends a broadcast to a peer on its link (its own slot in a second session) and gets a reply, and
a console writes a line to its port 0 and reads what the host side answers (the default
``echo`` backend: the same line).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time

from viowire import registry
from viowire.client.connection import Connection, DeviceInfo, connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.console import ConsoleDriver
from viowire.client.drivers.net import NetDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.client.mmio import VirtioMmioDevice
from viowire.client.trace import TracingBus
from viowire.server.platform import PlatformSpec
from viowire.server.private import private_server
from viowire.virtio.constants import feature_names
from viowire.virtio.net import BROADCAST, format_mac

FRAME_TIMEOUT = 5.0  # a frame on an in-server link arrives in well under a millisecond
ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental
ANSWER_TIMEOUT = 2.0  # what a console's host side says back to the demo's line


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
        elif isinstance(driver, NetDriver):
            ok = await _net_io(conn, info, driver)
        elif isinstance(driver, ConsoleDriver):
            ok = await _console_io(driver)
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


async def _net_io(conn: Connection, info: DeviceInfo, net: NetDriver) -> bool:
    """A peer on the same link (this slot in a second session: the same device spec), a
    broadcast to it and its unicast reply, which the switch sends to this device alone."""
    say(
        f"-- I/O: MAC {format_mac(net.mac)}, link {'up' if net.link_up else 'down'}, "
        f"MTU {net.mtu}, {net.header_size}-byte virtio_net_hdr"
    )
    async with await connect(
        str(conn.endpoint), memory="shared", name="viowire-demo-peer"
    ) as other:
        peer = await NetDriver.attach(await other.attach(info))
        try:
            say(f"   peer: the same slot in a second session, MAC {format_mac(peer.mac)}")
            return await _hello(net, peer)
        except TimeoutError:
            say(f"   no frame arrived within {FRAME_TIMEOUT:g} s: the link lost it")
            return False
        finally:
            await peer.detach()


async def _hello(net: NetDriver, peer: NetDriver) -> bool:
    hello = BROADCAST + net.mac + ETHERTYPE + b"hello, anyone on this link?".ljust(46)
    start = time.perf_counter()
    heard = await _exchange(net, peer, hello)
    say(f"   broadcast {len(hello)} bytes: the peer received it in {_ms(start)}")
    # the same MAC on both (mac= in the spec): the switch could not tell them apart
    to = BROADCAST if peer.mac == net.mac else net.mac
    reply = to + peer.mac + ETHERTYPE + b"hello back, from the peer".ljust(46)
    start = time.perf_counter()
    answered = await _exchange(peer, net, reply)
    ok = heard == hello and answered == reply
    say(
        f"   its {'broadcast' if to == BROADCAST else 'unicast'} reply: {_ms(start)}, "
        f"{'verified' if ok else 'MISMATCH'}"
    )
    return ok


async def _exchange(sender: NetDriver, receiver: NetDriver, frame: bytes) -> bytes:
    """Send ``frame`` and return the receiver's next frame."""
    frames = receiver.frames()
    async with asyncio.timeout(FRAME_TIMEOUT):
        await sender.send(frame)
        return await anext(frames)


async def _console_io(console: ConsoleDriver) -> bool:
    """A line to port 0 and the host side's answer: the line itself from the default ``echo``
    backend; another backend (a program, a socket) may answer anything, or nothing yet."""
    port = await console.port(0)
    size = f"{console.size[0]}x{console.size[1]}" if console.size else "not given"
    ports = f"MULTIPORT, {len(console.ports)} port(s)" if console.multiport else "one port"
    name = f" {port.name!r}" if port.name else ""
    say(f"-- I/O: port 0{name}, console size {size}, {ports}")
    line = b"hello, console\r\n"
    start = time.perf_counter()
    await port.write(line)
    say(f"   wrote {len(line)} bytes in {_ms(start)}")
    answer = b""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(ANSWER_TIMEOUT):
            while len(answer) < len(line):
                chunk = await port.read(len(line) - len(answer))
                if not chunk:
                    break
                answer += chunk
    if not answer:
        say(f"   the host side answered nothing within {ANSWER_TIMEOUT:g} s (not an echo backend)")
        return True
    echoed = ", the echo verified" if answer == line else ""
    say(f"   the host side answered {answer!r} in {_ms(start)}{echoed}")
    return True


def _ms(start: float) -> str:
    return f"{(time.perf_counter() - start) * 1e3:.2f} ms"
