"""The ``viowire`` command as a user runs it: real subprocesses, every wait bounded.

Each command runs in a process group of its own (``start_new_session``), and the whole group is
ended on the way out: whatever a command started goes with it, even when the command is broken.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import signal
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
    """Run ``viowire ARGS`` to completion; on timeout its whole process group is killed."""
    return run([*VIOWIRE, *args], timeout=timeout, **kw)


def run(command: list[str], timeout: float = RUN_TIMEOUT, **kw) -> subprocess.CompletedProcess[str]:
    """``subprocess.run(command)``, text captured, in a process group that is ended with it."""
    with subprocess.Popen(
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
        **kw,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(timeout=timeout)
        finally:
            end_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def end_group(proc: subprocess.Popen) -> None:
    """Kill every process of ``proc``'s group (it leads one: start_new_session) and wait until
    they are gone. Those the leader forked become this process's children when it dies (the test
    run is a child subreaper: suite_guards) and are reaped here; elsewhere init reaps them."""
    members = _group_members(proc.pid) - {proc.pid}
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(timeout=5)
    deadline = time.monotonic() + 5
    while members and time.monotonic() < deadline:
        for pid in list(members):
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    members.discard(pid)
            except ChildProcessError:  # not ours to reap: gone, or a zombie for init to reap
                if _state(pid) in (None, "Z"):
                    members.discard(pid)
        time.sleep(0.01)


def _state(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0]
    except OSError:
        return None


def _group_members(pgid: int) -> set[int]:
    members = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError), open(f"/proc/{entry}/stat") as f:
                fields = f.read().rpartition(")")[2].split()
            if fields and int(fields[2]) == pgid:  # fields: state, ppid, pgrp, ...
                members.add(int(entry))
    return members


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
def serve(
    *args: str, cwd: str | os.PathLike[str] | None = None, command: list[str] = VIOWIRE
) -> Iterator[Served]:
    """Start ``viowire serve ARGS`` and wait until it prints a 'listening on' line per --listen.

    ``command`` is what runs ``viowire``: another program that ends in viowire's ``main``. The
    server and every process it started are killed on the way out.
    """
    expected = sum(arg == "--listen" or arg.startswith("--listen=") for arg in args)
    assert expected, "give --listen: the default tcp://127.0.0.1:7000 may be taken"
    proc = subprocess.Popen(
        [*command, "serve", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        start_new_session=True,
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
        end_group(proc)
        proc.stderr.close()
