"""The ``viowire`` command: serve, demo, probe, io."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from viowire import __version__, bench, load, logs
from viowire.conform import cli as conform_cli
from viowire.options import add_target_options
from viowire.runtime import LOOPS, run, until_signalled

MAX_LISTED = 32  # devices serve prints at startup
DEFAULT_LISTEN = ("tcp://127.0.0.1:7000", "unix:///tmp/viowire.sock")


def _add_device_declarations(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="SIZE@BASE:IRQ[:ID]",
        help="declare a device window in the kernel's virtio_mmio.device= syntax, e.g. "
        "0x200@0x10001000:5 (repeatable; default: the server's platform table)",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viowire", description="virtio-mmio devices as network services"
    )
    parser.add_argument("--version", action="version", version=f"viowire {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    parser.add_argument("--loop", choices=LOOPS, default="auto", help="event loop (default: auto)")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a device server")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="URL",
        help=f"tcp://HOST:PORT or unix:///PATH, repeatable (default: "
        f"{' and '.join(DEFAULT_LISTEN)})",
    )
    serve.add_argument("--config", metavar="FILE", help="TOML platform description")
    serve.add_argument(
        "--workers",
        type=int,
        default=1,
        metavar="N",
        help="serve from N processes sharing the listeners (one per core); a session lives in "
        "one worker",
    )
    serve.add_argument(
        "--write-dts", metavar="FILE", help="write the platform as a device tree source"
    )
    serve.add_argument(
        "--write-dtb", metavar="FILE", help="write the platform as a flattened device tree"
    )
    serve.add_argument(
        "--no-shm",
        action="store_true",
        help="refuse named /dev/shm guest RAM from same-host TCP peers (such a peer could "
        "shrink it under the server); memfds over Unix sockets are sealed and stay allowed",
    )
    serve.add_argument(
        "--poll-us",
        type=int,
        default=0,
        metavar="US",
        help="after serving a queue in shared memory, poll it up to US microseconds for more "
        "with the driver's notifications off (as vhost's busy-polling: fewer wake-ups, more "
        "CPU; the window adapts to the traffic, as KVM's halt-polling; default 0, off)",
    )
    serve.add_argument(
        "--device",
        action="append",
        metavar="SPEC",
        default=[],
        help="a device, e.g. blk,size=64M  blk,path=disk.img  blk,version=1  rng "
        "(repeatable; replaces the default device set)",
    )

    sub.add_parser("demo", help="start a server on a private socket and drive every device")

    probe = sub.add_parser("probe", help="list a server's devices, like lspci -v")
    add_target_options(probe)
    fmt = probe.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--dts", action="store_true", help="print a device tree (DTS)")
    fmt.add_argument("--dtb", metavar="FILE", help="write a flattened device tree (DTB)")
    fmt.add_argument(
        "--cmdline", action="store_true", help="print virtio_mmio.device= kernel parameters"
    )
    _add_device_declarations(probe)

    io = sub.add_parser("io", help="drive a block device like qemu-io")
    add_target_options(io)
    io.add_argument(
        "--device",
        required=True,
        metavar="N|SIZE@BASE:IRQ",
        help="index of the device in the platform (see viowire probe), or its window in the "
        "kernel's virtio_mmio.device= syntax",
    )
    io.add_argument(
        "-c",
        "--cmd",
        action="append",
        required=True,
        metavar="COMMAND",
        help="'write -P PATTERN OFFSET LENGTH', 'read -P PATTERN OFFSET LENGTH', "
        "'flush' (repeatable, run in order)",
    )
    conform_cli.add_parser(sub)
    bench.add_parser(sub)
    load.add_parser(sub)
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _platform_spec(args: argparse.Namespace):
    from viowire.server.platform import DeviceSpec, PlatformSpec

    spec = PlatformSpec.from_toml(args.config) if args.config else PlatformSpec.default()
    if args.device:
        extra = [DeviceSpec.parse(text) for text in args.device]
        spec.devices = spec.devices + extra if args.config else extra
    _write_device_tree(spec, args.write_dts, args.write_dtb)
    return spec


def _print_layout(spec) -> None:
    layout = spec.layout()
    for base, irq, dev in layout[:MAX_LISTED]:
        print(f"device {dev.kind:4} v{dev.version} at {base:#x} irq {irq}", flush=True)
    if len(layout) > MAX_LISTED:
        print(f"... and {len(layout) - MAX_LISTED} more devices (viowire probe lists them)")


def _serve_workers(args: argparse.Namespace) -> int:
    """--workers N: bind here, fork the workers, supervise them (no event loop in this process)."""
    from viowire.server.app import bind
    from viowire.server.workers import Supervisor

    spec = _platform_spec(args)
    spec.validate()
    listeners = [bind(url) for url in args.listen or DEFAULT_LISTEN]
    supervisor = Supervisor(
        spec,
        listeners,
        args.workers,
        loop=args.loop,
        allow_shm=not args.no_shm,
        poll_us=args.poll_us,
    )

    def ready(pids: list[int]) -> None:
        _print_layout(spec)
        print(f"workers: {' '.join(map(str, pids))}", flush=True)
        for endpoint, _ in listeners:
            print(f"listening on {endpoint}", flush=True)

    return supervisor.run(ready)


async def _serve(args: argparse.Namespace) -> int:
    from viowire.server.app import Server

    spec = _platform_spec(args)
    logs.install()
    server = Server(spec, allow_shm=not args.no_shm, poll_us=args.poll_us)
    endpoints = await server.start(args.listen or list(DEFAULT_LISTEN))
    _print_layout(spec)
    for endpoint in endpoints:
        print(f"listening on {endpoint}", flush=True)
    await until_signalled()
    await server.close()
    return 0


def _write_device_tree(spec, dts: str | None, dtb: str | None) -> None:
    """The platform as a board's device tree, for a guest kernel or another tool to read."""
    from viowire.declarations import Declaration, build_dtb, build_dts

    windows = [Declaration(base, spec.window, irq) for base, irq, _ in spec.layout()]
    if dts:
        Path(dts).write_text(build_dts(windows))
    if dtb:
        Path(dtb).write_bytes(build_dtb(windows))


