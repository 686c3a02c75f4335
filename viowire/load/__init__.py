"""``viowire load URL``: many sessions, many devices, a verified mixed workload, a summary.

Opens ``--sessions`` connections, brings ``--devices`` devices up across them (to DRIVER_OK),
drives a weighted mix of block reads and writes, entropy reads and network frames for
``--duration`` seconds or ``--requests`` requests with ``--concurrency`` requests in flight (at
most ``--depth`` per device), then reads back every block it wrote. Every written block carries
a verifiable pattern and every read is checked; net devices stream numbered, checksummed frames
to a partner on their link, which checks each one and its order. The exit status is 0 only if
every request completed without error, nothing failed verification, every written block was
read back and no frame was lost (unless --allow-loss).

Any other device type is driven by a function of your own instead of the mix: ``--workload
package.module:function``, ``async def function(driver, rng) -> int`` called once per operation
with the device's driver, returning the bytes it moved (:mod:`viowire.load.workload`).

Latencies are HdrHistograms per operation (p50 to max within 1 %). ``--timeseries FILE`` writes
a row a second (CSV or JSON lines), ``--report FILE.html`` a page with plots, ``--histogram-out
FILE`` the run in a mergeable form; ``viowire load merge FILES...`` sums such files of many
clients into one summary (docs/load.md).

Wiring into ``viowire.cli``::

    from viowire import load
    load.add_parser(sub)               # in build_parser()
    COMMANDS["load"] = load.run

Modules: :mod:`~viowire.load.config` (options), :mod:`~viowire.load.runner` (the phases),
:mod:`~viowire.load.pool` (fair scheduling), :mod:`~viowire.load.pattern` (block contents and
verification), :mod:`~viowire.load.frames` (frame contents and verification),
:mod:`~viowire.load.net` (flows between net devices), :mod:`~viowire.load.workload` (a user's
function), :mod:`~viowire.load.latency` (HdrHistogram), :mod:`~viowire.load.stats`,
:mod:`~viowire.load.timeseries`, :mod:`~viowire.load.progress`, :mod:`~viowire.load.report`
(text), :mod:`~viowire.load.html` (the page), :mod:`~viowire.load.merge` (many runs).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from typing import TYPE_CHECKING, Any

from viowire.load.config import DEFAULT_MIX, OPS
from viowire.options import UsageError, add_device_types_option, add_memory_option

if TYPE_CHECKING:
    from viowire.load.runner import LoadRun
    from viowire.metrics import MetricsEndpoint


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``load`` subcommand to ``subparsers`` (an argparse subparsers action)."""
    parser = subparsers.add_parser(
        "load",
        help="load-test a server: many sessions and devices, a verified mixed workload",
        description=__doc__.split("\n\n")[1].replace("``", ""),
    )
    parser.add_argument(
        "url",
        nargs="?",
        help="a viowire server, tcp://HOST:PORT or unix:///PATH; or 'merge' followed by files of "
        "--histogram-out: one summary of those runs",
    )
    parser.add_argument("files", nargs="*", metavar="FILE", help=argparse.SUPPRESS)
    add_memory_option(parser)
    add_device_types_option(
        parser, "load devices served for this run alone, on a private server (give no URL then)"
    )
    parser.add_argument(
        "--sessions", type=int, default=16, metavar="N", help="connections (default 16)"
    )
    parser.add_argument(
        "--devices",
        type=int,
        metavar="N",
        help="devices to bring up in total, spread over the sessions (default: every blk, rng "
        "or net device the mix uses, or every device --workload drives, in every session's "
        "platform)",
    )
    stop = parser.add_mutually_exclusive_group()
    stop.add_argument(
        "--duration", type=float, metavar="S", help="seconds of workload (default 10)"
    )
    stop.add_argument("--requests", type=int, metavar="N", help="requests of workload")
    parser.add_argument(
        "--mix",
        metavar="OP=W,...",
        help=f"operation weights, of {', '.join(OPS)} (default {DEFAULT_MIX}, less the "
        "operations of device types the server does not have)",
    )
    parser.add_argument(
        "--workload",
        metavar="MODULE:FUNCTION",
        help="drive the devices with a function of your own instead of the mix: async def "
        "FUNCTION(driver, rng) -> bytes moved, one call per operation; it drives the devices "
        "of its device_type attribute, or every device (see viowire/load/workload.py)",
    )
    parser.add_argument(
        "--block-size", default="4K", metavar="SIZE", help="bytes per request (default 4K)"
    )
    parser.add_argument(
        "--span",
        default="0",
        metavar="SIZE",
        help="bytes of each disk used, from offset 0 (default 0: the whole disk)",
    )
    parser.add_argument(
        "--frame-size",
        default="1514",
        metavar="SIZE",
        help="bytes of each net frame, Ethernet header included (default 1514: an MTU of 1500)",
    )
    parser.add_argument(
        "--allow-loss",
        action="store_true",
        help="frames a link dropped are counted, not errors: for a link busy with other "
        "traffic, which can fill a receiver's backlog (without it a lost frame is an error)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=1,
        metavar="N",
        help="requests in flight per device (default 1)",
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=256,
        metavar="N",
        help="requests in flight in total, over all devices (default 256)",
    )
    parser.add_argument(
        "--seed",
        type=int,
        help="seed of the block patterns and of the workload's choices (default: random; the "
        "summary gives it)",
    )
    parser.add_argument(
        "--bringup-concurrency",
        type=int,
        default=512,
        metavar="N",
        help="devices probed in parallel during bring-up (default 512)",
    )
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        metavar="S",
        help="bound on each request and each device's bring-up; a request that takes longer "
        "counts as a 'timeout' error and its device leaves the workload (default 10)",
    )
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")
    parser.add_argument(
        "--timeseries",
        metavar="FILE",
        help="a row per second of workload (ops/s, MB/s, p50, p99, errors, in total and per "
        "operation) to FILE, as it comes: CSV for .csv, JSON lines for .jsonl",
    )
    parser.add_argument(
        "--timeseries-format", choices=("csv", "jsonl"), help="of --timeseries, whatever its name"
    )
    parser.add_argument(
        "--report",
        metavar="FILE.html",
        help="a self-contained page of the run: latency and rate over time, latency histograms",
    )
    parser.add_argument(
        "--histogram-out",
        metavar="FILE",
        help="the run in a mergeable form (summary and HdrHistograms, JSON); a directory gets "
        "load-HOST-PID.json; 'viowire load merge FILES...' combines such files",
    )
    parser.add_argument(
        "--no-progress", action="store_true", help="no live progress line on stderr"
    )
    parser.add_argument(
        "--metrics",
        metavar="tcp://HOST:PORT",
        help="serve the run's counters as Prometheus metrics at http://HOST:PORT/metrics "
        "(docs/metrics.md)",
    )
    return parser


