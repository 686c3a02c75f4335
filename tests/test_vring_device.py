"""The device side of split virtqueues, on real rings built in test RAM (tests/ringbuilder.py)."""

from __future__ import annotations

import asyncio
import logging
import mmap

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ringbuilder import (
    NO_RING_FEATURES,
    RAM_GPA,
    GuestRam,
    MmioDriver,
    RecordingMemory,
    RingBuilder,
    make_device,
)

from viowire.device import Device
from viowire.server.virtqueue import (
    INDIRECT_MAX_ENTRIES,
    READABLE_PREFETCH_BYTES,
    RingError,
    SplitVirtqueue,
    StaleQueueError,
    vring_need_event,
)
from viowire.virtio.constants import (
    DESC_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Feature,
    Interrupt,
    Reg,
    Status,
)
from viowire.virtio.memory import GuestMemoryError, MappedGuestMemory
from viowire.virtio.ring import DESC

TIMEOUT = 2.0


class PatternBackend(Device):
    """Fills every writable byte with 0xAB; optionally waits on ``gate`` first."""

    device_id = 42
    handle_inline = True  # the transport's batching, as blk and rng use it
    num_queues = 2
    queue_num_max = 16

    def __init__(self) -> None:
        super().__init__()
        self.gate: asyncio.Event | None = None
        self.entered = asyncio.Event()
        self.chains = []
        self.fail: Exception | None = None
        self.report: int | None = None

    def device_features(self, version: int) -> int:
        return 0

    async def handle(self, queue, chain, memory) -> int:
        self.chains.append(chain)
        self.entered.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.fail is not None:
            raise self.fail
        await memory.writev([(gpa, b"\xab" * length) for gpa, length in chain.writable])
        return chain.writable_len if self.report is None else self.report


def queue_on(ring: RingBuilder, *, indirect: bool = True, event_idx: bool = False):
    return ring.device_queue(indirect=indirect, event_idx=event_idx)


@pytest.fixture
def ram() -> GuestRam:
    return GuestRam()


# -- SplitVirtqueue on its own ------------------------------------------------------------------
@pytest.mark.asyncio
async def test_pop_simple_chain_then_none(ram):
    ring = RingBuilder(ram, 8)
    queue = queue_on(ring)
    sent = ring.add_chain([b"hello", b"world!"], [16, 1])
    chain = await queue.pop(ram.memory)
    assert chain.head == sent.head
    assert chain.readable == sent.readable and chain.writable == sent.writable
    assert chain.readable_len == 11 and chain.writable_len == 17
    assert await queue.pop(ram.memory) is None
    assert queue.last_avail_idx == 1


@pytest.mark.asyncio
async def test_push_writes_element_before_index(ram):
    ring = RingBuilder(ram, 8)
    memory = RecordingMemory(ram)
    queue = queue_on(ring)
    await queue.push(memory, 5, 77)
    assert memory.ops == [("writev", ring.used + 4), ("write_u16", ring.used + 2)]
    assert ring.used_idx == 1 and ring.used_elem(0) == (5, 77)


@pytest.mark.asyncio
async def test_push_many_wraps_in_two_segments(ram):
    ring = RingBuilder(ram, 4)
    memory = RecordingMemory(ram)
    queue = queue_on(ring)
    queue.used_idx = 3
    await queue.push_many(memory, [(0, 1), (1, 2), (2, 3)])
    assert memory.ops[0] == ("writev", ring.used + 4 + 8 * 3, ring.used + 4)
    assert [ring.used_elem(i) for i in (3, 4, 5)] == [(0, 1), (1, 2), (2, 3)]
    assert ring.used_idx == 6


@pytest.mark.asyncio
@pytest.mark.parametrize("indirect_from", [0, 1, 2])
async def test_indirect_tables_are_flattened(ram, indirect_from):
    """Zero or more direct descriptors followed by one indirect one (§2.7.5.3.2)."""
    ring = RingBuilder(ram, 8)
    queue = queue_on(ring)
    sent = ring.add_chain([b"h" * 16, b"d" * 512], [512, 1], indirect_from=indirect_from)
    chain = await queue.pop(ram.memory)
    assert (chain.head, chain.readable, chain.writable) == (sent.head, sent.readable, sent.writable)


@pytest.mark.asyncio
async def test_indirect_without_feature_is_an_error(ram):
    ring = RingBuilder(ram, 8)
    queue = queue_on(ring, indirect=False)
    ring.add_chain([b"x"], [1], indirect_from=0)
    with pytest.raises(RingError, match="INDIRECT_DESC"):
        await queue.pop(ram.memory)


@pytest.mark.asyncio
async def test_good_chains_before_a_bad_one_are_returned_first(ram):
    ring = RingBuilder(ram, 8)
    queue = queue_on(ring)
    first = ring.add_chain([b"a"], [1])
    ring.publish(8)  # head out of range
    assert (await queue.pop(ram.memory)).head == first.head
    with pytest.raises(RingError, match="Guest says index 8 is available"):
        await queue.pop(ram.memory)


