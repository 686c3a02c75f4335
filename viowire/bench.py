"""``viowire bench [URL]``: the benchmark suite, each figure beside a bare baseline and a ratio.

Without a URL (or with ``--spawn``) it starts its own viowire server, bare echo server and bare
split-ring device as separate processes for each event loop and socket kind; with a URL it
measures that server. ``--json`` prints ``{"results": [{"name", "value", "unit", "baseline",
"ratio", "loop", "socket", ...}]}``. The suite itself lives in :mod:`viowire.perf`.

Wiring into ``viowire.cli``::

    from viowire import bench
    bench.add_parser(sub)               # in build_parser()
    COMMANDS["bench"] = bench.run       # async; or call bench.main(args) outside a loop

Every measurement runs in child processes with their own event loops, so ``run`` does not care
which loop it is awaited on (the global ``--loop`` is not the benchmark's: use
``viowire bench --loop asyncio|uvloop|both``).
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Sequence

from viowire.perf.options import add_arguments


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``bench`` command to the ``viowire`` command's subparsers."""
    parser = subparsers.add_parser(
        "bench",
        help="benchmarks against bare baselines (spawns its own servers without a URL)",
        description=__doc__.split("\n\n")[0],
    )
    add_arguments(parser)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the suite as ``args`` say (blocking; spawns and stops its own processes)."""
    from viowire.perf import suite  # the client, server and codec it measures: only to run it

    return suite.main(args)


async def run(args: argparse.Namespace) -> int:
    """``main`` for an event loop: the suite runs in a thread, its children in processes."""
    return await asyncio.to_thread(main, args)


def cli(argv: Sequence[str] | None = None) -> int:
    """``python -m viowire.bench [options] [URL]``."""
    from viowire.perf import suite

    return suite.main(suite.parse(argv))


if __name__ == "__main__":
    sys.exit(cli())
