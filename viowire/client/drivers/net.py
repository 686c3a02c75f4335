"""virtio-net (SPEC §5.1): Ethernet frames over a receiveq/transmitq pair.

Every frame either way starts with a ``virtio_net_hdr`` whose size follows the features in
force (:func:`viowire.virtio.net.header_size`: 12 bytes with VERSION_1 or MRG_RXBUF, else 10),
the same rule the device applies. Receive buffers of ``mtu`` + Ethernet header (+ VLAN tag) +
virtio header bytes stay posted (without MRG_RXBUF each frame must fit one buffer), and each is
posted again once its frame is read::

    drv = await NetDriver.attach(dev)
    await drv.send(frame)                 # an Ethernet frame, no virtio header
    async for frame in drv.frames():      # the same, as they arrive
        ...
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Sequence
from typing import Any

from viowire.client.drivers.generic import GenericDriver
from viowire.client.mmio import VirtioMmioDevice
from viowire.virtio.net import (
    DEVICE_ID,
    ETH_HEADER,
    ETH_VLAN_TAG,
    NET_CONFIG,
    QUEUE_NAMES,
    RECEIVEQ,
    TRANSMITQ,
    NetFeature,
    NetStatus,
    header_size,
    transmit_header,
)

DEFAULT_MTU = 1500  # §5.1.4: without MTU the driver picks its own
RX_BUFFERS = 32


class NetDriver(GenericDriver):
    """A virtio-net device: ``mac``, ``link_up`` and ``mtu`` from its config space, ``await
    send(frame)`` and ``async for frame in frames()``."""

    device_id = DEVICE_ID
    feature_table = 1 << NetFeature.MAC | 1 << NetFeature.STATUS | 1 << NetFeature.MTU
    queue_names = QUEUE_NAMES
    config_layout = NET_CONFIG

    def __init__(self, dev: VirtioMmioDevice, *, rx_buffers: int = RX_BUFFERS, **opts: Any) -> None:
        """``rx_buffers``: receive buffers kept posted (at most the queue's size)."""
        super().__init__(dev, **opts)
        self.rx_buffers = rx_buffers
        self.mac = b""
        self.link_up = True
        self.mtu = DEFAULT_MTU

    @property
    def header_size(self) -> int:
        """Bytes of virtio_net_hdr before every frame, with the features negotiated."""
        return header_size(self.negotiated_features)

    async def setup(self) -> None:
        await self.read_config()
        await super().setup()

    async def read_config(self) -> None:
        """Re-read mac, status and mtu (each only if its feature bit was negotiated)."""
        if self.has_feature(NetFeature.MAC):
            self.mac = await self.config_bytes(0, 6)
        if self.has_feature(NetFeature.STATUS):
            self.link_up = bool(await self.config_read(6, 2) & NetStatus.LINK_UP)
        if self.has_feature(NetFeature.MTU):
            self.mtu = await self.config_read(10, 2)

    async def config_changed(self) -> None:
        await self.read_config()
        await super().config_changed()

    async def device_ready(self) -> None:
        if RECEIVEQ in self._receivers:
            await super().device_ready()  # a reinitialise: post them again
            return
        size = self.header_size + ETH_HEADER + ETH_VLAN_TAG + self.mtu
        count = min(self.rx_buffers, self.vqs[RECEIVEQ].num)
        await self.post(RECEIVEQ, size, count)

    async def post(self, queue: int, size: int, count: int) -> None:
        """The receive queue's buffers are this driver's own (posted when the device went
        live, sized for the MTU): posting there again changes nothing, so tools that post on
        any type's receive queue (``viowire conform``) drive a net device too."""
        if queue == RECEIVEQ and RECEIVEQ in self._receivers:
            return
        await super().post(queue, size, count)

    async def send(self, frame: bytes | Sequence[bytes]) -> None:
        """Transmit one Ethernet frame (destination, source, ethertype, payload); returns once
        the device has taken it. The header goes in a descriptor of its own, as a legacy device
        without ANY_LAYOUT needs."""
        data = (
            bytes(frame) if isinstance(frame, bytes | bytearray | memoryview) else b"".join(frame)
        )
        await self.request(TRANSMITQ, out=[transmit_header(self.header_size), data])

    async def frames(self) -> AsyncIterator[bytes]:
        """``async for frame in drv.frames()``: received frames, virtio header stripped, in the
        order the device returned them; ends when the driver detaches."""
        hdr = self.header_size
        async for data in self.receive(RECEIVEQ):
            yield data[hdr:]