@pytest.mark.asyncio
async def test_a_batch_costs_three_round_trips(ram):
    """avail.idx, the ring and the descriptor table in one readv, then all indirect tables in
    one, then the readable bytes of every chain in one: the devices need not read them again."""
    ring = RingBuilder(ram, 16)
    memory = RecordingMemory(ram)
    queue = queue_on(ring)
    for i in range(8):
        ring.add_chain([b"h" * 8, bytes([i]) * 8], [64, 1], indirect_from=0)
    chains = [await queue.pop(memory) for _ in range(8)]
    assert [c.head for c in chains] == list(range(8))
    assert [c.readable_data for c in chains] == [b"h" * 8 + bytes([i]) * 8 for i in range(8)]
    assert memory.round_trips == 3
    assert not queue.has_cached
    assert await queue.pop(memory) is None
    assert memory.round_trips == 4


@pytest.mark.asyncio
async def test_readable_prefetch_is_capped_and_shared_memory_reads_in_place(ram):
    ram = GuestRam(1 << 20)
    ring = RingBuilder(ram, 8)
    big = READABLE_PREFETCH_BYTES // 2 - 8  # two fit, the third does not
    sent = [ring.add_chain([bytes([i]) * big], [1]) for i in range(3)]
    sent.append(ring.add_chain([b"t" * 8], [1]))  # a small one after it still fits
    queue = queue_on(ring)
    chains = [await queue.pop(RecordingMemory(ram)) for _ in range(4)]
    assert [c.head for c in chains] == [c.head for c in sent]
    assert [c.readable_data for c in chains] == [b"\0" * big, b"\1" * big, None, b"t" * 8]
    queue = queue_on(ring)
    assert [(await queue.pop(ram.memory)).readable_data for _ in range(4)] == [None] * 4


@pytest.mark.asyncio
async def test_a_failed_readable_prefetch_leaves_the_reads_to_the_device(ram):
    class FailingFourthRead(RecordingMemory):
        async def readv(self, ranges):
            if sum(op[0] == "readv" for op in self.ops) == 2:  # ring+table, indirect, this
                self.ops.append(("readv", "failed"))
                raise GuestMemoryError("the client answered with an error")
            return await super().readv(ranges)

    ring = RingBuilder(ram, 8)
    ring.add_chain([b"h" * 16], [1], indirect_from=0)
    queue = queue_on(ring)
    chain = await queue.pop(FailingFourthRead(ram))
    assert chain.readable_data is None and chain.readable_len == 16


@pytest.mark.asyncio
async def test_event_idx_pop_publishes_avail_event(ram):
    ring = RingBuilder(ram, 8)
    queue = queue_on(ring, event_idx=True)
    for _ in range(3):
        ring.add_chain([b"a"], [1])
    for _ in range(3):
        await queue.pop(ram.memory)
    assert await queue.pop(ram.memory) is None
    assert ring.avail_event == 3 == queue.last_avail_idx


@pytest.mark.asyncio
async def test_indices_wrap_past_65535(ram):
    ring = RingBuilder(ram, 4)
    queue = queue_on(ring)
    queue.last_avail_idx = queue.used_idx = 65534
    ring.avail_idx = 65534
    sent = [ring.add_chain([], [2]) for _ in range(4)]  # one descriptor each: all 4 fit
    assert ring.avail_idx == 2
    heads = [(await queue.pop(ram.memory)).head for _ in range(4)]
    assert heads == [c.head for c in sent]
    await queue.push_many(ram.memory, [(h, 2) for h in heads])
    assert queue.last_avail_idx == 2 and ring.used_idx == 2
    assert [ring.used_elem(i)[0] for i in (65534, 65535, 0, 1)] == heads


@pytest.mark.asyncio
async def test_reset_while_reading_abandons_the_pop(ram):
    ring = RingBuilder(ram, 8)
    queue = queue_on(ring)
    ring.add_chain([b"a"], [1])

    class ResettingMemory(RecordingMemory):
        async def readv(self, ranges):
            queue.reset()
            return await super().readv(ranges)

    with pytest.raises(StaleQueueError):
        await queue.pop(ResettingMemory(ram))
    assert queue.last_avail_idx == 0 and not queue.has_cached


def crosses(event: int, new: int, old: int) -> bool:
    """By definition: the used entry with index ``event`` is among those just published."""
    return any((old + k) & 0xFFFF == event for k in range((new - old) & 0xFFFF))


@given(st.integers(0, 0xFFFF), st.integers(0, 0xFFFF), st.integers(0, 64))
def test_vring_need_event_is_the_crossing_test(event, old, moved):
    new = (old + moved) & 0xFFFF
    assert vring_need_event(event, new, old) == crosses(event, new, old)


