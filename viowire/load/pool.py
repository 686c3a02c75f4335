"""Fair scheduling of many devices among a few workers: a round-robin pool of free slots.

Each device puts ``depth`` tokens in the pool of its kind. A worker takes the token at the head
(the device that has waited longest), runs one request on it, and puts it back at the tail; so
with 10,000 devices and 256 workers every device gets its turn in order, no device has more than
``depth`` requests in flight, and no task per device is needed. A worker that finds the pool
empty waits, first come first served. A token not put back (its device left the workload) is
dropped; when the last one goes, or on :meth:`close`, every waiter gets ``None``.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class DevicePool(Generic[T]):
    def __init__(self) -> None:
        self._ready: deque[T] = deque()
        self._waiters: deque[asyncio.Future[T | None]] = deque()
        self.tokens = 0  # tokens in the pool or out with a worker
        self.closed = False

    def add(self, item: T) -> None:
        """A new token."""
        self.tokens += 1
        self.put(item)

    def put(self, item: T) -> None:
        """Give a token back (to the first waiter, else to the tail)."""
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(item)
                return
        self._ready.append(item)

    def drop(self) -> None:
        """A token taken and never to be put back."""
        self.tokens -= 1
        if self.tokens <= 0:
            self.close()

    async def take(self) -> T | None:
        """The next token; ``None`` once the pool is closed or has no tokens left."""
        if self._ready:
            return self._ready.popleft()
        if self.closed:
            return None
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled() and waiter.result() is not None:
                self.put(waiter.result())  # handed to us as we were cancelled: pass it on
            raise

    def close(self) -> None:
        """Wake every waiter with ``None``; later takes get what is left, then ``None``."""
        self.closed = True
        while self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)

    def __len__(self) -> int:
        return len(self._ready)
