"""Serving a device's virtqueues: the passes over a ring that QueueNotify starts, and poll mode.

:class:`QueueService` is the half of :class:`viowire.server.mmio.MmioDevice` that walks the rings
(the other half is the register file). A notify starts a pass from a loop callback once the
frames at hand are dispatched; the pass runs as a plain callback until it first has to wait (a
proxied read, a flush) and only then becomes a task, because a task per notify cost more than
the pass itself with shared memory. Every await re-checks the queue's epoch, so nothing is
written to guest memory after a reset or a queue stop. Poll mode (``poll_us``) watches a ring
after a pass with the driver's notifications off, as vhost's busy-polling does.
"""

from __future__ import annotations

import asyncio
import collections.abc
import contextlib
import logging
import time
from collections.abc import Coroutine, Generator, Sequence
from functools import partial

from viowire import polling
from viowire.device import Device
from viowire.server.queue import Queue
from viowire.server.virtqueue import DescriptorChain, RingError, SplitVirtqueue, StaleQueueError
from viowire.virtio.constants import Feature
from viowire.virtio.memory import GuestMemory, GuestMemoryError, MappedGuestMemory, Region

log = logging.getLogger("viowire.device")

MAX_POLLING_QUEUES = 64  # queues of one process polling at once (poll mode); the rest are notified
_polling = [0]  # queues polling now, in this process