def test_vring_need_event_wraparound_examples():
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # 0xFFFE -> 1 publishes entry 0xFFFF
    assert vring_need_event(0, 1, 0xFFFF)
    assert not vring_need_event(2, 1, 0xFFFE)
    assert not vring_need_event(0xFFFD, 1, 0xFFFE)


def test_legacy_layout_matches_linux_vring_size():
    queue = SplitVirtqueue(0, 1024)
    for num, avail_off, used_off in ((128, 2048, 4096), (256, 4096, 8192), (1024, 16384, 20480)):
        queue.num = num
        queue.set_legacy_pfn(0x10, 4096, 4096)
        base = 0x10 * 4096
        assert (queue.desc_addr, queue.avail_addr, queue.used_addr) == (
            base,
            base + avail_off,
            base + used_off,
        )
    queue.num = 4  # QueueAlign 4: the used_event slot counts (QEMU's formula differs here)
    queue.set_legacy_pfn(1, 4096, 4)
    assert queue.used_addr == 4096 + 64 + 4 + 8 + 2 + 2


@pytest.mark.parametrize(
    "change, message",
    [
        (dict(num=6), "power of 2"),
        (dict(num=32), "power of 2"),
        (dict(desc_addr=0x1008), "aligned"),
        (dict(used_addr=0x1002), "aligned"),
        (dict(avail_addr=0x4010_0000 - 8), "Cannot map avail"),
        (dict(desc_addr=0), "Cannot map desc"),
    ],
)
def test_check_layout(ram, change, message):
    queue = queue_on(RingBuilder(ram, 16))
    queue.check_layout(ram.memory)
    for name, value in change.items():
        setattr(queue, name, value)
    with pytest.raises(RingError, match=message):
        queue.check_layout(ram.memory)


# -- the device engine ------------------------------------------------------------------------
def up(version=2, drop=0, num=8, ram=None):
    ram = ram or GuestRam()
    backend = PatternBackend()
    device = make_device(backend, version, ram)
    rings = [
        RingBuilder.legacy(ram, num) if version == 1 else RingBuilder(ram, num)
        for _ in range(backend.num_queues)
    ]
    driver = MmioDriver(device)
    driver.bring_up(rings, drop=drop)
    return device, driver, rings[0], backend


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [1, 2])
async def test_notify_processes_and_interrupts(version):
    device, driver, ring, _backend = up(version)
    sent = ring.add_chain([b"req"], [8])
    await driver.kick()
    assert ring.used_idx == 1 and ring.used_elem(0) == (sent.head, 8)
    assert ring.ram.read(sent.writable[0][0], 8) == b"\xab" * 8
    assert device.interrupt_status == Interrupt.VRING and device.irqs == [True]
    ring.add_chain([b"req"], [8])
    await driver.kick()  # line already high: no second edge
    assert device.irqs == [True]
    driver.write(Reg.INTERRUPT_ACK, Interrupt.VRING)
    assert device.interrupt_status == 0 and device.irqs == [True, False]


@pytest.mark.asyncio
async def test_one_notify_serves_a_batch_with_one_interrupt():
    device, driver, ring, _ = up(num=16)
    for _ in range(5):
        ring.add_chain([b"r"], [4])
    await driver.kick()
    assert ring.used_idx == 5 and device.irqs == [True]


@pytest.mark.asyncio
async def test_event_idx_suppresses_until_used_event_is_crossed():
    device, driver, ring, _ = up()
    assert device.negotiated_features >> Feature.RING_EVENT_IDX & 1
    ring.set_used_event(10)  # far ahead: only the first notification (after reset) comes
    ring.add_chain([b"r"], [4])
    await driver.kick()
    assert device.irqs == [True]
    driver.write(Reg.INTERRUPT_ACK, 1)
    ring.add_chain([b"r"], [4])
    await driver.kick()
    assert device.irqs == [True, False] and ring.used_idx == 2
    assert ring.avail_event == 2  # kick me at the next buffer
    ring.set_used_event(2)  # "interrupt me when entry 2 is used"
    ring.add_chain([b"r"], [4])
    await driver.kick()
    assert device.irqs == [True, False, True]


@pytest.mark.asyncio
async def test_event_idx_crossing_wraps_past_65535():
    device, driver, ring, _ = up()
    queue = device.queues[0]
    queue.last_avail_idx = queue.used_idx = 65533
    ring.avail_idx = 65533
    ring.add_chain([b"r"], [4])
    await driver.kick()  # first after reset: unconditional; used 65533 -> 65534
    driver.write(Reg.INTERRUPT_ACK, 1)
    ring.set_used_event(3)
    for _ in range(3):
        ring.add_chain([b"r"], [4])
    await driver.kick()  # 65534 -> 1 does not publish entry 3
    assert ring.used_idx == 1 and device.interrupt_status == 0
    ring.set_used_event(0xFFFF)
    ring.add_chain([b"r"], [4])
    await driver.kick()  # 1 -> 2 does not publish 0xFFFF either
    assert device.interrupt_status == 0
    ring.set_used_event(2)
    for _ in range(2):
        ring.add_chain([b"r"], [4])
    await driver.kick()  # 2 -> 4 publishes entry 2
    assert device.interrupt_status == Interrupt.VRING


