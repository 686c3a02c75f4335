"""The driver side of a split virtqueue (SPEC §2.7) over guest memory, like Linux's virtio_ring.c.

The driver publishes in the order the spec requires: descriptors, then the avail ring slot, then
``avail.idx``; it reads ``used.idx`` before the used element it covers. Every ring index is a
free-running u16 kept masked with ``& 0xFFFF``, and each is stored and loaded through
``write_u16``/``read_u16``, which :class:`MappedGuestMemory` does as one 16-bit access.

Completion is asynchronous: :meth:`Virtqueue.submit` publishes a chain, kicks, and awaits a future
that :meth:`Virtqueue.interrupt` resolves when the device returns the chain, so any number of
requests (up to the ring size) are in flight at once. One ``asyncio.Condition`` guards the ring:
publishing and consuming never interleave between awaits, and a submitter waits on it for free
descriptors instead of failing when the ring is full.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import struct
import threading
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from viowire.client.errors import DeviceBrokenError, QueueDeletedError, QueueFullError
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
from viowire.virtio.memory import GuestMemory

log = logging.getLogger(__name__)

_DESC = struct.Struct("<QIHH")  # addr, len, flags, next
_USED_ELEM = struct.Struct("<II")  # id, len

Layout = Literal["legacy", "modern"]
Buffers = Sequence[tuple[int, int]]  # (gpa, length)


class Allocator(Protocol):
    """Where the driver's rings and buffers go (GuestRAM, RangeAllocator, QtestRAM). Blocks come
    back with undefined contents: Virtqueue.create zeroes its rings itself."""

    def alloc(self, size: int, align: int = 16) -> int: ...

    def free(self, gpa: int) -> None: ...


_FENCE = threading.Lock()


def full_barrier() -> None:
    """A store-to-load barrier (SPEC §2.7.13 step 5, reference §4.7), as far as Python allows.

    With shared memory the device is another process, and x86 may let our avail.idx store sit in
    the store buffer past a later avail_event load: both sides then skip the notification and the
    ring stalls. Taking a lock runs a lock-prefixed instruction (glibc's semaphore CAS), a full
    fence on x86. Elsewhere (ARM) it is not; that would need a fence from C.
    """
    with _FENCE:
        pass


def vring_need_event(event: int, new: int, old: int) -> bool:
    """Linux's crossing test, mod 2^16: did moving an index from ``old`` to ``new`` pass it?"""
    return (new - event - 1) & 0xFFFF < (new - old) & 0xFFFF


def align_up(value: int, align: int) -> int:
    return (value + align - 1) & ~(align - 1)


def vring_size(num: int, align: int = PAGE_SIZE) -> int:
    """Bytes of the legacy contiguous ring (Linux ``vring_size``, reference §4.3)."""
    return align_up(DESC_SIZE * num + 2 * (3 + num), align) + 2 * 3 + USED_ELEM_SIZE * num


@dataclass(frozen=True)
class VringAddresses:
    """Where the three parts of a ring live, and the blocks to free when it goes."""

    desc: int
    avail: int
    used: int
    blocks: tuple[int, ...]


def legacy_addresses(base: int, num: int, align: int = PAGE_SIZE) -> VringAddresses:
    """The legacy layout at ``base``: desc, avail right after, used at the next ``align``.

    The +2 before aligning is the used_event slot, which Linux always reserves (reference §4.3).
    """
    avail = base + DESC_SIZE * num
    used = align_up(avail + 4 + 2 * num + 2, align)
    return VringAddresses(base, avail, used, (base,))


async def maybe_await(value: object) -> None:
    """Callbacks may be plain functions or coroutine functions; run either."""
    if inspect.isawaitable(value):
        await value


@dataclass(slots=True)
class _Head:
    """One published chain, keyed by its head descriptor."""

    token: object
    descs: list[int]  # ring descriptors the chain holds
    indirect: int | None  # gpa of its indirect table, freed when the chain returns
    in_bytes: int  # device-writable bytes: used.len may not exceed this


class Virtqueue:
    """A split virtqueue, driver side. Build it with :meth:`create` (which zeroes the rings)."""

    def __init__(
        self,
        index: int,
        num: int,
        memory: GuestMemory,
        allocator: Allocator,
        layout: Layout = "modern",
        *,
        event_idx: bool = False,
        indirect: bool = False,
        notify: Callable[[Virtqueue], Awaitable[None]] | None = None,
        callback: Callable[[Virtqueue], object] | None = None,
        device: str = "virtio",
        name: str = "",
    ) -> None:
        """Allocate the rings; raises ``MemoryError`` if they do not fit (the caller shrinks)."""
        if not 0 < num <= MAX_QUEUE_SIZE or num & (num - 1):
            raise ValueError(f"split virtqueue size {num} is not a power of two in 1..32768")
        self.index = index
        self.num = num
        self.memory = memory
        self.allocator = allocator
        self.layout = layout
        self.event_idx = event_idx
        self.indirect = indirect
        self.callback = callback
        self.device = device
        self.name = name
        self._notify = notify
        self.addresses = self._allocate()
        self.broken: Exception | None = None
        self._lock = asyncio.Condition()
        self._free: list[int] = list(reversed(range(num)))  # a stack: descriptor 0 goes first
        self._heads: dict[int, _Head] = {}
        self._backlog: deque[tuple[object, int]] = deque()  # returned, not yet taken by get_buf
        self._avail_idx = 0
        self._last_used = 0
        self._num_added = 0
        self._cb_disabled = False

    @classmethod
    async def create(cls, *args: Any, **kwargs: Any) -> Virtqueue:
        """Construct (same arguments) and zero the rings: every index and flag starts at 0."""
        vq = cls(*args, **kwargs)
        try:
            await vq._zero_rings()
        except BaseException:
            vq.free_rings()
            raise
        return vq

    # -- memory ---------------------------------------------------------------------------------

    def _allocate(self) -> VringAddresses:
        if self.layout == "legacy":
            base = self.allocator.alloc(vring_size(self.num), PAGE_SIZE)
            return legacy_addresses(base, self.num)
        blocks: list[int] = []
        try:
            for size, align in (
                (DESC_SIZE * self.num, 16),
                (6 + 2 * self.num, 2),
                (6 + USED_ELEM_SIZE * self.num, 4),
            ):
                blocks.append(self.allocator.alloc(size, align))
        except BaseException:
            for gpa in blocks:
                self.allocator.free(gpa)
            raise
        return VringAddresses(blocks[0], blocks[1], blocks[2], tuple(blocks))

    async def _zero_rings(self) -> None:
        a = self.addresses
        if self.layout == "legacy":
            await self.memory.write(a.desc, bytes(vring_size(self.num)))
            return
        await self.memory.writev([
            (a.desc, bytes(DESC_SIZE * self.num)),
            (a.avail, bytes(6 + 2 * self.num)),
            (a.used, bytes(6 + USED_ELEM_SIZE * self.num)),
        ])

    def free_rings(self) -> None:
        """Give the ring memory back. Only once the device has stopped using the queue."""
        for gpa in self.addresses.blocks:
            self.allocator.free(gpa)
        self.addresses = VringAddresses(0, 0, 0, ())

    @property
    def _used_event(self) -> int:
        return self.addresses.avail + 4 + 2 * self.num

    @property
    def _avail_event(self) -> int:
        return self.addresses.used + 4 + USED_ELEM_SIZE * self.num

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def in_flight(self) -> int:
        return len(self._heads)

    # -- publishing (virtqueue_add_split) -------------------------------------------------------

    async def add(self, out_bufs: Buffers, in_bufs: Buffers, token: object) -> None:
        """Publish one chain: device-readable ``out_bufs`` then device-writable ``in_bufs``.

        ``token`` comes back from :meth:`get_buf`; an ``asyncio.Future`` token is instead resolved
        with the used length by :meth:`interrupt`. Raises :class:`QueueFullError` when the chain
        does not fit now; :meth:`submit` waits for room instead.
        """
        if token is None:
            raise ValueError("token must not be None: get_buf() returns None for 'nothing used'")
        self._check_buffers(out_bufs, in_bufs)
        table = self._alloc_indirect(len(out_bufs) + len(in_bufs))
        try:
            async with self._lock:
                self._check_usable()
                await self._add_locked(out_bufs, in_bufs, token, table)
                table = None
                force_kick = self._num_added == 0xFFFF  # keep old/new apart for the event test
        finally:
            if table is not None:
                self.allocator.free(table)
        if force_kick:
            await self.kick()

    def _check_buffers(self, out_bufs: Buffers, in_bufs: Buffers) -> None:
        if not out_bufs and not in_bufs:
            raise ValueError("a chain needs at least one buffer")
        for gpa, length in (*out_bufs, *in_bufs):
            if not 0 < length < 1 << 32 or gpa < 0:
                raise ValueError(f"bad buffer {gpa:#x}+{length}: length must be in 1..2^32-1")

    def _alloc_indirect(self, count: int) -> int | None:
        """An indirect table when negotiated and useful; ``None`` (go direct) if RAM is short."""
        if not self.indirect or count < 2:
            return None
        try:
            return self.allocator.alloc(DESC_SIZE * count, 16)
        except MemoryError:
            return None

    def _needed(self, count: int, table: int | None) -> int:
        return 1 if table is not None else count

    async def _add_locked(
        self, out_bufs: Buffers, in_bufs: Buffers, token: object, table: int | None
    ) -> None:
        count = len(out_bufs) + len(in_bufs)
        needed = self._needed(count, table)
        if needed > len(self._free):
            raise QueueFullError(self.device, self.index, needed, len(self._free), self.num)
        chain = [(gpa, n, 0) for gpa, n in out_bufs]
        chain += [(gpa, n, VIRTQ_DESC_F_WRITE) for gpa, n in in_bufs]
        if table is not None:
            await self.memory.write(table, _chain_bytes(chain, list(range(count))))
            chain = [(table, DESC_SIZE * count, VIRTQ_DESC_F_INDIRECT)]
        descs = [self._free.pop() for _ in chain]
        await self.memory.writev(_chain_segments(self.addresses.desc, chain, descs))
        head = descs[0]
        self._heads[head] = _Head(token, descs, table, sum(n for _, n in in_bufs))
        slot = self.addresses.avail + 4 + 2 * (self._avail_idx & (self.num - 1))
        await self.memory.write_u16(slot, head)
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        await self.memory.write_u16(self.addresses.avail + 2, self._avail_idx)
        self._num_added += 1

    async def kick(self) -> bool:
        """Notify the device of published chains unless it asked not to be; True if notified."""
        async with self._lock:
            needed = await self._kick_prepare()
        if needed and self._notify is not None:
            await self._notify(self)
        return needed

    async def _kick_prepare(self) -> bool:
        """virtqueue_kick_prepare_split: EVENT_IDX crossing of avail_event, else used.flags."""
        if not self._num_added:
            return False  # nothing new: Linux would kick anyway (without EVENT_IDX); no need
        new = self._avail_idx
        old = (new - self._num_added) & 0xFFFF
        self._num_added = 0
        full_barrier()
        if self.event_idx:
            return vring_need_event(await self.memory.read_u16(self._avail_event), new, old)
        return not await self.memory.read_u16(self.addresses.used) & VIRTQ_USED_F_NO_NOTIFY

    async def submit(
        self, out_bufs: Buffers, in_bufs: Buffers, *, release: Callable[[], None] | None = None
    ) -> int:
        """Add a chain, kick, and wait until the device returns it; the used length.

        Waits for free descriptors when the ring is full. If the caller is cancelled the buffers
        may still belong to the device: ``release`` (when given) is then called once the device
        has given them back (or the queue is gone); on any other outcome the buffers are the
        caller's again when this returns or raises.
        """
        self._check_buffers(out_bufs, in_bufs)
        done = asyncio.get_running_loop().create_future()
        try:
            kick = await self._publish(out_bufs, in_bufs, done)
        except asyncio.CancelledError:
            if release is not None:
                release()  # never published: nothing of it is the device's
            raise
        try:
            if kick and self._notify is not None:
                await self._notify(self)
            return await asyncio.shield(done)
        except asyncio.CancelledError:
            if release is not None:
                done.add_done_callback(lambda _: release())
            raise

    async def _publish(self, out_bufs: Buffers, in_bufs: Buffers, done: asyncio.Future) -> bool:
        count = len(out_bufs) + len(in_bufs)
        table = self._alloc_indirect(count)
        try:
            needed = self._needed(count, table)
            if needed > self.num:
                raise QueueFullError(self.device, self.index, needed, len(self._free), self.num)
            async with self._lock:
                await self._lock.wait_for(
                    lambda: self.broken is not None or len(self._free) >= needed
                )
                self._check_usable()
                await self._add_locked(out_bufs, in_bufs, done, table)
                table = None
                return await self._kick_prepare()
        finally:
            if table is not None:
                self.allocator.free(table)

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise self.broken
        if not self.addresses.blocks:
            raise QueueDeletedError(self.device, self.index)

    # -- consuming (virtqueue_get_buf_ctx_split) ------------------------------------------------

    async def get_buf(self) -> tuple[object, int] | None:
        """The next returned chain as ``(token, used length)``, or None if none is waiting."""
        async with self._lock:
            if self._backlog:
                return self._backlog.popleft()
            item = await self._get_buf_locked()
            self._lock.notify_all()
            return item

    async def _more_used(self) -> bool:
        if self.broken is not None or not self.addresses.blocks:
            return False
        return await self.memory.read_u16(self.addresses.used + 2) != self._last_used

    async def _get_buf_locked(self) -> tuple[object, int] | None:
        if self.broken is not None or not self.addresses.blocks:
            return None
        used_idx = await self.memory.read_u16(self.addresses.used + 2)
        pending = (used_idx - self._last_used) & 0xFFFF
        if pending == 0:
            return None
        if pending > self.num:
            return self._break(f"used.idx moved from {self._last_used} to {used_idx}, "
                               f"more than the queue size {self.num}")
        slot = self._last_used & (self.num - 1)
        elem = self.addresses.used + 4 + USED_ELEM_SIZE * slot
        head_id, length = _USED_ELEM.unpack(await self.memory.read(elem, USED_ELEM_SIZE))
        if head_id >= self.num:
            return self._break(f"used id {head_id} out of range")
        head = self._heads.get(head_id)
        if head is None:
            return self._break(f"used id {head_id} is not a head")
        if length > head.in_bytes:
            return self._break(f"used len {length} is larger than the {head.in_bytes} "
                               f"device-writable bytes of chain {head_id}")
        self._detach(head_id, head)
        self._last_used = (self._last_used + 1) & 0xFFFF
        if self.event_idx and not self._cb_disabled:
            # Ask for an interrupt when the next entry is used (Linux does this on every get).
            await self.memory.write_u16(self._used_event, self._last_used)
        return head.token, length

    def _detach(self, head_id: int, head: _Head) -> None:
        del self._heads[head_id]
        self._free.extend(reversed(head.descs))
        if head.indirect is not None:
            self.allocator.free(head.indirect)

    def _break(self, reason: str) -> None:
        """The device broke the protocol: stop the queue and fail every waiter (Linux BAD_RING)."""
        self.broken = DeviceBrokenError(self.device, self.index, reason)
        self._fail_pending(self.broken)
        self._lock.notify_all()

    def _fail_pending(self, exc: BaseException) -> None:
        for head in self._heads.values():
            token = head.token
            if isinstance(token, asyncio.Future) and not token.done():
                token.set_exception(exc)
                token.exception()  # a cancelled submitter never retrieves it: no warning

    async def interrupt(self) -> bool:
        """vring_interrupt: take every returned chain, resolve submitters, run the callback.

        Returns False when nothing new was used (the interrupt was for another queue).
        """
        async with self._lock:
            if not await self._more_used():
                return False
            while (item := await self._get_buf_locked()) is not None:
                token, length = item
                if isinstance(token, asyncio.Future):
                    if not token.done():
                        token.set_result(length)
                else:
                    self._backlog.append(item)
            self._lock.notify_all()
        if self.callback is not None:
            try:
                await maybe_await(self.callback(self))
            except Exception:
                log.exception("%s: virtqueue %d callback failed", self.device, self.index)
        return True

    async def fail(self, exc: Exception) -> None:
        """Stop the queue with ``exc`` (DEVICE_NEEDS_RESET): waiters raise it, nothing is freed."""
        async with self._lock:
            if self.broken is None:
                self.broken = exc
            self._fail_pending(exc)
            self._lock.notify_all()

    async def detach_all(self) -> None:
        """The device has stopped using the queue (reset or deactivated): reclaim every chain."""
        async with self._lock:
            self._fail_pending(QueueDeletedError(self.device, self.index))
            for head_id, head in list(self._heads.items()):
                self._detach(head_id, head)
            self._lock.notify_all()

    # -- notification suppression ---------------------------------------------------------------

    async def disable_cb(self) -> None:
        """Ask the device not to interrupt for this queue (a hint; it may still do so)."""
        async with self._lock:
            self._cb_disabled = True
            if self.event_idx:
                # used.flags must stay 0 with EVENT_IDX: put used_event as far behind as possible.
                await self.memory.write_u16(self._used_event, (self._last_used - 1) & 0xFFFF)
            else:
                await self.memory.write_u16(self.addresses.avail, VIRTQ_AVAIL_F_NO_INTERRUPT)

    async def enable_cb(self) -> bool:
        """Re-enable interrupts; False if chains were used meanwhile (poll them, or miss them)."""
        async with self._lock:
            self._cb_disabled = False
            if self.event_idx:
                await self.memory.write_u16(self._used_event, self._last_used)
            else:
                await self.memory.write_u16(self.addresses.avail, 0)
            # The re-check after the store: a chain used before it would raise no interrupt.
            full_barrier()
            return not await self._more_used()

    def __repr__(self) -> str:
        return (f"<Virtqueue {self.device} #{self.index} num={self.num} {self.layout} "
                f"in_flight={self.in_flight} avail={self._avail_idx} used={self._last_used}>")


def _chain_bytes(chain: list[tuple[int, int, int]], descs: list[int]) -> bytes:
    """Descriptors of one chain in table order (an indirect table: next = position + 1)."""
    return b"".join(_desc(chain, descs, i) for i in range(len(chain)))


def _chain_segments(
    table: int, chain: list[tuple[int, int, int]], descs: list[int]
) -> list[tuple[int, bytes]]:
    return [(table + DESC_SIZE * d, _desc(chain, descs, i)) for i, d in enumerate(descs)]


def _desc(chain: list[tuple[int, int, int]], descs: list[int], i: int) -> bytes:
    gpa, length, flags = chain[i]
    if i + 1 < len(chain):
        return _DESC.pack(gpa, length, flags | VIRTQ_DESC_F_NEXT, descs[i + 1])
    return _DESC.pack(gpa, length, flags, 0)
