"""Checks on the test run as a whole, so that it cannot pass while testing less than it seems.

- **No unexpected skip in CI.** With the ``CI`` environment variable set, a test that skips
  fails instead, unless the allow-list (``tests/skip-allowlist.txt``) lists it with a reason.
  Outside CI a skip stays a skip (a machine without QEMU still runs the rest), with its reason
  in the summary.
- **No error lost in the event loop.** An exception in a callback, or in a task nobody awaits,
  only reaches asyncio's logger: a test during which it logs an error fails (at teardown).
- **A hang, explained.** pytest-timeout's traceback of a hung async test ends in the event
  loop's select(); the report adds where each of the loop's tasks was waiting.
- **Nothing left behind.** After the last test, the run fails if a test left a process (the
  pytest process is made a child subreaper, so a server's orphaned workers count too), a
  temporary file or directory outside pytest's ``tmp_path``, a ``/dev/shm/viowire-*`` segment,
  a mount, a network namespace, a network interface or a Docker container, or changed the
  host's forwarding switches or firewall rules (a Docker engine a test starts sets both). Each
  is reported with the test during which it appeared; processes are then killed and temporary
  files removed.
  To tell its temporary files apart from other programs', the run gets a ``TMPDIR`` of its own.

conftest.py installs it (:func:`install`); ``-p no:viowire_guards`` turns it off.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fnmatch
import logging
import os
import shutil
import signal
import subprocess
import tempfile
import time
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType

import pytest

NAME = "viowire_guards"
SETTLE = 3.0  # seconds for processes a test has just signalled to exit, at the end of the run
PR_SET_CHILD_SUBREAPER = 36
NETNS_DIRS = ("/run/netns", "/var/run/netns")  # where `ip netns` mounts namespaces


def in_ci() -> bool:
    """Whether this run is CI's: the ``CI`` variable set, as CI services set it."""
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


# -- the skip allow-list ----------------------------------------------------------------------
@dataclass
class AllowedSkip:
    pattern: str  # a test id as pytest prints it; fnmatch wildcards allowed
    reason: str
    line: int
    used: int = 0


def read_allowlist(path: Path) -> list[AllowedSkip]:
    """``PATTERN -- REASON`` per line; blank lines and ``#`` comments are ignored."""
    entries = []
    for number, raw in enumerate(path.read_text().splitlines(), 1):
        text = raw.strip()
        if not text or text.startswith("#"):
            continue
        pattern, sep, reason = (part.strip() for part in text.partition(" -- "))
        if not sep or not pattern or not reason:
            raise pytest.UsageError(
                f"{path}:{number}: write 'TEST-ID -- WHY IT MAY SKIP IN CI', got {raw!r}"
            )
        entries.append(AllowedSkip(pattern, reason, number))
    return entries


def skip_reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


# -- errors only asyncio's logger sees --------------------------------------------------------
class AsyncioErrors(logging.Handler):
    """Collects what asyncio logs at ERROR: exceptions in callbacks, unretrieved task errors."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def take(self) -> str:
        text = "\n".join(logging.Formatter().format(record) for record in self.records)
        self.records.clear()
        return text


# -- a hang, explained ------------------------------------------------------------------------
def _timed_out(exc: BaseException) -> bool:
    return "from pytest-timeout" in str(exc)


def _asyncio_stacks(item: pytest.Item) -> str:
    """Where each task of the test's event loop waits: pytest-timeout's traceback of an async
    test ends in the loop's select(), which says nothing of the await that hung."""
    funcargs = getattr(item, "funcargs", {})
    loops = {
        runner.get_loop()
        for runner in funcargs.values()
        if isinstance(runner, asyncio.Runner) and not runner.get_loop().is_closed()
    }
    out = []
    for loop in loops:
        for task in asyncio.all_tasks(loop):
            frames = traceback.StackSummary.extract((f, f.f_lineno) for f in _awaiting(task))
            out.append(f"{task!r}, awaiting:\n{''.join(frames.format())}")
    return "\n".join(out)


