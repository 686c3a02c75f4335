"""Command-line options every client command shares, written once (argparse)."""

from __future__ import annotations

import argparse

TARGET_HELP = (
    "a viowire server, tcp://HOST:PORT or unix:///PATH, or QEMU's devices through its qtest "
    "socket, qtest+unix:///PATH (QEMU started with -qtest unix:PATH,server=on,wait=off)"
)


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
