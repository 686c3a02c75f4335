"""The device side of a split virtqueue (virtio 1.2 §2.7; reference §4).

The driver owns the rings; this module only reads the descriptor table and the available ring and
only writes the used ring. Every guest value is checked before use (indices against the queue
size, buffers against guest memory), chain walks are bounded by the table they walk, and a broken
ring raises :class:`RingError` with QEMU's wording, so the transport can put the device into
DEVICE_NEEDS_RESET (reference §4.8) instead of crashing or hanging.

In proxied mode every :class:`GuestMemory` call is a network round trip, so :meth:`pop` reads
``avail.idx`` once and then, in one ``readv``, every pending ring slot and the whole descriptor
table; the indirect tables of those chains come in one more ``readv``. The chains of that batch
are served from the snapshot: the driver may not touch descriptors it has made available until the
device uses them (§2.7.13), so the snapshot stays valid until each chain is pushed.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence
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
)
from viowire.virtio.memory import GuestMemory, GuestMemoryError

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")  # id, len
INDIRECT_MAX_ENTRIES = MAX_QUEUE_SIZE
"""Largest indirect table accepted (512 KiB): next is a u16, Linux never comes near it."""
INDIRECT_PREFETCH_BYTES = 256 * 1024
"""A refill stops taking heads once their indirect tables add up to this, to bound one read."""


class RingError(Exception):
    """The driver broke the ring protocol; the device must enter DEVICE_NEEDS_RESET (§4.8)."""


class ChainError(RingError):
    """A well-formed chain carrying a request its device type cannot parse (QEMU's virtio-blk
    'missing headers'): the device must stop just as for a broken ring."""


class StaleQueueError(Exception):
    """The queue was reset or stopped while an operation awaited guest memory; it was abandoned."""


@dataclass
class DescriptorChain:
    """One available buffer: device-readable then device-writable ``(gpa, len)`` segments.

    Indirect tables are already flattened, and every segment lies inside guest memory.
    """

    head: int
    readable: list[tuple[int, int]] = field(default_factory=list)
    writable: list[tuple[int, int]] = field(default_factory=list)

    @property
    def readable_len(self) -> int:
        return sum(length for _, length in self.readable)

    @property
    def writable_len(self) -> int:
        return sum(length for _, length in self.writable)


def slice_segments(
    segments: Sequence[tuple[int, int]], offset: int, length: int
) -> list[tuple[int, int]]:
    """The ``(gpa, len)`` pieces holding bytes ``[offset, offset+length)`` of the segments laid
    end to end: device requests (headers, data, status) may be split anywhere (ANY_LAYOUT)."""
    out = []
    for gpa, seg_len in segments:
        if length <= 0:
            break
        if offset >= seg_len:
            offset -= seg_len
            continue
        take = min(seg_len - offset, length)
        out.append((gpa + offset, take))
        length -= take
        offset = 0
    return out


def scatter(segments: Sequence[tuple[int, int]], data: bytes) -> list[tuple[int, bytes]]:
    """Split ``data`` over ``segments`` in order, ready for one ``writev``."""
    out = []
    pos = 0
    for gpa, length in slice_segments(segments, 0, len(data)):
        out.append((gpa, data[pos : pos + length]))
        pos += length
    return out


def vring_need_event(event: int, new: int, old: int) -> bool:
    """True when moving an index from ``old`` to ``new`` passes ``event`` (mod 2^16, §2.7.10)."""
    return ((new - event - 1) & 0xFFFF) < ((new - old) & 0xFFFF)


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def is_power_of_2(value: int) -> bool:
    return value > 0 and value & (value - 1) == 0


class SplitVirtqueue:
    """State of one split virtqueue as the device keeps it, and the operations on its rings.

    ``epoch`` changes whenever the ring state is forgotten (device reset, queue stopped); every
    coroutine checks it after each await and raises :class:`StaleQueueError` rather than touch a
    ring the driver may already have freed or re-programmed.
    """

    def __init__(self, index: int, num_max: int) -> None:
        if not is_power_of_2(num_max) or num_max > MAX_QUEUE_SIZE:
            raise ValueError(f"queue_num_max {num_max} must be a power of 2 <= {MAX_QUEUE_SIZE}")
        self.index = index
        self.num_max = num_max
        self.legacy = False
        self.epoch = 0
        self.reset()

    # -- state ----------------------------------------------------------------------------------
    def reset(self) -> None:
        """Device reset (§2.4): everything the driver programmed and every ring index."""
        self.num = self.num_max
        self.desc_addr = self.avail_addr = self.used_addr = 0
        self.align = PAGE_SIZE
        self.event_idx = False
        self.indirect = False
        self.stop()

    def stop(self) -> None:
        """QueueReady=0 / QueuePFN=0: stop using the ring and forget its indices, so a ring
        enabled later starts from 0 as a freshly allocated one does."""
        self.ready = False
        self.pfn = 0
        self.epoch += 1
        self.last_avail_idx = 0
        self.used_idx = 0
        self.signalled_used = 0
        self.signalled_used_valid = False
        self._cache: deque[DescriptorChain] = deque()
        self._cache_error: RingError | None = None
        self._avail_event: int | None = None

    @property
    def has_cached(self) -> bool:
        """Chains already read and not yet popped: the current batch is not finished."""
        return bool(self._cache)

    def set_legacy_pfn(self, pfn: int, page_size: int, align: int) -> None:
        """Version 1 QueuePFN: one contiguous block, used ring aligned to QueueAlign (§4.3)."""
        self.pfn = pfn
        self.align = align
        base = pfn * page_size
        self.desc_addr = base
        self.avail_addr = base + DESC_SIZE * self.num
        self.used_addr = align_up(self.avail_addr + 4 + 2 * self.num + 2, align)

    def check_size(self) -> None:
        if not is_power_of_2(self.num) or self.num > self.num_max:
            raise RingError(f"queue size {self.num} is not a power of 2 <= {self.num_max}")

    def check_layout(self, memory: GuestMemory) -> None:
        """Raise :class:`RingError` unless the size is valid and all three areas, with their
        event-index fields, are aligned (§2.7 table) and inside guest memory."""
        self.check_size()
        n = self.num
        areas = (
            ("desc", self.desc_addr, DESC_SIZE * n, 16),
            ("avail", self.avail_addr, 6 + 2 * n, 2),
            ("used", self.used_addr, 6 + USED_ELEM_SIZE * n, 4),
        )
        for name, addr, size, alignment in areas:
            if addr % alignment:
                raise RingError(f"Cannot map {name}: {addr:#x} is not {alignment}-byte aligned")
            try:
                memory.check(addr, size)
            except GuestMemoryError as exc:
                raise RingError(f"Cannot map {name}: {exc}") from exc

    def _check_epoch(self, epoch: int) -> None:
        if self.epoch != epoch:
            raise StaleQueueError(f"queue {self.index} was reset while waiting for guest memory")

    # -- consuming available buffers ------------------------------------------------------------
    async def pop(self, memory: GuestMemory) -> DescriptorChain | None:
        """The next available chain, or None when the driver has made none available.

        Raises :class:`RingError` for a malformed ring or chain (the chains before it in the same
        batch are still returned first) and :class:`StaleQueueError` after a reset.
        """
        if not self._cache and self._cache_error is None:
            await self._refill(memory)
        if self._cache:
            self.last_avail_idx = (self.last_avail_idx + 1) & 0xFFFF
            return self._cache.popleft()
        if self._cache_error is not None:
            raise self._cache_error
        return None

    async def _refill(self, memory: GuestMemory) -> None:
        epoch = self.epoch
        n = self.num
        if self.event_idx and self._avail_event != self.last_avail_idx:
            # Ask for a kick at the next new buffer; the avail.idx read below comes after this
            # write, so a buffer published in between is seen by that read (§2.7.10).
            await memory.write_u16(self.used_addr + 4 + USED_ELEM_SIZE * n, self.last_avail_idx)
            self._check_epoch(epoch)
            self._avail_event = self.last_avail_idx
        avail_idx = await memory.read_u16(self.avail_addr + 2)
        self._check_epoch(epoch)
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > n:
            raise RingError(f"Guest moved used index from {self.last_avail_idx} to {avail_idx}")
        if not pending:
            return
        ring, table = await memory.readv(
            [(self.avail_addr + 4, 2 * n), (self.desc_addr, DESC_SIZE * n)]
        )
        self._check_epoch(epoch)
        heads = struct.unpack(f"<{n}H", ring)
        slots = [heads[(self.last_avail_idx + k) % n] for k in range(pending)]
        chains, error = self._walk_heads(memory, table, slots)
        chains, error = await self._flatten_indirect(memory, chains, error)
        self._check_epoch(epoch)
        self._cache.extend(chains)
        self._cache_error = error

    def _walk_heads(
        self, memory: GuestMemory, table: bytes, heads: list[int]
    ) -> tuple[list[tuple[DescriptorChain, tuple[int, int] | None]], RingError | None]:
        """Walk the direct part of each chain; stop at the first bad one or at the prefetch cap."""
        n = self.num
        budget = n  # descriptors in flight can never exceed the table ("Virtqueue size exceeded")
        indirect_bytes = 0
        out: list[tuple[DescriptorChain, tuple[int, int] | None]] = []
        for head in heads:
            chain = DescriptorChain(head)
            try:
                if head >= n:
                    raise RingError(f"Guest says index {head} is available")
                indirect, visited = self._walk(memory, table, head, n, chain, nested=False)
                budget -= visited
                if budget < 0:
                    raise RingError("Virtqueue size exceeded")
            except RingError as exc:
                return out, exc
            if indirect is not None:
                if out and indirect_bytes + indirect[1] > INDIRECT_PREFETCH_BYTES:
                    break  # the rest waits for the next refill
                indirect_bytes += indirect[1]
            out.append((chain, indirect))
        return out, None

    async def _flatten_indirect(
        self,
        memory: GuestMemory,
        chains: list[tuple[DescriptorChain, tuple[int, int] | None]],
        error: RingError | None,
    ) -> tuple[list[DescriptorChain], RingError | None]:
        """Read every indirect table of the batch in one readv and append their segments."""
        ranges = [indirect for _, indirect in chains if indirect is not None]
        try:
            tables = iter(await memory.readv(ranges) if ranges else [])
        except GuestMemoryError as exc:  # checked in _walk; only a shrinking memory gets here
            return [], RingError(f"Cannot map indirect buffer: {exc}")
        out = []
        for chain, indirect in chains:
            if indirect is not None:
                try:
                    entries = indirect[1] // DESC_SIZE
                    self._walk(memory, next(tables), 0, entries, chain, nested=True)
                except RingError as exc:
                    return out, exc
            out.append(chain)
        return out, error

    def _walk(
        self,
        memory: GuestMemory,
        table: bytes,
        start: int,
        size: int,
        chain: DescriptorChain,
        nested: bool,
    ) -> tuple[tuple[int, int] | None, int]:
        """Follow NEXT links from ``start`` through a table of ``size`` descriptors, appending the
        segments to ``chain``. Returns the (addr, len) of an indirect table that ends the chain,
        if any, and the number of descriptors visited. At most ``size`` steps: a longer walk is a
        loop."""
        index = start
        for visited in range(1, size + 1):
            addr, length, flags, next_index = _DESC.unpack_from(table, DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                return self._indirect_table(memory, addr, length, flags, nested), visited
            _add_segment(memory, chain, addr, length, bool(flags & VIRTQ_DESC_F_WRITE))
            if not flags & VIRTQ_DESC_F_NEXT:
                return None, visited
            if next_index >= size:
                raise RingError(f"Desc next is {next_index}")
            index = next_index
        raise RingError("Looped descriptor")

    def _indirect_table(
        self, memory: GuestMemory, addr: int, length: int, flags: int, nested: bool
    ) -> tuple[int, int]:
        if nested:
            raise RingError("Nested indirect descriptor")
        if not self.indirect:
            raise RingError("Indirect descriptor but VIRTIO_F_INDIRECT_DESC was not negotiated")
        if flags & VIRTQ_DESC_F_NEXT:
            raise RingError("Indirect descriptor with VIRTQ_DESC_F_NEXT set")
        if length == 0 or length % DESC_SIZE:
            raise RingError("Invalid size for indirect buffer table")
        if length > INDIRECT_MAX_ENTRIES * DESC_SIZE:
            raise RingError(f"Indirect buffer table of {length // DESC_SIZE} entries is too big")
        try:
            memory.check(addr, length)
        except GuestMemoryError as exc:
            raise RingError(f"Cannot map indirect buffer: {exc}") from exc
        return addr, length

    # -- publishing used buffers ----------------------------------------------------------------
    async def push(self, memory: GuestMemory, head: int, length: int) -> None:
        """Publish one used element, then used.idx (§2.7.14 order)."""
        await self.push_many(memory, [(head, length)])

    async def push_many(self, memory: GuestMemory, used: Sequence[tuple[int, int]]) -> None:
        """Publish ``(head, len)`` elements in one writev, then used.idx in one 16-bit store."""
        if not used:
            return
        epoch = self.epoch
        n = self.num
        idx = self.used_idx
        segments: list[tuple[int, bytes]] = []
        for head, length in used:
            gpa = self.used_addr + 4 + USED_ELEM_SIZE * (idx % n)
            elem = _USED_ELEM.pack(head, length)
            if segments and segments[-1][0] + len(segments[-1][1]) == gpa:
                segments[-1] = (segments[-1][0], segments[-1][1] + elem)
            else:
                segments.append((gpa, elem))
            idx = (idx + 1) & 0xFFFF
        await memory.writev(segments)
        self._check_epoch(epoch)
        await memory.write_u16(self.used_addr + 2, idx)
        self._check_epoch(epoch)
        self.used_idx = idx

    async def needs_notification(self, memory: GuestMemory, old_used_idx: int) -> bool:
        """Whether moving used.idx from ``old_used_idx`` to now needs a used-buffer notification.

        With EVENT_IDX: the first one after reset always, then only when used_event was crossed
        (mod 2^16); without: unless the driver set VIRTQ_AVAIL_F_NO_INTERRUPT.
        """
        epoch = self.epoch
        new = self.used_idx
        if new == old_used_idx & 0xFFFF:
            return False
        if self.event_idx:
            used_event = await memory.read_u16(self.avail_addr + 4 + 2 * self.num)
            self._check_epoch(epoch)
            first = not self.signalled_used_valid
            self.signalled_used_valid = True
            self.signalled_used = new
            return first or vring_need_event(used_event, new, old_used_idx)
        flags = await memory.read_u16(self.avail_addr)
        self._check_epoch(epoch)
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT


def _add_segment(
    memory: GuestMemory, chain: DescriptorChain, addr: int, length: int, writable: bool
) -> None:
    if length == 0:
        raise RingError("zero sized buffers are not allowed")
    if not writable and chain.writable:
        raise RingError("Incorrect order for descriptors")
    try:
        memory.check(addr, length)
    except GuestMemoryError as exc:
        raise RingError(f"bogus descriptor: {exc}") from exc
    (chain.writable if writable else chain.readable).append((addr, length))