class _GuardedMemory(GuestMemory):
    """Guest memory as a backend sees it while serving one queue: every access first checks
    that the queue has not been reset or stopped since the chain was popped, and that the
    device has not entered DEVICE_NEEDS_RESET."""

    __slots__ = ("_memory", "_queue", "_service", "epoch")

    def __init__(
        self, memory: GuestMemory, queue: SplitVirtqueue, epoch: int, service: QueueService
    ) -> None:
        self._memory = memory
        self._queue = queue
        self._service = service
        self.epoch = epoch

    @property
    def regions(self) -> Sequence[Region]:
        return self._memory.regions

    def _check_epoch(self) -> None:
        if self._queue.epoch != self.epoch:
            raise StaleQueueError(f"queue {self._queue.index} was reset during a request")
        if self._service._broken:
            raise StaleQueueError(f"queue {self._queue.index}: the device needs a reset")

    async def readv(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        self._check_epoch()
        data = await self._memory.readv(ranges)
        self._check_epoch()
        return data

    async def writev(self, segments: Sequence[tuple[int, bytes]]) -> None:
        self._check_epoch()
        await self._memory.writev(segments)


class _Returned(GuestMemory):
    """The memory of a chain given back to the driver: its buffers are not the device's any
    more, so every access is refused."""

    regions: Sequence[Region] = ()

    async def readv(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        raise StaleQueueError("this chain was completed: its buffers are the driver's again")

    async def writev(self, segments: Sequence[tuple[int, bytes]]) -> None:
        raise StaleQueueError("this chain was completed: its buffers are the driver's again")


RETURNED = _Returned()


class PollState:
    """A device's poll mode: the queues polling now, and each queue's adaptive window."""

    __slots__ = ("limit", "pass_ends", "polls", "windows")

    def __init__(self, limit: float) -> None:
        self.limit = limit  # seconds: poll_us
        self.polls: dict[int, tuple[float, int]] = {}  # index -> (deadline, epoch) while polling
        self.windows: dict[int, float] = {}  # index -> seconds; poll_us until it adapts
        self.pass_ends: dict[int, float] = {}  # index -> perf_counter when its last pass ended

    def window(self, index: int) -> float:
        return self.windows.get(index, self.limit)

    def adapt(self, index: int, waited: float) -> None:
        """The driver's kick came ``waited`` seconds after the queue's last pass."""
        self.windows[index] = polling.adapt(self.window(index), self.limit, waited)


class QueueService:
    """Queue processing for a device; :class:`~viowire.server.mmio.MmioDevice` mixes it in.

    It relies on the device's ``backend``, ``memory``, ``queues``, ``name``, ``_tasks``,
    ``_rerun`` and ``_broken`` attributes and on its ``_has``, ``_fail``, ``_notify_used`` and
    ``_processing_blocked`` methods. Its own state is in class attributes until first set, so
    that an idle device carries none of it (100,000 of them must fit in one process).
    """

    poll_us = 0  # the largest polling window, µs (0: no poll mode)
    _loop: asyncio.AbstractEventLoop | None = None
    _poll_mode: PollState | None = None
    _handles: dict[int, Queue] | None = None  # the device's queue handles, once it asks
    _requests: dict[int, set[asyncio.Task]] | None = None  # queue -> requests that had to wait
    _completions: dict[int, tuple[int, list[tuple[int, int]]]] | None = None  # queue -> unflushed

    # -- the device's side: queue handles -------------------------------------------------------
    def queue_handle(self, index: int) -> Queue:
        """The :class:`Queue` handle of virtqueue ``index`` (made on first use)."""
        if not 0 <= index < len(self.queues):
            raise IndexError(f"{self.name} has no virtqueue {index} (it has {len(self.queues)})")
        handles = self._handles
        if handles is None:
            handles = self._handles = {}
        handle = handles.get(index)
        if handle is None:
            handle = handles[index] = Queue(self, index)
        return handle

    def _usable(self, queue: SplitVirtqueue) -> bool:
        return (
            queue.ready
            and not self._broken
            and self.memory is not None
            and self._processing_blocked() is None
        )

    def _schedule(self, queue: SplitVirtqueue) -> None:
        """A driver's notification for ``queue``: the device's own handler if it has one, else
        the request pass through its ``handle``."""
        backend = self.backend
        if type(backend).queue_notify is Device.queue_notify:
            self._schedule_pass(queue)
            return
        handle = self.queue_handle(queue.index)
        handle._wake()
        try:
            backend.queue_notify(handle)
        except Exception as exc:
            log.exception("%s: queue %d: queue_notify failed", self.name, queue.index)
            self._fail(f"queue {queue.index}: internal error {exc!r}")

    def _wake_waiters(self) -> None:
        """Queues may have become usable (DRIVER_OK, QueueReady): waiting ``get()``s look."""
        if self._handles:
            for handle in self._handles.values():
                handle._wake()

    async def _pop_for_device(self, queue: SplitVirtqueue) -> DescriptorChain | None:
        """:meth:`Queue.pop`: one chain, its memory guarded by the ring's epoch."""
        if not self._usable(queue):
            return None
        memory, epoch = self.memory, queue.epoch
        try:
            self._prepare(queue, memory)
            chain = await queue.pop(memory)
        except StaleQueueError:
            return None
        except (RingError, GuestMemoryError) as exc:
            if queue.epoch == epoch:
                self._fail(f"queue {queue.index}: {exc}")
            return None
        if chain is not None:
            chain.memory = _GuardedMemory(memory, queue, epoch, self)
        return chain

    def _complete_held(self, queue: SplitVirtqueue, chain: DescriptorChain, written: int) -> None:
        """:meth:`Queue.complete`."""
        guarded = chain.memory
        if guarded is RETURNED:
            raise ValueError(f"{chain!r} was completed already: a chain is completed once")
        if not isinstance(guarded, _GuardedMemory) or guarded._queue is not queue:
            raise ValueError(f"{chain!r} was not taken from queue {queue.index} of {self.name}")
        chain.memory = RETURNED
        if guarded.epoch != queue.epoch or self._broken:
            return  # the ring it came from is gone: nothing more is written to it
        self._add_completion(queue, guarded.epoch, chain, written)

    def _schedule_pass(self, queue: SplitVirtqueue) -> None:
        """Serve ``queue`` once the frames at hand are dispatched (the notifies among them make
        one pass). The pass then runs as a plain callback until it first has to wait, and only
        then becomes a task: with shared memory it seldom waits at all, and a task per pass
        cost more than the pass (a loop turn, the loop's set of all tasks)."""
        index = queue.index
        run = self._tasks.get(index)
        if run is not None:
            if run.started:
                self._rerun[index] = True  # the running pass goes round once more
            return
        if self._loop is None:
            try:
                self._loop = asyncio.get_running_loop()
            except RuntimeError:
                log.error("%s: QUEUE_NOTIFY outside an event loop: not processed", self.name)
                return
        run = self._tasks[index] = QueuePass()
        self._loop.call_soon(self._start_pass, queue, run)

    def _start_pass(self, queue: SplitVirtqueue, run: QueuePass) -> None:
        if self._tasks.get(queue.index) is not run:
            return  # the device was closed meanwhile
        run.started = True
        coro = self._queue_task(queue, run)
        try:
            waiting_on = coro.send(None)
        except StopIteration:
            return
        run.task = self._loop.create_task(
            Started(coro, waiting_on), name=f"{self.name} q{queue.index}"
        )

    async def _queue_task(self, queue: SplitVirtqueue, run: QueuePass) -> None:
        """Serve ``queue`` until its ring is empty and no notify came in meanwhile."""
        start = queue.last_avail_idx
        try:
            while not self._broken and queue.ready and self._processing_blocked() is None:
                self._rerun[queue.index] = False
                epoch = queue.epoch
                if not await self._run_guarded(queue, epoch):
                    break
                if not self._rerun.get(queue.index):
                    break
        finally:
            if self._tasks.get(queue.index) is run:
                del self._tasks[queue.index]
        if self.poll_us and queue.last_avail_idx != start:
            self._start_polling(queue)

    # -- polling ----------------------------------------------------------------------------------
    # The window adapts (viowire.polling) by when the driver's next kick with new buffers comes
    # after a pass; work found while polling leaves it as it is.
    @property
    def polling(self) -> dict[int, tuple[float, int]]:
        """Queues polling now: index -> (deadline, epoch of the ring)."""
        return self._poll_mode.polls if self._poll_mode is not None else {}

    def _poll_state(self) -> PollState:
        if self._poll_mode is None:
            self._poll_mode = PollState(self.poll_us / 1e6)
        return self._poll_mode

    def _kick_came(self, index: int) -> None:
        """A notification from the driver: adapt the window by how long after the pass it came.
        Only a kick with new buffers counts, and none while a pass or polling runs."""
        state = self._poll_mode
        if state is None or index in state.polls or index in self._tasks:
            return
        ended = state.pass_ends.get(index)
        memory = self.memory
        if ended is None or type(memory) is not MappedGuestMemory:
            return
        queue = self.queues[index]
        if not queue.ready or not queue.avail_pending(memory):
            return  # nothing new: a spurious kick says nothing about the window
        del state.pass_ends[index]
        state.adapt(index, time.perf_counter() - ended)

    def _start_polling(self, queue: SplitVirtqueue) -> None:
        """Watch the ring for a while with the driver's notifications off, as vhost's
        busy-polling does: a request that comes meanwhile is served without the driver's
        notification waking this process. Each look is one loop turn (a callback), so the other
        sessions are served between looks. Shared memory only: a proxied look is a round trip."""
        memory = self.memory
        if type(memory) is not MappedGuestMemory or memory.single_region() is None:
            return
        if not self._polling_allowed(queue, memory):
            return
        state, index = self._poll_state(), queue.index
        window = state.window(index)
        state.pass_ends[index] = time.perf_counter()  # for _kick_came
        running = state.polls.get(index)
        if running is None:
            if window <= 0:
                return
            if _polling[0] >= MAX_POLLING_QUEUES:
                return  # enough of the process's turns go to looking; this one is notified
            _polling[0] += 1
        # perf_counter, not loop.time(): uvloop's clock moves in milliseconds.
        state.polls[index] = (time.perf_counter() + window, queue.epoch)
        queue.suppress_kicks(memory)
        if running is None or running[1] != queue.epoch:  # none, or one about to give up
            self._loop.call_soon(self._poll, queue, memory, queue.epoch)

    def _stop_polling(self, index: int) -> None:
        del self._poll_mode.polls[index]
        _polling[0] -= 1

    def _forget_pass(self, index: int | None = None) -> None:
        """A reset: the next kick is not to be measured against the old ring's passes."""
        if self._poll_mode is not None:
            if index is None:
                self._poll_mode.pass_ends.clear()
            else:
                self._poll_mode.pass_ends.pop(index, None)

    def _polling_allowed(self, queue: SplitVirtqueue, memory: GuestMemory) -> bool:
        return (
            self.memory is memory
            and queue.ready
            and not self._broken
            and self._processing_blocked() is None
        )

    def _poll(self, queue: SplitVirtqueue, memory: MappedGuestMemory, epoch: int) -> None:
        """One look; the loop ends at the deadline with the driver's notifications back on."""
        index = queue.index
        entry = self._poll_mode.polls.get(index)
        if entry is None or entry[1] != epoch:
            return  # a loop for the queue's new ring has taken over
        if queue.epoch != epoch or not self._polling_allowed(queue, memory):
            self._stop_polling(index)  # reset or stopped: that ring is not ours any more
            return
        if index not in self._tasks and queue.avail_pending(memory):
            self._poll_mode.pass_ends.pop(index, None)  # caught: the kick it spares says nothing
            self._schedule_pass(queue)  # a pass that finds work extends the deadline
        if time.perf_counter() < entry[0]:
            self._loop.call_soon(self._poll, queue, memory, epoch)
            return
        self._stop_polling(index)
        if queue.allow_kicks(memory) and index not in self._tasks:
            self._schedule_pass(queue)  # buffers that came as we gave up: kicks may be skipped

    async def _run_guarded(self, queue: SplitVirtqueue, epoch: int) -> bool:
        """One pass over the ring; False if the device broke. Nothing escapes."""
        try:
            await self._process_queue(queue, epoch)
        except StaleQueueError:
            pass  # reset or stopped meanwhile: a later notify starts over
        except (RingError, GuestMemoryError) as exc:
            if queue.epoch == epoch:
                self._fail(f"queue {queue.index}: {exc}")
            return False
        except Exception as exc:  # a backend bug must not take the server down
            if queue.epoch == epoch:
                log.exception("%s: queue %d: internal error", self.name, queue.index)
                self._fail(f"queue {queue.index}: internal error {exc!r}")
            return False
        return True

    async def _process_queue(self, queue: SplitVirtqueue, epoch: int) -> None:
        memory = self.memory
        if memory is None:
            raise RingError("no guest memory registered")
        self._prepare(queue, memory)
        mapped = type(memory) is MappedGuestMemory
        guarded = _GuardedMemory(memory, queue, epoch, self)
        handle = self.backend.handle
        inline = self.backend.handle_inline
        index = queue.index
        stats = queue.stats
        done: list[tuple[int, int]] = []
        served = 0
        while (chain := await queue.pop(memory)) is not None:
            served += 1
            if served % queue.num == 0:  # a driver that keeps refilling: let the rest run too
                await asyncio.sleep(0)
                self._check_epoch(queue, epoch)
            chain.memory = guarded
            # Each request is a task of its own, so one that waits holds back neither the
            # chains behind it nor their completion. An inline device's request runs here until
            # it first waits: one that never waits completes with its batch, with no task.
            request = handle(index, chain, guarded)
            if not inline:  # its own task from the first step: asyncio.timeout, TaskGroup work
                self._start_request(queue, epoch, chain, request)
                written = None
            else:
                try:
                    waiting_on = request.send(None)
                except StopIteration as finished:
                    written = finished.value
                except RingError:
                    await self._complete_quietly(queue, memory, done, epoch)
                    raise
                else:
                    self._start_request(queue, epoch, chain, Started(request, waiting_on))
                    written = None
            self._check_epoch(queue, epoch)
            if written is not None and chain.memory is guarded:
                chain.memory = RETURNED
                used = self._used_len(queue, written, chain.writable_len)
                done.append((chain.head, used))
                stats.done(chain.popped, chain.readable_len, used)
            if not queue.has_cached:  # the batch one avail.idx read exposed is done
                if done:
                    await self._complete(queue, memory, done, epoch)
                    done = []
                if mapped and queue.avail_pending(memory):
                    # The driver refilled the ring while we served it: the other sessions of
                    # this process get their turn before the next batch, not after the stream.
                    await asyncio.sleep(0)
                    self._check_epoch(queue, epoch)

    def _prepare(self, queue: SplitVirtqueue, memory: GuestMemory | None) -> None:
        if memory is None:
            raise RingError("no guest memory registered")
        queue.event_idx = self._has(Feature.RING_EVENT_IDX)  # legacy: features apply at use
        queue.indirect = self._has(Feature.RING_INDIRECT_DESC)
        queue.check_layout(memory)

    # -- requests that wait, and completions out of order ---------------------------------------
    def _start_request(
        self, queue: SplitVirtqueue, epoch: int, chain: DescriptorChain, request: Coroutine
    ) -> None:
        """Run a request as a task of its own; it completes when it ends."""
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        task = self._loop.create_task(request, name=f"{self.name} q{queue.index} #{chain.head}")
        requests = self._requests
        if requests is None:
            requests = self._requests = {}
        requests.setdefault(queue.index, set()).add(task)
        task.add_done_callback(partial(self._request_done, queue, epoch, chain))

    def _request_done(
        self, queue: SplitVirtqueue, epoch: int, chain: DescriptorChain, task: asyncio.Task
    ) -> None:
        running = self._requests.get(queue.index) if self._requests else None
        if running is not None:
            running.discard(task)
        if task.cancelled() or queue.epoch != epoch or self._broken:
            return  # reset, stopped or broken meanwhile: the chain is not ours to complete
        exc = task.exception()
        if exc is None:
            if chain.memory is RETURNED:
                log.error(
                    "%s: queue %d: handle() completed chain %d itself and returned too: "
                    "completed once",
                    self.name,
                    queue.index,
                    chain.head,
                )
                return
            chain.memory = RETURNED
            self._add_completion(queue, epoch, chain, task.result())
        elif isinstance(exc, (RingError, GuestMemoryError)):
            self._fail(f"queue {queue.index}: {exc}")
        elif not isinstance(exc, StaleQueueError):
            log.error("%s: queue %d: internal error", self.name, queue.index, exc_info=exc)
            self._fail(f"queue {queue.index}: internal error {exc!r}")

    def _add_completion(
        self, queue: SplitVirtqueue, epoch: int, chain: DescriptorChain, written: int
    ) -> None:
        """Queue a used element; those of one loop turn are published together."""
        pending = self._completions
        if pending is None:
            pending = self._completions = {}
        entry = pending.get(queue.index)
        if entry is None or entry[0] != epoch:
            entry = pending[queue.index] = (epoch, [])
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self._flush_completions, queue, entry)
        used = self._used_len(queue, written, chain.writable_len)
        entry[1].append((chain.head, used))
        queue.stats.done(chain.popped, chain.readable_len, used)

    def _flush_completions(
        self, queue: SplitVirtqueue, entry: tuple[int, list[tuple[int, int]]]
    ) -> None:
        if self._completions.get(queue.index) is entry:
            del self._completions[queue.index]
        epoch, done = entry
        memory = self.memory
        if queue.epoch != epoch or self._broken or memory is None:
            return
        publish = self._publish(queue, memory, done, epoch)
        try:
            waiting_on = publish.send(None)
        except StopIteration:
            return
        task = self._loop.create_task(Started(publish, waiting_on))
        requests = self._requests
        if requests is None:
            requests = self._requests = {}
        requests.setdefault(queue.index, set()).add(task)
        task.add_done_callback(requests[queue.index].discard)

    async def _publish(
        self, queue: SplitVirtqueue, memory: GuestMemory, done: list[tuple[int, int]], epoch: int
    ) -> None:
        try:
            await self._complete(queue, memory, done, epoch)
        except StaleQueueError:
            pass
        except (RingError, GuestMemoryError) as exc:
            if queue.epoch == epoch:
                self._fail(f"queue {queue.index}: {exc}")

    def _cancel_requests(self, index: int | None = None) -> None:
        """Reset, queue reset or DEVICE_NEEDS_RESET: end the requests still running (of queue
        ``index``, or all) and forget unpublished completions; nothing of theirs reaches guest
        memory afterwards (their epoch is gone, and so is every write they try)."""
        requests = self._requests
        if requests:
            for queue_index, tasks in list(requests.items()):
                if index is None or queue_index == index:
                    for task in list(tasks):
                        task.cancel()
        if self._completions:
            if index is None:
                self._completions.clear()
            else:
                self._completions.pop(index, None)

    def _used_len(self, queue: SplitVirtqueue, written: int, writable: int) -> int:
        if isinstance(written, int) and 0 <= written <= writable:
            return written
        if not isinstance(written, int):
            log.error(
                "%s: queue %d: handle() returned %r, not the number of bytes written",
                self.name,
                queue.index,
                written,
            )
            return 0
        log.error(
            "%s: queue %d: backend reported %d of %d writable bytes",
            self.name,
            queue.index,
            written,
            writable,
        )
        return max(0, min(written, writable))  # used.len may under-report, never over-report

    async def _complete(
        self, queue: SplitVirtqueue, memory: GuestMemory, done: list[tuple[int, int]], epoch: int
    ) -> None:
        """Publish used elements, then used.idx, then (if wanted) the interrupt."""
        self._check_epoch(queue, epoch)
        old_used_idx = queue.used_idx
        await queue.push_many(memory, done)
        if await queue.needs_notification(memory, old_used_idx):
            self._notify_used(queue.index)

    async def _complete_quietly(
        self, queue: SplitVirtqueue, memory: GuestMemory, done: list[tuple[int, int]], epoch: int
    ) -> None:
        """Publish what finished before a bad request; the device is about to break anyway."""
        with contextlib.suppress(RingError, GuestMemoryError, StaleQueueError):
            await self._complete(queue, memory, done, epoch)

    @staticmethod
    def _check_epoch(queue: SplitVirtqueue, epoch: int) -> None:
        if queue.epoch != epoch:
            raise StaleQueueError(f"queue {queue.index} was reset during a request")

    def requests_waiting(self, index: int) -> int:
        """Requests of virtqueue ``index`` whose ``handle()`` is waiting now (tests, stats)."""
        running = self._requests.get(index) if self._requests else None
        return len(running) if running else 0

    def _running(self) -> list[asyncio.Task]:
        tasks = [run.task for run in self._tasks.values() if run.task is not None]
        if self._requests:
            for running in self._requests.values():
                tasks += running
        return tasks

    async def drain(self) -> None:
        """Wait until no queue pass or request is running and every completion is published
        (tests, orderly shutdown)."""
        while self._tasks or self._running() or self._completions:
            await asyncio.gather(*self._running(), asyncio.sleep(0), return_exceptions=True)

    async def aclose(self) -> None:
        """Cancel the queue passes and requests and wait for them to end."""
        tasks = self._running()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._tasks.clear()
        if self._requests:
            self._requests.clear()


class QueuePass:
    """One pass over a queue: ``started`` once it runs, ``task`` once it has had to wait."""

    __slots__ = ("started", "task")

    def __init__(self) -> None:
        self.started = False
        self.task: asyncio.Task[None] | None = None


class Started(collections.abc.Coroutine):
    """A coroutine that was started by hand and yielded ``waiting_on``, as a coroutine a task
    runs: the task's first step gets that yield (a future, or None for a bare yield), and what
    the task sends or throws afterwards goes on to the coroutine. A task cancelled before its
    first step throws CancelledError into the coroutine, so its ``except`` and ``finally``
    blocks run, as in a task of its own."""

    __slots__ = ("coro", "first")

    def __init__(self, coro: Coroutine, waiting_on: object) -> None:
        self.coro = coro
        self.first: tuple[object] | None = (waiting_on,)

    def send(self, value: object) -> object:
        first = self.first
        if first is not None:
            self.first = None
            return first[0]
        return self.coro.send(value)

    def throw(self, *exc: object) -> object:
        self.first = None
        return self.coro.throw(*exc)

    def close(self) -> None:
        self.first = None
        self.coro.close()

    def __await__(self) -> Generator[object, object, object]:
        raise TypeError("a started coroutine is run by a task (loop.create_task), not awaited")
