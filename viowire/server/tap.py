"""A TAP interface of the server's host as an uplink of a link: ``--device net,tap=IFNAME``
plugs the device into link ``tap:IFNAME``, to which the TAP is attached, so that the device's
frames reach the host's kernel (its addresses, routes, a bridge the TAP is in) through the one
switch of :mod:`viowire.server.link`.

The TAP opens when the first device plugs in and closes when the last one leaves; one viowire
created is then removed by the kernel, one that existed (``ip tuntap add``) stays. The kernel's
frames are read when the descriptor is readable (a bounded burst per wake-up, so the loop stays
fair); one longer than the smallest MTU of the devices plugged in is dropped and counted
(``oversize``), as the device could not take it. Frames for the kernel are written at once,
nonblocking: one it cannot take is dropped and counted (``tx_dropped``), never queued.
"""

from __future__ import annotations

import asyncio
import logging

from viowire.server import link as links
from viowire.tap import Tap, check_ifname, has_cap_net_admin
from viowire.virtio.net import ETH_HEADER, ETH_VLAN_TAG

log = logging.getLogger("viowire.tap")
BURST = 64  # frames read per wake-up before other callbacks get their turn


def link_name(ifname: str) -> str:
    """The link a TAP is attached to: ``tap:IFNAME``."""
    return f"tap:{ifname}"


def parse_tap(text: object) -> str:
    """The ``tap=`` option: an interface name, and a process that may open a TAP (the error
    comes at startup, not when a client's driver first goes live)."""
    name = check_ifname(text)
    if not has_cap_net_admin():
        try:
            Tap.open(name).close()  # one created for this user beforehand opens without it
        except OSError as exc:
            raise ValueError(exc.strerror or str(exc)) from None
    return name


class TapPort:
    """The TAP ``ifname``, open, as an uplink of link ``tap:IFNAME``."""

    def __init__(self, ifname: str, mtu: int) -> None:
        self.tap = Tap.open(ifname)
        self.mtu = mtu
        if self.tap.created:
            self.tap.set_mtu(mtu)  # so that the kernel sends nothing the device must drop
        self.rx_frames = self.oversize = 0  # from the kernel
        self.tx_frames = self.tx_dropped = 0  # to the kernel
        self.loop = asyncio.get_running_loop()
        self.port = links.attach_uplink(
            link_name(ifname), f"tap {ifname}", self._deliver, on_idle=self.close
        )
        self.loop.add_reader(self.tap.fd, self._readable)

    @property
    def max_frame(self) -> int:
        return ETH_HEADER + ETH_VLAN_TAG + self.mtu

    def _readable(self) -> None:
        for _ in range(BURST):
            frame = self.tap.read()
            if frame is None:
                return
            if len(frame) > self.max_frame:
                self.oversize += 1
                log.debug("tap %s: dropped a %d-byte frame (MTU %d)", self.tap.name,
                          len(frame), self.mtu)  # fmt: skip
                continue
            self.rx_frames += 1
            self.port.send(frame)

    def _deliver(self, frame: bytes) -> None:
        if self.tap.write(frame):
            self.tx_frames += 1
        else:
            self.tx_dropped += 1

    def close(self) -> None:
        """Stop reading, leave the link, close the TAP (the kernel removes one we created)."""
        if self.tap.fd < 0:
            return
        _open.pop(self.tap.name, None)
        self.loop.remove_reader(self.tap.fd)
        links.release(self.port)
        self.tap.close()

    def __repr__(self) -> str:
        return f"<TapPort {self.tap.name} mtu {self.mtu}>"


_open: dict[str, TapPort] = {}


def plug(ifname: str, mtu: int) -> str:
    """Have the TAP ``ifname`` attached to its link (opening it if it is not yet) for a device
    of MTU ``mtu``; the link's name, for the device to plug into. A TAP that cannot be opened
    is logged: the device still plugs in, and the next device to plug in tries again."""
    found = _open.get(ifname)
    if found is None:
        try:
            _open[ifname] = TapPort(ifname, mtu)
        except OSError as exc:
            log.error("%s; the device's frames go nowhere", exc.strerror or exc)
    else:
        found.mtu = min(found.mtu, mtu)
    return link_name(ifname)


def port(ifname: str) -> TapPort | None:
    """The open TAP ``ifname`` of this process, if any (its counters, for tests and tools)."""
    return _open.get(ifname)
