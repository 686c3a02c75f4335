"""Blocking device work (file I/O) off the event loop: one thread pool for the whole process.

A pread that waits for a disk must not stall every session of the process, so devices hand it
to :func:`submit`. The pool is made on first use (an idle server, and the 100,000 idle devices of
a load test, start no thread), holds at most :data:`MAX_THREADS` threads (started as work comes,
as ``ThreadPoolExecutor`` does), and is shared by every device of the process, so the threads a
process runs do not grow with its sessions. A forked child (``serve --workers``) starts over
with a pool of its own: the parent's threads do not exist there.

Threads get plain values (an fd, offsets, bytes) and never guest memory: what they return is
written into guest memory by the event loop, where a reset can still refuse it.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

MAX_THREADS = 32
"""Blocking calls running at once in the process: one queue at depth 32 keeps the disk as busy
as it would be with native AIO; more requests wait in the pool's queue."""

_pool: list[ThreadPoolExecutor] = []  # the process's pool, once made


def executor() -> ThreadPoolExecutor:
    """The process's pool for blocking device work (made on first use)."""
    if not _pool:
        _pool.append(ThreadPoolExecutor(MAX_THREADS, thread_name_prefix="viowire-io"))
    return _pool[0]


def submit(fn: Callable[..., Any], *args: Any) -> Future:
    """Run ``fn(*args)`` on the pool. The concurrent future is returned so that the caller can
    attach a callback that runs however it ends (done, failed, or cancelled before it started);
    ``asyncio.wrap_future`` makes it awaitable. Cancelling the awaiting task cancels a call that
    has not started; one that has runs to its end and its result is dropped."""
    return executor().submit(fn, *args)


async def run(fn: Callable[..., Any], *args: Any) -> Any:
    """``await run(fn, *args)``: ``fn(*args)`` on the pool, its result or exception here."""
    return await asyncio.wrap_future(submit(fn, *args))


def _forget_pool() -> None:
    _pool.clear()  # its threads stayed in the parent


os.register_at_fork(after_in_child=_forget_pool)

__all__ = ["MAX_THREADS", "executor", "run", "submit"]
