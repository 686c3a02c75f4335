"""The device side of a split virtqueue (virtio 1.2 §2.7; reference §4).

The driver owns the rings; this module only reads the descriptor table and the available ring and
only writes the used ring. Every guest value is checked before use (indices against the queue
size, buffers against guest memory), chain walks are bounded by the table they walk, and a broken
ring raises :class:`RingError` with QEMU's wording, so the transport can put the device into
DEVICE_NEEDS_RESET (reference §4.8) instead of crashing or hanging.

In proxied mode every :class:`GuestMemory` call is a network round trip, so :meth:`pop` reads
``avail.idx`` once and then, in one ``readv``, every pending ring slot and the whole descriptor
table; the indirect tables of those chains come in one more ``readv``, and their device-readable
bytes (request headers, data to write) in one more, kept as ``chain.readable_data``, so that a
device handling the batch makes no read of its own. The chains of that batch are served from the
snapshot: the driver may not touch descriptors or buffers it has made available until the device
uses them (§2.7.13), so the snapshot stays valid until each chain is pushed.

Shared memory (a plain :class:`MappedGuestMemory`) needs no snapshot: the same walk reads the ring
slots, descriptors and indirect tables in place through bounds-checked views, with the same checks
in the same order, and used elements are packed straight into the used ring. Each guest value is
read once, checked, and only then used, so a driver rewriting a table meanwhile can garble its own
requests but never get a segment outside guest memory.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Iterable, Sequence

from viowire.server.metrics import QueueStats, now
from viowire.virtio.constants import PAGE_SIZE
from viowire.virtio.memory import (
    GuestMemory,
    GuestMemoryError,
    MappedGuestMemory,
    full_barrier,
)
from viowire.virtio.ring import (
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    DESC,
    DESC_SIZE,
    MAX_QUEUE_SIZE,
    USED_ELEM,
    USED_ELEM_SIZE,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    RingLayout,
    avail_event_offset,
    ring_areas,
    used_event_offset,
    valid_queue_size,
    vring_need_event,
)
from viowire.virtio.ring import is_power_of_2 as is_power_of_2  # server/mmio.py's QueueAlign

INDIRECT_MAX_ENTRIES = MAX_QUEUE_SIZE
"""Largest indirect table accepted (512 KiB): next is a u16, Linux never comes near it."""
INDIRECT_PREFETCH_BYTES = 256 * 1024
"""A refill stops taking heads once their indirect tables add up to this, to bound one read."""
READABLE_PREFETCH_BYTES = 256 * 1024
"""Proxied mode: device-readable bytes read ahead per refill at most; chains past it (or larger
than it) leave ``readable_data`` None and their device reads them itself."""


class RingError(Exception):
    """The driver broke the ring protocol; the device must enter DEVICE_NEEDS_RESET (§4.8)."""


class ChainError(RingError):
    """A well-formed chain carrying a request its device type cannot parse (QEMU's virtio-blk
    'missing headers'): the device must stop just as for a broken ring."""


class StaleQueueError(Exception):
    """The queue was reset or stopped while an operation awaited guest memory; it was abandoned."""


class DescriptorChain:
    """One available buffer: device-readable then device-writable ``(gpa, len)`` segments.

    Indirect tables are already flattened, and every segment lies inside guest memory.
    ``readable_len`` and ``writable_len`` are kept as segments are added by the ring walk.
    ``readable_data``, when not None, is the readable part already read (proxied mode reads it
    for the whole batch at once); a device uses it instead of reading the segments again.
    """

    __slots__ = (
        "head",
        "memory",
        "popped",
        "readable",
        "readable_data",
        "readable_len",
        "writable",
        "writable_len",
    )

    def __init__(
        self,
        head: int,
        readable: Iterable[tuple[int, int]] = (),
        writable: Iterable[tuple[int, int]] = (),
    ) -> None:
        self.head = head
        self.readable: list[tuple[int, int]] = list(readable)
        self.writable: list[tuple[int, int]] = list(writable)
        self.readable_len = sum([length for _, length in self.readable]) if readable else 0
        self.writable_len = sum([length for _, length in self.writable]) if writable else 0
        self.readable_data: bytes | None = None
        # Taken off the available ring (the ring walk makes the chain): where the request's
        # latency starts (viowire.server.metrics).
        self.popped = now()
        self.memory: GuestMemory | None = None
        """Guest memory as the device may touch it for this chain (refused once the queue is
        reset); set when the chain is handed to a device."""

    async def read(self, offset: int = 0, length: int | None = None) -> bytes:
        """Bytes ``[offset, offset+length)`` of the device-readable part (all of it by default),
        read across descriptors."""
        end = self.readable_len if length is None else min(self.readable_len, offset + length)
        if offset >= end:
            return b""
        if self.readable_data is not None:  # read ahead with the batch (proxied memory)
            return bytes(self.readable_data[offset:end])
        parts = await self._memory().readv(slice_segments(self.readable, offset, end - offset))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def write(self, data: bytes, offset: int = 0) -> int:
        """Write ``data`` into the device-writable part at ``offset``, across descriptors;
        what does not fit is dropped. Returns the bytes written."""
        segments = slice_segments(self.writable, offset, len(data))
        if segments:
            await self._memory().writev(scatter(segments, data))
        return sum(length for _, length in segments)

    def _memory(self) -> GuestMemory:
        if self.memory is None:
            raise RuntimeError("this chain was not handed out by a queue: no guest memory")
        return self.memory

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, DescriptorChain):
            return NotImplemented
        return (self.head, self.readable, self.writable) == (
            other.head,
            other.readable,
            other.writable,
        )

    __hash__ = None  # type: ignore[assignment]  # mutable, like the dataclass it replaces

    def __repr__(self) -> str:
        return (
            f"DescriptorChain(head={self.head}, readable={self.readable}, writable={self.writable})"
        )


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


class SplitVirtqueue:
    """State of one split virtqueue as the device keeps it, and the operations on its rings.

    ``epoch`` changes whenever the ring state is forgotten (device reset, queue stopped); every
    coroutine checks it after each await and raises :class:`StaleQueueError` rather than touch a
    ring the driver may already have freed or re-programmed.
    """

    # Where its requests are counted: the device sets its type's (viowire.server.metrics); a
    # queue of no device counts into one that no scrape reads.
    stats = QueueStats("", 0)

    def __init__(self, index: int, num_max: int) -> None:
        if not valid_queue_size(num_max):
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
        layout = RingLayout.legacy(pfn * page_size, self.num, align)
        self.desc_addr, self.avail_addr, self.used_addr = layout.desc, layout.avail, layout.used

    def check_size(self) -> None:
        if not valid_queue_size(self.num, self.num_max):
            raise RingError(f"queue size {self.num} is not a power of 2 <= {self.num_max}")

    def check_layout(self, memory: GuestMemory) -> None:
        """Raise :class:`RingError` unless the size is valid and all three areas, with their
        event-index fields, are aligned (§2.7 table) and inside guest memory."""
        self.check_size()
        areas = ring_areas(self.num, self.desc_addr, self.avail_addr, self.used_addr)
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
            # In place only for the plain class (a subclass may interpose on every access, as
            # the tests' RecordingMemory does) with one region, the shared-memory case.
            if type(memory) is MappedGuestMemory and memory.single_region() is not None:
                self._refill_mapped(memory)
            else:
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
            await memory.write_u16(self.used_addr + avail_event_offset(n), self.last_avail_idx)
            self._check_epoch(epoch)
            self._avail_event = self.last_avail_idx
            if isinstance(memory, MappedGuestMemory):
                full_barrier()  # shared (several regions): the read below must not pass it
        # avail.idx, the ring and the table in one exchange (proxied memory: one round trip,
        # not two). One snapshot: the driver fills ring slots and descriptors before it moves
        # the index, and the client answers the read as a whole.
        index, ring, table = await memory.readv(
            [
                (self.avail_addr + AVAIL_IDX, 2),
                (self.avail_addr + AVAIL_RING, 2 * n),
                (self.desc_addr, DESC_SIZE * n),
            ]
        )
        self._check_epoch(epoch)
        avail_idx = int.from_bytes(index, "little")
        pending = (avail_idx - self.last_avail_idx) & 0xFFFF
        if pending > n:
            raise RingError(f"Guest moved used index from {self.last_avail_idx} to {avail_idx}")
        if not pending:
            return
        heads = struct.unpack(f"<{n}H", ring)
        slots = [heads[(self.last_avail_idx + k) % n] for k in range(pending)]
        chains, error = self._walk_heads(memory, table, slots)
        chains, error = await self._flatten_indirect(memory, chains, error)
        self._check_epoch(epoch)
        await self._prefetch_readable(memory, chains)
        self._check_epoch(epoch)
        self._cache.extend(chains)
        self._cache_error = error

    async def _prefetch_readable(self, memory: GuestMemory, chains: list[DescriptorChain]) -> None:
        """Read the readable part of the batch's chains in one readv (up to the cap), into
        ``chain.readable_data``. A failed read leaves them None: each device then reads for
        itself and meets the error on the request it belongs to."""
        ranges: list[tuple[int, int]] = []
        takers = []
        total = 0
        for chain in chains:
            size = chain.readable_len
            if size and total + size <= READABLE_PREFETCH_BYTES:
                ranges += chain.readable
                takers.append(chain)
                total += size
        if not ranges:
            return
        try:
            parts = iter(await memory.readv(ranges))
        except GuestMemoryError:
            return
        for chain in takers:
            chain.readable_data = b"".join([next(parts) for _ in chain.readable])

    def _refill_mapped(self, memory: MappedGuestMemory) -> None:
        """:meth:`_refill` for one mapped region: the same reads, checks and batch, in place."""
        n = self.num
        last = self.last_avail_idx
        if self.event_idx and self._avail_event != last:
            memory.store_u16(self.used_addr + avail_event_offset(n), last)
            self._avail_event = last
            full_barrier()  # the avail.idx load below must not pass that store (§2.7.10)
        avail_idx = memory.load_u16(self.avail_addr + AVAIL_IDX)
        pending = (avail_idx - last) & 0xFFFF
        if pending > n:
            raise RingError(f"Guest moved used index from {last} to {avail_idx}")
        if not pending:
            return
        lo, hi, region = memory.single_region()
        ring = self.avail_addr + AVAIL_RING
        for addr, size in ((ring, 2 * n), (self.desc_addr, DESC_SIZE * n)):
            if not (lo <= addr and addr + size <= hi):
                memory.check(addr, size)  # raises, as the general path's readv would
        first = last % n  # slot k is (last + k) % n; pending <= n, so they wrap at most once
        if first + pending <= n:
            slots = struct.unpack_from(f"<{pending}H", region, ring - lo + 2 * first)
        else:
            slots = struct.unpack_from(f"<{n - first}H", region, ring - lo + 2 * first)
            slots += struct.unpack_from(f"<{first + pending - n}H", region, ring - lo)
        chains, error = self._walk_region(memory, slots)
        self._cache.extend(chains)
        self._cache_error = error

    # -- polling (shared memory only) -------------------------------------------------------------
    def avail_pending(self, memory: MappedGuestMemory) -> bool:
        """The driver has made buffers available that were not popped yet."""
        return memory.load_u16(self.avail_addr + AVAIL_IDX) != self.last_avail_idx

    def suppress_kicks(self, memory: MappedGuestMemory) -> None:
        """Ask the driver not to notify: the device polls the ring meanwhile (§2.7.10). With
        EVENT_IDX avail_event goes one behind the last index seen, so vring_need_event holds for
        no index until it is moved; without it, VIRTQ_USED_F_NO_NOTIFY."""
        if self.event_idx:
            behind = (self.last_avail_idx - 1) & 0xFFFF
            memory.store_u16(self.used_addr + avail_event_offset(self.num), behind)
            self._avail_event = behind
        else:
            memory.store_u16(self.used_addr + USED_FLAGS, VIRTQ_USED_F_NO_NOTIFY)

    def allow_kicks(self, memory: MappedGuestMemory) -> bool:
        """Ask for notifications again; True if buffers came meanwhile (serve them: the driver
        may have skipped their notification)."""
        if self.event_idx:
            last = self.last_avail_idx
            memory.store_u16(self.used_addr + avail_event_offset(self.num), last)
            self._avail_event = last
        else:
            memory.store_u16(self.used_addr + USED_FLAGS, 0)
        full_barrier()
        return self.avail_pending(memory)

    def _walk_region(
        self, memory: MappedGuestMemory, heads: Sequence[int]
    ) -> tuple[list[DescriptorChain], RingError | None]:
        """:meth:`_walk_heads`, :meth:`_walk` and the indirect flattening in one loop, for one
        mapped region: descriptors are unpacked straight from it, a bounds check is two
        comparisons, and each indirect table is walked right after the direct part of its chain.

        The result is the general path's: the chains before the first bad one in ring order,
        then its error, with the same prefetch cap. Any check that fails defers to the general
        code (:meth:`_indirect_table`, ``memory.check``), so errors carry the same messages;
        tests/test_vring_device.py compares both paths on random rings.
        """
        n = self.num
        lo, hi, region = memory.single_region()
        unpack_from = DESC.unpack_from
        indirect_ok = self.indirect
        budget = n  # descriptors in flight can never exceed the table ("Virtqueue size exceeded")
        indirect_bytes = 0
        out: list[DescriptorChain] = []
        try:
            for head in heads:
                chain = DescriptorChain(head)
                if head >= n:
                    raise RingError(f"Guest says index {head} is available")
                readable, writable = chain.readable, chain.writable
                readable_len = writable_len = 0
                # the direct table from the head, then the chain's indirect table if it has one
                base, size, index, nested = self.desc_addr - lo, n, head, False
                while True:
                    table = None
                    for visited in range(1, size + 1):  # noqa: B007 - counted after the loop
                        addr, length, flags, next_index = unpack_from(
                            region, base + DESC_SIZE * index
                        )
                        if flags & VIRTQ_DESC_F_INDIRECT:
                            if (
                                nested
                                or not indirect_ok
                                or flags & VIRTQ_DESC_F_NEXT
                                or not length
                                or length % DESC_SIZE
                                or length > INDIRECT_MAX_ENTRIES * DESC_SIZE
                                or not (lo <= addr and addr + length <= hi)
                            ):
                                self._indirect_table(memory, addr, length, flags, nested)
                            table = addr
                            break
                        if not length:
                            raise RingError("zero sized buffers are not allowed")
                        if flags & VIRTQ_DESC_F_WRITE:
                            if not (lo <= addr and addr + length <= hi):
                                _bogus(memory, addr, length)
                            writable.append((addr, length))
                            writable_len += length
                        else:
                            if writable:
                                raise RingError("Incorrect order for descriptors")
                            if not (lo <= addr and addr + length <= hi):
                                _bogus(memory, addr, length)
                            readable.append((addr, length))
                            readable_len += length
                        if not flags & VIRTQ_DESC_F_NEXT:
                            break
                        if next_index >= size:
                            raise RingError(f"Desc next is {next_index}")
                        index = next_index
                    else:
                        raise RingError("Looped descriptor")
                    if nested:
                        break
                    budget -= visited
                    if budget < 0:
                        raise RingError("Virtqueue size exceeded")
                    if table is None:
                        break
                    if out and indirect_bytes + length > INDIRECT_PREFETCH_BYTES:
                        return out, None  # the rest waits for the next refill
                    indirect_bytes += length
                    base, size, index, nested = table - lo, length // DESC_SIZE, 0, True
                chain.readable_len, chain.writable_len = readable_len, writable_len
                out.append(chain)
        except RingError as exc:
            return out, exc
        return out, None

    def _walk_heads(
        self, memory: GuestMemory, table: bytes | memoryview, heads: Sequence[int]
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
        table: bytes | memoryview,
        start: int,
        size: int,
        chain: DescriptorChain,
        nested: bool,
    ) -> tuple[tuple[int, int] | None, int]:
        """Follow NEXT links from ``start`` through a table of ``size`` descriptors, appending the
        segments to ``chain``. Returns the (addr, len) of an indirect table that ends the chain,
        if any, and the number of descriptors visited. At most ``size`` steps: a longer walk is a
        loop."""
        unpack_from = DESC.unpack_from
        check = memory.check
        readable, writable = chain.readable, chain.writable
        index = start
        for visited in range(1, size + 1):
            addr, length, flags, next_index = unpack_from(table, DESC_SIZE * index)
            if flags & VIRTQ_DESC_F_INDIRECT:
                return self._indirect_table(memory, addr, length, flags, nested), visited
            # the segment, with QEMU's order of checks: not empty, readable ones before writable
            # ones, inside guest memory
            if length == 0:
                raise RingError("zero sized buffers are not allowed")
            device_writes = flags & VIRTQ_DESC_F_WRITE
            if writable and not device_writes:
                raise RingError("Incorrect order for descriptors")
            try:
                check(addr, length)
            except GuestMemoryError as exc:
                raise RingError(f"bogus descriptor: {exc}") from exc
            if device_writes:
                writable.append((addr, length))
                chain.writable_len += length
            else:
                readable.append((addr, length))
                chain.readable_len += length
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
        if type(memory) is MappedGuestMemory:
            self._push_mapped(memory, used)
            return
        epoch = self.epoch
        n = self.num
        idx = self.used_idx
        segments: list[tuple[int, bytes]] = []
        for head, length in used:
            gpa = self.used_addr + USED_RING + USED_ELEM_SIZE * (idx % n)
            elem = USED_ELEM.pack(head, length)
            if segments and segments[-1][0] + len(segments[-1][1]) == gpa:
                segments[-1] = (segments[-1][0], segments[-1][1] + elem)
            else:
                segments.append((gpa, elem))
            idx = (idx + 1) & 0xFFFF
        await memory.writev(segments)
        self._check_epoch(epoch)
        await memory.write_u16(self.used_addr + USED_IDX, idx)
        self._check_epoch(epoch)
        self.used_idx = idx

    def _push_mapped(self, memory: MappedGuestMemory, used: Sequence[tuple[int, int]]) -> None:
        """:meth:`push_many` in place: elements packed into the used ring, then used.idx."""
        n = self.num
        idx = self.used_idx
        pack_into = USED_ELEM.pack_into
        with memory.view(self.used_addr + USED_RING, USED_ELEM_SIZE * n) as ring:
            for head, length in used:
                pack_into(ring, USED_ELEM_SIZE * (idx % n), head, length)
                idx = (idx + 1) & 0xFFFF
        memory.store_u16(self.used_addr + USED_IDX, idx)
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
        if isinstance(memory, MappedGuestMemory):
            full_barrier()  # the used.idx store above must not pass the load below (§2.7.10)
        mapped = type(memory) is MappedGuestMemory  # in place (a subclass may interpose)
        if self.event_idx:
            used_event_addr = self.avail_addr + used_event_offset(self.num)
            if mapped:
                used_event = memory.load_u16(used_event_addr)
            else:
                used_event = await memory.read_u16(used_event_addr)
            self._check_epoch(epoch)
            first = not self.signalled_used_valid
            self.signalled_used_valid = True
            self.signalled_used = new
            return first or vring_need_event(used_event, new, old_used_idx)
        flags_addr = self.avail_addr + AVAIL_FLAGS
        flags = memory.load_u16(flags_addr) if mapped else await memory.read_u16(flags_addr)
        self._check_epoch(epoch)
        return not flags & VIRTQ_AVAIL_F_NO_INTERRUPT


def _bogus(memory: GuestMemory, addr: int, length: int) -> None:
    """Raise the general path's error for a segment outside the fast bounds (if it is outside)."""
    try:
        memory.check(addr, length)
    except GuestMemoryError as exc:
        raise RingError(f"bogus descriptor: {exc}") from exc
