"""``viowire vhost-user``: serve devices to vhost-user front-ends (QEMU), one per socket.

    viowire vhost-user --socket-path /tmp/blk.sock --device blk,path=disk.img \\
                       --socket-path /tmp/rng.sock --device rng

Options follow vhost-user.rst's "Backend program conventions": ``--socket-path``,
``--print-capabilities`` (JSON on stdout, then exit), SIGTERM ends the process.
"""

from __future__ import annotations

import argparse
import json
import logging

from viowire.options import UsageError
from viowire.runtime import until_signalled

log = logging.getLogger("viowire.vhost_user")

BACKEND_TYPES = {
    1: "net",
    2: "block",
    3: "console",
    4: "rng",
    5: "balloon",
    7: "rpmsg",
    8: "scsi",
    9: "9p",
    11: "rproc-serial",
    12: "caif",
    16: "gpu",
    18: "input",
    19: "vsock",
    20: "crypto",
    26: "fs",
}
"""virtio device ID -> the type name of QEMU's vhost-user.json (VHostUserBackendType)."""


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "vhost-user",
        help="serve devices to vhost-user front-ends (QEMU's vhost-user-blk, vhost-user-rng, "
        "-netdev vhost-user)",
        description="Serve each --device on the --socket-path given with it (in pairs, in "
        "order): a vhost-user back-end, one front-end per socket.",
    )
    parser.add_argument(
        "--socket-path",
        action="append",
        default=[],
        metavar="PATH",
        help="the Unix socket to listen on (repeatable: one per --device)",
    )
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar="TYPE[,KEY=VALUE...]",
        help="the device served on the --socket-path in the same position: blk,size=64M, "
        "blk,path=disk.img, rng, net,link=NAME, or package.module:Class[,KEY=VALUE...]",
    )
    parser.add_argument(
        "--print-capabilities",
        action="store_true",
        help="print the back-end's capabilities as JSON (vhost-user.json) and exit",
    )


def _specs(args: argparse.Namespace):
    from viowire.server.platform import DeviceSpec

    if not args.device:
        raise UsageError("give --device TYPE (and --socket-path PATH for each)")
    specs = []
    for text in args.device:
        spec = DeviceSpec.parse(text)
        if spec.version != 2 or spec.base is not None or spec.irq is not None or spec.count != 1:
            raise UsageError(
                f"--device {text}: version=, base=, irq= and count= are virtio-mmio's; a "
                "vhost-user device is modern and alone on its socket"
            )
        specs.append(spec)
    return specs


def capabilities(args: argparse.Namespace) -> dict:
    specs = _specs(args)
    types = {BACKEND_TYPES.get(spec.device_class.device_id) for spec in specs}
    if len(types) != 1 or None in types:
        names = ", ".join(spec.kind for spec in specs)
        raise UsageError(
            f"--print-capabilities describes one vhost-user back-end type; {names} is not one "
            "of QEMU's (block, rng, net, ...)"
        )
    return {"type": types.pop(), "features": []}


async def run(args: argparse.Namespace) -> int:
    if args.print_capabilities:
        print(json.dumps(capabilities(args), indent=2))
        return 0
    specs = _specs(args)
    if len(args.socket_path) != len(specs):
        raise UsageError(
            f"{len(args.socket_path)} --socket-path for {len(specs)} --device: give them in "
            "pairs, one socket per device"
        )
    from viowire import logs
    from viowire.vhost_user.server import Listener

    listeners = []
    try:
        for path, spec in zip(args.socket_path, specs, strict=True):
            device = spec.instantiate(repr(spec.kind))
            listener = Listener(path, device)
            listeners.append(listener)
            await listener.start()
        logs.install(("viowire.vhost_user", "viowire.device"))  # a hostile front-end
        for listener in listeners:
            print(f"vhost-user {listener.name}: listening on {listener.path}", flush=True)
        await until_signalled()
    finally:
        for listener in listeners:
            await listener.close()
    return 0
