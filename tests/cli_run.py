"""The ``viowire`` command as a user runs it: real subprocesses, every wait bounded."""

from __future__ import annotations

import contextlib
import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

VIOWIRE = [sys.executable, "-m", "viowire.cli"]
CONSOLE_SCRIPT = Path(sys.executable).with_name("viowire")
START_TIMEOUT = 10.0
RUN_TIMEOUT = 20.0
_LISTENING = re.compile(r"^listening on (\S+)$")


def viowire(*args: str, timeout: float = RUN_TIMEOUT, **kw) -> subprocess.CompletedProcess[str]:
    """Run ``viowire ARGS`` to completion."""
    return subprocess.run(
        [*VIOWIRE, *args], capture_output=True, text=True, timeout=timeout, check=False, **kw
    )


@dataclass
class Served:
    """A running ``viowire serve``: its process, what it printed, and where it listens."""

    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    endpoints: list[str] = field(default_factory=list)

    def url(self, scheme: str) -> str:
        return next(url for url in self.endpoints if url.startswith(f"{scheme}://"))


def _pump(stream, out: queue.Queue[str | None]) -> None:
    with stream:
        for line in stream:
            out.put(line.rstrip("\n"))
    out.put(None)


@contextlib.contextmanager
def serve(*args: str, cwd: str | os.PathLike[str] | None = None) -> Iterator[Served]:
    """Start ``viowire serve ARGS`` and wait until it prints a 'listening on' line per --listen.

    The server is killed on the way out if it is still running.
    """
    expected = sum(arg == "--listen" or arg.startswith("--listen=") for arg in args)
    assert expected, "give --listen: the default tcp://127.0.0.1:7000 may be taken"
    proc = subprocess.Popen(
        [*VIOWIRE, "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
    )
    lines: queue.Queue[str | None] = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
    served = Served(proc)
    try:
        deadline = time.monotonic() + START_TIMEOUT
        while len(served.endpoints) < expected:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                raise AssertionError(
                    f"viowire serve {' '.join(args)}: not listening after {START_TIMEOUT} s; "
                    f"printed {served.lines}"
                ) from None
            if line is None:
                proc.wait(timeout=5)
                raise AssertionError(
                    f"viowire serve {' '.join(args)} exited with {proc.returncode} before "
                    f"listening: {proc.stderr.read()}"
                )
            served.lines.append(line)
            match = _LISTENING.match(line)
            if match:
                served.endpoints.append(match.group(1))
        yield served
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(timeout=5)
        proc.stderr.close()
