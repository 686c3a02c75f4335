"""Network namespaces for tests: a bridge in the root namespace and namespaces joined to it by
veth pairs, or namespaces alone; test subnets owned in the root namespace before any traffic.

Adapted from the measured recipe (shared/reference/containers/netns_fixture.py). Safety (the
project's hard rule): every test subnet gets a route in the root namespace first (the bridge's
address, or ``ip route add unreachable SUBNET``) and ``ip route get`` is checked for each test
address before traffic; traffic is sent only from inside namespaces. Everything made here is
undone on exit, failure included: processes in the namespaces (by PID), the namespaces (their
veths, TAPs go with them), the bridge, the iptables rule, the routes.

    with Topology(["server", "c1"], subnet="10.203.7") as topo:
        topo.ips["server"]                  # "10.203.7.10"
        topo.popen("server", [...])         # runs inside namespace "server"
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence

import pytest


def ip(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], check=check, capture_output=True, text=True, timeout=10)


def unavailable_reason() -> str | None:
    """Why this process cannot make namespaces and bridges, or None if it can."""
    if shutil.which("ip") is None:
        return "iproute2's ip is not installed"
    if os.geteuid() != 0:
        return "network namespaces need root (CAP_NET_ADMIN and CAP_SYS_ADMIN)"
    probe = "vwprobe" + uuid.uuid4().hex[:6]
    result = ip("netns", "add", probe, check=False)
    if result.returncode != 0:
        return f"cannot create a network namespace: {result.stderr.strip()}"
    ip("netns", "del", probe, check=False)
    return None


def require_netns(*tools: str) -> None:
    """Skip, saying why, unless namespaces can be made here and ``tools`` are installed."""
    reason = unavailable_reason()
    for tool in tools:
        if reason is None and shutil.which(tool) is None:
            reason = f"{tool} is not installed (scripts/install-test-tools installs it)"
    if reason:
        pytest.skip(reason)


def tag() -> str:
    return uuid.uuid4().hex[:6]


def is_local(address: str, bridge: str | None = None) -> bool:
    """Whether the root namespace keeps ``address`` here: on ``bridge``, or unreachable."""
    result = ip("route", "get", address, check=False)
    if result.returncode != 0:
        return "unreachable" in result.stderr or "No route to host" in result.stderr
    return bridge is not None and f"dev {bridge} " in result.stdout + " "


class Topology(contextlib.AbstractContextManager):
    """A bridge with ``SUBNET.1/24`` in the root namespace (``bridge=False``: none) and one
    namespace per name; with a bridge, each namespace has eth0 = ``SUBNET.(10+i)/24`` on it.
    ``unreachable``: more subnets (``10.204.0.0/24``) routed nowhere in the root namespace."""

    def __init__(
        self,
        names: Sequence[str],
        subnet: str,
        *,
        bridge: bool = True,
        unreachable: Sequence[str] = (),
    ) -> None:
        t = tag()
        self.bridge = f"vwbr{t}" if bridge else None
        self.subnet = subnet
        self.ns = {name: f"vw{t}-{name}" for name in names}
        self.ips = {name: f"{subnet}.{10 + i}" for i, name in enumerate(names)}
        self.unreachable = [f"{subnet}.0/24"] * (not bridge) + list(unreachable)
        self._routes: list[str] = []
        self._fwd_rule: list[str] | None = None
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Topology:
        try:
            self._setup()
        except BaseException:
            self.close()
            raise
        return self

    def _setup(self) -> None:
        for route in self.unreachable:  # SAFETY: owned in the root namespace before traffic
            ip("route", "add", "unreachable", route)
            self._routes.append(route)
        if self.bridge:
            ip("link", "add", self.bridge, "type", "bridge")
            ip("addr", "add", f"{self.subnet}.1/24", "dev", self.bridge)
            ip("link", "set", self.bridge, "up")
        for i, name in enumerate(self.ns):
            ns = self.ns[name]
            ip("netns", "add", ns)
            ip("-n", ns, "link", "set", "lo", "up")
            if self.bridge:
                self._veth(i, name, ns)
        self._allow_forwarding()
        self.check_routes()

    def _veth(self, i: int, name: str, ns: str) -> None:
        host, inside = f"{self.bridge}h{i}", f"{self.bridge}n{i}"
        ip("link", "add", host, "type", "veth", "peer", "name", inside)
        ip("link", "set", host, "master", self.bridge, "up")
        ip("link", "set", inside, "netns", ns)
        ip("-n", ns, "link", "set", inside, "name", "eth0")
        ip("-n", ns, "addr", "add", f"{self.ips[name]}/24", "dev", "eth0")
        ip("-n", ns, "link", "set", "eth0", "up")

    def _allow_forwarding(self) -> None:
        # Once dockerd has run, FORWARD's policy is DROP and br_netfilter makes bridged frames
        # pass it: allow this bridge's own traffic (only if FORWARD is not a bare ACCEPT).
        if not self.bridge or shutil.which("iptables") is None:
            return
        rules = subprocess.run(["iptables", "-S", "FORWARD"], capture_output=True, text=True)
        if "-P FORWARD ACCEPT" in rules.stdout and "-A FORWARD" not in rules.stdout:
            return
        rule = ["FORWARD", "-i", self.bridge, "-o", self.bridge, "-j", "ACCEPT"]
        if subprocess.run(["iptables", "-I", *rule], capture_output=True).returncode == 0:
            self._fwd_rule = rule

    def check_routes(self, addresses: Sequence[str] = ()) -> None:
        """Raise unless every test address stays on this machine (bridge, or unreachable)."""
        for address in [*self.ips.values(), *addresses]:
            if not is_local(address, self.bridge):
                out = ip("route", "get", address, check=False)
                raise RuntimeError(f"UNSAFE: {address} would leave: {out.stdout}{out.stderr}")

    # -- use ------------------------------------------------------------------------------------
    def cmd(self, name: str, argv: Sequence[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns[name], *argv]

    def run(self, name: str, argv: Sequence[str], **kw) -> subprocess.CompletedProcess[str]:
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 15)
        return subprocess.run(self.cmd(name, argv), **kw)

    def popen(self, name: str, argv: Sequence[str], **kw) -> subprocess.Popen:
        """A process inside namespace ``name``, in a process group of its own (killed whole
        on close)."""
        proc = subprocess.Popen(self.cmd(name, argv), start_new_session=True, **kw)
        self._procs.append(proc)
        return proc

    def start(
        self, name: str, argv: Sequence[str], expect: str, timeout: float = 10.0, **kw
    ) -> tuple[subprocess.Popen, re.Match[str]]:
        """Start ``argv`` in namespace ``name`` and wait (bounded) for a line of its stdout that
        matches ``expect``; its stderr goes to a file (read by :func:`stderr_of`), the lines
        of its stdout after that one to :func:`stdout_of`."""
        err = tempfile.TemporaryFile("w+")  # noqa: SIM115 (closed with the topology)
        proc = self.popen(name, argv, stdout=subprocess.PIPE, stderr=err, text=True, **kw)
        proc.stderr_file = err
        lines: queue.Queue[str | None] = queue.Queue()
        proc.stdout_lines = lines
        threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
        deadline = time.monotonic() + timeout
        seen = []
        while True:
            try:
                line = lines.get(timeout=max(deadline - time.monotonic(), 0))
            except queue.Empty:
                line = None
            if line is None:
                raise AssertionError(
                    f"{' '.join(argv)} in {name}: no line matching {expect!r} in {timeout} s; "
                    f"printed {seen}, stderr: {stderr_of(proc)[-2000:]}"
                )
            seen.append(line)
            match = re.search(expect, line)
            if match:
                return proc, match

    def ip(self, name: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        return ip("-n", self.ns[name], *args, check=check)

    # -- teardown -------------------------------------------------------------------------------
    def close(self) -> None:
        for proc in self._procs:
            stop(proc)
            err = getattr(proc, "stderr_file", None)
            if err is not None:
                err.close()
        for i in range(len(self.ns) * bool(self.bridge)):
            # the root namespace's end, now: a namespace is destroyed (and its veth end with
            # it) only once the kernel's cleanup has run, some time after `ip netns del`
            ip("link", "del", f"{self.bridge}h{i}", check=False)
        for ns in self.ns.values():
            pids = ip("netns", "pids", ns, check=False).stdout.split()
            for pid in pids:
                with contextlib.suppress(ProcessLookupError, ValueError):
                    os.kill(int(pid), signal.SIGKILL)
            ip("netns", "del", ns, check=False)  # its veth end and TAPs go with it
        if self._fwd_rule:
            subprocess.run(["iptables", "-D", *self._fwd_rule], capture_output=True)
            self._fwd_rule = None
        if self.bridge:
            ip("link", "del", self.bridge, check=False)
        for route in self._routes:
            ip("route", "del", "unreachable", route, check=False)
        self._routes.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()


def _pump(stream, out: queue.Queue[str | None]) -> None:
    with contextlib.suppress(ValueError, OSError):
        for line in stream:
            out.put(line.rstrip("\n"))
    out.put(None)


def stdout_of(proc: subprocess.Popen) -> str:
    """The lines a process :meth:`Topology.start` started printed since, so far."""
    out = []
    with contextlib.suppress(queue.Empty):
        while (line := proc.stdout_lines.get_nowait()) is not None:
            out.append(line)
    return "\n".join(out)


def stderr_of(proc: subprocess.Popen) -> str:
    """What a process :meth:`Topology.start` started wrote to stderr so far."""
    err = proc.stderr_file
    err.seek(0)
    return err.read()


def stop(proc: subprocess.Popen, timeout: float = 5.0) -> None:
    """SIGTERM the process group, then SIGKILL it if it has not gone within ``timeout``."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)  # anything of the group still there
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
