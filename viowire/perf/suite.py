"""The orchestrator: spawn the processes, run the workers, gather, report, profile.

Spawned mode (the default without a URL, or ``--spawn``): for each (event loop, socket kind), a
viowire server (``viowire.perf.server``: blk v2, blk v1, rng, tsrng), a bare echo server
(``viowire.perf.bare``) and, for the bring-up case, a second viowire server with many idle
devices, each its own process on the same loop and socket kind; then one worker process
(``viowire.perf.worker``) as the client. So client and server run on different cores, as they
would in use. The bare ring's device is a process of its own too (the worker starts it).

URL mode (``viowire bench URL``): the viowire figures are taken against that server (its loop is
whatever it runs; "loop" in the results is the client's). The bare echo server is still a local
child process on the same socket kind; the interrupt latency (needs the tsrng device) and the
memory figures (need the server's pid) are skipped.
"""

from __future__ import annotations

import argparse
import asyncio
import fnmatch
import json
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path

from viowire.perf import cases, memory, worker
from viowire.perf.options import PROFILE_CASE, add_arguments
from viowire.perf.stats import Target, summarise, table
from viowire.protocol.messages import MsgType
from viowire.urls import parse_endpoint

SPAWNED_DEVICES = ("blk,size=64M", "blk,size=64M,version=1", "rng", "tsrng", "net,link=bench")
TSRNG_INDEX = 3
CODEC_TYPES = (MsgType.MMIO_READ, MsgType.MMIO_READ_REPLY, MsgType.MMIO_WRITE, MsgType.IRQ)


def all_names() -> list[str]:
    names = [
        f"codec.{t.name.lower()}{suffix}" for t in CODEC_TYPES for suffix in ("", ".vs_construct")
    ]
    return [*names, *worker.case_names(), "memory.idle_device", "memory.rss_100k"]


def vhost_user_results(args: argparse.Namespace) -> list[dict]:
    """``--vhost-user URL`` (repeatable): blk QD1/QD32 reads and writes through viowire's
    vhost-user front-end on each back-end, in one worker per loop, the back-ends taking turns
    run by run; the first back-end is the baseline of the others."""
    results = []
    loops = ("asyncio", "uvloop") if args.bench_loop == "both" else (args.bench_loop,)
    names = worker.vhost_user_case_names()
    for loop in loops:
        cfg = worker_config(args, names, loop, "unix")
        cfg["cases"] = names
        cfg["vhost_user"] = args.vhost_user
        _say(f"== {loop} / vhost-user: {len(names)} cases, {args.runs} runs each")
        results += run_worker(cfg)
    return results


def select_names(only: Sequence[str] | None) -> list[str]:
    """Names matching any --only: exact, a dotted prefix (``blk``, ``blk.read``) or a glob."""
    names = all_names()
    if not only:
        return names
    chosen = [
        n
        for n in names
        if any(n == o or n.startswith(o.rstrip(".") + ".") or fnmatch.fnmatch(n, o) for o in only)
    ]
    if not chosen:
        raise ValueError(f"--only {' '.join(only)} matches no benchmark (see --list)")
    return chosen


# --- child processes ---------------------------------------------------------------------------


def terminate(proc: subprocess.Popen, grace: float = 15) -> None:
    """SIGTERM (the process reports and cleans up), then SIGKILL after ``grace`` seconds."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


class Children:
    """Processes this run started; each is stopped by its pid at the end."""

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.procs: list[subprocess.Popen] = []
        self.count = 0

    def start(
        self, argv: list[str], name: str, timeout: float = 600
    ) -> tuple[subprocess.Popen, str]:
        """Start ``python -m argv...`` and wait for its ``listening on URL`` line.

        A thread drains the child's stdout for its whole life, so a chatty child never blocks.
        """
        self.count += 1
        log_path = self.tmp / f"{name}-{self.count}.log"
        with log_path.open("w") as errors:
            proc = subprocess.Popen(
                [sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=errors, text=True
            )
        self.procs.append(proc)
        found: queue.Queue[str] = queue.Queue()

        def drain() -> None:
            for line in proc.stdout:
                if line.startswith("listening on "):
                    found.put(line.split()[-1])
            found.put("")

        threading.Thread(target=drain, daemon=True).start()
        try:
            url = found.get(timeout=timeout)
        except queue.Empty:
            url = ""
        if not url:
            raise RuntimeError(
                f"{name} did not start ({' '.join(argv)}):\n{log_path.read_text()[-2000:]}"
            )
        return proc, url

    def viowire(
        self,
        loop: str,
        url: str,
        *,
        devices: Sequence[str] = (),
        config: str = "",
        poll_us: int = 0,
        metrics: str = "",
    ):
        argv = ["viowire.perf.server", "--loop", loop, "serve", "--listen", url]
        if poll_us:
            argv += ["--poll-us", str(poll_us)]
        if metrics:
            argv += ["--metrics", metrics]
        for spec in devices:
            argv += ["--device", spec]
        if config:
            argv += ["--config", config]
        return self.start(argv, "viowire-server")

    def bare(self, loop: str, url: str):
        return self.start(["viowire.perf.bare", "--loop", loop, "--listen", url], "bare-server")

    def stop(self, proc: subprocess.Popen) -> None:
        terminate(proc)

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


def free_port() -> int:
    """A TCP port of 127.0.0.1 free now (for a child's --metrics, which prints no line a
    benchmark waits for)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _listen_url(kind: str, tmp: Path, name: str) -> str:
    return f"unix://{tmp}/{name}.sock" if kind == "unix" else "tcp://127.0.0.1:0"


