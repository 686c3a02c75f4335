"""The device API (viowire.device) end to end: devices that hold buffers, requests that wait and
complete out of order, and what a reset or a failing request does to what a device holds.

Each test serves its own device classes from a real server over a real Unix socket and drives
them with the real client's virtio-mmio flow and virtqueues. The devices are steered by events
the test sets, never by the clock.
"""

from __future__ import annotations

import asyncio
import struct
from typing import ClassVar

import pytest
from servers import running_server, url_of

from viowire.client.connection import connect
from viowire.client.drivers.base import VirtioDriver
from viowire.device import DescriptorChain, Device, GuestMemory, Queue
from viowire.server.mmio import MmioDevice
from viowire.server.platform import Platform, PlatformSpec, Slot
from viowire.virtio.constants import Status

BASE, STRIDE, WINDOW = 0x1000_1000, 0x1000, 0x200
TIMEOUT = 10


class Mailbox(Device):
    """Queue 0 is a receive queue whose buffers the device holds until queue 1 (a transmit
    queue) brings data; each transmitted buffer is delivered into the next held one."""

    device_id = 0x7F01
    type_name = "mailbox"
    num_queues = 2
    notified: ClassVar[list[int]] = []

    def queue_notify(self, queue: Queue) -> None:
        Mailbox.notified.append(queue.index)
        if queue.index == 1:
            queue.serve()  # the transmit queue is plain request/response

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        data = await chain.read()
        receive = self.queue(0)
        held = await receive.get()  # waits (as its own task) until the driver posts one
        receive.complete(held, await held.write(data))
        return 0


class Gate(Device):
    """A request names a gate (u32); it completes once the test opens that gate, writing its
    name back. Gates are per process, so the test steers the server's device directly."""

    device_id = 0x7F02
    type_name = "gate"
    gates: ClassVar[dict[int, asyncio.Event]] = {}
    entered: ClassVar[dict[int, asyncio.Event]] = {}
    failing: ClassVar[set[int]] = set()

    @classmethod
    def gate(cls, key: int) -> asyncio.Event:
        return cls.gates.setdefault(key, asyncio.Event())

    @classmethod
    def arrived(cls, key: int) -> asyncio.Event:
        return cls.entered.setdefault(key, asyncio.Event())

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        (key,) = struct.unpack("<I", await chain.read(0, 4))
        if key == 0:
            return await chain.write(b"open")  # never waits: completes with its batch
        self.arrived(key).set()
        await self.gate(key).wait()
        if key in self.failing:
            raise RuntimeError(f"gate {key} is broken")
        return await chain.write(struct.pack("<I", key))


class ClassPlatform(PlatformSpec):
    """A platform of device classes (the registry will name them; here the test does)."""

    def __init__(self, *classes: type[Device]) -> None:
        super().__init__([])
        self.classes = classes

    def validate(self) -> None:
        pass

    def build(self, name_prefix: str = "") -> Platform:
        return Platform(
            [
                Slot(BASE + i * STRIDE, WINDOW, 1 + i, MmioDevice(cls(), 2, name=cls.type_name))
                for i, cls in enumerate(self.classes)
            ]
        )


class RawDriver(VirtioDriver):
    """Any device: its queues, and chains submitted by hand."""

    def __init__(self, dev, queues: int) -> None:
        super().__init__(dev)
        self.queue_count = queues

    async def setup(self) -> None:
        self.vqs = await self.dev.find_vqs([f"q{i}" for i in range(self.queue_count)])

    async def submit(self, queue: int, out: bytes, in_size: int) -> tuple[int, bytes]:
        """One chain: ``out`` device-readable, ``in_size`` device-writable; (used.len, data)."""
        ram = self.dev.allocator
        out_gpa = ram.alloc(max(len(out), 1))
        in_gpa = ram.alloc(max(in_size, 1))
        memory = self.dev.memory
        await memory.write(out_gpa, out)
        await memory.write(in_gpa, b"\xee" * in_size)
        outs = [(out_gpa, len(out))] if out else []
        ins = [(in_gpa, in_size)] if in_size else []
        used = await self.vqs[queue].submit(outs, ins)
        return used, await memory.read(in_gpa, in_size)


