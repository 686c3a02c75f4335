"""``viowire trace show|pcap|dissector``: read what ``--trace FILE`` recorded."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

from viowire.options import UsageError

if TYPE_CHECKING:  # imported when the command runs: every `viowire` command builds its parser
    from viowire.trace import show


def add_parser(sub) -> None:
    trace = sub.add_parser(
        "trace",
        help="decode a message trace (record one with --trace FILE on any command)",
        description="Decode a trace that --trace FILE recorded (docs/trace.md).",
    )
    actions = trace.add_subparsers(dest="trace_command", required=True)
    shown = actions.add_parser("show", help="one line per message")
    shown.add_argument("file", help="a trace written by --trace")
    _add_filters(shown)
    pcap = actions.add_parser(
        "pcap", help="write the messages as a pcap file for Wireshark (with the dissector)"
    )
    pcap.add_argument("file", help="a trace written by --trace")
    pcap.add_argument("out", help="the pcap file to write")
    _add_filters(pcap)
    actions.add_parser(
        "dissector",
        help="print a Wireshark Lua dissector for the protocol (viowire trace dissector > "
        "~/.local/lib/wireshark/plugins/viowire.lua)",
    )


def _add_filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--session", metavar="HEX", help="only this session (its id in hex, as the logs print it)"
    )
    parser.add_argument(
        "--type",
        action="append",
        default=[],
        metavar="NAME",
        help="only messages of this type, e.g. MMIO_READ (repeatable)",
    )
    parser.add_argument("--end", choices=("client", "server"), help="only what this end recorded")


def _selected(args: argparse.Namespace, trace: show.Trace) -> Iterator[show.Message]:
    from viowire.protocol.messages import MsgType
    from viowire.trace import show

    names = {name.upper().replace("-", "_") for name in args.type}
    unknown = sorted(names - set(MsgType.__members__))
    if unknown:
        raise UsageError(
            f"--type {unknown[0]}: no such message type; the types are "
            + ", ".join(MsgType.__members__)
        )
    types = {int(MsgType[name]) for name in names}
    try:
        session = int(args.session, 16) if args.session else None
    except ValueError:
        raise UsageError(f"--session {args.session!r}: give the session id in hex") from None
    known = show.client_sessions(show.read(args.file).records)
    for msg in show.messages(trace.records, known):
        if session is not None and msg.session != session:
            continue
        if types and (msg.frame is None or msg.frame.type not in types):
            continue
        if args.end and msg.end.name.lower() != args.end:
            continue
        yield msg


async def run(args: argparse.Namespace) -> int:
    from viowire.trace import dissector, show

    if args.trace_command == "dissector":
        sys.stdout.write(dissector.generate())
        return 0
    try:
        trace = show.read(args.file)
    except (show.TraceError, FileNotFoundError) as exc:
        raise UsageError(str(exc)) from None
    if args.trace_command == "pcap":
        count = dissector.write_pcap(
            _selected(args, trace), trace.wall_ns, trace.monotonic_ns, Path(args.out)
        )
        print(f"{count} messages written to {args.out}")
        return 0
    try:
        for msg in _selected(args, trace):
            print(show.format_message(msg, trace.monotonic_ns))
    except show.TraceError as exc:
        print(f"viowire trace show: {exc}", file=sys.stderr)
        return 1
    return 0
