#!/usr/bin/env python3
"""This checkout's server against another source tree's, in the same run: ``python
benchmarks/tree_ab.py OTHER_TREE``.

::

    git archive fdd4a92 viowire | tar -x -C /tmp/base     # e.g. the commit before the counters
    python benchmarks/tree_ab.py /tmp/base --runs 15

Two ``viowire serve --device blk,size=64M`` processes on Unix sockets and uvloop, one imported
from this checkout and one from ``OTHER_TREE`` (a directory holding a ``viowire`` package that
speaks the same protocol version). One client takes turns between them run by run: 4 KiB reads
at depth 32 (IOPS) and MMIO_READ round trips (µs p50). It prints the medians and the median of
the per-run ratios (this tree / the other). That is what ``viowire bench`` cannot show: the
cost of a change to the hot path that both of its servers carry (issue 13's always-on counters).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from viowire.perf import cases  # noqa: E402
from viowire.perf.stats import percentile  # noqa: E402
from viowire.runtime import run  # noqa: E402


def start(tree: Path, sock: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(tree))
    argv = [sys.executable, "-m", "viowire", "--loop", "uvloop", "serve"]
    argv += ["--listen", f"unix://{sock}", "--device", "blk,size=64M"]
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, text=True, cwd=tempfile.gettempdir()
    )
    for line in proc.stdout:
        if line.startswith("listening on"):
            return proc
    raise RuntimeError(f"the server of {tree} did not start")


async def measure(urls: dict[str, str], runs: int, seconds: float) -> dict[str, dict]:
    opened = {name: await cases.open_blk(url, "shared") for name, url in urls.items()}
    figures: dict[str, dict[str, list[float]]] = {
        "blk.read.shared.qd32 IOPS": {name: [] for name in urls},
        "mmio.read_rtt µs p50": {name: [] for name in urls},
    }
    for _, blk in opened.values():  # warm up
        await cases.blk_iops(blk, "read", 32, seconds / 4, 100)
    for i in range(runs):
        for name in sorted(urls, reverse=bool(i % 2)):
            conn, blk = opened[name]
            iops = await cases.blk_iops(blk, "read", 32, seconds, 2000)
            figures["blk.read.shared.qd32 IOPS"][name].append(iops)
            rtts = await cases.mmio_rtt(conn, cases.magic_addr(blk.dev.base), seconds, 2000)
            figures["mmio.read_rtt µs p50"][name].append(percentile(rtts, 50))
    for conn, _ in opened.values():
        await conn.close()
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("other", type=Path, help="a source tree holding a viowire package")
    parser.add_argument("--runs", type=int, default=11)
    parser.add_argument("--seconds", type=float, default=1.0, help="per measurement")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        trees = {"this": ROOT, "other": args.other.resolve()}
        procs = [start(tree, f"{tmp}/{name}.sock") for name, tree in trees.items()]
        try:
            urls = {name: f"unix://{tmp}/{name}.sock" for name in trees}
            figures = run(measure(urls, args.runs, args.seconds), loop="uvloop")
        finally:
            for proc in procs:
                proc.terminate()
                proc.wait()
    for figure, values in figures.items():
        ratios = [a / b for a, b in zip(values["this"], values["other"], strict=True)]
        print(
            f"{figure}: this {statistics.median(values['this']):,.1f}, other "
            f"{statistics.median(values['other']):,.1f}, ratio {statistics.median(ratios):.3f} "
            f"(runs {min(ratios):.2f}-{max(ratios):.2f})"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