async def attach(conn, info, queues: int) -> RawDriver:
    driver = type("Raw", (RawDriver,), {"device_id": info.device_id})
    return await driver.attach(await conn.attach(info), queues=queues)


@pytest.fixture
async def serve(tmp_path):
    """``async with serve(*classes) as (server, conn, devices)``."""
    for registry in (Gate.gates, Gate.entered, Gate.failing, Mailbox.notified):
        registry.clear()

    def start(*classes: type[Device]):
        return _session(tmp_path, ClassPlatform(*classes))

    return start


class _session:
    def __init__(self, tmp_path, spec: PlatformSpec) -> None:
        self.tmp_path, self.spec = tmp_path, spec

    async def __aenter__(self):
        self._server = running_server(self.tmp_path, self.spec)
        server = await self._server.__aenter__()
        self._conn = await connect(url_of(server, "unix"))
        conn = await self._conn.__aenter__()
        return server, conn, await conn.platform()

    async def __aexit__(self, *exc):
        await self._conn.__aexit__(*exc)
        await self._server.__aexit__(*exc)


def device_of(server, type_name: str) -> MmioDevice:
    (session,) = server.sessions
    return next(slot.device for slot in session.platform.slots if slot.device.name == type_name)


async def test_a_receive_queue_holds_buffers_until_data_comes(serve):
    async with serve(Mailbox) as (server, conn, (info,)):
        drv = await attach(conn, info, 2)
        async with asyncio.timeout(TIMEOUT):
            posted = [asyncio.create_task(drv.submit(0, b"", 64)) for _ in range(3)]
            while 0 not in Mailbox.notified:  # the device heard of the posted buffers ...
                await asyncio.sleep(0.001)
            await device_of(server, "mailbox").drain()
            assert not any(task.done() for task in posted)  # ... and keeps them
            for word in (b"one", b"two", b"three"):
                assert await drv.submit(1, word, 0) == (0, b"")
            results = await asyncio.gather(*posted)
        assert sorted(data[:used] for used, data in results) == [b"one", b"three", b"two"]
        assert all(data[used:] == b"\xee" * (64 - used) for used, data in results)
        await drv.detach()


async def test_transmit_waits_for_a_receive_buffer_without_blocking_its_queue(serve):
    async with serve(Mailbox) as (server, conn, (info,)):
        drv = await attach(conn, info, 2)
        async with asyncio.timeout(TIMEOUT):
            sends = [asyncio.create_task(drv.submit(1, bytes([i]) * 8, 0)) for i in range(4)]
            await asyncio.sleep(0)
            mmio = device_of(server, "mailbox")
            while mmio.requests_waiting(1) < 4:  # all four wait at once, none done
                await asyncio.sleep(0.001)
            assert not any(task.done() for task in sends)
            got = await asyncio.gather(*(drv.submit(0, b"", 8) for _ in range(4)))
            await asyncio.gather(*sends)
        assert sorted(data for _, data in got) == [bytes([i]) * 8 for i in range(4)]
        await drv.detach()


async def test_a_slow_request_does_not_hold_back_a_fast_one(serve):
    async with serve(Gate) as (_server, conn, (info,)):
        drv = await attach(conn, info, 1)
        async with asyncio.timeout(TIMEOUT):
            slow = asyncio.create_task(drv.submit(0, struct.pack("<I", 1), 4))
            await Gate.arrived(1).wait()
            # Behind the slow one on the same queue: one that does not wait, one that waits.
            assert await drv.submit(0, struct.pack("<I", 0), 4) == (4, b"open")
            second = asyncio.create_task(drv.submit(0, struct.pack("<I", 2), 4))
            await Gate.arrived(2).wait()
            Gate.gate(2).set()
            assert await second == (4, struct.pack("<I", 2))
            assert not slow.done()
            Gate.gate(1).set()
            assert await slow == (4, struct.pack("<I", 1))
        await drv.detach()