def _say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# --- the figures -------------------------------------------------------------------------------


def codec_results(names: list[str], runs: int, quick: bool) -> list[dict]:
    """Per message type: viowire's codec against hand ``struct``, and against construct."""
    results = []
    number = 500 if quick else 20_000
    for msg_type in CODEC_TYPES:
        name = f"codec.{msg_type.name.lower()}"
        if name not in names and f"{name}.vs_construct" not in names:
            continue
        _say(f"{name}: {runs} runs")
        samples = [cases.codec_costs(msg_type, number) for _ in range(runs)]
        fast = [s["viowire"] for s in samples]
        if name in names:
            results.append(
                summarise(
                    name,
                    "µs/msg",
                    fast,
                    [s["struct"] for s in samples],
                    loop=None,
                    socket=None,
                    target=Target("value", "<=", 2.0),
                    baseline_name="hand-written struct: one fused Struct, same message class",
                )
            )
        if f"{name}.vs_construct" in names:
            results.append(
                summarise(
                    f"{name}.vs_construct",
                    "µs/msg",
                    fast,
                    [s["construct"] for s in samples],
                    loop=None,
                    socket=None,
                    baseline_name="construct, interpreted",
                )
            )
    return results


def memory_results(names: list[str], loop: str, kind: str, devices: int, tmp: Path) -> list[dict]:
    """RSS of a server with ``devices`` idle devices and one session, per device and in all."""
    from viowire.client import connection

    # Building 100,000 devices for the session takes longer than a request normally may.
    connection.REQUEST_TIMEOUT = max(connection.REQUEST_TIMEOUT, 600.0)

    def measure(count: int) -> tuple[int, int]:
        config = memory.write_config(tmp / f"idle-{count}.toml", count)
        kids = Children(tmp)
        try:
            proc, url = kids.viowire(
                loop, _listen_url(kind, tmp, f"idle-{count}"), config=str(config)
            )
            started = memory.rss_kib(proc.pid)

            async def session() -> int:
                async with await connection.connect(url, memory="proxied"):
                    return memory.rss_kib(proc.pid)

            return started, asyncio.run(session())
        finally:
            kids.close()

    _say(f"memory: a server with 1 idle device, then with {devices:,}")
    _, one = measure(1)
    started, loaded = measure(devices)
    per_device = (loaded - one) * 1024 / max(1, devices - 1)
    floor = float(
        subprocess.run(
            [sys.executable, "-m", "viowire.perf.memory", "--bare", str(devices)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    results = []
    note = (
        f"measured with {devices:,} idle rng devices (v1 and v2) and one session"
        if devices >= 100_000
        else f"measured with {devices:,} idle devices; 100,000 extrapolated linearly"
    )
    if "memory.idle_device" in names:
        results.append(
            summarise(
                "memory.idle_device",
                "KiB/device",
                [per_device / 1024],
                [floor / 1024],
                loop=loop,
                socket=kind,
                devices=devices,
                session_kib_per_device=(loaded - started) / devices,
                baseline_name="bare floor: slotted register-file and queue objects",
                note=note,
            )
        )
    if "memory.rss_100k" in names:
        at_100k = loaded if devices >= 100_000 else one + per_device / 1024 * (100_000 - 1)
        results.append(
            summarise(
                "memory.rss_100k",
                "MiB",
                [at_100k / 1024],
                [one / 1024],
                loop=loop,
                socket=kind,
                target=Target("value", "<=", 2048),
                devices=devices,
                measured=devices >= 100_000,
                baseline_name="RSS of the same server with one device and one session",
                note=note,
            )
        )
    return results


def run_worker(cfg: dict) -> list[dict]:
    proc = subprocess.run(
        [sys.executable, "-m", "viowire.perf.worker", json.dumps(cfg)],
        stdout=subprocess.PIPE,
        text=True,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"the {cfg['loop']}/{cfg['socket']} worker failed ({proc.returncode})")
    return json.loads(proc.stdout.strip().splitlines()[-1])["results"]


def worker_config(args: argparse.Namespace, names: list[str], loop: str, kind: str) -> dict:
    return {
        "loop": loop,
        "socket": kind,
        "cases": [n for n in names if n in worker.case_names()],
        "runs": args.runs,
        "budget": args.seconds or (0.05 if args.quick else 1.0),
        "least": 20 if args.quick else 2000,
        "bringup": {
            "sessions": args.bringup_sessions,
            "concurrency": 32,
            "limit": args.bringup_devices or (8 if args.quick else 2500),
        },
    }


def combos(args: argparse.Namespace) -> list[tuple[str, str]]:
    loops = ("asyncio", "uvloop") if args.bench_loop == "both" else (args.bench_loop,)
    if args.url:
        kinds: tuple[str, ...] = (parse_endpoint(args.url).scheme,)
    else:
        kinds = ("tcp", "unix") if args.bench_socket == "both" else (args.bench_socket,)
    return [(loop, kind) for loop in loops for kind in kinds]


def run_suite(args: argparse.Namespace, names: list[str], tmp: Path) -> list[dict]:
    results = codec_results(names, args.runs, args.quick)
    wanted = set(names) & set(worker.case_names())
    for loop, kind in combos(args) if wanted else []:
        kids = Children(tmp)
        try:
            cfg = worker_config(args, names, loop, kind)
            _, cfg["bare_url"] = kids.bare(loop, _listen_url(kind, tmp, f"bare-{loop}"))
            if args.url:
                cfg["url"] = cfg["bringup_url"] = args.url
                cfg["bringup"]["sessions"] = args.bringup_sessions
            else:
                _, cfg["url"] = kids.viowire(
                    loop, _listen_url(kind, tmp, f"viowire-{loop}"), devices=SPAWNED_DEVICES
                )
                cfg["irq_device"] = TSRNG_INDEX
                if set(worker.POLL_CASES) & wanted:
                    _, cfg["poll_url"] = kids.viowire(
                        loop,
                        _listen_url(kind, tmp, f"poll-{loop}"),
                        devices=SPAWNED_DEVICES,
                        poll_us=worker.POLL_US,
                    )
                if set(worker.METRICS_CASES) & wanted:
                    cfg["metrics_port"] = free_port()
                    _, cfg["metrics_url"] = kids.viowire(
                        loop,
                        _listen_url(kind, tmp, f"metrics-{loop}"),
                        devices=SPAWNED_DEVICES,
                        metrics=f"tcp://127.0.0.1:{cfg['metrics_port']}",
                    )
                if "platform.bringup" in wanted:
                    count = cfg["bringup"]["limit"]
                    config = memory.write_config(tmp / f"bringup-{count}.toml", count)
                    _, cfg["bringup_url"] = kids.viowire(
                        loop, _listen_url(kind, tmp, f"bringup-{loop}"), config=str(config)
                    )
            _say(f"== {loop} / {kind}: {len(cfg['cases'])} cases, {args.runs} runs each")
            results += run_worker(cfg)
        finally:
            kids.close()
    if not args.url and {"memory.idle_device", "memory.rss_100k"} & set(names):
        loop, kind = combos(args)[0]
        count = args.memory_devices or (50 if args.quick else 100_000)
        results += memory_results(names, loop, kind, count, tmp)
    return results


# --- profile -----------------------------------------------------------------------------------


def _py_spy() -> str:
    from shutil import which

    found = which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not os.path.exists(found):
        raise SystemExit("--profile needs py-spy: pip install py-spy")
    return found


IDLE_LEAVES = ("epoll_wait", "epoll_pwait", "poll", "select", "__poll", "__select")


def collapse(raw: str) -> tuple[dict[str, int], dict[str, int], int, int]:
    """Own and cumulative busy samples per function from py-spy's raw (collapsed) stacks, the
    busy total, and the samples spent waiting in epoll (idle)."""
    own: dict[str, int] = {}
    total: dict[str, int] = {}
    busy = idle = 0
    for line in raw.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_function(f) for f in stack.split(";")[1:]]  # the first is the process
        if not frames:
            continue
        if frames[-1].split(" (")[0] in IDLE_LEAVES:
            idle += count
            continue
        busy += count
        own[frames[-1]] = own.get(frames[-1], 0) + count
        for frame in set(frames):
            total[frame] = total.get(frame, 0) + count
    return own, total, busy, idle


def _function(frame: str) -> str:
    """``name (path/to/file.py:123)`` -> ``name (file.py)``, so lines of one function merge."""
    name, _, where = frame.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = Path(path).parts
    short = "/".join(parts[-2:]) if "viowire" in parts else Path(path).name
    return f"{name} ({short})" if path else name


def profile_report(title: str, raw: str, top: int = 25) -> str:
    own, total, busy, idle = collapse(raw)
    if not busy:
        return f"{title}: no samples"
    lines = [
        f"{title}: {busy + idle} samples, {100 * idle / (busy + idle):.0f}% idle in epoll; "
        "percentages below are of the busy samples"
    ]
    # cumulative: Python functions only, less the loop plumbing every busy sample goes through
    python = {f: c for f, c in total.items() if ".py)" in f and c < 0.99 * busy}
    for label, counts in (("own time", own), ("cumulative, Python functions", python)):
        lines.append(f"  top {top} by {label}:")
        for func, count in sorted(counts.items(), key=lambda kv: -kv[1])[:top]:
            lines.append(f"    {100 * count / busy:5.1f}%  {func}")
    return "\n".join(lines)


def run_profile(args: argparse.Namespace, names: list[str], tmp: Path) -> str:
    if args.url:
        raise SystemExit("--profile needs spawned servers (no URL): it attaches to their pids")
    spy = _py_spy()
    case = (
        next((n for n in names if n in worker.case_names()), PROFILE_CASE)
        if args.only
        else (PROFILE_CASE)
    )
    loop, kind = combos(args)[0]
    out_dir = Path(args.profile_dir) if args.profile_dir else tmp
    out_dir.mkdir(parents=True, exist_ok=True)
    kids = Children(tmp)
    try:
        cfg = worker_config(args, [case], loop, kind)
        cfg["profile"] = args.profile + 2  # the worker keeps going while py-spy detaches
        server, cfg["url"] = kids.viowire(
            loop, _listen_url(kind, tmp, "viowire-prof"), devices=SPAWNED_DEVICES
        )
        _, cfg["bare_url"] = kids.bare(loop, _listen_url(kind, tmp, "bare-prof"))
        cfg["irq_device"] = TSRNG_INDEX
        client = subprocess.Popen(
            [sys.executable, "-m", "viowire.perf.worker", json.dumps(cfg)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for line in client.stderr:
            _say(line.rstrip())
            if line.startswith("PROFILE-START"):
                break
        spies = {}
        for side, pid in (("server", server.pid), ("client", client.pid)):
            raw = out_dir / f"profile-{side}-{case}-{loop}-{kind}.txt"
            spies[side] = (
                raw,
                subprocess.Popen(
                    [
                        spy,
                        "record",
                        "--pid",
                        str(pid),
                        "--duration",
                        f"{args.profile:g}",
                        "--rate",
                        "250",
                        "--native",
                        "--idle",
                        "--format",
                        "raw",
                        "--output",
                        str(raw),
                    ],
                    stdout=subprocess.DEVNULL,
                    stderr=subprocess.DEVNULL,
                ),
            )
        for _, spying in spies.values():
            spying.wait()
        out, err = client.communicate()
        sys.stderr.write(err)
        result = json.loads(out.strip().splitlines()[-1])["results"]
        figure = f"{result[0]['value']:.0f} {result[0]['unit']}" if result else "?"
        report = [f"profile of {case}, {loop}/{kind}, {args.profile:g} s ({figure}):"]
        for side, (raw, _) in spies.items():
            text = raw.read_text() if raw.exists() else ""
            report.append(
                profile_report(
                    f"{side} (pid {dict(server=server.pid, client=client.pid)[side]})", text
                )
            )
            report.append(f"  raw stacks: {raw}")
        return "\n\n".join(report)
    finally:
        kids.close()


# --- entry -------------------------------------------------------------------------------------


def main(args: argparse.Namespace) -> int:
    if args.list:
        print("\n".join(all_names()))
        return 0
    if args.runs < 1:
        raise ValueError("--runs must be at least 1")
    if args.vhost_user:
        if args.url:
            raise ValueError("--vhost-user measures vhost-user back-ends: give no server URL")
        results = vhost_user_results(args)
        print(json.dumps({"results": results}, indent=1) if args.json else table(results))
        return 0
    names = select_names(args.only)
    with tempfile.TemporaryDirectory(prefix="viowire-bench-") as tmp:
        if args.profile is not None:
            print(run_profile(args, names, Path(tmp)))
            return 0
        results = run_suite(args, names, Path(tmp))
    if args.json:
        print(json.dumps({"results": results}, indent=1))
    else:
        print(table(results))
    return 0


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="viowire bench", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(argv)
