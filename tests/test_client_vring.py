"""The driver side of the split virtqueue, with the test playing the device by hand.

Guest RAM is a bytearray behind MappedGuestMemory with a tiny first-fit allocator; the device side
(:class:`DeviceRing`) reads the avail ring and descriptors and writes the used ring directly.
"""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viowire.client.errors import DeviceBrokenError, QueueDeletedError, QueueFullError
from viowire.client.virtqueue import Virtqueue
from viowire.virtio.memory import GuestMemory, MappedGuestMemory, Region
from viowire.virtio.ring import (
    DESC,
    DESC_SIZE,
    USED_ELEM,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    RingLayout,
    align_up,
    avail_ring_size,
    used_ring_size,
    vring_need_event,
    vring_size,
)

TIMEOUT = 2.0


class RemoteMemory(GuestMemory):
    """The same bytes behind an interface that suspends on every access, like qtest's: the
    virtqueue then takes its awaiting path instead of the synchronous one."""

    def __init__(self, mapped: MappedGuestMemory) -> None:
        self.mapped = mapped

    @property
    def regions(self) -> list[Region]:
        return list(self.mapped.regions)

    async def readv(self, ranges):
        await asyncio.sleep(0)
        return [self.mapped.read_sync(gpa, n) for gpa, n in ranges]

    async def writev(self, segments):
        await asyncio.sleep(0)
        for gpa, data in segments:
            self.mapped.write_sync(gpa, data)


class FakeRAM:
    """Guest RAM over a bytearray with a first-fit allocator; ``limit`` makes bigger asks fail.

    ``memory`` is what the driver uses (``remote``: one that suspends); ``mapped`` is what the
    test, playing the device, reads and writes directly."""

    def __init__(
        self, size: int = 1 << 20, base: int = 0x4000_0000, *, remote: bool = False
    ) -> None:
        self.base, self.size = base, size
        self.mapped = MappedGuestMemory()
        self.buffer = bytearray(size)
        self.mapped.add_region(base, self.buffer)
        self.memory = RemoteMemory(self.mapped) if remote else self.mapped
        self.blocks: dict[int, int] = {}
        self.limit: int | None = None

    def alloc(self, size: int, align: int = 16) -> int:
        if self.limit is not None and size > self.limit:
            raise MemoryError(f"fake RAM refuses {size} bytes")
        gpa = align_up(self.base, align)
        for start, length in sorted(self.blocks.items()):
            if gpa + size <= start:
                break
            gpa = max(gpa, align_up(start + length, align))
        if gpa + size > self.base + self.size:
            raise MemoryError(f"fake RAM has no {size} bytes")
        self.blocks[gpa] = size
        self.mapped.write_sync(gpa, bytes(size))
        return gpa

    def free(self, gpa: int) -> None:
        del self.blocks[gpa]


