#!/usr/bin/env python3
"""Issue 12's starvation flood: ``python benchmarks/flood.py``.

::

    python benchmarks/flood.py                                  # 200 connections, 10 s, 3 runs
    python benchmarks/flood.py --connections 50 --duration 3 --runs 5 --json
    git worktree add /tmp/base 297b4bb
    python benchmarks/flood.py --baseline /tmp/base     # and that tree's server, runs taking turns

Each run starts a ``viowire serve`` of its own (TCP on loopback, a 1 MiB blk and an rng, its
default event loop) and times a fresh client a few times while it is idle. Then a flood process
(``python -m viowire.perf.flood``, the program tests/test_flood.py runs) opens ``--connections``
connections, sends each a HELLO, and pipelines MMIO_READs on all of them for ``--duration``
seconds without ever reading a reply. From the moment the flood starts connecting until it ends,
this process runs a fresh client every ``--every`` seconds: a new connection, HELLO and the
guest RAM registration, one register read, close (``viowire.perf.flood.fresh_client``). Server,
flood and this process are three processes.

The figures of a run, in milliseconds: ``first`` (the attempt started as the flood begins to
connect: the server accepts its connections and builds their sessions meanwhile), ``p50``,
``p99`` and ``max`` of every attempt (and when the worst began, seconds after the flood began
to connect); ``steady p50`` and ``p99``, of the attempts from 0.5 s after the flood connected
(the old server took a second to accept the flood's connections, with no flood meanwhile);
``idle``, the best of the attempts before the flood. The summary gives the median of the runs'
figures; ``over`` counts attempts past issue 12's bar of 100 ms, in all runs. With
``--baseline TREE`` the runs take turns between this checkout's server and the one imported from
TREE (a directory holding a ``viowire`` package); flood and client are this checkout's. Nothing
is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from viowire.perf.flood import fresh_client  # noqa: E402
from viowire.perf.stats import percentile  # noqa: E402
from viowire.runtime import run as run_loop  # noqa: E402

BAR_MS = 100.0
STEADY_AFTER = 0.5  # seconds after the flood connected: attempts from then on are "steady"
IDLE_PROBES = 5
PLATFORM = ("--device", "blk,size=1M", "--device", "rng")


def start_server(tree: Path, loop: str, log: Path) -> tuple[subprocess.Popen, str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, "-m", "viowire", "--loop", loop, "serve"]
    argv += ["--listen", "tcp://127.0.0.1:0", *PLATFORM]
    with log.open("w") as err:
        proc = subprocess.Popen(
            argv, env=env, stdout=subprocess.PIPE, stderr=err, text=True,
            cwd=tempfile.gettempdir(),
        )  # fmt: skip
    for line in proc.stdout:
        if line.startswith("listening on"):
            proc.stdout.close()  # nothing more is printed there
            return proc, line.split()[-1]
    proc.wait()
    raise RuntimeError(f"the server of {tree} did not start:\n{log.read_text()[-2000:]}")


async def probe_flood(url: str, connections: int, duration: float, every: float) -> dict:
    """Idle attempts, then the flood with attempts every ``every`` seconds from its first
    connection to its end."""
    idle = [await fresh_client(url) for _ in range(IDLE_PROBES)]
    host, port = url.removeprefix("tcp://").rsplit(":", 1)
    flood = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "viowire.perf.flood", host, port, str(connections), str(duration),
        stdout=subprocess.PIPE, env=dict(os.environ, PYTHONPATH=str(ROOT)),
    )  # fmt: skip
    attempts: list[float] = []
    starts: list[float] = []  # seconds after the flood began to connect
    failures: list[str] = []
    try:
        async with asyncio.timeout(duration + 60):
            assert (await flood.stdout.readline()).strip() == b"connecting"
            started = time.perf_counter()
            flooding = asyncio.ensure_future(flood.stdout.readline())
            ended = None
            while ended is None or not ended.done():
                starts.append(time.perf_counter() - started)
                try:
                    attempts.append(await fresh_client(url))
                except Exception as exc:  # a failed attempt is a finding, reported
                    starts.pop()
                    failures.append(f"{type(exc).__name__}: {exc}")
                if ended is None and flooding.done():
                    connected = time.perf_counter() - started
                    ended = asyncio.ensure_future(flood.stdout.readline())
                await asyncio.sleep(every)
            last = ended.result().split()
            sent = int(last[-1]) if last else 0  # no line: the flood died
    finally:
        if flood.returncode is None:
            flood.kill()
        await flood.wait()
    ms = [t * 1000 for t in attempts]
    steady = [t for t, at in zip(ms, starts, strict=True) if at > connected + STEADY_AFTER]
    return {
        "idle": min(idle) * 1000,
        "first": ms[0] if ms else float("nan"),
        "p50": percentile(ms, 50),
        "p99": percentile(ms, 99),
        "max": max(ms, default=float("nan")),
        "max_after_first": max(ms[1:], default=float("nan")),
        "worst_at": starts[ms.index(max(ms))] if ms else float("nan"),
        "steady_p50": percentile(steady, 50),
        "steady_p99": percentile(steady, 99),
        "attempts": len(ms),
        "over": sum(t > BAR_MS for t in ms),
        "failures": failures,
        "connect_s": connected,
        "sent_bytes": sent,
        "ms": [round(t, 1) for t in ms],
        "starts": [round(t, 3) for t in starts],
    }


def one_run(tree: Path, args: argparse.Namespace, tmp: Path, n: int) -> dict:
    server, url = start_server(tree, args.loop, tmp / f"server-{n}.log")
    try:
        result = run_loop(
            probe_flood(url, args.connections, args.duration, args.every), loop=args.loop
        )
        result["server_alive"] = server.poll() is None
    finally:
        server.kill()
        server.wait()
    return result


FIGURES = ("first", "p50", "p99", "max", "max_after_first", "steady_p50", "steady_p99", "idle")


def summary(runs: list[dict]) -> dict:
    out = {f: round(statistics.median(r[f] for r in runs), 1) for f in FIGURES}
    out["over"] = sum(r["over"] for r in runs)
    out["attempts"] = sum(r["attempts"] for r in runs)
    out["failures"] = sum(len(r["failures"]) for r in runs)
    out["worst"] = round(max(r["max"] for r in runs), 1)
    out["runs"] = len(runs)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=200)
    parser.add_argument("--duration", type=float, default=10.0, help="seconds of flood")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--every", type=float, default=0.05, help="seconds between attempts")
    parser.add_argument("--loop", choices=("auto", "uvloop", "asyncio"), default="auto")
    parser.add_argument("--baseline", type=Path, help="another tree's server, runs taking turns")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    trees = {"this": ROOT}
    if args.baseline:
        trees["baseline"] = args.baseline.resolve()
    results: dict[str, list[dict]] = {name: [] for name in trees}
    with tempfile.TemporaryDirectory(prefix="viowire-flood-") as tmp:
        for n in range(args.runs):
            for name in sorted(trees, reverse=bool(n % 2)):
                result = one_run(trees[name], args, Path(tmp), n)
                results[name].append(result)
                if not args.json:
                    print(
                        f"  {name:<8} run {n + 1}: first {result['first']:.1f} ms, p50 "
                        f"{result['p50']:.1f}, p99 {result['p99']:.1f}, max {result['max']:.1f} "
                        f"({result['worst_at']:.2f} s in; after the first "
                        f"{result['max_after_first']:.1f}), steady p50 {result['steady_p50']:.1f} "
                        f"p99 {result['steady_p99']:.1f}, idle "
                        f"{result['idle']:.1f}; {result['attempts']} attempts, {result['over']} "
                        f"over {BAR_MS:g} ms, {len(result['failures'])} failed; connected in "
                        f"{result['connect_s'] * 1000:.0f} ms, {result['sent_bytes'] / 1e6:.0f} "
                        f"MB sent" + ("" if result["server_alive"] else "; THE SERVER DIED"),
                        flush=True,
                    )
    summaries = {name: summary(runs) for name, runs in results.items()}
    if args.json:
        print(json.dumps({"summary": summaries, "runs": results}))
        return 0
    print(
        f"{args.connections} connections flooding {args.duration:g} s, a fresh client every "
        f"{args.every * 1000:g} ms; medians of {args.runs} runs (ms):"
    )
    for name, s in summaries.items():
        print(
            f"{name:<8} first {s['first']}, p50 {s['p50']}, p99 {s['p99']}, max {s['max']} "
            f"(after the first {s['max_after_first']}), steady p50 {s['steady_p50']} p99 "
            f"{s['steady_p99']}, idle {s['idle']}; worst of all runs "
            f"{s['worst']}; {s['over']} of {s['attempts']} attempts over {BAR_MS:g} ms; "
            f"{s['failures']} failed"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
