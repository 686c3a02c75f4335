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
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from viowire.client.errors import DeviceBrokenError, QueueDeletedError, QueueFullError
from viowire.virtio.constants import PAGE_SIZE
from viowire.virtio.memory import GuestMemory, MappedGuestMemory, full_barrier
from viowire.virtio.ring import (
    DESC,
    DESC_SIZE,
    USED_ELEM,
    USED_ELEM_SIZE,
    VIRTQ_AVAIL_F_NO_INTERRUPT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    VIRTQ_USED_F_NO_NOTIFY,
    RingLayout,
    area_sizes,
    indirect_descriptor,
    valid_queue_size,
    vring_need_event,
    vring_size,
)

log = logging.getLogger(__name__)

Layout = Literal["legacy", "modern"]
Buffers = Sequence[tuple[int, int]]  # (gpa, length)


class Allocator(Protocol):
    """Where the driver's rings and buffers go (GuestRAM, RangeAllocator, QtestRAM). Blocks come
    back with undefined contents: Virtqueue.create zeroes its rings itself."""

    def alloc(self, size: int, align: int = 16) -> int: ...

    def free(self, gpa: int) -> None: ...


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
    release: Callable[[], None] | None  # for a cancelled submit: runs when the chain returns


class Virtqueue:
    """A split virtqueue, driver side. Build it with :meth:`create` (which zeroes the rings).

    Guest memory that this process maps (:class:`MappedGuestMemory`) never suspends, so chains
    are published and consumed synchronously there, without taking the Condition unless a
    submitter is waiting for room; remote memory (qtest) goes through the awaiting path.
    """

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
        on_publish: Callable[[Virtqueue], None] | None = None,
    ) -> None:
        """Allocate the rings; raises ``MemoryError`` if they do not fit (the caller shrinks)."""
        if not valid_queue_size(num):
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
        self.addresses, self.blocks = self._allocate()
        """Where the ring's areas are (a :class:`RingLayout`), and the allocated blocks that
        hold them (freed by :meth:`free_rings`; empty once freed)."""
        self.broken: Exception | None = None
        self._mapped = memory if isinstance(memory, MappedGuestMemory) else None
        self._loop: asyncio.AbstractEventLoop | None = None  # get_running_loop() is a syscall
        self._lock = asyncio.Condition()
        self._room_waiters = 0  # submitters waiting on the Condition for free descriptors
        self._kicks: set[asyncio.Task[None]] = set()  # see _kick_anyway
        self._free: list[int] = list(reversed(range(num)))  # a stack: descriptor 0 goes first
        self._heads: dict[int, _Head] = {}
        self._backlog: deque[tuple[object, int]] = deque()  # returned, not yet taken by get_buf
        self._avail_idx = 0
        self._last_used = 0
        self._num_added = 0
        self._cb_disabled = False
        self.polling = False  # the driver polls the used ring: no notifications meanwhile
        self.on_publish = on_publish  # called after each submit's publish (polling drivers)

    @classmethod
    async def create(cls, *args: Any, **kwargs: Any) -> Virtqueue:
        """Construct (same arguments) and zero the rings: every index and flag starts at 0."""
        vq = cls(*args, **kwargs)
        vq._loop = asyncio.get_running_loop()
        try:
            await vq._zero_rings()
        except BaseException:
            vq.free_rings()
            raise
        return vq

    # -- memory ---------------------------------------------------------------------------------

    def _allocate(self) -> tuple[RingLayout, tuple[int, ...]]:
        if self.layout == "legacy":
            base = self.allocator.alloc(vring_size(self.num), PAGE_SIZE)
            return RingLayout.legacy(base, self.num), (base,)
        blocks: list[int] = []
        try:
            for size, align in area_sizes(self.num):
                blocks.append(self.allocator.alloc(size, align))
        except BaseException:
            for gpa in blocks:
                self.allocator.free(gpa)
            raise
        return RingLayout(self.num, *blocks), tuple(blocks)

    async def _zero_rings(self) -> None:
        a = self.addresses
        if self.layout == "legacy":
            await self.memory.write(a.desc, bytes(vring_size(self.num)))
            return
        await self.memory.writev([(addr, bytes(size)) for _, addr, size, _ in a.areas()])

    def free_rings(self) -> None:
        """Give the ring memory back. Only once the device has stopped using the queue."""
        for gpa in self.blocks:
            self.allocator.free(gpa)
        self.blocks = ()
        self.addresses = RingLayout(self.num, 0, 0, 0)

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
        count = _check_buffers(out_bufs, in_bufs)
        async with self._lock:
            self._check_usable()
            table = self._placement(count)
            if table is _NO_ROOM:
                needed = 1 if self._can_indirect(count) else count
                raise QueueFullError(self.device, self.index, needed, len(self._free), self.num)
            await self._add(out_bufs, in_bufs, count, token, None, table)
            force_kick = self._num_added == 0xFFFF  # keep old/new apart for the event test
        if force_kick:
            await self.kick()

    def _can_indirect(self, count: int) -> bool:
        return self.indirect and count >= 2

    def _placement(self, count: int) -> int | None:
        """Where a chain of ``count`` buffers goes now: ``None`` straight into the ring (it fits),
        the gpa of an indirect table (it does not, and one descriptor is free), or ``_NO_ROOM``.

        A direct chain costs the device no extra read and the driver no allocation; the table
        is only for chains that would not fit (Linux goes indirect whenever it can, but its
        tables come from kmalloc, not from a first-fit allocator over guest RAM).
        """
        free = len(self._free)
        if count <= free:
            return None
        if not free or not self._can_indirect(count):
            return _NO_ROOM
        try:
            return self.allocator.alloc(DESC_SIZE * count, 16)
        except MemoryError:
            return _NO_ROOM

    def _take(
        self,
        out_bufs: Buffers,
        in_bufs: Buffers,
        count: int,
        token: object,
        release: Callable[[], None] | None,
        table: int | None,
        into: memoryview | None = None,
    ) -> tuple[list[int], bytearray | None]:
        """Take ring descriptors for a chain and record it.

        Returns the ring descriptors (the head first) and the packed descriptors, DESC_SIZE
        bytes each: one per ring descriptor for a direct chain, the table's entries for an
        indirect one. ``into`` (a direct chain in mapped memory): the descriptor table itself,
        which they are packed into in place (None is returned for them). There must be room
        (see :meth:`_placement`).
        """
        free = self._free
        if table is None:
            ids = free[: -count - 1 : -1]  # the top of the stack, in pop order
            if into is None:
                packed = bytearray(DESC_SIZE * count)
                in_bytes = _pack_chain(out_bufs, in_bufs, ids, packed, range(count))
            else:
                packed = None
                in_bytes = _pack_chain(out_bufs, in_bufs, ids, into, ids)
        else:
            ids = free[-1:]
            packed = bytearray(DESC_SIZE * count)
            in_bytes = _pack_chain(out_bufs, in_bufs, range(count), packed, range(count))
        del free[-len(ids) :]
        self._heads[ids[0]] = _Head(token, ids, table, in_bytes, release)
        return ids, packed

    def _untake(self, head_id: int) -> None:
        """Undo :meth:`_take` for a chain that never reached avail.idx."""
        head = self._heads.pop(head_id)
        self._free.extend(reversed(head.descs))
        if head.indirect is not None:
            self.allocator.free(head.indirect)

    def _add_mapped(
        self,
        out_bufs: Buffers,
        in_bufs: Buffers,
        count: int,
        token: object,
        release: Callable[[], None] | None,
        table: int | None,
    ) -> None:
        """Publish a chain in mapped memory: descriptors, then the ring slot, then avail.idx."""
        mem = self._mapped
        a = self.addresses
        descs = mem.view(a.desc, DESC_SIZE * self.num)
        if table is None:  # packed straight into the descriptor table
            ids, _ = self._take(out_bufs, in_bufs, count, token, release, table, descs)
            head = ids[0]
        else:
            ids, packed = self._take(out_bufs, in_bufs, count, token, release, table)
            head = ids[0]
            mem.write_sync(table, packed)
            descs[DESC_SIZE * head : DESC_SIZE * (head + 1)] = indirect_descriptor(table, count)
        idx = self._avail_idx
        mem.store_u16(a.avail_ring + 2 * (idx & (self.num - 1)), head)
        self._avail_idx = idx = (idx + 1) & 0xFFFF
        mem.store_u16(a.avail_idx, idx)
        self._num_added += 1

    async def _add(
        self,
        out_bufs: Buffers,
        in_bufs: Buffers,
        count: int,
        token: object,
        release: Callable[[], None] | None,
        table: int | None,
    ) -> None:
        """:meth:`_add_mapped` for any guest memory; holds the lock."""
        if self._mapped is not None:
            self._add_mapped(out_bufs, in_bufs, count, token, release, table)
            return
        ids, packed = self._take(out_bufs, in_bufs, count, token, release, table)
        head = ids[0]
        a = self.addresses
        if table is None:
            writes = [
                (a.desc_addr(d), bytes(packed[DESC_SIZE * i : DESC_SIZE * (i + 1)]))
                for i, d in enumerate(ids)
            ]
        else:
            writes = [
                (table, bytes(packed)),
                (a.desc_addr(head), indirect_descriptor(table, count)),
            ]
        try:
            await self.memory.writev(writes)
            await self.memory.write_u16(a.avail_slot_addr(self._avail_idx), head)
        except BaseException:
            self._untake(head)
            raise
        self._avail_idx = (self._avail_idx + 1) & 0xFFFF
        self._num_added += 1
        # From here on the chain counts as published: a cancellation must not stop the store.
        await asyncio.shield(self.memory.write_u16(a.avail_idx, self._avail_idx))

    async def kick(self) -> bool:
        """Notify the device of published chains unless it asked not to be; True if notified."""
        async with self._lock:
            needed = await self._kick_prepare()
        if needed and self._notify is not None:
            await self._notify(self)
        return needed

    def _kick_range(self) -> tuple[int, int] | None:
        """(new, old) avail.idx since the last kick decision, or None if nothing was added."""
        if not self._num_added:
            return None  # nothing new: Linux would kick anyway (without EVENT_IDX); no need
        new = self._avail_idx
        old = (new - self._num_added) & 0xFFFF
        self._num_added = 0
        full_barrier()
        return new, old

    def _kick_needed(self, new: int, old: int, value: int) -> bool:
        """``value``: avail_event with EVENT_IDX, else used.flags."""
        if self.event_idx:
            return vring_need_event(value, new, old)
        return not value & VIRTQ_USED_F_NO_NOTIFY

    def _kick_prepare_mapped(self) -> bool:
        """virtqueue_kick_prepare_split: EVENT_IDX crossing of avail_event, else used.flags."""
        span = self._kick_range()
        if span is None:
            return False
        a = self.addresses
        where = a.avail_event if self.event_idx else a.used_flags
        return self._kick_needed(*span, self._mapped.load_u16(where))

    async def _kick_prepare(self) -> bool:
        if self._mapped is not None:
            return self._kick_prepare_mapped()
        span = self._kick_range()
        if span is None:
            return False
        a = self.addresses
        where = a.avail_event if self.event_idx else a.used_flags
        return self._kick_needed(*span, await self.memory.read_u16(where))

    async def submit(
        self, out_bufs: Buffers, in_bufs: Buffers, *, release: Callable[[], None] | None = None
    ) -> int:
        """Add a chain, kick, and wait until the device returns it; the used length.

        Waits for free descriptors when the ring is full. If the caller is cancelled the buffers
        may still belong to the device: ``release`` (when given) is then called once the device
        has given them back (or the queue is gone); on any other outcome the buffers are the
        caller's again when this returns or raises.
        """
        count = _check_buffers(out_bufs, in_bufs)
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        done = loop.create_future()
        try:
            kick = None
            if self._mapped is not None and not self._room_waiters and not self._lock.locked():
                kick = self._publish_now(out_bufs, in_bufs, count, done, release)
            if kick is None:
                kick = await self._publish(out_bufs, in_bufs, count, done, release)
        except asyncio.CancelledError:
            if release is not None and not done.cancelled():
                release()  # never published, or back already: nothing of it is the device's
            raise
        if self.on_publish is not None:
            self.on_publish(self)
        try:
            if kick and self._notify is not None:
                await self._notify(self)
                kick = False
            return await done
        except asyncio.CancelledError:
            if kick:
                self._kick_anyway()
            # The chain is published. Cancelled (by us or by the task's cancel), it is released
            # when the device gives it back; done already, it is back now.
            done.cancel()
            if release is not None and not done.cancelled():
                release()
            raise

    def _kick_anyway(self) -> None:
        """A cancellation lost a kick (or the decision to kick): notify from a task of our own.
        A spurious notification is harmless; a missing one can stall the queue for good."""
        if self._notify is None or self._loop is None:
            return
        task = self._loop.create_task(self._notify(self))
        self._kicks.add(task)
        task.add_done_callback(self._kicked)

    def _kicked(self, task: asyncio.Task[None]) -> None:
        self._kicks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.warning(
                "%s: virtqueue %d: notification failed: %s",
                self.device,
                self.index,
                task.exception(),
            )

    def _publish_now(
        self,
        out_bufs: Buffers,
        in_bufs: Buffers,
        count: int,
        done: asyncio.Future,
        release: Callable[[], None] | None,
    ) -> bool | None:
        """Publish in mapped memory without waiting: whether to kick, or None if no room now."""
        self._check_usable()
        table = self._placement(count)
        if table is _NO_ROOM:
            return None
        self._add_mapped(out_bufs, in_bufs, count, done, release, table)
        return self._kick_prepare_mapped()

    async def _publish(
        self,
        out_bufs: Buffers,
        in_bufs: Buffers,
        count: int,
        done: asyncio.Future,
        release: Callable[[], None] | None,
    ) -> bool:
        """Wait for room under the lock, publish, and decide on the kick."""
        if count > self.num and not self._can_indirect(count):
            raise QueueFullError(self.device, self.index, count, len(self._free), self.num)
        needed = 1 if self._can_indirect(count) else count
        async with self._lock:
            while True:
                self._room_waiters += 1
                try:
                    await self._lock.wait_for(
                        lambda n=needed: self.broken is not None or len(self._free) >= n
                    )
                finally:
                    self._room_waiters -= 1
                self._check_usable()
                table = self._placement(count)
                if table is not _NO_ROOM:
                    break
                if count > self.num:  # only a table would do, and guest RAM has none
                    raise QueueFullError(self.device, self.index, count, len(self._free), self.num)
                needed = count  # no table: wait until the chain fits directly
            try:
                await self._add(out_bufs, in_bufs, count, done, release, table)
                return await self._kick_prepare()
            except asyncio.CancelledError:
                if any(head.token is done for head in self._heads.values()):
                    done.cancel()  # published: released when the device gives it back
                    self._kick_anyway()
                raise

    def _check_usable(self) -> None:
        if self.broken is not None:
            raise self.broken
        if not self.blocks:
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
        if self.broken is not None or not self.blocks:
            return False
        return await self.memory.read_u16(self.addresses.used_idx) != self._last_used

    def _pending(self, used_idx: int) -> int:
        """Entries used since the last one taken; 0 if the device broke the ring by moving
        used.idx further than the ring holds (the queue is then broken)."""
        pending = (used_idx - self._last_used) & 0xFFFF
        if pending > self.num:
            self._break(
                f"used.idx moved from {self._last_used} to {used_idx}, "
                f"more than the queue size {self.num}"
            )
            return 0
        return pending

    def _take_used(self, head_id: int, length: int) -> _Head | None:
        """Check a used element and take its chain back; None if it breaks the queue."""
        head = self._heads.get(head_id) if head_id < self.num else None
        if head is None:
            reason = "out of range" if head_id >= self.num else "is not a head"
            self._break(f"used id {head_id} {reason}")
            return None
        if length > head.in_bytes:
            self._break(
                f"used len {length} is larger than the {head.in_bytes} "
                f"device-writable bytes of chain {head_id}"
            )
            return None
        self._detach(head_id, head)
        self._last_used = (self._last_used + 1) & 0xFFFF
        return head

    async def _get_buf_locked(self) -> tuple[object, int] | None:
        a = self.addresses
        if self.broken is not None or not self.blocks:
            return None
        if not self._pending(await self.memory.read_u16(a.used_idx)):
            return None
        elem = a.used_elem_addr(self._last_used)
        head_id, length = USED_ELEM.unpack(await self.memory.read(elem, USED_ELEM_SIZE))
        head = self._take_used(head_id, length)
        if head is None:
            return None
        if self.event_idx and not self._cb_disabled:
            # Ask for an interrupt when the next entry is used (Linux does this on every get).
            await self.memory.write_u16(a.used_event, self._last_used)
        return head.token, length

    def _detach(self, head_id: int, head: _Head) -> None:
        del self._heads[head_id]
        self._free.extend(reversed(head.descs))
        if head.indirect is not None:
            self.allocator.free(head.indirect)
        if head.release is not None and head.token.cancelled():  # type: ignore[attr-defined]
            try:
                head.release()
            except Exception:
                log.exception(
                    "%s: virtqueue %d: releasing a cancelled request's buffers failed",
                    self.device,
                    self.index,
                )

    def _break(self, reason: str) -> None:
        """The device broke the protocol: stop the queue and fail every waiter (Linux BAD_RING).

        The caller wakes the submitters waiting for room."""
        self.broken = DeviceBrokenError(self.device, self.index, reason)
        self._fail_pending(self.broken)

    def _fail_pending(self, exc: BaseException) -> None:
        for head in self._heads.values():
            token = head.token
            if isinstance(token, asyncio.Future) and not token.done():
                token.set_exception(exc)
                token.exception()  # a cancelled submitter never retrieves it: no warning

    def _deliver(self, head: _Head, length: int) -> None:
        token = head.token
        if isinstance(token, asyncio.Future):
            if not token.done():
                token.set_result(length)
        else:
            self._backlog.append((token, length))

    def _collect_mapped(self) -> bool:
        """Take every used chain from mapped memory, resolving submitters; True if any (or if
        the device broke the queue). With EVENT_IDX, used_event is moved once per batch and
        used.idx read again after it, so a chain used meanwhile is not left without interrupt.
        """
        if self.broken is not None or not self.blocks:
            return False
        mem = self._mapped
        a = self.addresses
        mask = self.num - 1
        unpack = USED_ELEM.unpack_from
        found = False
        while pending := self._pending(mem.load_u16(a.used_idx)):
            found = True
            elems = mem.view(a.used_ring, USED_ELEM_SIZE * self.num)
            for _ in range(pending):
                head_id, length = unpack(elems, USED_ELEM_SIZE * (self._last_used & mask))
                head = self._take_used(head_id, length)
                if head is None:
                    return True
                self._deliver(head, length)
            if not self.event_idx or self._cb_disabled or self.polling:
                continue
            mem.store_u16(a.used_event, self._last_used)
            full_barrier()
        return found or self.broken is not None

    def suppress_interrupts(self) -> None:
        """The driver polls (mapped memory): ask the device not to notify for used buffers,
        used_event one behind with EVENT_IDX, else VIRTQ_AVAIL_F_NO_INTERRUPT (§2.7.10)."""
        self.polling = True
        if self._cb_disabled or self._mapped is None:
            return  # off already, at the caller's request
        if self.event_idx:
            self._mapped.store_u16(self.addresses.used_event, (self._last_used - 1) & 0xFFFF)
        else:
            self._mapped.store_u16(self.addresses.avail_flags, VIRTQ_AVAIL_F_NO_INTERRUPT)

    def allow_interrupts(self) -> bool:
        """Polling is over: notifications on again. True if chains were used meanwhile, whose
        notification the device may have skipped: collect them."""
        self.polling = False
        mem = self._mapped
        if self._cb_disabled or mem is None or not self.blocks:
            return False
        if self.event_idx:
            mem.store_u16(self.addresses.used_event, self._last_used)
        else:
            mem.store_u16(self.addresses.avail_flags, 0)
        full_barrier()
        return bool(self._pending(mem.load_u16(self.addresses.used_idx)))

    def used_pending(self) -> bool:
        """Mapped memory: the device has returned chains not taken yet."""
        mem = self._mapped
        if mem is None or self.broken is not None or not self.blocks:
            return False
        return bool(self._pending(mem.load_u16(self.addresses.used_idx)))

    def can_collect_now(self) -> bool:
        """Whether :meth:`collect_now` can do :meth:`interrupt`'s work without awaiting: mapped
        memory, nobody inside the lock or waiting for room, no callback to run."""
        return (
            self._mapped is not None
            and self.callback is None
            and not self._room_waiters
            and not self._lock.locked()
        )

    def collect_now(self) -> bool:
        """:meth:`interrupt` from a plain callback, where :meth:`can_collect_now` said so."""
        return self._collect_mapped()

    async def interrupt(self) -> bool:
        """vring_interrupt: take every returned chain, resolve submitters, run the callback.

        Returns False when nothing new was used (the interrupt was for another queue).
        """
        if self._mapped is not None and not self._lock.locked():
            if not self._collect_mapped():
                return False
            if self._room_waiters:
                async with self._lock:
                    self._lock.notify_all()
        else:
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
                await self.memory.write_u16(
                    self.addresses.used_event, (self._last_used - 1) & 0xFFFF
                )
            else:
                await self.memory.write_u16(self.addresses.avail_flags, VIRTQ_AVAIL_F_NO_INTERRUPT)

    async def enable_cb(self) -> bool:
        """Re-enable interrupts; False if chains were used meanwhile (poll them, or miss them)."""
        async with self._lock:
            self._cb_disabled = False
            if self.event_idx:
                await self.memory.write_u16(self.addresses.used_event, self._last_used)
            else:
                await self.memory.write_u16(self.addresses.avail_flags, 0)
            # The re-check after the store: a chain used before it would raise no interrupt.
            full_barrier()
            return not await self._more_used()

    def __repr__(self) -> str:
        return (
            f"<Virtqueue {self.device} #{self.index} num={self.num} {self.layout} "
            f"in_flight={self.in_flight} avail={self._avail_idx} used={self._last_used}>"
        )