class DeviceRing:
    """The device's half of a split ring, done by hand on the same memory."""

    def __init__(self, mem: MappedGuestMemory, num: int, desc: int, avail: int, used: int) -> None:
        self.mem, self.num = mem, num
        self.layout = RingLayout(num, desc, avail, used)
        self.desc, self.avail, self.used = desc, avail, used
        self.last_avail = 0
        self.used_idx = 0

    @classmethod
    def of(cls, vq: Virtqueue) -> DeviceRing:
        a = vq.addresses
        mem = vq.memory.mapped if isinstance(vq.memory, RemoteMemory) else vq.memory
        return cls(mem, vq.num, a.desc, a.avail, a.used)  # type: ignore[arg-type]

    def start_at(self, index: int) -> None:
        """Both sides as if ``index`` chains had already gone round (white-box wraparound)."""
        self.last_avail = self.used_idx = index
        self.mem.store_u16(self.layout.used_idx, index)

    def avail_idx(self) -> int:
        return self.mem.load_u16(self.layout.avail_idx)

    def pending(self) -> int:
        return (self.avail_idx() - self.last_avail) & 0xFFFF

    def pop(self) -> tuple[int, list[tuple[int, int, bool]]] | None:
        """The next available head and its chain as (addr, len, device-writable)."""
        if not self.pending():
            return None
        head = self.mem.load_u16(self.layout.avail_slot_addr(self.last_avail))
        self.last_avail = (self.last_avail + 1) & 0xFFFF
        return head, self.walk(self.desc, head, self.num)

    def walk(self, table: int, index: int, size: int) -> list[tuple[int, int, bool]]:
        chain = []
        for _ in range(size):
            desc = self.mem.read_sync(table + DESC_SIZE * index, DESC_SIZE)
            addr, length, flags, nxt = DESC.unpack(desc)
            if flags & VIRTQ_DESC_F_INDIRECT:
                assert not flags & VIRTQ_DESC_F_NEXT and length % DESC_SIZE == 0
                return chain + self.walk(addr, 0, length // DESC_SIZE)
            chain.append((addr, length, bool(flags & VIRTQ_DESC_F_WRITE)))
            if not flags & VIRTQ_DESC_F_NEXT:
                return chain
            index = nxt
        raise AssertionError("looped descriptor chain")

    def push(self, head: int, length: int) -> None:
        """Used element first, then used.idx, as the device must."""
        self.mem.write_sync(self.layout.used_elem_addr(self.used_idx), USED_ELEM.pack(head, length))
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self.mem.store_u16(self.layout.used_idx, self.used_idx)

    def avail_flags(self) -> int:
        return self.mem.load_u16(self.layout.avail_flags)

    def used_event(self) -> int:
        return self.mem.load_u16(self.layout.used_event)

    def set_avail_event(self, value: int) -> None:
        self.mem.store_u16(self.layout.avail_event, value)

    def set_used_flags(self, value: int) -> None:
        self.mem.store_u16(self.layout.used_flags, value)


class Kicks:
    """The notify callback: counts kicks."""

    def __init__(self) -> None:
        self.count = 0

    async def __call__(self, vq: Virtqueue) -> None:
        self.count += 1


async def make_vq(
    ram: FakeRAM, num: int = 8, layout: str = "modern", **kwargs: object
) -> tuple[Virtqueue, DeviceRing, Kicks]:
    kicks = Kicks()
    vq = await Virtqueue.create(0, num, ram.memory, ram, layout, notify=kicks, **kwargs)
    return vq, DeviceRing.of(vq), kicks


async def wait(awaitable, timeout: float = TIMEOUT):
    return await asyncio.wait_for(awaitable, timeout)


async def settle() -> None:
    for _ in range(100):  # remote memory suspends on every access
        await asyncio.sleep(0)


@pytest.fixture(params=[False, True], ids=["mapped", "remote"])
def remote(request) -> bool:
    """Run a test on mapped guest memory (the synchronous path) and on remote memory."""
    return request.param


# -- layout -------------------------------------------------------------------------------------


async def test_legacy_ring_is_one_page_aligned_zeroed_block():
    ram = FakeRAM()
    ram.buffer[:] = b"\xaa" * len(ram.buffer)
    vq, _, _ = await make_vq(ram, 256, "legacy")
    assert vq.addresses.desc % 4096 == 0 and vq.blocks == (vq.addresses.desc,)
    assert ram.blocks[vq.addresses.desc] == vring_size(256)
    assert ram.memory.read_sync(vq.addresses.desc, vring_size(256)) == bytes(vring_size(256))


async def test_modern_rings_are_three_aligned_zeroed_areas():
    ram = FakeRAM()
    ram.buffer[:] = b"\xaa" * len(ram.buffer)
    vq, _, _ = await make_vq(ram, 16)
    a = vq.addresses
    assert len(vq.blocks) == 3 and a.desc % 16 == 0 and a.avail % 2 == 0 and a.used % 4 == 0
    assert ram.memory.read_sync(a.avail, avail_ring_size(16)) == bytes(38)
    assert ram.memory.read_sync(a.used, used_ring_size(16)) == bytes(134)
    vq.free_rings()
    assert not ram.blocks


async def test_failed_modern_allocation_gives_back_what_it_took():
    ram = FakeRAM(size=4096)
    with pytest.raises(MemoryError):
        await make_vq(ram, 256)
    assert not ram.blocks


# -- publishing ---------------------------------------------------------------------------------


async def test_add_publishes_descriptors_slot_then_index(remote):
    ram = FakeRAM(remote=remote)
    vq, dev, kicks = await make_vq(ram)
    await vq.add([(0x4008_0000, 16)], [(0x4008_1000, 512), (0x4008_2000, 1)], "req")
    assert dev.avail_idx() == 1
    head, chain = dev.pop()
    assert chain == [(0x4008_0000, 16, False), (0x4008_1000, 512, True), (0x4008_2000, 1, True)]
    assert vq.num_free == 5 and kicks.count == 0
    assert await vq.kick() and kicks.count == 1
    assert await vq.get_buf() is None
    dev.push(head, 513)
    assert await vq.get_buf() == ("req", 513)
    assert vq.num_free == 8 and vq.in_flight == 0


async def test_a_chain_that_fits_goes_direct_even_with_indirect(remote):
    ram = FakeRAM(remote=remote)
    vq, dev, _ = await make_vq(ram, indirect=True)
    blocks = len(ram.blocks)
    await vq.add([(0x4008_0000, 16)], [(0x4008_1000, 8), (0x4008_2000, 1)], "direct")
    assert vq.num_free == 5 and len(ram.blocks) == blocks  # no table allocated
    assert not DESC.unpack(ram.mapped.read_sync(dev.desc, DESC_SIZE))[2] & VIRTQ_DESC_F_INDIRECT
    _, chain = dev.pop()
    assert chain == [(0x4008_0000, 16, False), (0x4008_1000, 8, True), (0x4008_2000, 1, True)]


async def fill(vq: Virtqueue, free: int) -> None:
    """Publish one-buffer chains until ``free`` descriptors are left."""
    for i in range(vq.num_free - free):
        await vq.add([(0x4009_0000 + 64 * i, 4)], [], f"filler{i}")


async def test_a_chain_that_does_not_fit_takes_one_slot_and_a_table_freed_on_return(remote):
    ram = FakeRAM(remote=remote)
    vq, dev, _ = await make_vq(ram, indirect=True)
    await fill(vq, 2)
    blocks = len(ram.blocks)
    await vq.add([(0x4008_0000, 16)], [(0x4008_1000, 8), (0x4008_2000, 1)], "ind")
    assert vq.num_free == 1 and len(ram.blocks) == blocks + 1
    head_id = ram.mapped.load_u16(dev.layout.avail_slot_addr(6))
    flags = DESC.unpack(ram.mapped.read_sync(dev.layout.desc_addr(head_id), DESC_SIZE))[2]
    assert flags == VIRTQ_DESC_F_INDIRECT
    for _ in range(6):
        dev.pop()
    head, chain = dev.pop()
    assert chain == [(0x4008_0000, 16, False), (0x4008_1000, 8, True), (0x4008_2000, 1, True)]
    dev.push(head, 9)
    assert await vq.get_buf() == ("ind", 9)
    assert len(ram.blocks) == blocks and vq.num_free == 2


async def test_single_buffer_goes_direct_and_no_memory_for_a_table_means_no_room():
    ram = FakeRAM()
    vq, dev, _ = await make_vq(ram, indirect=True)
    await vq.add([], [(0x4008_0000, 64)], "one")
    assert DESC.unpack(ram.mapped.read_sync(dev.desc, DESC_SIZE))[2] == VIRTQ_DESC_F_WRITE
    await fill(vq, 1)
    ram.limit = 16  # the 32-byte table does not fit, and neither do two ring descriptors
    with pytest.raises(QueueFullError):
        await vq.add([(0x4008_0000, 16)], [(0x4008_1000, 8)], "direct")
    assert vq.num_free == 1


async def test_submit_without_memory_for_a_table_waits_until_the_chain_fits(remote):
    ram = FakeRAM(remote=remote)
    vq, dev, _ = await make_vq(ram, 4, indirect=True)
    await fill(vq, 1)
    ram.limit = 16
    task = asyncio.create_task(vq.submit([(0x4008_0000, 16)], [(0x4008_1000, 8)]))
    await settle()
    assert not task.done() and dev.pending() == 3
    for _ in range(3):
        head, _ = dev.pop()
        dev.push(head, 0)
    await vq.interrupt()
    await settle()
    head, chain = dev.pop()
    assert chain == [(0x4008_0000, 16, False), (0x4008_1000, 8, True)]
    dev.push(head, 8)
    await vq.interrupt()
    assert await wait(task) == 8


async def test_add_refuses_what_cannot_fit_now():
    ram = FakeRAM()
    vq, _, _ = await make_vq(ram, 2)
    with pytest.raises(QueueFullError, match="virtqueue 0: a chain of 3 descriptors"):
        await vq.add([(0x4008_0000, 1)], [(0x4008_1000, 1), (0x4008_2000, 1)], "big")
    with pytest.raises(ValueError, match="length"):
        await vq.add([(0x4008_0000, 0)], [], "empty")


# -- completion ---------------------------------------------------------------------------------


async def complete_all(dev: DeviceRing, vq: Virtqueue, lengths: dict[int, int], order=reversed):
    popped = []
    while (item := dev.pop()) is not None:
        popped.append(item)
    for head, chain in order(popped):
        dev.push(head, lengths.get(chain[0][0], 0))
    return await vq.interrupt()


async def test_many_submits_in_flight_complete_out_of_order(remote):
    ram = FakeRAM(remote=remote)
    vq, dev, kicks = await make_vq(ram, 8, event_idx=True, indirect=True)
    addrs = [0x4008_0000 + 0x1000 * i for i in range(8)]
    tasks = [asyncio.create_task(vq.submit([], [(a, 100)])) for a in addrs]
    await settle()
    assert dev.pending() == 8 and vq.in_flight == 8
    assert await complete_all(dev, vq, {a: i + 1 for i, a in enumerate(addrs)})
    assert await wait(asyncio.gather(*tasks)) == list(range(1, 9))
    assert kicks.count == 1  # the device never moved avail_event: one kick for index 0


async def test_submit_waits_for_a_free_slot_when_full(remote):
    ram = FakeRAM(remote=remote)
    vq, dev, _ = await make_vq(ram, 2)
    tasks = [asyncio.create_task(vq.submit([], [(0x4008_0000 + i * 64, 8)])) for i in range(3)]
    await settle()
    assert dev.pending() == 2 and not any(t.done() for t in tasks)
    head, _ = dev.pop()
    dev.push(head, 8)
    await vq.interrupt()
    await settle()
    assert dev.avail_idx() == 3  # the third went out once a slot came back
    await complete_all(dev, vq, {})
    assert await wait(asyncio.gather(*tasks)) == [8, 0, 0]


async def test_chain_longer_than_the_ring_fails_instead_of_waiting():
    ram = FakeRAM()
    vq, _, _ = await make_vq(ram, 2)
    bufs = [(0x4008_0000 + 16 * i, 16) for i in range(3)]
    with pytest.raises(QueueFullError):
        await wait(vq.submit(bufs, []))


async def test_interrupt_without_news_and_tokens_for_get_buf():
    ram = FakeRAM()
    calls = []
    vq, dev, _ = await make_vq(ram, callback=calls.append)
    assert not await vq.interrupt() and not calls
    await vq.add([(0x4008_0000, 4)], [], "plain")
    head, _ = dev.pop()
    dev.push(head, 0)
    assert await vq.interrupt() and calls == [vq]
    assert await vq.get_buf() == ("plain", 0)  # kept for get_buf, not dropped


@pytest.mark.parametrize("start", [65530, 65535, 0xFFF0])
async def test_indexes_wrap_past_65535(start, remote):
    ram = FakeRAM(remote=remote)
    vq, dev, kicks = await make_vq(ram, 4, event_idx=True)
    vq._avail_idx = vq._last_used = start
    ram.mapped.store_u16(dev.layout.avail_idx, start)
    dev.start_at(start)
    dev.set_avail_event(start)
    for round_ in range(6):
        tasks = [asyncio.create_task(vq.submit([], [(0x4008_0000 + 64 * i, 8)])) for i in range(4)]
        await settle()
        await complete_all(dev, vq, {0x4008_0000 + 64 * i: i + round_ for i in range(4)})
        assert await wait(asyncio.gather(*tasks)) == [round_ + i for i in range(4)]
        dev.set_avail_event(dev.last_avail)
    end = (start + 24) & 0xFFFF
    assert dev.avail_idx() == end and vq._last_used == end
    assert dev.used_event() == end
    assert kicks.count == 6  # one kick per round: avail_event named each round's first entry


async def test_many_rounds_through_the_real_wrap():
    """65,540 chains through a 1-entry ring: every index passes 65535 for real."""
    ram = FakeRAM()
    vq, dev, _ = await make_vq(ram, 1)
    for i in range(65540):
        await vq.add([(0x4008_0000, 4)], [], i)
        head, _ = dev.pop()
        dev.push(head, 0)
        assert await vq.get_buf() == (i, 0)
    assert dev.avail_idx() == 4 and ram.memory.load_u16(dev.layout.used_idx) == 4


# -- notification suppression -------------------------------------------------------------------


@given(old=st.integers(0, 0xFFFF), count=st.integers(0, 0xFFFF), event=st.integers(0, 0xFFFF))
def test_vring_need_event_is_crossing_mod_2_16(old, count, event):
    new = (old + count) & 0xFFFF
    crossed = event in {(old + k) & 0xFFFF for k in range(count)} if count < 64 else None
    if crossed is None:
        crossed = (event - old) & 0xFFFF < count
    assert vring_need_event(event, new, old) == crossed


async def test_event_idx_kick_only_when_avail_event_is_crossed(remote):
    ram = FakeRAM(remote=remote)
    vq, dev, kicks = await make_vq(ram, 8, event_idx=True)
    dev.set_avail_event(3)  # "kick me when you publish the entry at index 3"
    for i in range(3):
        await vq.add([(0x4008_0000, 4)], [], i)
    assert not await vq.kick() and kicks.count == 0  # indexes 0..2 published, 3 not crossed
    await vq.add([(0x4008_0000, 4)], [], 3)
    assert await vq.kick() and kicks.count == 1
    assert not await vq.kick()  # nothing new since


async def test_event_idx_crossing_at_the_wrap():
    ram = FakeRAM()
    vq, dev, _ = await make_vq(ram, 8, event_idx=True)
    vq._avail_idx = 65534
    ram.memory.store_u16(dev.layout.avail_idx, 65534)
    dev.start_at(65534)
    dev.set_avail_event(0)
    await vq.add([(0x4008_0000, 4)], [], "a")
    assert not await vq.kick()  # published index 65534
    await vq.add([(0x4008_0000, 4)], [], "b")
    await vq.add([(0x4008_0000, 4)], [], "c")
    assert await vq.kick()  # published 65535 and 0: crossed 0


async def test_used_no_notify_flag_suppresses_kicks_without_event_idx():
    ram = FakeRAM()
    vq, dev, kicks = await make_vq(ram)
    dev.set_used_flags(VIRTQ_USED_F_NO_NOTIFY)
    await vq.add([(0x4008_0000, 4)], [], 1)
    assert not await vq.kick()
    dev.set_used_flags(0)
    await vq.add([(0x4008_0000, 4)], [], 2)
    assert await vq.kick() and kicks.count == 1


async def test_disable_and_enable_callbacks_with_flags():
    ram = FakeRAM()
    vq, dev, _ = await make_vq(ram)
    await vq.disable_cb()
    assert dev.avail_flags() == VIRTQ_AVAIL_F_NO_INTERRUPT
    assert await vq.enable_cb() and dev.avail_flags() == 0
    await vq.add([(0x4008_0000, 4)], [], "x")
    await vq.disable_cb()
    head, _ = dev.pop()
    dev.push(head, 0)
    assert not await vq.enable_cb()  # a chain came back meanwhile: the caller must poll


async def test_disable_and_enable_callbacks_with_event_idx():
    ram = FakeRAM()
    vq, dev, _ = await make_vq(ram, event_idx=True)
    await vq.add([(0x4008_0000, 4)], [], "x")
    head, _ = dev.pop()
    dev.push(head, 0)
    assert await vq.get_buf() == ("x", 0)
    assert dev.used_event() == 1 and dev.avail_flags() == 0  # ask for the next one
    await vq.disable_cb()
    assert dev.used_event() == 0 and dev.avail_flags() == 0  # as far behind as it goes
    await vq.add([(0x4008_0000, 4)], [], "y")
    head, _ = dev.pop()
    dev.push(head, 0)
    assert await vq.get_buf() == ("y", 0)
    assert dev.used_event() == 0  # disabled: get_buf leaves used_event alone
    assert await vq.enable_cb() and dev.used_event() == 2


# -- a device that breaks the protocol ----------------------------------------------------------


async def broken_by(push) -> tuple[Virtqueue, asyncio.Task]:
    ram = FakeRAM()
    vq, dev, _ = await make_vq(ram, 4)
    task = asyncio.create_task(vq.submit([(0x4008_0000, 4)], [(0x4008_1000, 4)]))
    await settle()
    push(dev)
    assert await vq.interrupt()
    return vq, task


@pytest.mark.parametrize(
    ("push", "reason"),
    [
        (lambda dev: dev.push(7, 0), "used id 7 out of range"),
        (lambda dev: dev.push(dev.pop()[0] + 1, 0), "used id 1 is not a head"),
        (lambda dev: dev.push(dev.pop()[0], 5), "used len 5 is larger than the 4"),
        (lambda dev: dev.start_at(9), "used.idx moved from 0 to 9"),
    ],
)
async def test_protocol_violations_break_the_queue(push, reason):
    vq, task = await broken_by(push)
    with pytest.raises(DeviceBrokenError, match=reason) as info:
        await wait(task)
    assert "virtio: virtqueue 0:" in str(info.value)
    with pytest.raises(DeviceBrokenError):
        await wait(vq.submit([], [(0x4008_0000, 4)]))
    assert await vq.get_buf() is None


# -- teardown -----------------------------------------------------------------------------------


async def test_detach_fails_waiters_and_reclaims_descriptors(remote):
    ram = FakeRAM(remote=remote)
    vq, _, _ = await make_vq(ram, 4, indirect=True)
    await fill(vq, 1)
    task = asyncio.create_task(vq.submit([(0x4008_0000, 4)], [(0x4008_1000, 4)]))
    await settle()
    assert vq.num_free == 0 and len(ram.blocks) == 4  # the rings and an indirect table
    await vq.detach_all()
    with pytest.raises(QueueDeletedError):
        await wait(task)
    assert vq.num_free == 4 and len(ram.blocks) == 3  # the indirect table went too
    vq.free_rings()
    with pytest.raises(QueueDeletedError):
        await vq.add([(0x4008_0000, 4)], [], "late")


async def test_cancelled_submit_releases_buffers_only_when_the_device_returns_them(remote):
    ram = FakeRAM(remote=remote)
    vq, dev, _ = await make_vq(ram, 4)
    released = []
    task = asyncio.create_task(
        vq.submit([], [(0x4008_0000, 4)], release=lambda: released.append(True))
    )
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait(task)
    assert not released  # the device still owns the buffer
    head, _ = dev.pop()
    dev.push(head, 4)
    await vq.interrupt()
    await settle()
    assert released == [True] and vq.num_free == 4


async def cancelled_submit(ram: FakeRAM, num: int = 4):
    vq, dev, _ = await make_vq(ram, num)
    released = []
    task = asyncio.create_task(
        vq.submit([], [(0x4008_0000, 4)], release=lambda: released.append(True))
    )
    return vq, dev, task, released


async def test_cancelled_while_waiting_for_room_releases_at_once(remote):
    ram = FakeRAM(remote=remote)
    vq, dev, _ = await make_vq(ram, 2)
    await fill(vq, 0)
    released = []
    task = asyncio.create_task(
        vq.submit([], [(0x4008_0000, 4)], release=lambda: released.append(True))
    )
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait(task)
    assert released == [True] and vq.in_flight == 2  # never published
    assert dev.pending() == 2


async def test_cancelled_after_completion_releases_once_at_once():
    """The device returned the chain, but the task was cancelled before it ran again."""
    ram = FakeRAM()
    vq, dev, task, released = await cancelled_submit(ram)
    await settle()
    head, _ = dev.pop()
    dev.push(head, 4)
    await vq.interrupt()  # resolves the future; the task has not resumed yet
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait(task)
    await settle()
    assert released == [True] and vq.num_free == 4


async def test_cancelled_submit_is_released_by_detach_all(remote):
    ram = FakeRAM(remote=remote)
    vq, _, task, released = await cancelled_submit(ram)
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait(task)
    assert not released
    await vq.detach_all()
    assert released == [True] and vq.num_free == 4


async def test_cancelled_submit_on_a_failed_queue_waits_for_detach():
    """DEVICE_NEEDS_RESET: the device may still hold the chain until the reset."""
    ram = FakeRAM()
    vq, _, task, released = await cancelled_submit(ram)
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait(task)
    await vq.fail(RuntimeError("needs reset"))
    assert not released
    await vq.detach_all()
    assert released == [True]


async def test_a_batch_moves_used_event_once_to_the_last_entry(remote):
    ram = FakeRAM(remote=remote)
    vq, dev, _ = await make_vq(ram, 8, event_idx=True)
    tasks = [asyncio.create_task(vq.submit([], [(0x4008_0000 + 64 * i, 8)])) for i in range(5)]
    await settle()
    assert await complete_all(dev, vq, {})
    assert await wait(asyncio.gather(*tasks)) == [0] * 5
    assert dev.used_event() == 5 and vq.num_free == 8
    assert not await vq.interrupt()  # nothing new


async def test_room_waiters_are_woken_in_order_of_free_descriptors(remote):
    """More submitters than ring slots, completions one at a time: all finish, none lost."""
    ram = FakeRAM(remote=remote)
    vq, dev, _ = await make_vq(ram, 2)
    tasks = [asyncio.create_task(vq.submit([], [(0x4008_0000 + 64 * i, 8)])) for i in range(7)]
    for _ in range(20):
        await settle()
        if (item := dev.pop()) is not None:
            dev.push(item[0], 1)
            await vq.interrupt()
    assert await wait(asyncio.gather(*tasks)) == [1] * 7
    assert vq.num_free == 2 and vq.in_flight == 0


@pytest.mark.parametrize("steps", range(1, 14))
async def test_cancelled_at_any_point_releases_exactly_once_and_leaks_nothing(remote, steps):
    """Cancel a submit after ``steps`` loop turns (publishing on remote memory suspends at
    every access); whatever the device then returns, the buffers are released once, after the
    device is done with them, every descriptor comes back, and a published chain is kicked."""
    ram = FakeRAM(remote=remote)
    vq, dev, kicks = await make_vq(ram, 4, event_idx=True, indirect=True)
    released = []
    task = asyncio.create_task(
        vq.submit(
            [(0x4008_0000, 16)],
            [(0x4008_1000, 8), (0x4008_2000, 1)],
            release=lambda: released.append(dev.pending()),
        )
    )
    for _ in range(steps):
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait(task)
    assert released in ([], [0])
    await settle()
    assert kicks.count == (dev.pending() > 0)  # published: kicked, once
    while (item := dev.pop()) is not None:
        assert not released  # the device holds the buffers: not released yet
        dev.push(item[0], 1)
        await vq.interrupt()
    await settle()
    assert len(released) == 1 and vq.num_free == 4 and vq.in_flight == 0


async def test_a_gpa_beyond_64_bits_is_refused_before_anything_is_taken():
    ram = FakeRAM()
    vq, _, _ = await make_vq(ram, 4)
    with pytest.raises(ValueError, match="bad buffer"):
        await vq.add([(1 << 64, 4)], [], "huge")
    assert vq.num_free == 4 and vq.in_flight == 0


async def test_a_kick_cancelled_in_flight_is_sent_anyway():
    """The notify suspends (a full socket); cancelling the submitter must not lose the kick,
    or every chain published behind it waits for good."""
    ram = FakeRAM()
    gate = asyncio.Event()
    sent = []

    async def notify(vq: Virtqueue) -> None:
        await gate.wait()
        sent.append(vq.index)

    vq = await Virtqueue.create(0, 4, ram.memory, ram, notify=notify)
    task = asyncio.create_task(vq.submit([], [(0x4008_0000, 4)]))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait(task)
    assert not sent
    gate.set()
    await settle()
    assert sent == [0]
