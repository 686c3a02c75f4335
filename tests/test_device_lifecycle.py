"""The lifecycle of what a device holds, at its edges (found in review): a notification while
get() awaits guest memory, a chain completed twice, asyncio.timeout inside handle(), chains held
across DEVICE_NEEDS_RESET, requests cancelled before their task ran."""

from __future__ import annotations

import asyncio

import pytest
from ringbuilder import NO_RING_FEATURES, GuestRam, MmioDriver, RingBuilder, make_device

from viowire.device import ChainError, Device, StaleQueueError
from viowire.virtio.memory import MappedGuestMemory


def up(backend, ram=None, rings=1, memory=None):
    ram = ram or GuestRam()
    dev = make_device(backend, 2, ram)
    if memory is not None:
        dev.memory = memory
    made = [RingBuilder(ram, 8) for _ in range(rings)]
    driver = MmioDriver(dev)
    driver.bring_up(made, drop=NO_RING_FEATURES)
    return dev, driver, made, ram


class Holder(Device):
    """A receive-queue device: takes chains only through Queue.get()/pop()."""

    device_id = 0x7F10
    num_queues = 2

    def queue_notify(self, queue):
        if queue.index == 1:
            queue.serve()

    async def handle(self, queue, chain, memory):
        raise ChainError("queue 1 breaks the device")


class AnsweredEarly(MappedGuestMemory):
    """Proxied-like memory: a read's answer is taken now, delivered when ``gate`` opens (the
    MEM_READ_REPLY and a later QUEUE_NOTIFY arrive in the same data_received)."""

    def __init__(self, ram):
        super().__init__()
        self.add_region(ram.gpa, ram.buffer)
        self.gate = None

    async def readv(self, ranges):
        data = [bytes(part) for part in await super().readv(ranges)]
        if self.gate is not None:
            await self.gate
        return data


async def test_get_sees_a_notify_that_arrives_while_pop_awaits_memory():
    ram = GuestRam()
    memory = AnsweredEarly(ram)
    dev, driver, (ring, _), _ = up(Holder(), ram, rings=2, memory=memory)
    memory.gate = asyncio.get_running_loop().create_future()
    getter = asyncio.create_task(dev.backend.queue(0).get())
    await asyncio.sleep(0)  # get() -> pop() -> readv answered "nothing available", not delivered
    sent = ring.add_chain([b"x"], [4])
    driver.notify(0)  # the driver's kick: get() is not waiting on its future yet
    memory.gate.set_result(None)
    chain = await asyncio.wait_for(getter, 1.0)
    assert chain.head == sent.head


class Twice(Device):
    device_id = 0x7F11

    async def handle(self, queue, chain, memory):
        self.queue(queue).complete(chain, 0)  # e.g. a helper that completes, then returns
        return 0


async def test_a_chain_is_published_once_even_if_handle_completes_it_too():
    dev, driver, (ring,), _ = up(Twice())
    ring.add_chain([b"x"], [4])
    await driver.kick(0)
    await asyncio.sleep(0)
    await dev.drain()
    assert ring.used_idx == 1, f"used.idx {ring.used_idx}: head {ring.used_elem(0)} twice"


class Timed(Device):
    device_id = 0x7F12

    async def handle(self, queue, chain, memory):
        async with asyncio.timeout(1):  # any user's handle() that bounds a wait
            await asyncio.sleep(0.01)
        return 0


async def test_handle_may_use_asyncio_timeout():
    dev, driver, (ring,), _ = up(Timed())
    ring.add_chain([b"x"], [4])
    driver.notify(0)
    for _ in range(100):
        await asyncio.sleep(0.005)
        await dev.drain()
    assert not dev.broken
    assert ring.used_idx == 1


async def test_device_needs_reset_makes_held_chains_stale():
    dev, driver, (rx, tx), ram = up(Holder(), rings=2)
    buf = rx.add_chain([], [4])
    held = await dev.backend.queue(0).pop()
    tx.add_chain([b"bad"], [1])
    await driver.kick(1)  # queue 1's request fails: DEVICE_NEEDS_RESET
    assert dev.broken
    with pytest.raises(StaleQueueError):  # docs: a stale chain's writes are refused
        await held.write(b"late")
    assert ram.read(*buf.writable[0]) == b"\xee" * 4


class Careful(Device):
    device_id = 0x7F13
    cancelled: list[int] = []
    gate: asyncio.Event | None = None

    async def handle(self, queue, chain, memory):
        if await chain.read() == b"bad":
            raise ChainError("a malformed request")
        try:
            await Careful.gate.wait()
        except asyncio.CancelledError:
            Careful.cancelled.append(chain.head)  # release what the request holds
            raise
        return 0


async def test_a_request_cancelled_before_its_task_ran_sees_cancellederror():
    Careful.gate, Careful.cancelled = asyncio.Event(), []
    dev, driver, (ring,), _ = up(Careful())
    good = ring.add_chain([b"x"], [4])
    ring.add_chain([b"bad"], [4])  # same batch: its ChainError cancels `good` (DEVICE_NEEDS_RESET)
    driver.notify(0)
    for _ in range(5):
        await asyncio.sleep(0)
    assert dev.broken
    # cancelled before its task ran a step, the request still sees CancelledError
    assert Careful.cancelled == [good.head]


async def test_blk_budget_comes_back_when_a_waiting_request_is_cancelled_before_it_ran(tmp_path):
    import struct

    from viowire.server.devices.blk import BlockBackend, _DataBudget

    disk = BlockBackend(path=str(tmp_path / "disk.img"), size=1 << 20)
    disk._budget = _DataBudget(8192)  # stands for FILE_BYTES_IN_FLIGHT, small for the test
    dev, driver, (ring,), _ = up(disk)
    write = struct.pack("<IIQ", 1, 0, 0)  # VIRTIO_BLK_T_OUT, sector 0
    ring.add_chain([write, b"a" * 8192], [1])  # takes the whole budget, goes to a thread
    ring.add_chain([write, b"b" * 8192], [1])  # waits in _DataBudget.take()
    ring.add_chain([], [1])  # "missing headers" in the same batch: DEVICE_NEEDS_RESET
    driver.notify(0)
    for _ in range(50):
        await asyncio.sleep(0.01)
    assert dev.broken
    assert disk._budget.free == 8192
    disk.close()
