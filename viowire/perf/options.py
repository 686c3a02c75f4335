"""``viowire bench``'s options, apart from the suite so that building the ``viowire`` command's
parser does not import the client, the server and the codec the suite measures with."""

from __future__ import annotations

import argparse

PROFILE_CASE = "blk.read.shared.qd32"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "url", nargs="?", help="a running viowire server (default: spawn one per loop and socket)"
    )
    parser.add_argument("--spawn", action="store_true", help="spawn the servers (the default)")
    parser.add_argument(
        "--loop",
        dest="bench_loop",
        choices=("asyncio", "uvloop", "both"),
        default="both",
        help="event loop of client and servers (default: both, one after the other)",
    )
    parser.add_argument(
        "--socket",
        dest="bench_socket",
        choices=("tcp", "unix", "both"),
        default="both",
        help="socket kind (default: both); with a URL, the URL's",
    )
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default: 5)")
    parser.add_argument("--quick", action="store_true", help="tiny counts, for CI and tests")
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help="run only these benchmarks: a name, a prefix such as blk or mmio, or a glob "
        "(repeatable; see --list)",
    )
    parser.add_argument("--list", action="store_true", help="list the benchmark names and exit")
    parser.add_argument("--json", action="store_true", help='print {"results": [...]}')
    parser.add_argument(
        "--seconds",
        type=float,
        default=None,
        help="seconds per measurement (default: 1, --quick 0.05)",
    )
    parser.add_argument(
        "--bringup-devices",
        type=int,
        default=None,
        metavar="N",
        help="idle devices per session in the bring-up server (default 2500; --quick 8)",
    )
    parser.add_argument(
        "--bringup-sessions",
        type=int,
        default=4,
        metavar="N",
        help="sessions brought up at once (default 4: 10,000 devices a run)",
    )
    parser.add_argument(
        "--memory-devices",
        type=int,
        default=None,
        metavar="N",
        help="idle devices in the memory measurement (default 100000; --quick 50)",
    )
    parser.add_argument(
        "--profile",
        type=float,
        nargs="?",
        const=8.0,
        default=None,
        metavar="SECONDS",
        help=f"profile client and server with py-spy during one case (--only, default "
        f"{PROFILE_CASE}) for SECONDS (default 8) and print the top functions",
    )
    parser.add_argument("--profile-dir", default=None, help="keep py-spy's raw stacks here")
    parser.add_argument(
        "--vhost-user",
        action="append",
        default=[],
        metavar="URL",
        help="instead of the suite: blk QD1/QD32 through the vhost-user front-end on this "
        "back-end, vhost-user+unix:///PATH?type=blk (repeatable: the back-ends take turns in "
        "the same run, the first is the others' baseline)",
    )
