"""virtio-net (§5.1) on the device API: one receiveq/transmitq pair plugged into an in-server
link (:mod:`viowire.server.link`), so that net devices of any sessions of this server process on
the same ``link=NAME`` exchange Ethernet frames through a learning switch.

Transmit (request/response, inline: nothing waits): the chain's readable part is the
``virtio_net_hdr`` (10 or 12 bytes, by the features in force: :func:`viowire.virtio.net.
header_size`) then the frame, which goes to the link. A chain shorter than the header is
malformed (DEVICE_NEEDS_RESET); a frame shorter than an Ethernet header or longer than the MTU
allows is dropped and counted, as a NIC would.

Receive (held buffers, as examples/loopback.py): a frame from the link goes into the next
buffer the driver has made available, after a zeroed header (num_buffers = 1 where the header
has it). A frame that finds no buffer is dropped and counted (``rx_dropped``); at most
``queue_num_max`` frames wait for the device to write them, never more.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os

from viowire.device import (
    ChainError,
    DescriptorChain,
    Device,
    GuestMemory,
    Option,
    Queue,
    SampleRequest,
    StaleQueueError,
)
from viowire.server import link as links
from viowire.server import tap as taps
from viowire.virtio.net import (
    BROADCAST,
    CONFIG,
    DEVICE_ID,
    ETH_HEADER,
    ETH_VLAN_TAG,
    NET_CONFIG,
    RECEIVEQ,
    TRANSMITQ,
    NetFeature,
    NetStatus,
    format_mac,
    header_size,
    parse_mac,
    receive_header,
)

log = logging.getLogger("viowire.net")

# from a random start, so that servers whose links are joined (--link) do not hand out the same
# MACs; in order after it, so that one server's are distinct for 2**24 devices
_macs = itertools.count(int.from_bytes(os.urandom(3), "big"))
MAC_PREFIX = b"\x02\x76\x77"  # locally administered, unicast ("vw"); QEMU's 52:54:00 is not ours


def next_mac() -> bytes:
    """A fresh locally administered unicast MAC for this process: 02:76:77:xx:xx:xx."""
    return MAC_PREFIX + (next(_macs) & 0xFFFFFF).to_bytes(3, "big")


def _parse_mtu(text: object) -> int:
    mtu = int(str(text).strip(), 0)
    if not 68 <= mtu <= 65535:  # §5.1.4: mtu is a u16, and IPv4 needs 68
        raise ValueError(f"{mtu} is not within 68..65535")
    return mtu


class NetDevice(Device):
    """A virtio-net device on an in-server link; offers MAC, STATUS (link up) and MTU."""

    device_id = DEVICE_ID
    type_name = "net"
    num_queues = 2
    handle_inline = True  # transmit never waits before it is done
    config_layout = NET_CONFIG
    feature_bits = NetFeature
    driver = "viowire.client.drivers.net:NetDriver"
    options = {
        "link": Option.string("default", "the in-server link (switch) to plug into"),
        "mac": Option(
            parse_mac, None, "the MAC address; none: 02:76:77:xx:xx:xx, a new one per device"
        ),
        "mtu": Option(_parse_mtu, 1500, "the largest payload of a frame (68..65535)"),
        "tap": Option(
            taps.parse_tap,
            None,
            "a TAP interface of the server's host (created if absent; needs CAP_NET_ADMIN): "
            "the device plugs into link tap:IFNAME, to which the TAP is attached",
        ),
    }
    # what viowire conform sends: a 12-byte header and a broadcast frame (to a legacy device
    # the header is 10 bytes and the frame starts 2 bytes early: still a frame to switch)
    sample_request = SampleRequest(
        TRANSMITQ,
        readable=(bytes(12), BROADCAST + MAC_PREFIX + b"\x00\x00\xff\x88\xb5" + b"conform"),
        receive_queue=RECEIVEQ,
    )

    def __init__(
        self,
        link: str = "default",
        mac: bytes | str | None = None,
        mtu: int = 1500,
        tap: str | None = None,
    ):
        super().__init__()
        self.link_name = link
        self.tap = tap
        self.mac = next_mac() if mac is None else parse_mac(mac) if isinstance(mac, str) else mac
        self.mtu = _parse_mtu(mtu)
        self.port: links.Port | None = None
        self._inbox: collections.deque[bytes] = collections.deque()
        self._pump: asyncio.Task[None] | None = None
        self.tx_frames = self.tx_dropped = 0
        self.rx_frames = self.rx_dropped = 0

    # -- what the device is ---------------------------------------------------------------------
    def device_features(self, version: int) -> int:
        return 1 << NetFeature.MAC | 1 << NetFeature.STATUS | 1 << NetFeature.MTU

    def config_space(self) -> bytes:
        return CONFIG.pack(self.mac, NetStatus.LINK_UP, 1, self.mtu)

    @property
    def negotiated_features(self) -> int:
        """The feature bits in force, as the transport negotiated them (0 before)."""
        return self.transport.negotiated_features if self.transport is not None else 0

    @property
    def header_size(self) -> int:
        return header_size(self.negotiated_features)

    @property
    def max_frame(self) -> int:
        return ETH_HEADER + ETH_VLAN_TAG + self.mtu

    def _plug(self) -> links.Port:
        if self.port is None:
            name = self.link_name if self.tap is None else taps.plug(self.tap, self.mtu)
            self.port = links.attach(name, f"{self.name} {format_mac(self.mac)}", self._deliver)
        return self.port

    # -- transmit -------------------------------------------------------------------------------
    def queue_notify(self, queue: Queue) -> None:
        self._plug()  # the driver is live: frames may come from the link now
        if queue.index == TRANSMITQ:
            queue.serve()
        # RECEIVEQ: its buffers stay in the ring until a frame needs one

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        if queue != TRANSMITQ:
            raise ChainError(f"net: queue {queue} is not a transmit queue")
        hdr = self.header_size
        if chain.readable_len < hdr:
            raise ChainError(
                f"net: transmitted chain has {chain.readable_len} readable bytes, shorter than "
                f"the {hdr}-byte virtio_net_hdr"
            )
        length = chain.readable_len - hdr
        if not ETH_HEADER <= length <= self.max_frame:
            self.tx_dropped += 1
            return 0
        frame = await chain.read(hdr, length)
        self.tx_frames += 1
        self._plug().send(frame)
        return 0  # nothing written into a transmitted chain

    # -- receive --------------------------------------------------------------------------------
    def _deliver(self, frame: bytes) -> None:
        """A frame from the link (called by the switch; must not block)."""
        if len(self._inbox) >= self.queue_num_max:
            self.rx_dropped += 1  # the driver has not kept up: a NIC drops too
            return
        self._inbox.append(frame)
        if self._pump is None or self._pump.done():
            self._pump = asyncio.get_running_loop().create_task(self._write_frames())

    async def _write_frames(self) -> None:
        """Put waiting frames into receive buffers, in order; one with no buffer is dropped."""
        # a reset takes the buffers back (StaleQueueError); _stop() has emptied the inbox then
        with contextlib.suppress(StaleQueueError):
            await self._fill_buffers(self.queue(RECEIVEQ))

    async def _fill_buffers(self, receiveq: Queue) -> None:
        while self._inbox:
            frame = self._inbox.popleft()
            chain = await receiveq.pop()
            if chain is None:
                self.rx_dropped += 1
                continue
            data = receive_header(self.header_size) + frame
            if chain.writable_len < len(data):
                # §5.1.6.3.1: without MRG_RXBUF each buffer must hold a whole frame
                self.rx_dropped += 1
                receiveq.complete(chain, 0)
                continue
            receiveq.complete(chain, await chain.write(data))
            self.rx_frames += 1

    # -- lifecycle ------------------------------------------------------------------------------
    def _stop(self) -> None:
        if self._pump is not None:
            self._pump.cancel()
            self._pump = None
        self._inbox.clear()
        if self.port is not None:
            links.release(self.port)
            self.port = None

    def queue_reset(self, index: int) -> None:
        if index == RECEIVEQ:
            self._stop()  # the chains the pump held are the driver's again

    def reset(self) -> None:
        self._stop()

    def close(self) -> None:
        self._stop()
