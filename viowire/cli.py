"""The ``viowire`` command: serve, demo, probe, io."""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import logging
import os
import re
import sys
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from viowire import __version__, bench, console_cli, load, logs
from viowire.conform import cli as conform_cli
from viowire.options import (
    DEVICE_TYPE,
    OWN_SERVER_HELP,
    UsageError,
    add_device_types_option,
    add_memory_option,
    add_serve_security_options,
    add_target_options,
    apply_client_auth_options,
    names_device_type,
)
from viowire.runtime import LOOPS, run, until_signalled
from viowire.server.limits import add_limit_options, limits_from_args
from viowire.trace import cli as trace_cli
from viowire.vhost_user import cli as vhost_user_cli

if TYPE_CHECKING:
    from viowire.metrics import MetricsEndpoint
    from viowire.server.app import Server

MAX_LISTED = 32  # devices serve prints at startup
DEFAULT_LISTEN = ("tcp://127.0.0.1:7000", "unix:///tmp/viowire.sock")


def _add_device_declarations(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar=f"SIZE@BASE:IRQ[:ID]|{DEVICE_TYPE}",
        help="declare a device window in the kernel's virtio_mmio.device= syntax, e.g. "
        "0x200@0x10001000:5 (repeatable; default: the server's platform table)"
        f"{OWN_SERVER_HELP}",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="viowire", description="virtio-mmio devices as network services"
    )
    parser.add_argument("--version", action="version", version=f"viowire {__version__}")
    _add_common_options(parser, top=True)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run a device server")
    serve.add_argument(
        "--listen",
        action="append",
        metavar="URL",
        help=f"tcp://HOST:PORT, tls://HOST:PORT or unix:///PATH, repeatable (default: "
        f"{' and '.join(DEFAULT_LISTEN)}); a non-loopback address needs a token or TLS client "
        "certificates, or --insecure",
    )
    add_serve_security_options(serve)
    add_limit_options(serve)
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
        "--metrics",
        metavar="tcp://HOST:PORT",
        help="serve Prometheus metrics at http://HOST:PORT/metrics (docs/metrics.md)",
    )
    add_device_types_option(
        serve,
        "a device to serve, instead of the default set (with --config: besides its devices)",
        "; every device also takes version=1|2, base=, irq=, count=",
    )
    serve.add_argument(
        "--link",
        action="append",
        default=[],
        metavar="NAME,listen=URL|NAME,connect=URL[,auth=token|none]",
        help="join in-server link NAME with another server's (or a QEMU -netdev stream) over "
        "tcp://HOST:PORT, tls://HOST:PORT or unix:///PATH, with QEMU's stream framing; "
        "connect= retries (repeatable). auth=token (the default with a token) proves the token "
        "both ways before the first frame; auth=none for QEMU, which cannot. A non-loopback "
        "address needs a token or TLS certificates, or --insecure (docs/containers.md)",
    )
    serve.add_argument(
        "--list-devices",
        action="store_true",
        help="list the device types --device knows, with their options, and exit",
    )

    demo = sub.add_parser("demo", help="start a server on a private socket and drive every device")
    add_device_types_option(demo, "a device to demonstrate instead of the default set")

    probe = sub.add_parser("probe", help="list a server's devices, like lspci -v")
    add_target_options(probe, url_optional=True)
    fmt = probe.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true", help="print JSON")
    fmt.add_argument("--dts", action="store_true", help="print a device tree (DTS)")
    fmt.add_argument("--dtb", metavar="FILE", help="write a flattened device tree (DTB)")
    fmt.add_argument(
        "--cmdline", action="store_true", help="print virtio_mmio.device= kernel parameters"
    )
    _add_device_declarations(probe)

    io = sub.add_parser("io", help="drive a block device like qemu-io")
    add_target_options(io, url_optional=True)
    io.add_argument(
        "--device",
        required=True,
        metavar=f"N|SIZE@BASE:IRQ|{DEVICE_TYPE}",
        help="index of the device in the platform (see viowire probe), or its window in the "
        f"kernel's virtio_mmio.device= syntax{OWN_SERVER_HELP}",
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
    _add_net_attach(sub)
    conform_cli.add_parser(sub)
    console_cli.add_parser(sub)
    bench.add_parser(sub)
    load.add_parser(sub)
    vhost_user_cli.add_parser(sub)
    trace_cli.add_parser(sub)
    for command in sub.choices.values():
        _add_common_options(command, top=False)  # `viowire serve -v` as `viowire -v serve`
        command.description = _plain_text(command.description)
    return parser


def _plain_text(text: str | None) -> str | None:
    """A docstring's reStructuredText markup (``code``, :mod:`name`) as --help prints it."""
    if text is None:
        return None
    return re.sub(r":\w+:`~?([^`]+)`", r"\1", text).replace("``", "")


LOG_LEVELS = ("debug", "info", "warning", "error")


def _add_common_options(parser: argparse.ArgumentParser, *, top: bool) -> None:
    """Options every command takes, in front of the command or after it. After it, they are
    stored apart (no default) so that they do not overwrite what came in front."""

    def default(value: object) -> object:
        return value if top else argparse.SUPPRESS

    def add(*names: str, **kw: object) -> None:
        if any(name in parser._option_string_actions for name in names):
            return  # the command's own option of that name wins (bench --loop)
        parser.add_argument(*names, **kw)

    suffix = "" if top else "_after"
    add(
        "-v",
        "--verbose",
        action="count",
        dest="verbose" + suffix,
        default=default(0),
        help="more log output (-vv: debug)",
    )
    add(
        "--log-level",
        choices=LOG_LEVELS,
        default=default(None),
        help="log level (default: warning, or as -v says)",
    )
    add("--loop", choices=LOOPS, default=default("auto"), help="event loop (default: auto)")
    add(
        "--trace",
        metavar="FILE",
        default=default(None),
        help="record every frame sent and received, with its time, in FILE (read it with "
        "viowire trace show FILE; docs/trace.md)",
    )


def _add_net_attach(sub) -> None:
    attach = sub.add_parser(
        "net-attach", help="a server's virtio-net device as a local TAP interface"
    )
    attach.add_argument("url", help="a viowire server, tcp://HOST:PORT or unix:///PATH")
    attach.add_argument(
        "--device", type=int, metavar="N", help="index of the device (default: the first net one)"
    )
    attach.add_argument(
        "--tap", required=True, metavar="IFNAME", help="the TAP to create (needs CAP_NET_ADMIN)"
    )
    add_memory_option(attach)


async def _net_attach(args: argparse.Namespace) -> int:
    from viowire.client.netattach import net_attach

    def ready(line: str) -> None:
        print(line, flush=True)

    await net_attach(
        args.url, args.tap, index=args.device, memory=args.memory or "auto", ready=ready
    )
    return 0


def _list_devices() -> str:
    """``viowire serve --list-devices``: every named type, its options, defaults and help."""
    from viowire import registry
    from viowire.server.platform import TRANSPORT_HELP
    from viowire.virtio.constants import device_name

    lines = []
    for name, origin, found in registry.describe():
        if isinstance(found, Exception):
            lines += [f"{name}  {origin}", f"    unusable: {found}", ""]
            continue
        doc = (found.__doc__ or "").strip().splitlines()
        lines.append(
            f"{name}  {origin}  ({device_name(found.device_id)}, DeviceID {found.device_id})"
        )
        if doc:
            lines.append(f"    {doc[0]}")
        width = max((len(key) for key in found.options), default=0) + 1
        for key, option in found.options.items():
            default = "required" if option.required else f"default {_format_default(option)}"
            lines.append(f"    {key + '=':<{width}}  {option.help} ({default})")
        if not found.options:
            lines.append("    (no options of its own)")
        lines.append("")
    lines.append(f"every device also takes {TRANSPORT_HELP}")
    lines.append("and --device package.module:Class[,KEY=VALUE...] serves any Device subclass")
    return "\n".join(lines)


def _format_default(option) -> str:
    from viowire.units import format_size, parse_duration, parse_size

    value = option.default
    if value is None:
        return "none"
    if isinstance(value, bool):
        return "on" if value else "off"
    if option.parse is parse_size and isinstance(value, int):
        return format_size(value)
    if option.parse is parse_duration and isinstance(value, int | float):
        return f"{value * 1e3:g}ms" if value < 1 else f"{value:g}s"
    return repr(value) if isinstance(value, str) else str(value)


def _setup_logging(verbose: int, log_level: str | None) -> None:
    level = logging.WARNING if verbose == 0 else logging.INFO if verbose == 1 else logging.DEBUG
    if log_level is not None:
        level = getattr(logging, log_level.upper())
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")


def _platform_spec(args: argparse.Namespace):
    from viowire.server.platform import DeviceSpec, PlatformSpec

    spec = PlatformSpec.from_toml(args.config) if args.config else PlatformSpec.default()
    if args.device:
        extra = [DeviceSpec.parse(text) for text in args.device]
        spec.devices = spec.devices + extra if args.config else extra
    _write_device_tree(spec, args.write_dts, args.write_dtb)
    return spec


def _link_specs(args: argparse.Namespace):
    """--link options, after the [[link]] tables of --config."""
    from viowire.server.linkpeer import LinkSpec, from_toml

    try:
        found = from_toml(args.config) if args.config else []
        return found + [LinkSpec.parse(text) for text in args.link]
    except ValueError as exc:
        raise UsageError(str(exc)) from None


def _print_layout(spec) -> None:
    layout = spec.layout()
    for base, irq, dev in layout[:MAX_LISTED]:
        print(f"device {dev.kind:4} v{dev.version} at {base:#x} irq {irq}", flush=True)
    if len(layout) > MAX_LISTED:
        print(f"... and {len(layout) - MAX_LISTED} more devices (viowire probe lists them)")


def _serve_workers(args: argparse.Namespace) -> int:
    """--workers N: bind here, fork the workers, supervise them (no event loop in this process)."""
    from viowire.server.app import bind, security_from_args
    from viowire.server.workers import Supervisor

    if _link_specs(args):
        raise UsageError(
            "--link joins one process's links: serve with --workers 1 (each worker has "
            "links of its own)"
        )
    if args.metrics:
        raise UsageError("--metrics counts one process: serve with --workers 1")
    spec = _platform_spec(args)
    spec.validate()
    security = security_from_args(args)
    urls = args.listen or list(DEFAULT_LISTEN)
    security.check(urls)
    listeners = [bind(url, security.socket_mode) for url in urls]
    supervisor = Supervisor(
        spec,
        listeners,
        args.workers,
        loop=args.loop,
        allow_shm=not args.no_shm,
        poll_us=args.poll_us,
        security=security,
        limits=limits_from_args(args),
    )

    def ready(pids: list[int]) -> None:
        _print_layout(spec)
        print(f"workers: {' '.join(map(str, pids))}", flush=True)
        for endpoint, _ in listeners:
            print(f"listening on {endpoint}", flush=True)

    return supervisor.run(ready)


async def _serve(args: argparse.Namespace) -> int:
    from viowire.server.app import Server, security_from_args

    spec = _platform_spec(args)
    server = Server(
        spec,
        allow_shm=not args.no_shm,
        poll_us=args.poll_us,
        links=_link_specs(args),
        security=security_from_args(args),
        limits=limits_from_args(args),
    )
    metrics = await _start_metrics(args.metrics, server) if args.metrics else None
    try:
        endpoints = await server.start(args.listen or list(DEFAULT_LISTEN))
        logs.install()  # once it serves: a description that fails leaves the loggers as they were
        if metrics is not None:  # before the listening lines, which tell that it is ready
            print(f"metrics on {metrics.url}", flush=True)
        _print_layout(spec)
        for endpoint in endpoints:
            print(f"listening on {endpoint}", flush=True)
        await until_signalled()
        await server.close()
    finally:
        if metrics is not None:
            await metrics.close()
    return 0


async def _start_metrics(url: str, server: Server) -> MetricsEndpoint:
    from viowire.metrics import start_endpoint
    from viowire.server.metrics import ServerCollector

    return await start_endpoint(url, ServerCollector(server))


def _write_device_tree(spec, dts: str | None, dtb: str | None) -> None:
    """The platform as a board's device tree, for a guest kernel or another tool to read."""
    if not (dts or dtb):
        return
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
            raise UsageError(
                f"--device {args.device!r}: give an index, SIZE@BASE:IRQ or {DEVICE_TYPE}"
            ) from None
        windows = declarations((), args.from_dts, args.from_dtb)
    return await run_commands(
        args.url, index, args.cmd, memory=args.memory or "auto", windows=windows
    )


async def _demo(args: argparse.Namespace) -> int:
    from viowire.demo import demo
    from viowire.server.platform import DeviceSpec, PlatformSpec

    if not args.device:
        return await demo()
    return await demo(PlatformSpec([DeviceSpec.parse(text) for text in args.device]))


Command = Callable[[argparse.Namespace], Awaitable[int]]


def _on_own_server(
    command: Command, *, one_device: bool = False, needs_url: bool = True, quiet: bool = False
):
    """``command`` as it is, or, when ``--device`` names device types, on a private server that
    serves them (``viowire probe --device blk,size=1M``). ``quiet``: the command provokes the
    devices' warnings on purpose (conform): they are logged as INFO, shown with -v."""

    async def run_command(args: argparse.Namespace) -> int:
        given = [args.device] if isinstance(args.device, str) else list(args.device)
        types = [text for text in given if names_device_type(text)]
        if not types:
            if needs_url and not args.url:
                raise UsageError(
                    "give a server URL (tcp://HOST:PORT or unix:///PATH), or --device "
                    f"{DEVICE_TYPE} to run on a device served for this command alone"
                )
            return await command(args)
        _check_own_server(args, given, types)
        from viowire.server.platform import DeviceSpec, PlatformSpec
        from viowire.server.private import private_server

        spec = PlatformSpec([DeviceSpec.parse(text) for text in types])
        with logs.demoted() if quiet else contextlib.nullcontext():
            async with private_server(spec) as url:
                args.url = url
                args.device = "0" if one_device else []
                return await command(args)

    return run_command


def _check_own_server(args: argparse.Namespace, given: list[str], types: list[str]) -> None:
    if len(types) != len(given):
        other = next(text for text in given if text not in types)
        raise UsageError(
            f"--device {types[0]} serves a device of its own, --device {other} selects one of a "
            "server: give device types only, or a URL and indexes or SIZE@BASE:IRQ windows"
        )
    if args.url:
        raise UsageError(
            f"--device {types[0]} serves a device of its own: drop the URL {args.url}, or "
            "select a device of that server with --device N or SIZE@BASE:IRQ"
        )
    if getattr(args, "from_dts", None) or getattr(args, "from_dtb", None):
        raise UsageError(
            f"--device {types[0]} serves a device of its own: drop --from-dts/--from-dtb"
        )


COMMANDS: dict[str, Command] = {
    "serve": _serve,
    "probe": _on_own_server(_probe),
    "io": _on_own_server(_io, one_device=True),
    "demo": _demo,
    "conform": _on_own_server(conform_cli.run, needs_url=False, quiet=True),
    "bench": bench.run,
    "load": _on_own_server(load.run),
    "vhost-user": vhost_user_cli.run,
    "net-attach": _net_attach,
    "console": _on_own_server(console_cli.run, one_device=True),
    "trace": trace_cli.run,
}


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.verbose += getattr(args, "verbose_after", 0)
    _setup_logging(args.verbose, args.log_level)
    if args.command != "serve":
        apply_client_auth_options(args)
    try:
        _start_trace(args)
        if args.command == "serve" and args.list_devices:
            print(_list_devices())
            return 0
        if args.command == "serve" and args.workers != 1:
            return _serve_workers(args)
        return run(COMMANDS[args.command](args), loop=args.loop)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:  # `viowire probe URL | head`: the reader left, nothing to say
        sys.stderr.close()
        return 0
    except (OSError, ValueError, ConnectionError) as exc:
        if _bad_input(exc):
            # As argparse does for what it checks: status 2, and one line (a device's own
            # message may span several).
            print(f"viowire {args.command}: {' '.join(str(exc).split())}", file=sys.stderr)
            return 2
        # An OSError of connect() does not say where it went: name the URL.
        from viowire.tap import TapError  # its message names the interface instead

        named = isinstance(exc, OSError) and not isinstance(exc, TapError)
        if named and getattr(args, "url", None):
            print(f"viowire {args.command}: {args.url}: {_cause(exc)}", file=sys.stderr)
        else:
            print(f"viowire {args.command}: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # the client's precise errors: print them, not a traceback
        if os.environ.get("VIOWIRE_DEBUG"):
            raise
        print(f"viowire {args.command}: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.trace:
            from viowire.trace import recorder

            recorder.stop()


def _cause(exc: OSError) -> str:
    """Why a server could not be reached, in words (no errno number)."""
    if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
        return f"{exc.strerror}: no viowire server listens there (viowire serve --listen URL)"
    return exc.strerror or str(exc)


def _start_trace(args: argparse.Namespace) -> None:
    if not args.trace:
        return
    from viowire.trace import recorder

    if args.command == "serve" and args.workers != 1:
        raise UsageError("--trace records one process: serve with --workers 1")
    if args.command == "trace":
        raise UsageError("viowire trace reads a trace: --trace records one of another command")
    try:
        recorder.start(args.trace)
    except OSError as exc:
        raise UsageError(f"--trace {args.trace}: {exc.strerror or exc}") from None


def _bad_input(exc: Exception) -> bool:
    """Input the user must change: a device spec, a platform description, a usage error."""
    from viowire.client.netattach import NetAttachError
    from viowire.device import DeviceOptionError
    from viowire.registry import DeviceTypeError
    from viowire.server.platform import PlatformError

    return isinstance(
        exc, UsageError | PlatformError | DeviceTypeError | DeviceOptionError | NetAttachError
    )


if __name__ == "__main__":
    sys.exit(main())
