"""The requests one end has sent and awaits answers to, with no I/O (docs/protocol.md, section 2).

Both ends keep such a table: the client for its MMIO and other requests, the server for the
MEM_READs it sends a proxied client. It gives each request its id (from the end's
:class:`~viowire.protocol.requests.RequestIds`), keeps at most ``window`` of them awaiting
answers (max_inflight, as HELLO settled it), matches an answer to its request by id, and says
which requests are past their deadline. Time is whatever clock the caller passes as ``now``:
the caller arms one timer for :meth:`Outstanding.next_deadline`, not one per request.

What a request is to the caller (a future, a label) is opaque here: ``what``.
"""

from __future__ import annotations

import collections
import enum
from typing import Generic, TypeVar

from viowire.protocol.requests import RequestIds

T = TypeVar("T")

REMEMBERED = 1024  # ids of expired or abandoned requests kept, to tell a late answer apart


class Unmatched(enum.Enum):
    """Why an answer matched no request awaiting one."""

    UNKNOWN = "unknown"  # of our ids, but no request of ours awaits it (answered, or posted)
    LATE = "late"  # its request expired, or its sender stopped waiting, before it came
    FOREIGN = "foreign"  # not an id of this table's space (0, or the other end's numbering)


class Outstanding(Generic[T]):
    """Requests awaiting answers, keyed by request id, in the order they were opened."""

    __slots__ = ("_entries", "_gone", "_ordered", "_timeout", "ids", "window")

    def __init__(self, ids: RequestIds, window: int, timeout: float) -> None:
        if window < 1:
            raise ValueError(f"a window of {window} requests admits none: use at least 1")
        self.ids = ids
        self.window = window  # max_inflight: raise or lower it once HELLO has settled it
        self._timeout = timeout  # seconds a request may await its answer, unless opened with one
        self._entries: dict[int, tuple[float, T]] = {}  # id -> (deadline, what), opening order
        # Expired or abandoned ids, oldest first (LATE); ordered so the oldest goes in O(1).
        self._gone: collections.OrderedDict[int, None] = collections.OrderedDict()
        # Deadlines rise with opening order while every request has the table's timeout (the
        # clock only goes forward): expiry looks at the oldest only.
        self._ordered = True

    @property
    def timeout(self) -> float:
        """Seconds a request opened without a timeout of its own may await its answer."""
        return self._timeout

    @timeout.setter
    def timeout(self, timeout: float) -> None:
        if timeout != self._timeout and self._entries:
            self._ordered = False  # requests opened from now on may expire before older ones
        self._timeout = timeout

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, request_id: int) -> bool:
        return request_id in self._entries

    @property
    def full(self) -> bool:
        """Whether ``window`` requests await answers: :meth:`open` admits no more."""
        return len(self._entries) >= self.window

    def open(self, now: float, what: T, timeout: float | None = None) -> int | None:
        """A new request's id, awaiting its answer until ``now + timeout`` (default: the table's
        timeout); None when the window is full (the caller waits for a :meth:`close`)."""
        entries = self._entries
        if len(entries) >= self.window:
            return None
        request_id = self.ids.next()
        while request_id in entries:  # a request outlived a whole wrap of the ids
            request_id = self.ids.next()
        if timeout is None:
            timeout = self._timeout
        elif timeout != self._timeout:
            self._ordered = False
        entries[request_id] = (now + timeout, what)
        return request_id

    def take(self, request_id: int) -> T | None:
        """The request ``request_id`` answers, no longer awaiting; None if no request awaits
        it (then :meth:`answer` says why). The receive path's one dict look-up."""
        entry = self._entries.pop(request_id, None)
        return None if entry is None else entry[1]

    def answer(self, request_id: int) -> T | Unmatched:
        """The request an answer with ``request_id`` answers, no longer awaiting; or why it
        answers none (the caller logs or ignores it: nobody answers an answer)."""
        entry = self._entries.pop(request_id, None)
        if entry is not None:
            return entry[1]
        if request_id not in self.ids:
            return Unmatched.FOREIGN
        return Unmatched.LATE if request_id in self._gone else Unmatched.UNKNOWN

    def close(self, request_id: int) -> T | None:
        """Stop awaiting ``request_id`` (its sender gave up; a no-op once answered or expired):
        its window place is free, and an answer that still comes is LATE."""
        entry = self._entries.pop(request_id, None)
        if entry is None:
            return None
        self._forget(request_id)
        return entry[1]

    def expired(self, now: float) -> list[tuple[int, T]]:
        """The requests whose deadline is ``now`` or earlier, oldest first, no longer awaiting
        (an answer that still comes is LATE)."""
        entries = self._entries
        gone = []
        for request_id, (deadline, _what) in entries.items():
            if deadline <= now:
                gone.append(request_id)
            elif self._ordered:
                break
        expired = [(request_id, entries.pop(request_id)[1]) for request_id in gone]
        for request_id in gone:
            self._forget(request_id)
        if not entries:
            self._ordered = True
        return expired

    def next_deadline(self) -> float | None:
        """When the next request expires (None: none awaits an answer)."""
        if not self._entries:
            return None
        if self._ordered:
            return next(iter(self._entries.values()))[0]
        return min(deadline for deadline, _what in self._entries.values())

    def fail_all(self) -> list[T]:
        """Every request awaiting an answer, oldest first, none awaiting any more (the
        connection is gone, or the peer sent a fatal ERROR): the caller fails each."""
        failed = [what for _deadline, what in self._entries.values()]
        for request_id in self._entries:
            self._forget(request_id)
        self._entries.clear()
        self._ordered = True
        return failed

    def _forget(self, request_id: int) -> None:
        gone = self._gone
        gone[request_id] = None
        if len(gone) > REMEMBERED:
            gone.popitem(last=False)