def _awaiting(task: asyncio.Task) -> Iterator[FrameType]:
    """The frames of a suspended task, outermost first, down the chain of awaits."""
    coro = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is None:
            return
        yield frame
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)


# -- what a run can leave behind --------------------------------------------------------------
def descendants(pid: int) -> dict[int, str]:
    """Live (not zombie) processes below ``pid``: pid -> command line."""
    found: dict[int, str] = {}
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child in _children(parent):
            if child not in found and _alive(child):
                found[child] = _cmdline(child)
                todo.append(child)
    return found


def _children(pid: int) -> list[int]:
    pids = []
    with contextlib.suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError), open(f"/proc/{pid}/task/{task}/children") as f:
                pids += [int(p) for p in f.read().split()]
    return pids


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rpartition(")")[2].split()[0] not in ("Z", "X")
    except OSError:
        return False


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return "?"


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def _mounts() -> set[str]:
    """Mount points, from this process's mountinfo (field 5)."""
    try:
        with open("/proc/self/mountinfo") as f:
            return {line.split()[4] for line in f if line.strip()}
    except OSError:
        return set()


def _containers() -> set[str] | None:
    """Docker containers, running or not; None when no Docker engine answers."""
    if not shutil.which("docker"):
        return None
    try:
        result = subprocess.run(
            ["docker", "ps", "-aq", "--no-trunc"],
            capture_output=True,
            text=True,
            timeout=20,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    return set(result.stdout.split()) if result.returncode == 0 else None


def _host_network() -> set[str]:
    """IP forwarding and the firewall rules (packet counters left out), one line each."""
    state = set()
    for name in ("ipv4/ip_forward", "ipv6/conf/all/forwarding"):
        with contextlib.suppress(OSError), open(f"/proc/sys/net/{name}") as f:
            state.add(f"{name} = {f.read().strip()}")
    for tool in ("iptables-save", "ip6tables-save"):
        path = shutil.which(tool, path=f"{os.environ.get('PATH', '')}:/usr/sbin:/sbin")
        if path is None or os.geteuid() != 0:
            continue
        with contextlib.suppress(OSError, subprocess.TimeoutExpired):
            out = subprocess.run(
                [path], capture_output=True, text=True, timeout=20, check=False,
                stdin=subprocess.DEVNULL,
            ).stdout  # fmt: skip
            for line in out.splitlines():
                if line and not line.startswith("#"):
                    state.add(f"{tool}: {line.split(' [')[0]}")
    return state


@dataclass
class Leftover:
    kind: str
    name: str
    test: str | None  # the test during which it appeared, if one did

    def __str__(self) -> str:
        where = f" (appeared during {self.test})" if self.test else ""
        return f"{self.kind}: {self.name}{where}"


@dataclass(eq=False)  # a plugin must be hashable
class SuiteGuards:
    """The plugin: one per run."""

    ci: bool
    allowlist_path: Path
    allowlist: list[AllowedSkip]
    tmpdir: Path | None = None  # the run's TMPDIR, made when the session starts
    old_tmpdir: str | None = None
    pid: int = field(default_factory=os.getpid)
    known_pids: set[int] = field(default_factory=set)
    baseline: set[tuple[str, str]] = field(default_factory=set)
    containers: set[str] | None = None
    host_network: set[str] = field(default_factory=set)
    first_seen: dict[tuple[str, str], str] = field(default_factory=dict)
    leftovers: list[Leftover] = field(default_factory=list)
    asyncio_errors: AsyncioErrors = field(default_factory=AsyncioErrors)
    unexpected_skips: list[str] = field(default_factory=list)

    # -- snapshots --------------------------------------------------------------------------
    def snapshot(self) -> set[tuple[str, str]]:
        """Everything a test could leave behind, as (kind, name), cheap enough for every test."""
        processes = descendants(self.pid)
        self.known_pids |= processes.keys()
        return {
            *(("process", f"{pid} {cmd}") for pid, cmd in processes.items()),
            *(("temporary file", os.path.join(self.tmpdir, n)) for n in self._temporary()),
            *(("shared memory", f"/dev/shm/{n}") for n in self._shm_segments()),
            *(("mount", m) for m in _mounts()),
            *(("network namespace", n) for n in _listdir("/run/netns")),
            *(("network interface", n) for n in _listdir("/sys/class/net")),
        }

    def _temporary(self) -> list[str]:
        return _listdir(str(self.tmpdir)) if self.tmpdir is not None else []

    def _shm_segments(self) -> list[str]:
        """viowire guest-RAM segments made by this run: named ``viowire-PID-...`` by a process
        of ours, or by one that has exited (other programs' live segments are theirs)."""
        ours = []
        for name in _listdir("/dev/shm"):
            if not name.startswith("viowire-"):
                continue
            pid = name.split("-")[1]
            if pid.isdigit() and (
                int(pid) in self.known_pids or int(pid) == self.pid or not _alive(int(pid))
            ):
                ours.append(name)
        return ours

    # -- hooks ------------------------------------------------------------------------------
    def pytest_sessionstart(self, session: pytest.Session) -> None:
        self.old_tmpdir = os.environ.get("TMPDIR")
        self.tmpdir = _own_tmpdir(session.config)
        self.baseline = self.snapshot()
        self.containers = _containers()
        self.host_network = _host_network()
        logging.getLogger("asyncio").addHandler(self.asyncio_errors)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_protocol(self, item: pytest.Item, nextitem: pytest.Item | None):
        before = self.snapshot()
        try:
            return (yield)
        finally:
            for thing in self.snapshot() - before:
                self.first_seen.setdefault(thing, item.nodeid)

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo):
        report = yield
        if report.failed and call.excinfo is not None and _timed_out(call.excinfo.value):
            stacks = _asyncio_stacks(item)
            if stacks:
                report.sections.append(("asyncio tasks when the timeout struck", stacks))
        if call.when == "teardown" and self.asyncio_errors.records and report.passed:
            report.outcome = "failed"
            report.longrepr = (
                "asyncio logged errors during this test; nothing else would have seen them:\n"
                + self.asyncio_errors.take()
            )
        self._judge_skip(report)
        return report

    @pytest.hookimpl(wrapper=True)
    def pytest_make_collect_report(self, collector: pytest.Collector):
        report = yield
        self._judge_skip(report)
        return report

    def _judge_skip(self, report: pytest.TestReport | pytest.CollectReport) -> None:
        if not self.ci or not report.skipped or hasattr(report, "wasxfail"):
            return
        for entry in self.allowlist:
            if fnmatch.fnmatchcase(report.nodeid, entry.pattern):
                entry.used += 1
                return
        reason = skip_reason(report)
        self.unexpected_skips.append(f"{report.nodeid}: {reason}")
        report.outcome = "failed"
        report.longrepr = (
            f"skipped in CI: {reason}\n"
            f"CI must run every test: install what it needs (scripts/install-test-tools), or add "
            f"'{report.nodeid} -- WHY' to {self.allowlist_path} for review"
        )

    @pytest.hookimpl(trylast=True)
    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        logging.getLogger("asyncio").removeHandler(self.asyncio_errors)
        self.leftovers = self._collect_leftovers()
        self._clean_up()
        if self.leftovers and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED

    def pytest_terminal_summary(self, terminalreporter) -> None:
        write = terminalreporter.write_line
        if self.unexpected_skips:
            terminalreporter.section("skipped in CI, not on the allow-list", sep="=", red=True)
            for line in self.unexpected_skips:
                write(line)
        if self.ci:
            for entry in self.allowlist:
                if not entry.used:
                    write(f"{self.allowlist_path}:{entry.line}: {entry.pattern} did not skip")
        if self.leftovers:
            terminalreporter.section("left behind by the tests", sep="=", red=True)
            for leftover in self.leftovers:
                write(str(leftover))
            write(
                "a test must end what it starts: processes (and their process groups), "
                "temporary files outside tmp_path, mounts, namespaces, interfaces, containers, "
                "firewall rules and forwarding switches"
            )

    # -- the end of the run -----------------------------------------------------------------
    def _collect_leftovers(self) -> list[Leftover]:
        self._unmount_netns_dir()
        deadline = time.monotonic() + SETTLE
        while any(kind == "process" for kind, _ in self.snapshot() - self.baseline):
            if time.monotonic() > deadline:
                break
            time.sleep(0.05)  # a process signalled by the last test may still be exiting
        found = [
            Leftover(kind, name, self.first_seen.get((kind, name)))
            for kind, name in sorted(self.snapshot() - self.baseline)
        ]
        if self.containers is not None:
            found += [
                Leftover("container", name, None)
                for name in sorted((_containers() or set()) - self.containers)
            ]
        now = _host_network()
        found += [Leftover("host network, new", s, None) for s in sorted(now - self.host_network)]
        found += [Leftover("host network, gone", s, None) for s in sorted(self.host_network - now)]
        return found

    def _unmount_netns_dir(self) -> None:
        """The first ``ip netns add`` on a machine makes /run/netns a mount point (shared, so
        that namespaces mounted there are seen everywhere) and iproute2 never removes it: on a
        fresh machine the run made it, and unmounts it when no namespace is left there."""
        for path in NETNS_DIRS:
            if ("mount", path) not in self.baseline and path in _mounts() and not _listdir(path):
                with contextlib.suppress(OSError, subprocess.TimeoutExpired):
                    subprocess.run(["umount", path], capture_output=True, timeout=20, check=False)

    def _clean_up(self) -> None:
        """Kill what is left, reap every child, and remove the run's TMPDIR."""
        for leftover in self.leftovers:
            if leftover.kind == "process":
                pid = int(leftover.name.split()[0])
                with contextlib.suppress(OSError):
                    if os.getpgid(pid) == pid:
                        os.killpg(pid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + SETTLE
        while descendants(self.pid) and time.monotonic() < deadline:
            _reap()
            time.sleep(0.05)
        _reap()
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            # as it was: pytest.main may run again in this process (mutmut does)
            if self.old_tmpdir is None:
                os.environ.pop("TMPDIR", None)
            else:
                os.environ["TMPDIR"] = self.old_tmpdir
            tempfile.tempdir = None


def _reap() -> None:
    """Collect exited children: orphans handed to this process as subreaper, among them."""
    with contextlib.suppress(ChildProcessError):
        while os.waitpid(-1, os.WNOHANG)[0]:
            pass


def _become_subreaper() -> None:
    """Orphaned descendants (a killed server's workers) become this process's children, so
    they are seen, and reaped, instead of vanishing under init."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)


def _own_tmpdir(config: pytest.Config) -> Path:
    """A TMPDIR for this run and its subprocesses; pytest's tmp_path root stays where it is."""
    factory = getattr(config, "_tmp_path_factory", None)
    if factory is not None:
        factory.getbasetemp()  # settle pytest's tmp_path root before tempfile moves
    path = Path(tempfile.mkdtemp(prefix="viowire-test-run-"))
    os.environ["TMPDIR"] = str(path)
    tempfile.tempdir = None  # tempfile reads TMPDIR again
    return path


def install(config: pytest.Config, allowlist: Path) -> None:
    """Register the guards for this run (from conftest's pytest_configure), with the skip
    allow-list at ``allowlist``."""
    if config.pluginmanager.is_blocked(NAME) or config.pluginmanager.has_plugin(NAME):
        return
    entries = read_allowlist(allowlist) if allowlist.exists() else []
    _become_subreaper()
    config.pluginmanager.register(SuiteGuards(in_ci(), allowlist, entries), NAME)