@pytest.mark.asyncio
async def test_no_interrupt_flag_without_event_idx():
    device, driver, ring, _ = up(drop=NO_RING_FEATURES)
    ring.set_avail_flags(VIRTQ_AVAIL_F_NO_INTERRUPT)
    ring.add_chain([b"r"], [4])
    await driver.kick()
    assert ring.used_idx == 1 and device.irqs == []
    ring.set_avail_flags(0)
    ring.add_chain([b"r"], [4])
    await driver.kick()
    assert device.irqs == [True]


@pytest.mark.asyncio
async def test_order_data_then_used_element_then_index_then_interrupt():
    ram = GuestRam()
    memory = RecordingMemory(ram)
    device, driver, ring, _ = up(ram=ram)
    device.memory = memory
    device.on_irq = lambda level: memory.ops.append(("irq", level))
    sent = ring.add_chain([b"r"], [4])
    await driver.kick()
    writes = [op for op in memory.ops if op[0] in ("writev", "write_u16", "irq")]
    used_writes = [w for w in writes if w[0] != "irq" and ring.used <= w[1] < ring.used + 4 + 8 * 8]
    assert writes.index(("writev", sent.writable[0][0])) < writes.index(used_writes[0])
    assert used_writes[:2] == [("writev", ring.used + 4), ("write_u16", ring.used + 2)]
    assert writes.index(("write_u16", ring.used + 2)) < writes.index(("irq", True))


@pytest.mark.asyncio
async def test_batch_round_trips_with_indirect_and_event_idx():
    ram = GuestRam()
    memory = RecordingMemory(ram)
    device, driver, ring, _ = up(ram=ram)
    device.memory = memory
    for _ in range(8):
        ring.add_chain([b"h" * 16], [64, 1], indirect_from=0)
    await driver.kick()
    assert ring.used_idx == 8
    # avail.idx with ring+table, indirect tables, readable bytes, used_event, final avail.idx:
    # 5 for 8 requests
    assert memory.round_trips == 5


@pytest.mark.asyncio
async def test_notify_while_running_is_not_lost():
    device, driver, ring, backend = up()
    backend.gate = asyncio.Event()
    ring.add_chain([b"a"], [1])
    driver.notify()
    await asyncio.wait_for(backend.entered.wait(), TIMEOUT)
    ring.add_chain([b"b"], [1])
    driver.notify()
    backend.gate.set()
    await asyncio.wait_for(device.drain(), TIMEOUT)
    assert ring.used_idx == 2 and len(backend.chains) == 2


@pytest.mark.asyncio
@pytest.mark.parametrize("how", ["reset", "queue_ready_0"])
async def test_reset_during_a_request_writes_nothing_afterwards(how, caplog):
    device, driver, ring, backend = up()
    backend.gate = asyncio.Event()
    sent = ring.add_chain([b"a"], [4])
    driver.notify()
    await asyncio.wait_for(backend.entered.wait(), TIMEOUT)
    if how == "reset":
        driver.write(Reg.STATUS, 0)
    else:
        driver.write(Reg.QUEUE_SEL, 0)
        driver.write(Reg.QUEUE_READY, 0)
        assert driver.read(Reg.QUEUE_READY) == 0
    backend.gate.set()
    await asyncio.wait_for(device.drain(), TIMEOUT)
    assert ring.used_idx == 0
    assert ring.ram.read(sent.writable[0][0], 4) == b"\xee" * 4
    assert not device.broken and not device.status & Status.DEVICE_NEEDS_RESET
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


@pytest.mark.asyncio
async def test_modern_notify_before_driver_ok_is_ignored(caplog):
    ram = GuestRam()
    device = make_device(PatternBackend(), 2, ram)
    ring = RingBuilder(ram, 8)
    driver = MmioDriver(device)
    driver.negotiate()
    driver.setup_queue(0, ring)
    ring.add_chain([b"a"], [1])
    driver.notify()
    await asyncio.wait_for(device.drain(), TIMEOUT)
    assert ring.used_idx == 0
    assert "before DRIVER_OK" in caplog.text


@pytest.mark.asyncio
async def test_legacy_kick_before_driver_ok_is_served():
    ram = GuestRam()
    device = make_device(PatternBackend(), 1, ram)
    ring = RingBuilder.legacy(ram, 8)
    driver = MmioDriver(device)
    driver.negotiate()
    driver.setup_queue(0, ring)
    ring.add_chain([b"a"], [1])
    await driver.kick()
    assert ring.used_idx == 1