async def test_many_waiting_requests_on_one_queue_run_at_once(serve):
    async with serve(Gate) as (_server, conn, (info,)):
        drv = await attach(conn, info, 1)
        keys = range(1, 33)
        async with asyncio.timeout(TIMEOUT):
            tasks = [asyncio.create_task(drv.submit(0, struct.pack("<I", k), 4)) for k in keys]
            await asyncio.gather(*(Gate.arrived(k).wait() for k in keys))  # 32 inside at once
            for k in reversed(keys):
                Gate.gate(k).set()
            results = await asyncio.gather(*tasks)
        assert results == [(4, struct.pack("<I", k)) for k in keys]
        await drv.detach()


async def test_reset_cancels_waiting_requests_and_writes_nothing_after(serve):
    async with serve(Gate) as (server, conn, (info,)):
        dev = await conn.attach(info)
        drv = await type("Raw", (RawDriver,), {"device_id": info.device_id}).attach(dev, queues=1)
        mmio = device_of(server, "gate")
        vq = drv.vqs[0]
        used_idx_addr = vq.addresses.used + 2
        buf = dev.allocator.alloc(4)
        await dev.memory.write(buf, b"\xee" * 4)
        request = dev.allocator.alloc(4)
        await dev.memory.write(request, struct.pack("<I", 7))
        async with asyncio.timeout(TIMEOUT):
            pending = asyncio.create_task(vq.submit([(request, 4)], [(buf, 4)]))
            await Gate.arrived(7).wait()
            await conn.mmio_write(dev.base + 0x70, 4, 0)  # Status = 0: device reset
            assert await conn.mmio_read(dev.base + 0x70, 4) == 0  # (and the server has it)
            Gate.gate(7).set()  # too late: the waiting request was cancelled
            await mmio.drain()
            assert mmio.requests_waiting(0) == 0
        assert await dev.memory.read(buf, 4) == b"\xee" * 4
        assert await dev.memory.read(used_idx_addr, 2) == b"\0\0"
        pending.cancel()
        await asyncio.gather(pending, return_exceptions=True)


async def test_queue_reset_cancels_that_queue_only(serve):
    async with serve(Mailbox) as (server, conn, (info,)):
        drv = await attach(conn, info, 2)
        mmio = device_of(server, "mailbox")
        async with asyncio.timeout(TIMEOUT):
            send = asyncio.create_task(drv.submit(1, b"lost", 0))  # waits for a receive buffer
            while mmio.requests_waiting(1) < 1:
                await asyncio.sleep(0.001)
            drv.vqs[1] = await drv.dev.reset_vq(drv.vqs[1])  # VIRTIO_F_RING_RESET, §2.6.1
            await mmio.drain()
            assert mmio.requests_waiting(1) == 0  # the waiting transmit request is gone
            received = asyncio.create_task(drv.submit(0, b"", 8))
            assert await drv.submit(1, b"kept", 0) == (0, b"")  # the new ring works
            used, data = await received
        assert data[:used] == b"kept"
        send.cancel()
        await asyncio.gather(send, return_exceptions=True)
        await drv.detach()


async def test_a_failing_request_breaks_its_device_only(serve):
    async with serve(Gate, Gate) as (_server, conn, (one, two)):
        bad = await attach(conn, one, 1)
        good = await attach(conn, two, 1)
        Gate.failing.add(5)
        async with asyncio.timeout(TIMEOUT):
            doomed = asyncio.create_task(bad.submit(0, struct.pack("<I", 5), 4))
            await Gate.arrived(5).wait()
            Gate.gate(5).set()
            while not await bad.dev.get_status() & Status.DEVICE_NEEDS_RESET:
                await asyncio.sleep(0.001)
            Gate.gate(6).set()
            assert await good.submit(0, struct.pack("<I", 6), 4) == (4, struct.pack("<I", 6))
        assert not await good.dev.get_status() & Status.DEVICE_NEEDS_RESET
        doomed.cancel()
        await asyncio.gather(doomed, return_exceptions=True)
