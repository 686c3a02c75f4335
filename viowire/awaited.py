"""The asyncio side of :class:`viowire.protocol.outstanding.Outstanding`, for both ends.

The table says which requests await answers and which are past their deadline; this gives each
request a future, arms one timer for the table's next deadline (a timer per request cost more
than the rest of a register read's client work), and lets requests wait, in order, for a place
in the window. The client connection and the server session each hold one.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
from collections.abc import Callable

from viowire.protocol.outstanding import Outstanding, Unmatched

__all__ = ["AwaitedRequests", "Unmatched"]


class AwaitedRequests:
    """Requests with futures; ``on_timeout(label)`` makes the exception an expired request's
    future gets."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        table: Outstanding[tuple[str, asyncio.Future]],
        on_timeout: Callable[[str], BaseException],
    ) -> None:
        self.table = table
        self._loop = loop
        self._on_timeout = on_timeout
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._closed: BaseException | None = None  # why no request may open any more

    def __len__(self) -> int:
        return len(self.table)

    def open_now(
        self, label: str, timeout: float | None = None
    ) -> tuple[int, asyncio.Future] | None:
        """A request id and the future its answer resolves, if the window has room and nobody
        waits for it before us; else None (then :meth:`open`)."""
        if self._waiters or self._closed is not None:
            return None
        return self._take(label, timeout)

    async def open(self, label: str, timeout: float | None = None) -> tuple[int, asyncio.Future]:
        """As :meth:`open_now`, waiting in order for a place in the window; raises what
        :meth:`close` was given once the connection is gone."""
        got = self.open_now(label, timeout)
        first = False  # a waiter woken for a place that another took goes first again
        while got is None:
            if self._closed is not None:
                raise self._closed
            waiter = self._loop.create_future()
            if first:
                self._waiters.appendleft(waiter)
            else:
                self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                with contextlib.suppress(ValueError):
                    self._waiters.remove(waiter)
                if waiter.done() and not waiter.cancelled():
                    self._wake()  # woken as we were cancelled: the next one gets the place
                raise
            if self._closed is not None:
                raise self._closed
            got = self._take(label, timeout)
            first = True
        if not self.table.full:
            self._wake()
        return got

    def _take(self, label: str, timeout: float | None) -> tuple[int, asyncio.Future] | None:
        future = self._loop.create_future()
        now = self._loop.time()
        request_id = self.table.open(now, (label, future), timeout)
        if request_id is None:
            return None
        if self._timer is None or (timeout is not None and now + timeout < self._timer_at):
            self._arm()  # the first request, or one that expires before the timer
        return request_id, future

    def answer(self, request_id: int) -> tuple[str, asyncio.Future] | Unmatched:
        """The (label, future) of the request an answer answers, or why it answers none."""
        return self.table.answer(request_id)

    def release(self, request_id: int) -> None:
        """The request's sender is done with it (answered, failed or cancelled): call it in a
        ``finally``; its place in the window goes to the first waiter."""
        self.table.close(request_id)
        if self._waiters:
            self._wake()

    def fail_all(self, error: BaseException) -> None:
        """Every request awaiting an answer fails with ``error`` (a fatal ERROR: the connection
        is closing); requests may still open until :meth:`close`."""
        self.fail(self.table.fail_all(), error)

    @staticmethod
    def fail(failed: list[tuple[str, asyncio.Future]], error: BaseException) -> None:
        """Fail requests the table has handed back already (``Closing.failed``)."""
        for _label, future in failed:
            if not future.done():
                future.set_exception(error)

    def close(self, error: BaseException) -> None:
        """The connection is gone: every request awaiting an answer or a place fails with
        ``error``, and so does every later one."""
        self._closed = error
        self.fail_all(error)
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)  # it raises self._closed

    def _wake(self) -> None:
        while self._waiters and not self.table.full:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _arm(self) -> None:
        """One timer, at the table's next deadline: with one timeout for all requests, each
        later request's deadline is later, so a request opened costs no timer of its own."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        deadline = self.table.next_deadline()
        if deadline is not None:
            self._timer_at = deadline
            self._timer = self._loop.call_at(deadline, self._expire)

    def _expire(self) -> None:
        self._timer = None
        for _request_id, (label, future) in self.table.expired(self._loop.time()):
            if not future.done():
                future.set_exception(self._on_timeout(label))
        if self._closed is None:
            self._arm()
