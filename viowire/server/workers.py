"""``viowire serve --workers N``: one listening socket, N processes serving it.

Python runs one event loop per core at best, so a server that should use more cores runs more
processes. The supervisor binds every listener once, before forking, so the workers inherit the
same sockets and the kernel hands each new connection to one of them; a session then lives in
one worker for its whole life (its devices and guest memory are that worker's). The supervisor
restarts a worker that dies, forwards SIGTERM/SIGINT, and removes Unix socket files at the end.

A worker never outlives its supervisor, even one killed with SIGKILL (which forwards nothing):
the kernel sends it SIGTERM when the supervisor dies (``PR_SET_PDEATHSIG``, Linux), and it also
watches a pipe whose only writer is the supervisor, so it sees end-of-file then (any POSIX
system, and a worker whose prctl failed). Either way it stops as on SIGTERM, within
:data:`STOP_GRACE` seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import ctypes.util
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from viowire import logs
from viowire.runtime import run, until_signalled
from viowire.server.app import Security, Server
from viowire.server.limits import Limits
from viowire.server.platform import PlatformSpec
from viowire.urls import Endpoint

log = logging.getLogger("viowire.server")

QUICK_DEATH = 2.0  # a worker that dies sooner than this after starting counts as failing
MAX_QUICK_DEATHS = 5
STOP_GRACE = 5.0  # seconds a stopping worker gives its sessions before it exits regardless
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def die_with_parent(parent: int) -> bool:
    """Ask the kernel for SIGTERM when the parent dies; whether it could. Called in the child
    right after fork: a parent already gone by then sends nothing, so that case exits here."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
        armed = libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) == 0
    except (OSError, AttributeError):  # not Linux, or no prctl in this libc
        armed = False
    if os.getppid() != parent:
        os._exit(0)
    return armed


async def until_orphaned(lifeline: int) -> None:
    """Return when the supervisor, the only writer of the pipe ``lifeline`` reads, has gone:
    the read end then sees end-of-file."""
    loop = asyncio.get_running_loop()
    gone = asyncio.Event()

    def readable() -> None:
        try:
            if os.read(lifeline, 64):
                return  # the supervisor writes nothing, but stray bytes are no reason to stop
        except BlockingIOError:
            return
        except OSError:
            pass
        gone.set()

    os.set_blocking(lifeline, False)
    loop.add_reader(lifeline, readable)
    try:
        await gone.wait()
    finally:
        loop.remove_reader(lifeline)


async def _first(*aws) -> None:
    """Return when the first of ``aws`` does; cancel the others."""
    tasks = [asyncio.ensure_future(aw) for aw in aws]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


async def _worker(
    spec: PlatformSpec,
    listeners: list[tuple[Endpoint, socket.socket]],
    options: dict,
    lifeline: int,
) -> int:
    logs.install()
    server = Server(spec, **options)
    await server.serve(listeners)
    await _first(until_signalled(), until_orphaned(lifeline))
    try:
        async with asyncio.timeout(STOP_GRACE):
            await server.close()
    except TimeoutError:  # a peer that never reads keeps its transport from closing
        log.warning("worker %d: sessions still open after %.0f s; exiting", os.getpid(), STOP_GRACE)
    return 0


class Supervisor:
    """Forks and watches the workers; call :meth:`run` from a process with no event loop."""

    def __init__(
        self,
        spec: PlatformSpec,
        listeners: list[tuple[Endpoint, socket.socket]],
        workers: int,
        *,
        loop: str = "auto",
        allow_shm: bool = True,
        poll_us: int = 0,
        security: Security | None = None,
        limits: Limits | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"--workers {workers}: at least 1")
        self.spec = spec
        self.listeners = listeners
        self.count = workers
        self.loop = loop
        # Server(**these)
        self.server_options = {
            "allow_shm": allow_shm,
            "poll_us": poll_us,
            "security": security,
            "limits": limits,  # each worker has the whole of them: limits are per process
        }
        self.children: dict[int, float] = {}  # pid -> start time
        self.stopping = False
        self.quick_deaths = 0
        self.lifeline: tuple[int, int] | None = None  # (read, write); workers get the read end

    def _spawn(self) -> None:
        assert self.lifeline is not None
        lifeline, held = self.lifeline
        parent = os.getpid()
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                os.close(held)  # else the pipe would never see end-of-file
                die_with_parent(parent)
                worker = _worker(self.spec, self.listeners, self.server_options, lifeline)
                code = run(worker, loop=self.loop)
            except BaseException:
                log.exception("worker %d failed", os.getpid())
            finally:
                os._exit(code)
        self.children[pid] = time.monotonic()

    def _stop(self, signum: int, _frame: object) -> None:
        self.stopping = True
        for pid in list(self.children):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)

    def run(self, ready: Callable[[list[int]], None] | None = None) -> int:
        """Start the workers and keep them running until SIGTERM/SIGINT; the exit status."""
        previous = {sig: signal.signal(sig, self._stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        self.lifeline = os.pipe()  # close-on-exec: only forked workers share it
        try:
            for _ in range(self.count):
                self._spawn()
            if ready is not None:
                ready(list(self.children))
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            for fd in self.lifeline:
                os.close(fd)
            self.lifeline = None
            for endpoint, sock in self.listeners:
                sock.close()
                if endpoint.path:
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(endpoint.path)

    def _watch(self) -> int:
        status = 0
        while self.children:
            try:
                pid, code = os.wait()
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            started = self.children.pop(pid, None)
            if started is None:
                continue
            if self.stopping:
                continue
            status = self._restart(pid, code, started)
            if status:
                self._stop(signal.SIGTERM, None)
        return status

    def _restart(self, pid: int, code: int, started: float) -> int:
        reason = os.waitstatus_to_exitcode(code)
        log.error("worker %d exited (%s); starting another", pid, reason)
        self.quick_deaths = self.quick_deaths + 1 if time.monotonic() - started < QUICK_DEATH else 0
        if self.quick_deaths >= MAX_QUICK_DEATHS:
            log.error("workers keep dying at start; giving up")
            return 1
        self._spawn()
        return 0
