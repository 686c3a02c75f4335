"""The driver's half of a split virtqueue, built in a MappedGuestMemory, for testing the device.

Like rust-vmm virtio-queue's ``mock.rs``: real descriptor tables, available rings and indirect
tables in (fake) guest RAM, written the way a driver writes them, so device code is tested without
a VMM. Also a tiny driver (:class:`MmioDriver`) that brings an :class:`MmioDevice` up through its
registers the way Linux does.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from dataclasses import dataclass, field

from viowire.server.mmio import MmioDevice
from viowire.server.virtqueue import align_up
from viowire.virtio.constants import (
    DESC_SIZE,
    PAGE_SIZE,
    USED_ELEM_SIZE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    Feature,
    Reg,
    Status,
)
from viowire.virtio.memory import MappedGuestMemory

RAM_GPA = 0x4000_0000  # not 0, so that an address/offset mix-up cannot pass unnoticed
_DESC = struct.Struct("<QIHH")


class GuestRam:
    """One region of guest RAM with a bump allocator for rings, tables and buffers."""

    def __init__(self, size: int = 1 << 20, gpa: int = RAM_GPA) -> None:
        self.gpa = gpa
        self.size = size
        self.buffer = bytearray(size)
        self.memory = MappedGuestMemory()
        self.memory.add_region(gpa, self.buffer)
        self._next = gpa

    @property
    def end(self) -> int:
        return self.gpa + self.size

    def alloc(self, size: int, align: int = 16) -> int:
        gpa = align_up(self._next, align)
        if gpa + size > self.end:
            raise MemoryError(f"test RAM exhausted allocating {size} bytes")
        self._next = gpa + size
        return gpa

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
    """A split ring of ``num`` entries as a driver lays it out and fills it."""

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
        self.desc = ram.alloc(DESC_SIZE * num, 16) if desc is None else desc
        self.avail = ram.alloc(6 + 2 * num, 2) if avail is None else avail
        self.used = ram.alloc(6 + USED_ELEM_SIZE * num, 4) if used is None else used
        self.pfn = 0
        self._next_desc = 0
        self._avail_idx = 0

    @classmethod
    def legacy(
        cls, ram: GuestRam, num: int, page_size: int = PAGE_SIZE, align: int = PAGE_SIZE
    ) -> RingBuilder:
        """The contiguous Version 1 layout at a page boundary (reference §4.3)."""
        size = align_up(DESC_SIZE * num + 2 * (3 + num), align) + 6 + USED_ELEM_SIZE * num
        base = ram.alloc(size, page_size)
        avail = base + DESC_SIZE * num
        used = align_up(avail + 4 + 2 * num + 2, align)
        ring = cls(ram, num, desc=base, avail=avail, used=used)
        ring.pfn = base // page_size
        return ring

    # -- descriptors ----------------------------------------------------------------------------
    def set_desc(self, index: int, addr: int, length: int, flags: int = 0, next: int = 0) -> None:
        self.ram.write(self.desc + DESC_SIZE * index, _DESC.pack(addr, length, flags, next))

    def buffers(
        self, readable: Sequence[bytes], writable: Sequence[int]
    ) -> list[tuple[int, int, bool]]:
        """Allocate and fill buffers: ``(gpa, len, device_writable)`` in chain order."""
        out = []
        for data in readable:
            gpa = self.ram.alloc(len(data))
            self.ram.write(gpa, data)
            out.append((gpa, len(data), False))
        for length in writable:
            gpa = self.ram.alloc(length)
            self.ram.write(gpa, b"\xee" * length)  # poison: tests see what the device wrote
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
        """Build a chain of fresh buffers; segments from ``indirect_from`` on go into an
        indirect table that the last direct descriptor points to."""
        segments = self.buffers(readable, writable)
        direct = segments if indirect_from is None else segments[:indirect_from]
        indices = [self._take_desc() for _ in range(len(direct) + (indirect_from is not None))]
        for i, (gpa, length, is_writable) in enumerate(direct):
            flags = (VIRTQ_DESC_F_WRITE if is_writable else 0) | (
                VIRTQ_DESC_F_NEXT if i + 1 < len(indices) else 0
            )
            self.set_desc(
                indices[i], gpa, length, flags, indices[i + 1] if i + 1 < len(indices) else 0
            )
        if indirect_from is not None:
            table = self.indirect_table(segments[indirect_from:])
            self.set_desc(
                indices[-1],
                table,
                DESC_SIZE * (len(segments) - indirect_from),
                VIRTQ_DESC_F_INDIRECT,
            )
        chain = Chain(
            indices[0],
            [(g, n) for g, n, w in segments if not w],
            [(g, n) for g, n, w in segments if w],
        )
        if publish:
            self.publish(chain.head)
        return chain

    def indirect_table(self, segments: list[tuple[int, int, bool]]) -> int:
        """Write an indirect table whose entries chain 0 → 1 → … and return its address."""
        table = self.ram.alloc(DESC_SIZE * len(segments), 16)
        for i, (gpa, length, is_writable) in enumerate(segments):
            last = i + 1 == len(segments)
            flags = (VIRTQ_DESC_F_WRITE if is_writable else 0) | (0 if last else VIRTQ_DESC_F_NEXT)
            self.ram.write(
                table + DESC_SIZE * i, _DESC.pack(gpa, length, flags, 0 if last else i + 1)
            )
        return table

    def _take_desc(self) -> int:
        index = self._next_desc
        self._next_desc = (self._next_desc + 1) % self.num
        return index

    # -- available ring -------------------------------------------------------------------------
    def publish(self, *heads: int) -> None:
        """Ring slots first, then avail.idx, as §2.7.13 orders it."""
        for head in heads:
            self.ram.set_u16(self.avail + 4 + 2 * (self._avail_idx % self.num), head)
            self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self.ram.set_u16(self.avail + 2, self._avail_idx)

    @property
    def avail_idx(self) -> int:
        return self._avail_idx

    @avail_idx.setter
    def avail_idx(self, value: int) -> None:
        self._avail_idx = value & 0xFFFF
        self.ram.set_u16(self.avail + 2, self._avail_idx)

    def set_avail_flags(self, flags: int) -> None:
        self.ram.set_u16(self.avail, flags)

    def set_used_event(self, value: int) -> None:
        self.ram.set_u16(self.avail + 4 + 2 * self.num, value & 0xFFFF)

    # -- used ring ------------------------------------------------------------------------------
    @property
    def used_idx(self) -> int:
        return self.ram.u16(self.used + 2)

    @property
    def avail_event(self) -> int:
        return self.ram.u16(self.used + 4 + USED_ELEM_SIZE * self.num)

    def used_elem(self, i: int) -> tuple[int, int]:
        """(id, len) of the used element with free-running index ``i``."""
        gpa = self.used + 4 + USED_ELEM_SIZE * (i % self.num)
        return struct.unpack("<II", self.ram.read(gpa, USED_ELEM_SIZE))


class MmioDriver:
    """Register-level driver steps, in Linux's order (reference §2.2, §7.2, §7.3)."""

    def __init__(self, device: MmioDevice) -> None:
        self.device = device

    def read(self, reg: int) -> int:
        return self.device.read(reg, 4)

    def write(self, reg: int, value: int) -> None:
        self.device.write(reg, 4, value)

    def add_status(self, bits: int) -> int:
        self.write(Reg.STATUS, self.read(Reg.STATUS) | bits)
        return self.read(Reg.STATUS)

    def device_features(self) -> int:
        self.write(Reg.DEVICE_FEATURES_SEL, 1)
        high = self.read(Reg.DEVICE_FEATURES)
        self.write(Reg.DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.read(Reg.DEVICE_FEATURES)

    def write_features(self, features: int) -> None:
        self.write(Reg.DRIVER_FEATURES_SEL, 1)
        self.write(Reg.DRIVER_FEATURES, features >> 32)
        self.write(Reg.DRIVER_FEATURES_SEL, 0)
        self.write(Reg.DRIVER_FEATURES, features & 0xFFFF_FFFF)

    def negotiate(self, features: int | None = None, drop: int = 0) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features (all offered unless given), FEATURES_OK (v2)."""
        self.write(Reg.STATUS, 0)
        self.add_status(Status.ACKNOWLEDGE)
        self.add_status(Status.DRIVER)
        if self.device.version == 1:
            self.write(Reg.GUEST_PAGE_SIZE, PAGE_SIZE)
        offered = self.device_features()
        accepted = (offered if features is None else features) & ~drop
        self.write_features(accepted)
        if self.device.version == 2:
            self.add_status(Status.FEATURES_OK)
        return accepted

    def setup_queue(self, index: int, ring: RingBuilder) -> None:
        self.write(Reg.QUEUE_SEL, index)
        self.write(Reg.QUEUE_NUM, ring.num)
        if self.device.version == 1:
            self.write(Reg.QUEUE_ALIGN, PAGE_SIZE)
            self.write(Reg.QUEUE_PFN, ring.pfn)
            return
        for reg, addr in (
            (Reg.QUEUE_DESC_LOW, ring.desc),
            (Reg.QUEUE_AVAIL_LOW, ring.avail),
            (Reg.QUEUE_USED_LOW, ring.used),
        ):
            self.write(reg, addr & 0xFFFF_FFFF)
            self.write(reg + 4, addr >> 32)
        self.write(Reg.QUEUE_READY, 1)

    def bring_up(self, rings: list[RingBuilder], features: int | None = None, drop: int = 0) -> int:
        """The whole init sequence; returns the accepted features."""
        accepted = self.negotiate(features, drop)
        for index, ring in enumerate(rings):
            self.setup_queue(index, ring)
        self.add_status(Status.DRIVER_OK)
        return accepted

    def notify(self, queue: int = 0) -> None:
        self.write(Reg.QUEUE_NOTIFY, queue)

    async def kick(self, queue: int = 0, timeout: float = 2.0) -> None:
        """Notify and wait, bounded, until the device has processed everything."""
        self.notify(queue)
        await asyncio.wait_for(self.device.drain(), timeout)


NO_RING_FEATURES = (1 << Feature.RING_EVENT_IDX) | (1 << Feature.RING_INDIRECT_DESC)
"""Pass as ``drop=`` to negotiate without EVENT_IDX and INDIRECT_DESC."""


def make_device(backend, version: int = 2, ram: GuestRam | None = None) -> MmioDevice:
    """An MmioDevice with test RAM attached and its interrupt levels recorded in ``irqs``."""
    device = MmioDevice(backend, version, name="test-dev")
    device.memory = (ram or GuestRam()).memory
    device.irqs = []  # type: ignore[attr-defined]
    device.on_irq = device.irqs.append  # type: ignore[attr-defined]
    return device


class RecordingMemory(MappedGuestMemory):
    """Test RAM that logs every access as ``(op, gpa...)`` in ``ops``: one entry per call, so a
    test can count round trips (proxied mode) and check the order of writes."""

    def __init__(self, ram: GuestRam, ops: list | None = None) -> None:
        super().__init__()
        self.add_region(ram.gpa, ram.buffer)
        self.ops: list[tuple] = [] if ops is None else ops

    async def readv(self, ranges):
        self.ops.append(("readv", *[gpa for gpa, _ in ranges]))
        return await super().readv(ranges)

    async def writev(self, segments):
        self.ops.append(("writev", *[gpa for gpa, _ in segments]))
        await super().writev(segments)

    async def read_u16(self, gpa):
        self.ops.append(("read_u16", gpa))
        return self.load_u16(gpa)

    async def write_u16(self, gpa, value):
        self.ops.append(("write_u16", gpa))
        self.store_u16(gpa, value)

    @property
    def round_trips(self) -> int:
        """Calls that need an answer from a remote memory (writes are posted)."""
        return sum(op[0] in ("readv", "read_u16") for op in self.ops)
