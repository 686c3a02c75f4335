"""The ``viowire`` command: serve, demo, probe, io."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Sequence

from viowire import __version__, logs
from viowire.runtime import LOOPS, run

DEFAULT_LISTEN = ("tcp://127.0.0.1:7000", "unix:///tmp/viowire.sock")


def _add_client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("url", help="server address: tcp://HOST:PORT or unix:///PATH")
    parser.add_argument(
        "--memory",
        choices=("shared", "proxied"),
        default=None,
        help="guest memory mode (default: shared when the server is on this host, else proxied)",
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
        "--no-shm",
        action="store_true",
        help="refuse named /dev/shm guest RAM from same-host TCP peers (such a peer could "
        "shrink it under the server); memfds over Unix sockets are sealed and stay allowed",
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
    _add_client_options(probe)
    fmt = probe.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--dts", action="store_true", help="print device-tree nodes")

    io = sub.add_parser("io", help="drive a block device like qemu-io")
    _add_client_options(io)
    io.add_argument(
        "--device",
        type=int,
        required=True,
        metavar="N",
        help="index of the device in the platform (see viowire probe)",
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
    return parser


def _setup_logging(verbose: int) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


async def _serve(args: argparse.Namespace) -> int:
    from viowire.server.app import Server
    from viowire.server.platform import DeviceSpec, PlatformSpec

    spec = PlatformSpec.from_toml(args.config) if args.config else PlatformSpec.default()
    if args.device:
        extra = [DeviceSpec.parse(text) for text in args.device]
        spec.devices = spec.devices + extra if args.config else extra
    logs.install()
    server = Server(spec, allow_shm=not args.no_shm)
    endpoints = await server.start(args.listen or list(DEFAULT_LISTEN))
    for base, irq, dev in spec.layout():
        print(f"device {dev.kind:4} v{dev.version} at {base:#x} irq {irq}", flush=True)
    for endpoint in endpoints:
        print(f"listening on {endpoint}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()
    return 0


async def _probe(args: argparse.Namespace) -> int:
    from viowire.client.inspect import describe_platform, format_dts, format_text

    devices = await describe_platform(args.url, memory=args.memory or "auto")
    if args.json:
        print(json.dumps({"devices": devices}, indent=2))
    elif args.dts:
        print(format_dts(devices))
    else:
        print(format_text(devices))
    return 0


async def _io(args: argparse.Namespace) -> int:
    from viowire.client.qemu_io import run_commands

    return await run_commands(args.url, args.device, args.cmd, memory=args.memory or "auto")


async def _demo(args: argparse.Namespace) -> int:
    from viowire.demo import demo

    return await demo()


COMMANDS = {"serve": _serve, "probe": _probe, "io": _io, "demo": _demo}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _setup_logging(args.verbose)
    try:
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
