"""A guest in this process, for unit tests of a device or of ring code (rust-vmm's mock.rs).

Three pieces, as rust-vmm virtio-queue's ``mock.rs`` has them: guest RAM (:class:`GuestRam`), a
split ring in it written by hand the way a driver writes one (:class:`RingBuilder`), and the
device side's real :class:`~viowire.server.virtqueue.SplitVirtqueue` programmed on that ring
(:meth:`RingBuilder.device_queue`). A device type's :meth:`~viowire.device.Device.handle` is
then tested with no server, socket or client::

    from viowire.virtio.mock import GuestRam, RingBuilder, serve

    ram = GuestRam()
    ring = RingBuilder(ram, 16)
    sent = ring.add_chain([header], [512, 1])  # readable bytes, writable lengths; published
    assert await serve(device, ring) == [(sent.head, 513)]  # pop, handle, used elements
    assert ring.used_elem(0) == (sent.head, 513)
    data = ram.read(*sent.writable[0])

Why no mock memory class: :class:`~viowire.virtio.memory.MappedGuestMemory` over an anonymous
mapping already is guest memory in this process. :class:`GuestRam` keeps it a plain
``MappedGuestMemory`` (the device side's in-place paths serve exactly that class, as on shared
memory) and adds what a test needs besides: a bump allocator and synchronous accessors.
"""

from __future__ import annotations

import mmap
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from viowire.server.virtqueue import SplitVirtqueue
from viowire.virtio.constants import PAGE_SIZE
from viowire.virtio.memory import MappedGuestMemory
from viowire.virtio.ring import (
    DESC,
    DESC_SIZE,
    USED_ELEM,
    USED_ELEM_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    RingLayout,
    Segment,
    align_up,
    area_sizes,
    chain_descriptors,
    pack_descriptors,
    vring_size,
)

if TYPE_CHECKING:
    from viowire.device import Device

RAM_GPA = 0x4000_0000
"""Where :class:`GuestRam` starts by default: not 0, so that an address taken for an offset (or
the reverse) does not pass unnoticed."""
POISON = 0xEE
"""What a writable buffer holds before the device writes it, so a test sees what was written."""


class GuestRam:
    """One region of guest RAM (an anonymous mapping: zero pages until touched) with a bump
    allocator for rings, tables and buffers.

    ``memory`` is what the device (or a driver) is given; ``buffer`` is the mapping behind it.
    ``free`` is a no-op, so it also serves the driver side as its ``Allocator``.
    """

    def __init__(self, size: int = 1 << 20, gpa: int = RAM_GPA) -> None:
        self.gpa = gpa
        self.size = size
        self.buffer = mmap.mmap(-1, size)
        self.memory = MappedGuestMemory()
        self.memory.add_region(gpa, self.buffer)
        self._next = gpa

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = align_up(self._next, align)
        if gpa + size > self.end:
            raise MemoryError(f"mock guest RAM exhausted allocating {size} bytes")
        self._next = gpa + size
        return gpa

    def free(self, gpa: int) -> None:
        """Nothing is reused: a test's RAM lives as long as the test."""

    def write(self, gpa: int, data: bytes) -> None:
        self.memory.write_sync(gpa, data)

    def read(self, gpa: int, length: int) -> bytes:
        return self.memory.read_sync(gpa, length)

    def u16(self, gpa: int) -> int:
        return self.memory.load_u16(gpa)

    def set_u16(self, gpa: int, value: int) -> None:
        self.memory.store_u16(gpa, value)


@dataclass
class Chain:
    """A chain the test published: its head and where each buffer lives."""

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)