async def _probe(args: argparse.Namespace) -> int:
    from viowire.client.inspect import as_declarations, describe_platform, format_text
    from viowire.client.target import declarations
    from viowire.declarations import build_dtb, build_dts, format_kernel_params

    windows = declarations(args.device, args.from_dts, args.from_dtb)
    devices = await describe_platform(args.url, memory=args.memory or "auto", windows=windows)
    if args.json:
        print(json.dumps({"devices": devices}, indent=2))
    elif args.dts:
        print(build_dts(as_declarations(devices)), end="")
    elif args.dtb:
        Path(args.dtb).write_bytes(build_dtb(as_declarations(devices)))
    elif args.cmdline:
        print(format_kernel_params(as_declarations(devices)))
    else:
        print(format_text(devices))
    return 0


async def _io(args: argparse.Namespace) -> int:
    from viowire.client.qemu_io import run_commands
    from viowire.client.target import declarations, is_declaration

    if is_declaration(args.device):
        index, windows = 0, declarations([args.device])
    else:
        try:
            index = int(args.device, 0)
        except ValueError:
            raise ValueError(f"--device {args.device!r}: give an index or SIZE@BASE:IRQ") from None
        windows = declarations((), args.from_dts, args.from_dtb)
    return await run_commands(
        args.url, index, args.cmd, memory=args.memory or "auto", windows=windows
    )


async def _demo(args: argparse.Namespace) -> int:
    from viowire.demo import demo

    return await demo()


COMMANDS = {
    "serve": _serve,
    "probe": _probe,
    "io": _io,
    "demo": _demo,
    "conform": conform_cli.run,
    "bench": bench.run,
    "load": load.run,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
        if args.command == "serve" and args.workers != 1:
            return _serve_workers(args)
        return run(COMMANDS[args.command](args), loop=args.loop)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `viowire probe URL | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0
    except (OSError, ValueError, ConnectionError) as exc:
        # An OSError of connect() does not say where it went: name the URL.
        where = f"{args.url}: " if isinstance(exc, OSError) and hasattr(args, "url") else ""
        print(f"viowire {args.command}: {where}{exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the client's precise errors: print them, not a traceback
        if os.environ.get("VIOWIRE_DEBUG"):
            raise
        print(f"viowire {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
