"""``viowire net-attach URL --tap IFNAME``: a remote virtio-net device as a local Linux
interface, as a NIC's driver makes one. The client drives the device (:class:`NetDriver`) and
creates a TAP with the device's MAC and MTU; frames the kernel sends out of the TAP go to the
device's transmit queue, frames the device receives are written to the TAP. The TAP's carrier
follows the device's link status. It runs until SIGINT or SIGTERM, then detaches the driver and
closes the TAP (the kernel removes one this command created).

Nothing queues here without a bound: the TAP's own queue in the kernel (txqueuelen) holds what
the device has not taken yet, and the kernel drops past it; a frame the TAP cannot take now, or
one longer than the device's MTU, is dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from viowire.client.connection import DeviceInfo
from viowire.client.drivers.net import NetDriver
from viowire.client.target import devices, open_target
from viowire.runtime import until_signalled
from viowire.tap import Tap
from viowire.virtio.constants import device_name
from viowire.virtio.net import DEVICE_ID, ETH_HEADER, ETH_VLAN_TAG, format_mac

log = logging.getLogger("viowire.netattach")


class NetAttachError(ValueError):
    """The URL has no such net device: the message says which devices there are."""


@dataclass
class Counters:
    to_device: int = 0  # frames from the TAP sent on the device's transmit queue
    to_tap: int = 0  # frames the device received, written to the TAP
    oversize: int = 0  # from the TAP, longer than the device's MTU allows
    tap_dropped: int = 0  # the TAP did not take them (down, or its queue full)


class _WatchedNetDriver(NetDriver):
    """A NetDriver that reports a config change (the link status) to ``on_config``."""

    on_config: Callable[[], None] = staticmethod(lambda: None)

    async def config_changed(self) -> None:
        await super().config_changed()
        self.on_config()


def pick(platform: Sequence[DeviceInfo], index: int | None, url: str) -> DeviceInfo:
    """Device ``index`` of the platform, which must be virtio-net; None: the first net device."""
    if index is None:
        found = [info for info in platform if info.device_id == DEVICE_ID]
        if not found:
            raise NetAttachError(f"{url} has no virtio-net device (viowire probe {url} lists them)")
        return found[0]
    if not 0 <= index < len(platform):
        raise NetAttachError(f"--device {index}: {url} has devices 0..{len(platform) - 1}")
    info = platform[index]
    if info.device_id != DEVICE_ID:
        raise NetAttachError(
            f"--device {index} at {info.base:#x} is {device_name(info.device_id)}, not virtio-net"
        )
    return info


class Attachment:
    """A NetDriver and a TAP, pumping frames both ways until :meth:`close`."""

    def __init__(self, drv: NetDriver, tap: Tap) -> None:
        self.drv, self.tap = drv, tap
        self.counters = Counters()
        self._readable = asyncio.Event()
        self._loop = asyncio.get_running_loop()

    @property
    def max_frame(self) -> int:
        return ETH_HEADER + ETH_VLAN_TAG + self.drv.mtu

    def follow_link(self) -> None:
        """The TAP's carrier follows the device's link status."""
        with contextlib.suppress(OSError):  # TUNSETCARRIER is Linux 4.19+: else leave it
            self.tap.set_carrier(self.drv.link_up)

    async def run(self) -> None:
        """Pump until either direction ends (the device went away)."""
        self._loop.add_reader(self.tap.fd, self._readable.set)
        try:
            tasks = [
                asyncio.ensure_future(self._to_device()),
                asyncio.ensure_future(self._to_tap()),
            ]
            done, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)
            for task in done:
                task.result()
        finally:
            self._loop.remove_reader(self.tap.fd)

    async def _to_device(self) -> None:
        while True:
            frame = self.tap.read()
            if frame is None:
                self._readable.clear()
                await self._readable.wait()
                continue
            if len(frame) > self.max_frame:
                self.counters.oversize += 1
                continue
            await self.drv.send(frame)  # one at a time: the TAP's queue holds the rest
            self.counters.to_device += 1

    async def _to_tap(self) -> None:
        async for frame in self.drv.frames():
            if self.tap.write(frame):
                self.counters.to_tap += 1
            else:
                self.counters.tap_dropped += 1


async def net_attach(
    url: str,
    ifname: str,
    *,
    index: int | None = None,
    memory: str = "auto",
    ready: Callable[[str], None] = print,
    until: Callable[[], Awaitable[object]] = until_signalled,
) -> Counters:
    """Attach device ``index`` (None: the first virtio-net device) of ``url`` as the local TAP
    ``ifname`` until ``until()`` returns (default: SIGINT or SIGTERM); ``ready`` gets one line
    once the interface is up."""
    tap = Tap.open(ifname)  # first: a TAP this process cannot have ends it before it connects
    try:
        async with await open_target(url, memory=memory) as conn:
            info = pick(await devices(conn), index, url)
            drv = await _WatchedNetDriver.attach(await conn.attach(info))
            try:
                return await _serve(drv, tap, url, info, ready, until)
            finally:
                with contextlib.suppress(OSError, ConnectionError):
                    await drv.detach()
    finally:
        tap.close()


async def _serve(drv, tap: Tap, url: str, info: DeviceInfo, ready, until) -> Counters:
    tap.set_mac(drv.mac)
    tap.set_mtu(drv.mtu)
    attachment = Attachment(drv, tap)
    drv.on_config = attachment.follow_link
    attachment.follow_link()
    tap.set_up()
    # until() installs the SIGTERM handler in its first step: let it run before saying ready,
    # or a signal sent on the ready line kills the process before the TAP is cleaned up
    stop = asyncio.ensure_future(until())
    await asyncio.sleep(0)
    ready(
        f"{tap.name}: {format_mac(drv.mac)} mtu {drv.mtu} link "
        f"{'up' if drv.link_up else 'down'}, on {url} device at {info.base:#x}"
    )
    pump = asyncio.ensure_future(attachment.run())
    try:
        await asyncio.wait([pump, stop], return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (pump, stop):
            task.cancel()
        await asyncio.gather(pump, stop, return_exceptions=True)
    if pump.done() and not pump.cancelled() and pump.exception() is not None:
        raise pump.exception()
    log.info("%s: %s", tap.name, attachment.counters)
    return attachment.counters
