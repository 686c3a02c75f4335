"""Command-line options every client command shares, written once (argparse)."""

from __future__ import annotations

import argparse

TARGET_HELP = (
    "a viowire server, tcp://HOST:PORT or unix:///PATH, or QEMU's devices through its qtest "
    "socket, qtest+unix:///PATH (QEMU started with -qtest unix:PATH,server=on,wait=off), or a "
    "vhost-user back-end's one device, vhost-user+unix:///PATH?type=TYPE (docs/vhost-user.md)"
)
DEVICE_TYPE = "TYPE[,KEY=VALUE...]"
TYPES_HELP = (
    "a device type and its options: blk,size=64M or blk,path=disk.img or rng, a type an "
    "installed package offers, or package.module:Class[,KEY=VALUE...] for a class of your own "
    "(viowire serve --list-devices lists the types and their options)"
)
OWN_SERVER_HELP = (
    "; or a device type and its options (blk,size=1M or rng or package.module:Class[,KEY=VALUE"
    "...]; viowire serve --list-devices lists them): the command starts a private server of "
    "such devices and runs on it (give no URL then)"
)


class UsageError(ValueError):
    """Command-line input that cannot work: exit status 2 and one line that says what to write."""


def add_memory_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--memory",
        choices=("shared", "proxied"),
        default=None,
        help="guest memory mode (default: shared when the server is on this host, else proxied)",
    )


def add_target_options(parser: argparse.ArgumentParser, *, url_optional: bool = False) -> None:
    """The URL, the memory mode, and device-tree declarations of the devices to use."""
    parser.add_argument("url", nargs="?" if url_optional else None, help=TARGET_HELP)
    add_memory_option(parser)
    parser.add_argument(
        "--from-dts", metavar="FILE", help="declare the devices from virtio,mmio nodes of a DTS"
    )
    parser.add_argument("--from-dtb", metavar="FILE", help="the same from a flattened device tree")


def add_device_types_option(parser: argparse.ArgumentParser, what: str, note: str = "") -> None:
    """``--device TYPE[,KEY=VALUE...]``, repeatable: devices for ``what`` to serve."""
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar=DEVICE_TYPE,
        help=f"{what} (repeatable): {TYPES_HELP}{note}",
    )


def names_device_type(text: str) -> bool:
    """``blk,size=1M`` or ``package.module:Class`` (a type to serve) rather than ``3`` (an index
    into a server's platform) or ``0x200@0x10001000:5`` (a window in the kernel's syntax)."""
    head = text.split(",", 1)[0].strip()
    if "@" in head:
        return False
    try:
        int(head, 0)
    except ValueError:
        return True
    return False