async def run(args: argparse.Namespace) -> int:
    """Run the load as ``args`` say, print the summary; 0 if everything was served intact."""
    from viowire.load import merge
    from viowire.load.config import LoadConfig
    from viowire.load.runner import LoadRun

    if args.url == "merge":
        summary = merge.merge([merge.read(path) for path in args.files])
        return _print(summary, json_out=args.json)
    if args.files:
        raise UsageError(
            f"viowire load takes one URL, not {' '.join([args.url, *args.files])}; to combine "
            "runs: viowire load merge FILES..."
        )
    config = LoadConfig.from_args(args)
    with contextlib.ExitStack() as files:
        series = None
        if config.timeseries:
            series = files.enter_context(open(config.timeseries, "w", newline=""))
        load = LoadRun(config, stderr=sys.stderr, timeseries=series)
        metrics = await _start_metrics(args.metrics, load) if args.metrics else None
        try:
            summary = await load.execute()
        finally:
            if metrics is not None:
                await metrics.close()
    if config.histogram_out:
        merge.write(config.histogram_out, merge.document(summary, load.mergeable()))
    if config.report:
        from viowire.load.html import write_report

        rows = load.series.rows if load.series else []
        histograms = {op: s.latency.rows() for op, s in load.stats.ops.items()}
        write_report(config.report, summary, rows, histograms)
    return _print(summary, json_out=config.json)


def _print(summary: dict[str, Any], *, json_out: bool) -> int:
    from viowire.load.report import format_summary

    if json_out:
        print(json.dumps(summary, indent=2))
    else:
        sys.stdout.write(format_summary(summary))
    sys.stdout.flush()
    return 0 if summary["ok"] else 1


async def _start_metrics(url: str, load_run: LoadRun) -> MetricsEndpoint:
    from viowire.load.metrics import LoadCollector
    from viowire.metrics import start_endpoint

    endpoint = await start_endpoint(url, LoadCollector(load_run))
    print(f"metrics on {endpoint.url}", file=sys.stderr, flush=True)
    return endpoint