_NO_ROOM = -1  # _placement: the chain cannot go out now
_F_NEXT = VIRTQ_DESC_F_NEXT  # short names for _pack_chain's lines
_F_WRITE = VIRTQ_DESC_F_WRITE


def _check_buffers(out_bufs: Buffers, in_bufs: Buffers) -> int:
    """The chain's buffer count, after checking every (gpa, length)."""
    count = len(out_bufs) + len(in_bufs)
    if not count:
        raise ValueError("a chain needs at least one buffer")
    for bufs in (out_bufs, in_bufs):
        for gpa, length in bufs:
            if not 0 < length < 1 << 32 or not 0 <= gpa < 1 << 64:
                raise ValueError(f"bad buffer {gpa:#x}+{length}: length must be in 1..2^32-1")
    return count


def _pack_chain(
    out_bufs: Buffers,
    in_bufs: Buffers,
    links: Sequence[int],
    into: bytearray | memoryview,
    slots: Sequence[int],
) -> int:
    """Pack the chain's descriptors, readable then writable, into ``into``: the i-th at
    descriptor ``slots[i]``, linked to ``links[i + 1]`` (ring descriptors; for an indirect
    table ``range(n)``). Returns its device-writable bytes."""
    pack_into = DESC.pack_into
    last = len(out_bufs) + len(in_bufs) - 1
    i = 0
    for gpa, length in out_bufs:
        if i < last:
            pack_into(into, DESC_SIZE * slots[i], gpa, length, _F_NEXT, links[i + 1])
        else:
            pack_into(into, DESC_SIZE * slots[i], gpa, length, 0, 0)
        i += 1
    in_bytes = 0
    for gpa, length in in_bufs:
        if i < last:
            pack_into(into, DESC_SIZE * slots[i], gpa, length, _F_WRITE | _F_NEXT, links[i + 1])
        else:
            pack_into(into, DESC_SIZE * slots[i], gpa, length, _F_WRITE, 0)
        in_bytes += length
        i += 1
    return in_bytes
