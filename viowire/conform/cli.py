"""``viowire conform URL``: run the conformance suite against a server's devices.

Wired into ``viowire.cli`` by :func:`add_parser` (the subcommand and its options) and
:func:`run` (the coroutine the command runs). Exit status: 0 when nothing FAILs, else 1.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from viowire.options import DEVICE_TYPE, OWN_SERVER_HELP, UsageError, add_target_options


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add the ``conform`` subcommand to ``subparsers`` (an argparse subparsers action)."""
    parser = subparsers.add_parser(
        "conform",
        help="check a server's virtio-mmio devices against the spec",
        description="Drive each device through the correct flows and through deliberate "
        "violations; verdicts PASS, REJECT (violation refused, device healthy), WEDGED "
        "(DEVICE_NEEDS_RESET), FAIL, SKIP (not applicable: a device whose type declares no "
        "sample request gets the checks that need no I/O). Exit status 1 if anything FAILs.",
    )
    add_target_options(parser, url_optional=True)
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar=f"N|SIZE@BASE:IRQ|{DEVICE_TYPE}",
        help="only device N of the platform (see viowire probe), or declare a window in the "
        f"kernel's virtio_mmio.device= syntax (repeatable){OWN_SERVER_HELP}",
    )
    parser.add_argument(
        "--only",
        action="append",
        default=[],
        metavar="PATTERN",
        help="only checks whose id matches the glob, e.g. 'ring.*' (repeatable)",
    )
    fmt = parser.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print the results as JSON")
    fmt.add_argument("--list", action="store_true", help="list the checks and exit")
    parser.add_argument("--junit", metavar="FILE", help="also write JUnit XML to FILE")
    parser.add_argument(
        "--timeout",
        type=float,
        default=2.0,
        metavar="SECONDS",
        help="bound on each register access and each awaited event (default 2)",
    )
    return parser


def _check_patterns(checks, patterns: list[str]) -> None:
    """A --only that matches nothing would run no check and pass: refuse it, naming the checks."""
    from viowire.conform.model import selected

    for pattern in patterns:
        if not selected(checks, [pattern]):
            raise UsageError(
                f"--only {pattern!r} matches no check; the checks are "
                + ", ".join(check.id for check in checks)
                + " (globs such as 'ring.*' match several)"
            )


async def run(args: argparse.Namespace) -> int:
    """Run the suite as ``args`` say; print the table (or JSON); 1 if any check FAILs."""
    from viowire.client import target as targets
    from viowire.conform.checks import CHECKS
    from viowire.conform.model import Options, Target, failed, selected
    from viowire.conform.report import TableWriter, format_checks, to_json, to_junit
    from viowire.conform.runner import run_suite
    from viowire.conform.vhost_user import target_bus

    _check_patterns(CHECKS, args.only)
    if args.list:
        sys.stdout.write(format_checks(selected(CHECKS, args.only)))
        return 0
    if not args.url:
        raise ValueError("viowire conform needs a server URL, e.g. unix:///tmp/viowire.sock")
    qtest = args.url.startswith("qtest+")
    if qtest and args.memory:
        raise ValueError("--memory does not apply to QEMU: its guest RAM is its own")
    memory = args.memory or "auto"
    options = Options(access_timeout=args.timeout, io_timeout=args.timeout, only=args.only)
    connections: list[Any] = []

    specs = [d for d in args.device if targets.is_declaration(d)]
    indexes = [_index(d) for d in args.device if not targets.is_declaration(d)]
    windows = targets.declarations(specs, args.from_dts, args.from_dtb)

    async def open_target() -> Target:
        for old in connections:
            await old.close()
        connections.clear()
        # The suite judges the register and the line exactly: no IRQ_STATUS shortcut.
        conn = await targets.open_target(args.url, memory=memory, windows=windows, irq_status=False)
        connections.append(conn)
        bus = target_bus(conn)
        return Target(bus, conn.ram.memory, conn.ram, await targets.devices(conn, windows))

    try:
        target = await open_target()
        devices = None
        if indexes:
            for index in indexes:
                if not 0 <= index < len(target.devices):
                    raise ValueError(
                        f"device {index}: the platform has devices 0..{len(target.devices) - 1}"
                    )
            devices = indexes
        writer = None if args.json else TableWriter(sys.stdout)
        results = await run_suite(
            target,
            devices=devices,
            options=options,
            reopen=open_target,
            on_result=writer.add if writer else None,
        )
    finally:
        for conn in connections:
            await conn.close()
    if writer is None:
        print(to_json(results))
    else:
        writer.close(results)
    if args.junit:
        with open(args.junit, "w", encoding="utf-8") as out:
            out.write(to_junit(results))
    return 1 if failed(results) else 0


def _index(text: str) -> int:
    try:
        return int(text, 0)
    except ValueError:
        raise UsageError(
            f"--device {text!r}: give an index, SIZE@BASE:IRQ or {DEVICE_TYPE}"
        ) from None