@pytest.mark.asyncio
async def test_notify_value_is_masked_and_bad_queues_ignored(caplog):
    device, driver, ring, _ = up()
    ring.add_chain([b"a"], [1])
    driver.write(Reg.QUEUE_NOTIFY, 7)  # no queue 7
    driver.write(Reg.QUEUE_NOTIFY, 0xABCD_0000)  # notification data bits above the index
    await asyncio.wait_for(device.drain(), TIMEOUT)
    assert ring.used_idx == 1
    assert "queue 7, which does not exist" in caplog.text


@pytest.mark.asyncio
async def test_backend_over_reporting_is_clamped():
    _device, driver, ring, backend = up()
    backend.report = 1000
    ring.add_chain([b"a"], [4])
    await driver.kick()
    assert ring.used_elem(0)[1] == 4


# -- malformed rings ----------------------------------------------------------------------------
def _loop(ring):
    a, b = ring.buffers([b"x", b"y"], [])[:2]
    ring.set_desc(0, a[0], 1, VIRTQ_DESC_F_NEXT, 1)
    ring.set_desc(1, b[0], 1, VIRTQ_DESC_F_NEXT, 0)
    ring.publish(0)


def _desc(flags=0, length=4, next=0, addr=None):
    def build(ring):
        gpa = ring.buffers([b"x" * 4], [])[0][0] if addr is None else addr(ring)
        ring.set_desc(0, gpa, length, flags, next)
        ring.set_desc(1, gpa, 4, VIRTQ_DESC_F_WRITE)
        ring.publish(0)

    return build


def _indirect(entries, length=None, flags=VIRTQ_DESC_F_INDIRECT):
    """An indirect descriptor whose table holds ``entries(ring, gpa)`` raw descriptors."""

    def build(ring):
        gpa = ring.buffers([b"x" * 4], [])[0][0]
        table = ring.ram.alloc(DESC_SIZE * 4)
        for i, desc in enumerate(entries(ring, gpa)):
            ring.ram.write(table + DESC_SIZE * i, desc)
        ring.set_desc(0, table, DESC_SIZE * 2 if length is None else length, flags)
        ring.publish(0)

    return build


def _writable_then_readable(ring):
    gpa = ring.buffers([b"x" * 4], [])[0][0]
    ring.set_desc(0, gpa, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1)
    ring.set_desc(1, gpa, 4, 0)
    ring.publish(0)


def _raw(addr, length, flags=0, next=0):
    return DESC.pack(addr, length, flags, next)


MALFORMED = {
    "loop": (_loop, "Looped descriptor"),
    "next out of range": (_desc(VIRTQ_DESC_F_NEXT, next=8), "Desc next is 8"),
    "head out of range": (lambda r: r.publish(8), "Guest says index 8 is available"),
    "avail idx jump": (lambda r: setattr(r, "avail_idx", 9), "Guest moved used index from 0 to 9"),
    "zero length": (_desc(length=0), "zero sized buffers"),
    "readable after writable": (_writable_then_readable, "Incorrect order"),
    "readable after writable, outside memory": (
        lambda r: (
            r.set_desc(0, r.ram.gpa, 4, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 1),
            r.set_desc(1, r.ram.end, 4),
            r.publish(0),
        ),
        "Incorrect order",
    ),
    "address outside memory": (_desc(addr=lambda r: r.ram.end - 2), "bogus descriptor"),
    "huge length": (_desc(length=0xFFFF_FFFF), "bogus descriptor"),
    "nested indirect": (
        _indirect(lambda r, g: [_raw(g, 16, VIRTQ_DESC_F_INDIRECT)], DESC_SIZE),
        "Nested indirect",
    ),
    "indirect len not multiple of 16": (_indirect(lambda r, g: [], 24), "Invalid size"),
    "indirect len 0": (_indirect(lambda r, g: [], 0), "Invalid size"),
    "indirect huge": (_indirect(lambda r, g: [], 0xFFFF_FFF0), "too big"),
    "indirect one entry too many": (
        _indirect(lambda r, g: [], DESC_SIZE * (INDIRECT_MAX_ENTRIES + 1)),  # inside 1 MiB
        "too big",
    ),
    "indirect with next": (
        _indirect(lambda r, g: [], flags=VIRTQ_DESC_F_INDIRECT | VIRTQ_DESC_F_NEXT),
        "NEXT",
    ),
    "indirect loop": (
        _indirect(
            lambda r, g: [_raw(g, 4, VIRTQ_DESC_F_NEXT, 1), _raw(g, 4, VIRTQ_DESC_F_NEXT, 0)]
        ),
        "Looped descriptor",
    ),
    "indirect next out of range": (
        _indirect(lambda r, g: [_raw(g, 4, VIRTQ_DESC_F_NEXT, 2), _raw(g, 4)]),
        "Desc next is 2",
    ),
    "indirect buffer outside memory": (
        _indirect(lambda r, g: [_raw(r.ram.end, 4), _raw(g, 4)], DESC_SIZE),
        "bogus descriptor",
    ),
}


