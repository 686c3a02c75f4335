"""The split virtqueue's memory layout (virtio 1.2 §2.7; reference §4.1-§4.3), written once.

Every side that touches a split ring takes its shape from here: the device side
(``server/virtqueue.py``), the driver side (``client/virtqueue.py``), conform's hand-laid rings
(``conform/ring.py``) and the in-memory mock for unit tests (``virtio/mock.py``). The hot paths
keep their precompiled :data:`DESC` / :data:`USED_ELEM` structs and pack or unpack in place;
what they take from here is every offset and size.

The three areas of a queue of ``num`` entries, each contiguous and aligned (§2.7, all fields
little-endian)::

    descriptor table  align 16  num x {le64 addr, le32 len, le16 flags, le16 next}   16 num
    available ring    align 2   le16 flags, le16 idx, le16 ring[num], le16 used_event   6 + 2 num
    used ring         align 4   le16 flags, le16 idx, {le32 id, le32 len}[num],
                                le16 avail_event                                         6 + 8 num

``used_event`` and ``avail_event`` mean something only with VIRTIO_F_EVENT_IDX, but the space
is always there. A legacy device (virtio-mmio Version 1, QueuePFN) takes one block instead: the
descriptor table at its start, the available ring right after it, and the used ring at the next
multiple of QueueAlign past the whole available ring, used_event included (§2.7.2, Linux
``vring_size``).

Ring indices are free-running u16s: ring slot ``idx % num`` holds entry ``idx``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

from viowire.virtio.constants import (
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    PAGE_SIZE,
    USED_ELEM_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
)

DESC = struct.Struct("<QIHH")
"""struct virtq_desc: addr, len, flags, next (:data:`DESC_SIZE` bytes)."""
USED_ELEM = struct.Struct("<II")
"""struct virtq_used_elem: id (the chain's head), len (bytes written) (:data:`USED_ELEM_SIZE`)."""

# Offsets inside the available ring and the used ring: flags, idx, then the ring itself.
AVAIL_FLAGS = 0
AVAIL_IDX = 2
AVAIL_RING = 4
USED_FLAGS = 0
USED_IDX = 2
USED_RING = 4

# Each area starts at a multiple of its alignment (§2.7 table; Linux VRING_*_ALIGN_SIZE).
DESC_ALIGN = 16
AVAIL_ALIGN = 2
USED_ALIGN = 4

Desc = tuple[int, int, int, int]
"""One descriptor as ``(addr, len, flags, next)``, the fields of :data:`DESC`."""
Segment = tuple[int, int, bool]
"""One buffer of a chain as ``(gpa, len, device_writable)``."""
Area = tuple[str, int, int, int]
"""One area of a ring as ``(name, address, bytes, alignment)``."""


def align_up(value: int, align: int) -> int:
    """``value`` rounded up to a multiple of ``align`` (a power of 2)."""
    return (value + align - 1) & ~(align - 1)


def is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


def valid_queue_size(num: int, num_max: int = MAX_QUEUE_SIZE) -> bool:
    """A split ring's size: a power of 2 no larger than ``num_max`` (§2.7: at most 32768)."""
    return 0 < num <= num_max and num <= MAX_QUEUE_SIZE and not num & (num - 1)


def desc_table_size(num: int) -> int:
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    """flags, idx, ring[num] and used_event."""
    return AVAIL_RING + 2 * num + 2


def used_ring_size(num: int) -> int:
    """flags, idx, ring[num] and avail_event."""
    return USED_RING + USED_ELEM_SIZE * num + 2


def used_event_offset(num: int) -> int:
    """Where used_event sits in the available ring: right after ring[num]."""
    return AVAIL_RING + 2 * num


def avail_event_offset(num: int) -> int:
    """Where avail_event sits in the used ring: right after ring[num]."""
    return USED_RING + USED_ELEM_SIZE * num


def ring_areas(num: int, desc: int, avail: int, used: int) -> tuple[Area, Area, Area]:
    """``(name, address, bytes, alignment)`` of the three areas of a ring at these addresses.

    The device side checks these on every pass over a ring, so the sizes of
    :func:`desc_table_size`, :func:`avail_ring_size` and :func:`used_ring_size` are written out
    here rather than called (tests/test_ring_layout.py holds them equal)."""
    return (
        ("desc", desc, DESC_SIZE * num, DESC_ALIGN),
        ("avail", avail, AVAIL_RING + 2 * num + 2, AVAIL_ALIGN),
        ("used", used, USED_RING + USED_ELEM_SIZE * num + 2, USED_ALIGN),
    )


def area_sizes(num: int) -> tuple[tuple[int, int], ...]:
    """``(bytes, alignment)`` of the descriptor table, the available ring and the used ring:
    what a driver allocates."""
    return tuple((size, alignment) for _, _, size, alignment in ring_areas(num, 0, 0, 0))


def legacy_avail_offset(num: int) -> int:
    """Legacy block: the available ring follows the descriptor table."""
    return DESC_SIZE * num


def legacy_used_offset(num: int, align: int = PAGE_SIZE) -> int:
    """Legacy block at an ``align``-aligned base: the used ring at the first multiple of
    ``align`` past the whole available ring, its used_event slot included (Linux and the spec;
    QEMU leaves the slot out, which differs for QueueAlign 4 and 8: reference §4.3)."""
    return align_up(legacy_avail_offset(num) + avail_ring_size(num), align)


def vring_size(num: int, align: int = PAGE_SIZE) -> int:
    """Bytes of the legacy contiguous ring at an ``align``-aligned base (Linux ``vring_size``)."""
    return legacy_used_offset(num, align) + used_ring_size(num)


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True when moving an index from ``old`` to ``new`` passes ``event`` (mod 2^16, §2.7.10):
    the EVENT_IDX test both sides make before notifying."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


@dataclass(frozen=True, slots=True)
class RingLayout:
    """Where a split ring of ``num`` entries lives: the three areas and every field in them.

    Built from the three addresses a modern driver programs (QueueDesc/Driver/Device), or with
    :meth:`legacy` from a QueuePFN block. The field addresses are computed once, so a hot loop
    reads plain attributes.
    """

    num: int
    desc: int
    avail: int
    used: int
    avail_flags: int = field(init=False)
    avail_idx: int = field(init=False)
    avail_ring: int = field(init=False)
    used_event: int = field(init=False)
    used_flags: int = field(init=False)
    used_idx: int = field(init=False)
    used_ring: int = field(init=False)
    avail_event: int = field(init=False)

    def __post_init__(self) -> None:
        num, avail, used = self.num, self.avail, self.used
        for name, value in (
            ("avail_flags", avail + AVAIL_FLAGS),
            ("avail_idx", avail + AVAIL_IDX),
            ("avail_ring", avail + AVAIL_RING),
            ("used_event", avail + used_event_offset(num)),
            ("used_flags", used + USED_FLAGS),
            ("used_idx", used + USED_IDX),
            ("used_ring", used + USED_RING),
            ("avail_event", used + avail_event_offset(num)),
        ):
            object.__setattr__(self, name, value)

    @classmethod
    def legacy(cls, base: int, num: int, align: int = PAGE_SIZE) -> RingLayout:
        """The legacy contiguous block at ``base`` (QueuePFN x GuestPageSize, QueueAlign).

        The used ring's address itself is aligned, as Linux's ``vring_init`` aligns the pointer:
        a base that is not a multiple of ``align`` (a QueueAlign above GuestPageSize) moves it.
        """
        avail = base + legacy_avail_offset(num)
        return cls(num, base, avail, align_up(avail + avail_ring_size(num), align))

    def desc_addr(self, index: int) -> int:
        """Descriptor ``index`` of the table."""
        return self.desc + DESC_SIZE * index

    def avail_slot_addr(self, idx: int) -> int:
        """The available ring slot of free-running index ``idx`` (ring[idx % num])."""
        return self.avail_ring + 2 * (idx % self.num)

    def used_elem_addr(self, idx: int) -> int:
        """The used element of free-running index ``idx`` (ring[idx % num])."""
        return self.used_ring + USED_ELEM_SIZE * (idx % self.num)

    def areas(self) -> tuple[Area, Area, Area]:
        """``(name, address, bytes, alignment)`` of the three areas, desc, avail, used."""
        return ring_areas(self.num, self.desc, self.avail, self.used)


def chain_descriptors(segments: list[Segment] | tuple[Segment, ...], ids: list[int]) -> list[Desc]:
    """The descriptors of a chain laid in table entries ``ids`` (the head first): each segment
    ``(gpa, len, device_writable)`` linked by NEXT to the following one. For an indirect table
    ``ids`` is ``range(len(segments))``."""
    out = []
    last = len(segments) - 1
    for i, (gpa, length, writable) in enumerate(segments):
        flags = VIRTQ_DESC_F_WRITE if writable else 0
        if i < last:
            out.append((gpa, length, flags | VIRTQ_DESC_F_NEXT, ids[i + 1]))
        else:
            out.append((gpa, length, flags, 0))
    return out


def pack_descriptors(descs: list[Desc] | tuple[Desc, ...]) -> bytes:
    """Consecutive descriptors as guest bytes: an indirect table, or a run of the ring's."""
    return b"".join(DESC.pack(*desc) for desc in descs)


def indirect_descriptor(table: int, entries: int) -> bytes:
    """The ring descriptor that points at an indirect table of ``entries`` descriptors."""
    return DESC.pack(table, DESC_SIZE * entries, VIRTQ_DESC_F_INDIRECT, 0)


__all__ = [
    "AVAIL_ALIGN",
    "AVAIL_FLAGS",
    "AVAIL_IDX",
    "AVAIL_RING",
    "DESC",
    "DESC_ALIGN",
    "DESC_SIZE",
    "MAX_QUEUE_SIZE",
    "USED_ALIGN",
    "USED_ELEM",
    "USED_ELEM_SIZE",
    "USED_FLAGS",
    "USED_IDX",
    "USED_RING",
    "VIRTQ_AVAIL_F_NO_INTERRUPT",
    "VIRTQ_DESC_F_INDIRECT",
    "VIRTQ_DESC_F_NEXT",
    "VIRTQ_DESC_F_WRITE",
    "VIRTQ_USED_F_NO_NOTIFY",
    "Area",
    "Desc",
    "RingLayout",
    "Segment",
    "align_up",
    "area_sizes",
    "avail_event_offset",
    "avail_ring_size",
    "chain_descriptors",
    "desc_table_size",
    "indirect_descriptor",
    "is_power_of_2",
    "legacy_avail_offset",
    "legacy_used_offset",
    "pack_descriptors",
    "ring_areas",
    "used_event_offset",
    "used_ring_size",
    "valid_queue_size",
    "vring_need_event",
    "vring_size",
]
