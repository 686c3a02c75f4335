"""What a client command talks to: a viowire server, or QEMU's devices through qtest, and which
of their device windows, from the server's table or from declarations the user gives.

``tcp://`` and ``unix://`` reach a viowire server; ``qtest+unix:///PATH`` reaches a QEMU started
with ``-qtest unix:PATH,server=on,wait=off``; ``vhost-user+unix:///PATH?type=TYPE`` drives the
one device of a vhost-user back-end (docs/vhost-user.md). Declarations come in the three ways
the Linux driver learns of a device: the static table (the server's PLATFORM_INFO, the default),
a device tree (``--from-dts``/``--from-dtb``) and the kernel command-line syntax
(``--device SIZE@BASE:IRQ``).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from viowire.client.connection import Connection, DeviceInfo, connect
from viowire.client.discover import discover
from viowire.client.qtest import QtestConnection, connect_qtest
from viowire.client.vhost_user import SCHEME as VHOST_USER
from viowire.client.vhost_user import VhostUserConnection, connect_vhost_user
from viowire.declarations import Declaration, parse_cmdline_device, parse_dtb, parse_dts

Target = Connection | QtestConnection | VhostUserConnection


def is_declaration(text: str) -> bool:
    """``0x200@0x10001000:5`` (a window) rather than ``3`` (an index into the platform)."""
    return "@" in text


def declarations(
    specs: Sequence[str] = (), dts: str | None = None, dtb: str | None = None
) -> list[Declaration]:
    """Windows from command-line specs and device-tree files, in that order."""
    decls = [parse_cmdline_device(spec) for spec in specs]
    if dts:
        decls += parse_dts(Path(dts).read_text())
    if dtb:
        decls += parse_dtb(Path(dtb).read_bytes())
    return decls


async def open_target(
    url: str,
    *,
    memory: str = "auto",
    windows: Sequence[Declaration] = (),
    irq_status: bool = True,
) -> Target:
    """Connect to ``url``; for qtest, ``windows`` (or QEMU microvm's slots) are its devices.

    ``irq_status=False`` keeps the interrupt line exact (see :func:`connect`).
    """
    if url.startswith("qtest+"):
        return await connect_qtest(url, list(windows) or None)
    if url.startswith(VHOST_USER + ":"):
        if windows:
            raise ValueError(f"{url}: a vhost-user back-end has one device, no window to declare")
        return await connect_vhost_user(url)
    return await connect(url, memory=memory, irq_status=irq_status)


async def connect_session(
    url: str, *, memory: str = "auto", ram_size: int | None = None, name: str = "viowire-client"
) -> Connection | VhostUserConnection:
    """One session with guest RAM of ``ram_size`` bytes: a viowire server's, or the one
    front-end a vhost-user back-end serves."""
    size = {} if ram_size is None else {"ram_size": ram_size}
    if url.startswith(VHOST_USER + ":"):
        return await connect_vhost_user(url, **size)
    return await connect(url, memory=memory, name=name, **size)


def sessions_allowed(url: str) -> int | None:
    """How many sessions ``url`` takes at once (None: no limit): a vhost-user back-end serves
    one front-end per socket."""
    return 1 if url.startswith(VHOST_USER + ":") else None


async def devices(target: Target, windows: Sequence[Declaration] = ()) -> list[DeviceInfo]:
    """The declared windows that hold a device, else the target's own table."""
    if windows and isinstance(target, Connection):
        return await discover(target, windows, str(target.endpoint))
    return await target.platform()