@pytest.mark.asyncio
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_ring_needs_reset(case, version, caplog):
    build, message = MALFORMED[case]
    device, driver, ring, backend = up(version)
    build(ring)
    await driver.kick()
    assert device.status & Status.DEVICE_NEEDS_RESET and device.broken
    assert ring.used_idx == 0 and backend.chains == []
    errors = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert len(errors) == 1 and message in errors[0].getMessage()
    # a modern driver hears about it through a configuration change notification
    expected = Interrupt.CONFIG if version == 2 else 0
    assert device.interrupt_status == expected
    driver.notify()  # ignored, silently, until reset
    await asyncio.wait_for(device.drain(), TIMEOUT)
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 1
    driver.write(Reg.STATUS, 0)
    assert device.status == 0 and not device.broken and device.interrupt_status == 0


@pytest.mark.asyncio
async def test_errors_after_good_chains_publish_the_good_ones():
    device, driver, ring, _backend = up()
    ring.add_chain([b"a"], [1])
    ring.publish(9)
    await driver.kick()
    assert ring.used_idx == 1 and device.broken


@pytest.mark.asyncio
@pytest.mark.parametrize("error", [RuntimeError("bug"), MemoryError()])
async def test_backend_exception_breaks_the_device_not_the_server(error, caplog):
    device, driver, ring, backend = up()
    backend.fail = error
    ring.add_chain([b"a"], [1])
    await driver.kick()
    assert device.status & Status.DEVICE_NEEDS_RESET


@pytest.mark.asyncio
async def test_no_memory_registered_needs_reset():
    device, driver, ring, _ = up()
    device.memory = None
    ring.add_chain([b"a"], [1])
    await driver.kick()
    assert device.status & Status.DEVICE_NEEDS_RESET


@pytest.mark.asyncio
async def test_aclose_cancels_a_blocked_task():
    device, driver, ring, backend = up()
    backend.gate = asyncio.Event()
    ring.add_chain([b"a"], [1])
    driver.notify()
    await asyncio.wait_for(backend.entered.wait(), TIMEOUT)
    await asyncio.wait_for(device.aclose(), TIMEOUT)
    assert ring.used_idx == 0


# -- fuzzing the ring walker --------------------------------------------------------------------
FUZZ_RAM = 0x1_0000
FUZZ_NUM = 8


def _fuzz_descriptor():
    """Mostly plausible descriptors, so that walks get deep before something is wrong."""
    inside = st.integers(RAM_GPA, RAM_GPA + FUZZ_RAM - 64)
    return st.tuples(
        st.one_of(inside, st.integers(0, (1 << 64) - 1)),  # addr
        st.one_of(st.integers(1, 64), st.sampled_from([0, 16, 24, 48, 0xFFFF_FFFF])),  # len
        st.sampled_from([0, 1, 2, 3, 1, 3, 4, 5, 6, 7]),  # NEXT, WRITE, INDIRECT
        st.one_of(st.integers(0, FUZZ_NUM - 1), st.integers(0, FUZZ_NUM + 1)),  # next
    ).map(lambda d: DESC.pack(*d))


def _sometimes_bad(good_max: int, bad_max: int):
    return st.one_of(st.integers(0, good_max), st.integers(0, good_max), st.integers(0, bad_max))


