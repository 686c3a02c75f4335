"""In-server links: a learning Ethernet switch per link name, shared by every session of the
server process, so that net devices of different clients on the same ``link=NAME`` reach each
other as if plugged into one switch.

A :class:`Port` is one device's connection (its ``deliver`` takes a frame and must not block).
The switch learns which port each source MAC sits behind, forwards a unicast frame to that port
alone (or floods it while the destination is unknown), floods broadcast and multicast, and never
sends a frame back to the port it came from. Learned entries age out (300 s, checked when looked
at) and the table has a bound, so a flood of forged source MACs costs bounded memory; nothing is
queued here: a port that cannot take a frame drops it (and counts it).

Besides the devices' ports a link can have uplinks: ports to the world outside the server (a
TAP interface, :mod:`viowire.server.tap`; a peer server, :mod:`viowire.server.linkpeer`). They
switch like any port; an uplink with ``on_idle`` is told when the last device port leaves (a TAP
closes then), one without stays as long as its owner keeps it.

A link has a state, up or down (:meth:`Link.set_up`), which it tells every port through the
port's optional ``carrier`` callback, as a cable pulled and plugged again: net devices turn it
into their config space's LINK_UP (§5.1.4). A down link forwards nothing.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from viowire.virtio.net import ETH_HEADER, is_multicast

AGING = 300.0
"""Seconds a learned MAC stays bound to its port without a frame from it (IEEE 802.1D default)."""
MAX_ENTRIES = 4096
"""Learned MACs per link; past this the switch floods frames to unknown MACs instead of learning."""

Deliver = Callable[[bytes], None]
Carrier = Callable[[bool], None]


class Port:
    """One connection to a link: ``deliver(frame)`` hands it a frame to receive; ``carrier(up)``,
    if given, hears when the link goes down or up. ``uplink``: not a device's; ``on_idle``: an
    uplink's callback for when no device port is left."""

    __slots__ = ("carrier", "deliver", "link", "name", "on_idle", "uplink")

    def __init__(
        self,
        link: Link,
        name: str,
        deliver: Deliver,
        carrier: Carrier | None = None,
        *,
        uplink: bool = False,
        on_idle: Callable[[], None] | None = None,
    ) -> None:
        self.link, self.name, self.deliver, self.carrier = link, name, deliver, carrier
        self.uplink, self.on_idle = uplink, on_idle

    def send(self, frame: bytes) -> None:
        """Put ``frame`` (an Ethernet frame, no virtio header) on the link."""
        self.link.forward(self, frame)

    def detach(self) -> None:
        """Unplug: the switch forgets this port and every MAC learned behind it."""
        self.link.detach(self)

    def __repr__(self) -> str:
        return f"<Port {self.name} on link {self.link.name!r}>"


class Link:
    """One learning switch (see the module docstring). ``clock`` gives seconds (monotonic)."""

    def __init__(
        self,
        name: str,
        *,
        aging: float = AGING,
        max_entries: int = MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.name = name
        self.aging, self.max_entries, self.clock = aging, max_entries, clock
        self.ports: list[Port] = []
        self.table: dict[bytes, tuple[Port, float]] = {}  # MAC -> (port, last seen)
        self.forwarded = self.flooded = self.filtered = 0
        self.up = True

    def attach(
        self, name: str, deliver: Deliver, carrier: Carrier | None = None, **kind: Any
    ) -> Port:
        """A new port; frames for it arrive through ``deliver``; a link that is down says so
        through ``carrier`` at once; ``kind``: uplink=, on_idle= (see :class:`Port`)."""
        port = Port(self, name, deliver, carrier, **kind)
        self.ports.append(port)
        if not self.up and carrier is not None:
            carrier(False)
        return port

    def has_devices(self) -> bool:
        return any(not port.uplink for port in self.ports)

    def set_up(self, up: bool) -> None:
        """Bring the link up or down; every port's ``carrier`` hears of a change."""
        if up == self.up:
            return
        self.up = up
        for port in list(self.ports):
            if port.carrier is not None:
                port.carrier(up)

    def detach(self, port: Port) -> None:
        if port in self.ports:
            self.ports.remove(port)
        for mac in [mac for mac, (where, _) in self.table.items() if where is port]:
            del self.table[mac]

    def lookup(self, mac: bytes) -> Port | None:
        """The port ``mac`` was last seen behind, unless that has aged out."""
        entry = self.table.get(mac)
        if entry is None:
            return None
        port, seen = entry
        if self.clock() - seen >= self.aging:
            del self.table[mac]
            return None
        return port

    def learn(self, mac: bytes, port: Port) -> None:
        if is_multicast(mac):
            return  # a group address is never a source (a forged one must not capture traffic)
        if mac not in self.table and len(self.table) >= self.max_entries:
            now = self.clock()
            for old in [m for m, (_, seen) in self.table.items() if now - seen >= self.aging]:
                del self.table[old]
            if len(self.table) >= self.max_entries:
                return  # full of live entries: flood this MAC's traffic rather than grow
        self.table[mac] = (port, self.clock())

    def forward(self, sender: Port, frame: bytes) -> None:
        """Switch one frame from ``sender``: learn its source, then deliver it."""
        if not self.up or sender not in self.ports or len(frame) < ETH_HEADER:
            return
        dst, src = bytes(frame[0:6]), bytes(frame[6:12])
        self.learn(src, sender)
        if not is_multicast(dst):
            port = self.lookup(dst)
            if port is sender:
                self.filtered += 1  # the destination is on the sender's own side
                return
            if port is not None:
                self.forwarded += 1
                port.deliver(frame)
                return
        self.flooded += 1
        for port in list(self.ports):
            if port is not sender:
                port.deliver(frame)


_links: dict[str, Link] = {}


def link(name: str) -> Link:
    """The link called ``name`` in this server process (made on first use)."""
    found = _links.get(name)
    if found is None:
        found = _links[name] = Link(name)
    return found


def attach(name: str, port_name: str, deliver: Deliver, carrier: Carrier | None = None) -> Port:
    """Plug a new port into link ``name``."""
    return link(name).attach(port_name, deliver, carrier)


def attach_uplink(
    name: str, port_name: str, deliver: Deliver, on_idle: Callable[[], None] | None = None
) -> Port:
    """Plug an uplink into link ``name``: ``on_idle()`` is called when the link's last device
    port leaves (it should release the uplink); without it the uplink stays until released."""
    return link(name).attach(port_name, deliver, uplink=True, on_idle=on_idle)


def release(port: Port) -> None:
    """Unplug ``port``; a link with no ports left is forgotten (a new one starts empty), unless
    it is down: that is someone's decision, which outlives the devices."""
    port.detach()
    here = port.link
    if not port.uplink and not here.has_devices():
        for uplink in [p for p in here.ports if p.on_idle is not None]:
            uplink.on_idle()  # the last device left: a TAP closes
    if not here.ports and here.up and _links.get(here.name) is here:
        del _links[here.name]
