"""``viowire serve --workers N``: one listening socket, N processes serving it.

Python runs one event loop per core at best, so a server that should use more cores runs more
processes. The supervisor binds every listener once, before forking, so the workers inherit the
same sockets and the kernel hands each new connection to one of them; a session then lives in
one worker for its whole life (its devices and guest memory are that worker's). The supervisor
restarts a worker that dies, forwards SIGTERM/SIGINT, and removes Unix socket files at the end.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import time
from collections.abc import Callable

from viowire import logs
from viowire.runtime import run, until_signalled
from viowire.server.app import Security, Server
from viowire.server.platform import PlatformSpec
from viowire.urls import Endpoint

log = logging.getLogger("viowire.server")

QUICK_DEATH = 2.0  # a worker that dies sooner than this after starting counts as failing
MAX_QUICK_DEATHS = 5


async def _worker(
    spec: PlatformSpec, listeners: list[tuple[Endpoint, socket.socket]], options: dict
) -> int:
    logs.install()
    server = Server(spec, **options)
    await server.serve(listeners)
    await until_signalled()
    await server.close()
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
    ) -> None:
        if workers < 1:
            raise ValueError(f"--workers {workers}: at least 1")
        self.spec = spec
        self.listeners = listeners
        self.count = workers
        self.loop = loop
        # Server(**these)
        self.server_options = {"allow_shm": allow_shm, "poll_us": poll_us, "security": security}
        self.children: dict[int, float] = {}  # pid -> start time
        self.stopping = False
        self.quick_deaths = 0

    def _spawn(self) -> None:
        pid = os.fork()
        if pid == 0:  # the worker
            code = 1
            try:
                for sig in (signal.SIGINT, signal.SIGTERM):
                    signal.signal(sig, signal.SIG_DFL)
                code = run(_worker(self.spec, self.listeners, self.server_options), loop=self.loop)
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
        try:
            for _ in range(self.count):
                self._spawn()
            if ready is not None:
                ready(list(self.children))
            return self._watch()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
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