@settings(max_examples=300, deadline=None)
@given(
    st.lists(_fuzz_descriptor(), min_size=FUZZ_NUM, max_size=FUZZ_NUM),
    st.lists(_sometimes_bad(FUZZ_NUM - 1, FUZZ_NUM + 2), min_size=FUZZ_NUM, max_size=FUZZ_NUM),
    st.integers(0, FUZZ_NUM),  # avail.idx (jumps past the size are tested above)
    st.binary(min_size=16, max_size=256),
)
def test_random_rings_never_hang_or_escape(table, slots, avail_idx, noise):
    """Random descriptor tables, ring slots and indices: pop terminates, raises only RingError,
    and every chain it returns is well formed and inside guest memory."""
    ram = GuestRam(FUZZ_RAM)
    # random bytes wherever random indirect tables may point
    ram.write(ram.gpa, (noise * (FUZZ_RAM // len(noise) + 1))[:FUZZ_RAM])
    ring = RingBuilder(ram, FUZZ_NUM)
    ram.write(ring.desc, b"".join(table))
    for i, head in enumerate(slots):
        ram.set_u16(ring.layout.avail_slot_addr(i), head)
    ring.avail_idx = avail_idx
    queue = queue_on(ring)

    async def drain() -> None:
        for _ in range(FUZZ_NUM + 1):
            try:
                chain = await queue.pop(ram.memory)
            except RingError:
                return
            if chain is None:
                return
            assert chain.head < FUZZ_NUM
            for gpa, length in chain.readable + chain.writable:
                assert length > 0
                ram.memory.check(gpa, length)
        raise AssertionError("more chains than the avail ring can hold")

    asyncio.run(asyncio.wait_for(drain(), TIMEOUT))


# -- shared memory in place against the general path --------------------------------------------
async def _drain_all(queue: SplitVirtqueue, memory) -> list:
    """Everything pop gives, in order: chains with the batch they came in, then the error."""
    out = []
    for _ in range(4 * FUZZ_NUM):
        try:
            chain = await queue.pop(memory)
        except RingError as exc:
            out.append(("error", type(exc).__name__, str(exc)))
            return out
        if chain is None:
            return out
        out.append((chain.head, chain.readable, chain.writable, queue.has_cached))
        out.append((chain.readable_len, chain.writable_len))
    raise AssertionError("more chains than the avail ring can hold")


ITABLE = RAM_GPA + 0x8000  # where the differential rings keep a structured indirect table


def _plausible_descriptor(entries: int):
    """Descriptors that mostly make valid chains (so walks get deep, share descriptors and run
    out of budget), with every kind of mistake now and then: ranges across the end of RAM,
    empty buffers, readable after writable, indirect tables of odd sizes, links out of range."""
    end = RAM_GPA + FUZZ_RAM
    addr = st.one_of(
        st.integers(RAM_GPA, RAM_GPA + 0x4000),
        st.integers(RAM_GPA, RAM_GPA + 0x4000),
        st.integers(end - 64, end + 8),
        st.integers(0, (1 << 64) - 1),
    )
    length = st.one_of(st.integers(1, 64), st.integers(1, 64), st.sampled_from([0, 0xFFFF_FFFF]))
    plain = st.tuples(
        addr,
        length,
        st.sampled_from([0, 1, 2, 3, 1, 3, 3, 6, 7]),  # NEXT, WRITE; INDIRECT now and then
        st.one_of(st.integers(0, entries - 1), st.integers(0, entries + 1)),
    )
    indirect = st.tuples(
        st.one_of(st.just(ITABLE), st.integers(end - 48, end + 16)),
        st.sampled_from([16, 32, 48, 64, 64, 0, 24, 16 * (INDIRECT_MAX_ENTRIES + 1)]),
        st.sampled_from([4, 4, 4, 5, 6]),
        st.integers(0, entries - 1),
    )
    return st.one_of(plain, plain, plain, indirect).map(lambda d: DESC.pack(*d))


@settings(max_examples=600, deadline=None)
@given(
    st.lists(_plausible_descriptor(FUZZ_NUM), min_size=FUZZ_NUM, max_size=FUZZ_NUM),
    st.lists(_plausible_descriptor(4), min_size=4, max_size=4),
    st.lists(_sometimes_bad(FUZZ_NUM - 1, FUZZ_NUM + 2), min_size=FUZZ_NUM, max_size=FUZZ_NUM),
    st.integers(0, FUZZ_NUM + 1),  # pending: one past the size included
    st.integers(0, 0xFFFF),  # last_avail_idx: pending slots may wrap around the ring
    st.booleans(),  # EVENT_IDX
    st.booleans(),  # INDIRECT_DESC
)
def test_shared_memory_pop_is_the_general_pop(
    table, itable, slots, pending, last, event_idx, indirect
):
    """A plain MappedGuestMemory is walked in place; any other GuestMemory (here one that logs
    its calls) through readv snapshots. Both must give the same chains, batches and errors and
    leave guest RAM the same."""
    results, rams = [], []
    for general in (False, True):
        ram = GuestRam(FUZZ_RAM)
        ring = RingBuilder(ram, FUZZ_NUM)
        ram.write(ring.desc, b"".join(table))
        ram.write(ITABLE, b"".join(itable))
        ring_slots = [slots[(last + k) % FUZZ_NUM] for k in range(FUZZ_NUM)]
        for i, head in enumerate(ring_slots):
            ram.set_u16(ring.layout.avail_slot_addr(i), head)
        ring.avail_idx = last + pending
        queue = queue_on(ring, indirect=indirect, event_idx=event_idx)
        queue.last_avail_idx = queue.used_idx = last
        memory = RecordingMemory(ram) if general else ram.memory
        results.append(asyncio.run(asyncio.wait_for(_drain_all(queue, memory), TIMEOUT)))
        results.append(queue.last_avail_idx)
        rams.append(bytes(ram.buffer))
    assert results[:2] == results[2:]
    assert rams[0] == rams[1]


@settings(max_examples=200, deadline=None)
@given(
    st.sampled_from([1, 2, 4, 8]),
    st.integers(0, 0xFFFF),
    st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**32 - 1)), max_size=12),
    st.booleans(),
)
def test_shared_memory_push_is_the_general_push(num, used_idx, used, event_idx):
    rams = []
    for general in (False, True):
        ram = GuestRam(1 << 14)
        ring = RingBuilder(ram, num)
        queue = queue_on(ring, event_idx=event_idx)
        queue.used_idx = used_idx
        memory = RecordingMemory(ram) if general else ram.memory

        async def push(queue=queue, memory=memory) -> tuple:
            await queue.push_many(memory, used)
            return queue.used_idx, await queue.needs_notification(memory, used_idx)

        rams.append((asyncio.run(push()), bytes(ram.buffer)))
    assert rams[0] == rams[1]