class RingBuilder:
    """The driver's half of a split ring of ``num`` entries in :class:`GuestRam`.

    By default the three areas are allocated apart, as a modern driver may; :meth:`legacy`
    lays the Version 1 block. Any field may be written by hand (``set_desc``, ``publish``,
    ``avail_idx = ...``) to build the hostile shapes a device must refuse.
    """

    def __init__(
        self,
        ram: GuestRam,
        num: int,
        *,
        desc: int | None = None,
        avail: int | None = None,
        used: int | None = None,
    ) -> None:
        self.ram = ram
        self.num = num
        given = (desc, avail, used)
        addresses = [
            ram.alloc(size, align) if gpa is None else gpa
            for gpa, (size, align) in zip(given, area_sizes(num), strict=True)
        ]
        self.layout = RingLayout(num, *addresses)
        self.desc, self.avail, self.used = addresses  # the layout's, for short test lines
        self.pfn = 0
        self.queue: SplitVirtqueue | None = None
        """The device side's queue on this ring: the last one :meth:`device_queue` made."""
        self._next_desc = 0
        self._avail_idx = 0

    @classmethod
    def legacy(
        cls, ram: GuestRam, num: int, page_size: int = PAGE_SIZE, align: int = PAGE_SIZE
    ) -> RingBuilder:
        """The contiguous Version 1 layout at a page boundary (QueuePFN ``pfn``)."""
        base = ram.alloc(vring_size(num, align), page_size)
        layout = RingLayout.legacy(base, num, align)
        ring = cls(ram, num, desc=layout.desc, avail=layout.avail, used=layout.used)
        ring.pfn = base // page_size
        return ring

    def device_queue(
        self, index: int = 0, *, indirect: bool = True, event_idx: bool = False
    ) -> SplitVirtqueue:
        """The device side's queue on this ring, as the transport programs it (ready, and
        with the ring features given)."""
        queue = SplitVirtqueue(index, self.num)
        queue.desc_addr, queue.avail_addr, queue.used_addr = self.desc, self.avail, self.used
        queue.indirect, queue.event_idx = indirect, event_idx
        queue.ready = True
        self.queue = queue
        return queue

    # -- descriptors ----------------------------------------------------------------------------
    def set_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.ram.write(self.layout.desc_addr(index), DESC.pack(addr, length, flags, next))

    def buffers(self, readable: Sequence[bytes], writable: Sequence[int]) -> list[Segment]:
        """Allocate and fill buffers: ``(gpa, len, device_writable)`` in chain order; writable
        ones hold :data:`POISON`."""
        out = []
        for data in readable:
            gpa = self.ram.alloc(len(data))
            self.ram.write(gpa, data)
            out.append((gpa, len(data), False))
        for length in writable:
            gpa = self.ram.alloc(length)
            self.ram.write(gpa, bytes([POISON]) * length)
            out.append((gpa, length, True))
        return out

    def add_chain(
        self,
        readable: Sequence[bytes] = (),
        writable: Sequence[int] = (),
        *,
        indirect_from: int | None = None,
        publish: bool = True,
    ) -> Chain:
        """Build a chain of fresh buffers (``readable`` contents, then ``writable`` lengths) in
        the next free descriptors; segments from ``indirect_from`` on go into an indirect table
        that the last direct descriptor points to. Published unless ``publish`` is False."""
        segments = self.buffers(readable, writable)
        direct = segments if indirect_from is None else segments[:indirect_from]
        ids = [self._take_desc() for _ in range(len(direct) + (indirect_from is not None))]
        if indirect_from is None:
            descs = chain_descriptors(segments, ids)
        else:  # the table's descriptor ends the direct part
            table = self.indirect_table(segments[indirect_from:])
            length = DESC_SIZE * (len(segments) - indirect_from)
            descs = chain_descriptors([*direct, (table, length, False)], ids)
            descs[-1] = (table, length, VIRTQ_DESC_F_INDIRECT, 0)
        for index, desc in zip(ids, descs, strict=True):
            self.set_desc(index, *desc)
        chain = Chain(
            ids[0],
            [(g, n) for g, n, w in segments if not w],
            [(g, n) for g, n, w in segments if w],
        )
        if publish:
            self.publish(chain.head)
        return chain

    def indirect_table(self, segments: Sequence[Segment]) -> int:
        """Write an indirect table whose entries chain 0 → 1 → … and return its address."""
        descs = chain_descriptors(list(segments), list(range(len(segments))))
        table = self.ram.alloc(DESC_SIZE * len(descs), 16)
        self.ram.write(table, pack_descriptors(descs))
        return table

    def _take_desc(self) -> int:
        index = self._next_desc
        self._next_desc = (self._next_desc + 1) % self.num
        return index

    # -- available ring -------------------------------------------------------------------------
    def publish(self, *heads: int) -> None:
        """Ring slots first, then avail.idx, as §2.7.13 orders it."""
        for head in heads:
            self.ram.set_u16(self.layout.avail_slot_addr(self._avail_idx), head)
            self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.ram.set_u16(self.layout.avail_idx, self._avail_idx)

    @property
    def avail_idx(self) -> int:
        return self._avail_idx

    @avail_idx.setter
    def avail_idx(self, value: int) -> None:
        self._avail_idx = value & 0xFFFF
        self.ram.set_u16(self.layout.avail_idx, self._avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.ram.set_u16(self.layout.avail_flags, flags)

    def set_used_event(self, value: int) -> None:
        self.ram.set_u16(self.layout.used_event, value & 0xFFFF)

    # -- used ring ------------------------------------------------------------------------------
    @property
    def used_idx(self) -> int:
        return self.ram.u16(self.layout.used_idx)

    @property
    def used_flags(self) -> int:
        return self.ram.u16(self.layout.used_flags)

    @property
    def avail_event(self) -> int:
        return self.ram.u16(self.layout.avail_event)

    def used_elem(self, idx: int) -> tuple[int, int]:
        """(id, len) of the used element with free-running index ``idx``."""
        return USED_ELEM.unpack(self.ram.read(self.layout.used_elem_addr(idx), USED_ELEM_SIZE))


async def serve(device: Device, ring: RingBuilder) -> list[tuple[int, int]]:
    """Serve every chain available on ``ring`` through ``device.handle``, as the transport's
    request/response path does: pop, hand the chain over (``chain.memory`` set), then publish
    the used elements. Returns ``[(head, written)]`` in the order served.

    The device side's queue is ``ring.queue`` (made by :meth:`RingBuilder.device_queue` on
    first use, with INDIRECT_DESC and without EVENT_IDX; call it first for others). A
    ``written`` outside the chain's writable part is a device bug: the transport would log it
    and trim used.len; here it raises ValueError so that the test sees it.
    """
    queue = ring.queue or ring.device_queue()
    memory = ring.ram.memory
    used = []
    while (chain := await queue.pop(memory)) is not None:
        chain.memory = memory
        written = await device.handle(queue.index, chain, memory)
        if not 0 <= written <= chain.writable_len:
            raise ValueError(
                f"{type(device).__name__}.handle() returned {written} for chain {chain.head} "
                f"with {chain.writable_len} writable bytes"
            )
        used.append((chain.head, written))
    await queue.push_many(memory, used)
    return used


__all__ = ["POISON", "RAM_GPA", "Chain", "GuestRam", "RingBuilder", "serve"]