@pytest.mark.asyncio
async def test_a_kept_ring_error_does_not_pin_the_shared_mapping():
    """Views of guest memory die with the walk: the RingError kept for the next pop (and its
    traceback) must not stop the session from closing the mmap behind the memory."""
    mapping = mmap.mmap(-1, 1 << 16)
    memory = MappedGuestMemory()
    memory.add_region(RAM_GPA, mapping)
    ram = GuestRam(1 << 16)
    ram.memory = memory
    ram.buffer = mapping
    ring = RingBuilder(ram, 8)
    queue = queue_on(ring)
    ring.add_chain([], [1])  # descriptor 0
    table = ram.alloc(DESC_SIZE * 2, 16)
    ram.write(table, DESC.pack(RAM_GPA, 1, VIRTQ_DESC_F_INDIRECT, 0) * 2)
    ring.set_desc(1, table, DESC_SIZE * 2, VIRTQ_DESC_F_INDIRECT)
    ring.publish(1)
    assert (await queue.pop(memory)).head == 0
    with pytest.raises(RingError, match="Nested indirect") as info:
        await queue.pop(memory)
    await queue.push(memory, 0, 1)
    memory.close()
    mapping.close()  # BufferError if any view were still alive
    assert info.value is not None


@pytest.mark.asyncio
async def test_indirect_prefetch_cap_splits_batches_alike():
    """Eight chains with 64 KiB indirect tables: a refill takes heads until their tables add up
    to INDIRECT_PREFETCH_BYTES, in place or through snapshots alike."""
    entries = 4096
    batches = []
    for general in (False, True):
        ram = GuestRam(1 << 20)
        ring = RingBuilder(ram, 8)
        buffer = ram.alloc(1)
        table = b"".join(
            DESC.pack(
                buffer,
                1,
                VIRTQ_DESC_F_WRITE | (VIRTQ_DESC_F_NEXT if i + 1 < entries else 0),
                i + 1 if i + 1 < entries else 0,
            )
            for i in range(entries)
        )
        for head in range(8):
            gpa = ram.alloc(len(table), 16)
            ram.write(gpa, table)
            ring.set_desc(head, gpa, len(table), VIRTQ_DESC_F_INDIRECT)
            ring.publish(head)
        queue = queue_on(ring)
        memory = RecordingMemory(ram) if general else ram.memory
        seen = []
        while (chain := await queue.pop(memory)) is not None:
            seen.append((chain.head, chain.writable_len, queue.has_cached))
        batches.append(seen)
    assert batches[0] == batches[1]
    assert [cached for *_, cached in batches[0]].count(False) == 2  # two refills of four


@pytest.mark.asyncio
@pytest.mark.parametrize("heads, error", [((0,), None), ((0, 7), "Virtqueue size exceeded")])
async def test_descriptor_budget_boundary_alike(heads, error):
    """Chains that share descriptors: a batch may visit as many as the table holds, not one
    more, in place or through snapshots alike."""
    outcomes = []
    for general in (False, True):
        ram = GuestRam()
        ring = RingBuilder(ram, 8)
        buffer = ram.alloc(1)
        for i in range(8):
            ring.set_desc(i, buffer, 1, VIRTQ_DESC_F_NEXT if i < 7 else 0, i + 1 if i < 7 else 0)
        ring.publish(*heads)
        queue = queue_on(ring)
        outcomes.append(await _drain_all(queue, RecordingMemory(ram) if general else ram.memory))
    assert outcomes[0] == outcomes[1]
    assert (outcomes[0][-1][2] if error else None) == error


@pytest.mark.asyncio
@pytest.mark.parametrize("case", list(MALFORMED))
async def test_malformed_rings_alike_in_place_and_through_snapshots(case):
    build, message = MALFORMED[case]
    outcomes = []
    for general in (False, True):
        ram = GuestRam()
        ring = RingBuilder(ram, 8)
        build(ring)
        queue = queue_on(ring, indirect=True)
        outcomes.append(await _drain_all(queue, RecordingMemory(ram) if general else ram.memory))
    assert outcomes[0] == outcomes[1]
    assert message in outcomes[0][-1][2]
