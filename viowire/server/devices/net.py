"""virtio-net (§5.1) on the device API: receiveq/transmitq pairs and a controlq, plugged into an
in-server link (:mod:`viowire.server.link`), so that net devices of any sessions of this server
process on the same ``link=NAME`` exchange Ethernet frames through a learning switch.

Queues (§5.1.2): ``queues=N`` pairs, receiveq_k at 2k and transmitq_k at 2k+1, then the
controlq at 2N; a driver without MQ has one pair and its controlq at 2 (:func:`viowire.virtio.
net.ctrl_queue`). Until the driver sends VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET, frames arrive on
receiveq0 only; after it, on the pairs in use, steered by flow: a flow's frames go to the pair its
last transmitted frame left by, others to a pair chosen by a hash of the flow (§5.1.6.5.5).

Transmit (request/response, inline): the chain's readable part is the ``virtio_net_hdr`` (10 or
12 bytes, by the features in force: :func:`viowire.virtio.net.header_size`) then the frame,
which goes to the link. A chain shorter than the header is malformed (DEVICE_NEEDS_RESET); a
header asking for an offload not negotiated (NEEDS_CSUM, a GSO type) is a ``tx_errors``; a frame
shorter than an Ethernet header or longer than the MTU allows is dropped and counted, as a NIC
would, and so is every frame while the link is down.

Receive (held buffers): a frame from the link passes the receive filter (QEMU's
``receive_filter``: promiscuous after reset, as QEMU for old drivers; else own MAC, broadcast,
the MAC table, all-multicast and the CTRL_RX_EXTRA switches), then goes into the next buffer the
driver has made available, after a header. Without MRG_RXBUF one buffer holds one frame, and a
frame that does not fit is dropped and counted, never written past the buffer (which waits for
the next frame, as QEMU's goes back to the ring); with it a frame
spreads over as many buffers as it needs, all used together, ``num_buffers`` in the first
header saying how many (§5.1.6.4). A frame that finds the ring empty waits for the driver to
make buffers available (its next notification of the receiveq), as QEMU holds it
(``virtio_net_has_buffers``): a burst on the link waits for a driver that reads and reposts,
instead of dropping a frame in the crowd. At most ``queue_num_max`` frames per pair wait, never
more: past that a frame is dropped and counted (``rx_dropped``), as is a merged frame that
finds too few buffers after its first.

Control (§5.1.6.5): CTRL_RX (promiscuous, all-multicast; CTRL_RX_EXTRA's all-unicast, no-
multicast, no-unicast, no-broadcast), MAC_TABLE_SET, MAC_ADDR_SET (CTRL_MAC_ADDR), ANNOUNCE_ACK
(GUEST_ANNOUNCE: :meth:`NetDevice.announce` asks the driver) and VQ_PAIRS_SET (MQ). A command
that is unknown, of a feature not negotiated, or with data of the wrong length or value is
answered VIRTIO_NET_ERR; a chain with no writable ack byte or fewer than 2 readable bytes is
malformed (DEVICE_NEEDS_RESET).

Link state (STATUS): :meth:`NetDevice.set_link`, or the link's own state
(:meth:`viowire.server.link.Link.set_up`), changes LINK_UP and sends a configuration change
notification.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import logging
import os
import zlib

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
    COMMAND_FEATURE,
    CONFIG,
    CTRL_ACK_SIZE,
    CTRL_HEADER,
    DEVICE_ID,
    ETH_HEADER,
    ETH_VLAN_TAG,
    IMPLEMENTED,
    NET_CONFIG,
    RECEIVEQ,
    TRANSMITQ,
    VQ_PAIRS,
    Ack,
    CtrlClass,
    CtrlMac,
    CtrlRx,
    NetFeature,
    NetStatus,
    announce_frame,
    ctrl_queue,
    format_mac,
    header_size,
    is_multicast,
    parse_mac,
    parse_mac_table,
    queue_pairs,
    receive_header,
    transmit_header_problem,
)

log = logging.getLogger("viowire.net")

# from a random start, so that servers whose links are joined (--link) do not hand out the same
# MACs; in order after it, so that one server's are distinct for 2**24 devices
_macs = itertools.count(int.from_bytes(os.urandom(3), "big"))
MAC_PREFIX = b"\x02\x76\x77"  # locally administered, unicast ("vw"); QEMU's 52:54:00 is not ours
MAX_PAIRS = 8
"""The most receiveq/transmitq pairs ``queues=`` gives (QEMU's tap takes up to 8 per default)."""
CTRL_MAX_DATA = 65536
"""Readable bytes of a control command read at most; a longer one is ERR (a MAC table of
10,000 addresses fits)."""
STEERING_FLOWS = 1024
"""Flows whose transmit pair the device remembers for steering; the oldest is forgotten."""

OFFERED = IMPLEMENTED & ~(1 << NetFeature.MQ)
"""What every viowire net device offers; MQ too when it has more than one pair."""


def next_mac() -> bytes:
    """A fresh locally administered unicast MAC for this process: 02:76:77:xx:xx:xx."""
    return MAC_PREFIX + (next(_macs) & 0xFFFFFF).to_bytes(3, "big")


def _parse_mtu(text: object) -> int:
    mtu = int(str(text).strip(), 0)
    if not 68 <= mtu <= 65535:  # §5.1.4: mtu is a u16, and IPv4 needs 68
        raise ValueError(f"{mtu} is not within 68..65535")
    return mtu


def _parse_queues(text: object) -> int:
    pairs = int(str(text).strip(), 0)
    if not 1 <= pairs <= MAX_PAIRS:
        raise ValueError(f"{pairs} is not within 1..{MAX_PAIRS}")
    return pairs


class RxFilter:
    """The receive filter (§5.1.6.5.1, §5.1.6.5.2) with QEMU's rules (``receive_filter``).

    After a reset it is promiscuous, as QEMU's ("compatibility mode": a driver without CTRL_RX
    gets every frame); a driver turns that off with VIRTIO_NET_CTRL_RX_PROMISC (Linux does when
    the interface goes up). ``unicast`` and ``multicast`` are the MAC table's two halves, None
    for a half that overflowed (more than MAC_TABLE_ENTRIES: accept every address of the kind).
    """

    def __init__(self) -> None:
        self.promisc = True
        self.allmulti = self.alluni = self.nomulti = self.nouni = self.nobcast = False
        self.unicast: list[bytes] | None = []
        self.multicast: list[bytes] | None = []

    def accepts(self, dst: bytes, own: bytes) -> bool:
        """Whether a frame to ``dst`` reaches a device whose MAC is ``own``."""
        if self.promisc:
            return True
        if is_multicast(dst):
            if dst == BROADCAST:
                return not self.nobcast
            if self.nomulti:
                return False
            return self.allmulti or self.multicast is None or dst in self.multicast
        if self.nouni:
            return False
        return self.alluni or self.unicast is None or dst == own or dst in self.unicast


def flow_key(frame: bytes) -> bytes:
    """What identifies ``frame``'s flow, the same both ways: the Ethernet endpoints and type,
    or for IPv4/IPv6 the addresses (and TCP/UDP ports) and protocol."""
    ethertype = bytes(frame[12:14])
    ends = [bytes(frame[0:6]), bytes(frame[6:12])]
    proto, l3 = b"", None
    if ethertype == b"\x08\x00" and len(frame) >= 34:  # IPv4
        proto, l3 = frame[23:24], 14 + (frame[14] & 0x0F) * 4
        ends = [bytes(frame[26:30]), bytes(frame[30:34])]
    elif ethertype == b"\x86\xdd" and len(frame) >= 54:  # IPv6 (no extension headers)
        proto, l3 = frame[20:21], 54
        ends = [bytes(frame[22:38]), bytes(frame[38:54])]
    if l3 is not None and proto in (b"\x06", b"\x11") and len(frame) >= l3 + 4:
        ends = [ends[0] + frame[l3 : l3 + 2], ends[1] + frame[l3 + 2 : l3 + 4]]
    return ethertype + bytes(proto) + b"".join(sorted(ends))


class Steering:
    """Automatic receive steering (§5.1.6.5.5): a flow's frames go to the pair the driver last
    transmitted one of its frames on; a flow it has not sent on, to a pair by a hash of it."""

    def __init__(self, size: int = STEERING_FLOWS) -> None:
        self.size = size
        self.flows: collections.OrderedDict[bytes, int] = collections.OrderedDict()

    def learn(self, frame: bytes, pair: int) -> None:
        key = flow_key(frame)
        self.flows[key] = pair
        self.flows.move_to_end(key)
        if len(self.flows) > self.size:
            self.flows.popitem(last=False)

    def pick(self, frame: bytes, pairs: int) -> int:
        key = flow_key(frame)
        pair = self.flows.get(key)
        if pair is not None and pair < pairs:
            return pair
        return zlib.crc32(key) % pairs

    def clear(self) -> None:
        self.flows.clear()


class _RxPair:
    """One receiveq's side: frames waiting to be written, the task writing them, buffers
    taken from the ring but not used yet (a merged frame that found too few: QEMU leaves them
    in the ring, which is the same to the driver), and what wakes the task when it waits for
    the driver to make buffers available (its next notification of the receiveq)."""

    __slots__ = ("held", "inbox", "kicked", "pump")

    def __init__(self) -> None:
        self.inbox: collections.deque[bytes] = collections.deque()
        self.held: collections.deque[DescriptorChain] = collections.deque()
        self.pump: asyncio.Task[None] | None = None
        self.kicked: asyncio.Future[None] | None = None

    def kick(self) -> None:
        """The driver notified the receiveq: it made buffers available."""
        if self.kicked is not None and not self.kicked.done():
            self.kicked.set_result(None)

    def stop(self) -> int:
        """Forget everything (the ring was reset); returns the frames dropped."""
        if self.pump is not None:
            self.pump.cancel()
            self.pump = None
        dropped = len(self.inbox)
        self.inbox.clear()
        self.held.clear()
        return dropped


class NetDevice(Device):
    """virtio-net on an in-server link: merged buffers, control queue, queues=N pairs, link state.

    Offers MAC, STATUS, MTU, MRG_RXBUF, CTRL_VQ, CTRL_RX, CTRL_RX_EXTRA, CTRL_MAC_ADDR,
    GUEST_ANNOUNCE and, with ``queues`` > 1, MQ. ``num_queues`` is the instance's own
    (2 * queues + 1): the transport asks the instance.
    """

    device_id = DEVICE_ID
    type_name = "net"
    num_queues = 3  # receiveq0, transmitq0, controlq; an instance has 2 * queues + 1
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
        "queues": Option(
            _parse_queues,
            1,
            f"receiveq/transmitq pairs (1..{MAX_PAIRS}); more than 1 offers MQ, the driver "
            "picks how many it uses",
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
        queues: int = 1,
        tap: str | None = None,
    ):
        super().__init__()
        self.link_name = link
        self.tap = tap
        self.default_mac = (
            next_mac() if mac is None else parse_mac(mac) if isinstance(mac, str) else mac
        )
        self.mac = self.default_mac
        self.mtu = _parse_mtu(mtu)
        self.max_pairs = _parse_queues(queues)
        self.num_queues = 2 * self.max_pairs + 1
        self.port: links.Port | None = None
        self.link_up = True
        self.announcing = False  # status.ANNOUNCE: the driver is asked to announce itself
        self.filter = RxFilter()
        self.pairs = 1  # in use: §5.1.6.5.5, receiveq0 only until VQ_PAIRS_SET
        self.steering = Steering()
        self._rx = [_RxPair() for _ in range(self.max_pairs)]
        self._warned_tx = False
        self.tx_frames = self.tx_dropped = self.tx_errors = 0
        self.rx_frames = self.rx_dropped = self.rx_filtered = 0
        self.rx_pair_frames = [0] * self.max_pairs  # frames written, per receiveq
        self.ctrl_ok = self.ctrl_err = 0

    # -- what the device is ---------------------------------------------------------------------
    def device_features(self, version: int) -> int:
        mq = 1 << NetFeature.MQ if self.max_pairs > 1 else 0
        return OFFERED | mq

    def config_space(self) -> bytes:
        status = (NetStatus.LINK_UP if self.link_up else 0) | (
            NetStatus.ANNOUNCE if self.announcing else 0
        )
        return CONFIG.pack(self.mac, status, self.max_pairs, self.mtu)

    def config_write(self, offset: int, data_value: int, width: int) -> None:
        """A legacy driver without CTRL_MAC_ADDR sets the MAC by writing ``mac`` (§5.1.6.5.2's
        legacy interface; QEMU takes it); anything else is read-only."""
        features = self.negotiated_features
        legacy_mac = (
            self.transport is not None
            and getattr(self.transport, "version", 2) == 1
            and not features >> NetFeature.CTRL_MAC_ADDR & 1
            and offset + width <= 6
        )
        if not legacy_mac:
            super().config_write(offset, data_value, width)
            return
        mac = bytearray(self.mac)
        mac[offset : offset + width] = data_value.to_bytes(width, "little")
        self.mac = bytes(mac)

    @property
    def negotiated_features(self) -> int:
        """The feature bits in force, as the transport negotiated them (0 before)."""
        return self.transport.negotiated_features if self.transport is not None else 0

    def _has(self, bit: int) -> bool:
        return bool(self.negotiated_features >> bit & 1)

    @property
    def header_size(self) -> int:
        return header_size(self.negotiated_features)

    @property
    def max_frame(self) -> int:
        return ETH_HEADER + ETH_VLAN_TAG + self.mtu

    def _role(self, index: int) -> tuple[str, int]:
        """What virtqueue ``index`` is with the features in force: ("rx"|"tx", pair),
        ("ctrl", 0), or ("none", 0) for a queue that is not used."""
        features = self.negotiated_features
        if index == ctrl_queue(features, self.max_pairs):
            return "ctrl", 0
        if index < 2 * queue_pairs(features, self.max_pairs):
            return ("tx" if index & 1 else "rx"), index // 2
        return "none", 0

    def _plug(self) -> links.Port:
        if self.port is None:
            name = self.link_name if self.tap is None else taps.plug(self.tap, self.mtu)
            self.port = links.attach(
                name, f"{self.name} {format_mac(self.mac)}", self._deliver, self.set_link
            )
        return self.port

    # -- link state -----------------------------------------------------------------------------
    def set_link(self, up: bool) -> None:
        """Link up or down (STATUS's LINK_UP, §5.1.4); a change sends a configuration change
        notification. While down, frames are neither sent nor received (dropped, counted)."""
        up = bool(up)
        if up == self.link_up:
            return
        self.link_up = up
        log.info("%s: link %s", self.name, "up" if up else "down")
        self.on_config_change()

    def announce(self) -> None:
        """Tell the link where this device's MAC is (after a move, as QEMU after migration): a
        driver with GUEST_ANNOUNCE is asked to (status.ANNOUNCE and a configuration change
        notification, §5.1.6.5.4), which knows the addresses to announce; for any other the
        device sends QEMU's RARP itself."""
        if self._has(NetFeature.GUEST_ANNOUNCE) and self._has(NetFeature.CTRL_VQ):
            self.announcing = True
            self.on_config_change()
        elif self.link_up:
            self.tx_frames += 1
            self._plug().send(announce_frame(self.mac))

    # -- transmit and control -------------------------------------------------------------------
    def queue_notify(self, queue: Queue) -> None:
        self._plug()  # the driver is live: frames may come from the link now
        role, pair = self._role(queue.index)
        if role in ("tx", "ctrl"):
            queue.serve()
        elif role == "rx":  # its buffers stay in the ring until a frame needs one
            self._rx[pair].kick()  # a frame waiting for a buffer looks again
        # "none": not a queue in use

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        role, pair = self._role(queue)
        if role == "tx":
            return await self._transmit(chain, pair)
        if role == "ctrl":
            return await self._control(chain)
        raise ChainError(f"net: queue {queue} is not a transmit or control queue")

    async def _transmit(self, chain: DescriptorChain, pair: int) -> int:
        hdr = self.header_size
        if chain.readable_len < hdr:
            raise ChainError(
                f"net: transmitted chain has {chain.readable_len} readable bytes, shorter than "
                f"the {hdr}-byte virtio_net_hdr"
            )
        length = chain.readable_len - hdr
        if not self.link_up or not ETH_HEADER <= length <= self.max_frame:
            self.tx_dropped += 1
            return 0
        data = await chain.read()
        problem = transmit_header_problem(data[:hdr], self.negotiated_features)
        if problem is not None:
            self.tx_errors += 1
            if not self._warned_tx:
                self._warned_tx = True
                log.warning(
                    "%s: transmitted frame dropped: %s (counted in tx_errors)", self.name, problem
                )
            return 0
        frame = data[hdr:]
        self.tx_frames += 1
        if self.pairs > 1:
            self.steering.learn(frame, pair)
        self._plug().send(frame)
        return 0  # nothing written into a transmitted chain

    async def _control(self, chain: DescriptorChain) -> int:
        if chain.readable_len < CTRL_HEADER.size or chain.writable_len < CTRL_ACK_SIZE:
            raise ChainError(
                f"net: control command with {chain.readable_len} readable and "
                f"{chain.writable_len} writable bytes: it needs class and command (2 bytes) "
                "and an ack byte"
            )
        if chain.readable_len > CTRL_HEADER.size + CTRL_MAX_DATA:
            ack = Ack.ERR
        else:
            data = await chain.read()
            ack = await self._command(data[0], data[1], data[CTRL_HEADER.size :])
        if ack == Ack.OK:
            self.ctrl_ok += 1
        else:
            self.ctrl_err += 1
        return await chain.write(bytes([ack]))

    async def _command(self, cls: int, command: int, data: bytes) -> Ack:
        """One control command (§5.1.6.5): done, or ERR with nothing changed."""
        needs = COMMAND_FEATURE.get((cls, command))
        if needs is None or not self._has(needs):
            return Ack.ERR
        if cls == CtrlClass.RX:
            if len(data) != 1 or data[0] > 1:
                return Ack.ERR  # one byte, 0 (off) or 1 (on)
            setattr(self.filter, CtrlRx(command).name.lower(), bool(data[0]))
        elif command == CtrlMac.TABLE_SET and cls == CtrlClass.MAC:
            try:
                self.filter.unicast, self.filter.multicast = parse_mac_table(data)
            except ValueError:
                return Ack.ERR
        elif cls == CtrlClass.ANNOUNCE:  # ACK: only of an announcement asked for (QEMU)
            if data or not self.announcing:
                return Ack.ERR
            self.announcing = False
            self.on_config_change()
        elif cls == CtrlClass.MAC:  # ADDR_SET
            if len(data) != 6 or is_multicast(data):
                return Ack.ERR
            if data != self.mac:
                self.mac = bytes(data)
                self.on_config_change()  # config space's mac follows (§5.1.6.5.2)
        else:  # MQ VQ_PAIRS_SET
            if len(data) != VQ_PAIRS.size:
                return Ack.ERR
            (pairs,) = VQ_PAIRS.unpack(data)
            if not 1 <= pairs <= self.max_pairs:
                return Ack.ERR
            await self._set_pairs(pairs)
        return Ack.OK

    async def _set_pairs(self, pairs: int) -> None:
        """Use ``pairs`` pairs; once the command is acked no frame goes to the others
        (§5.1.6.5.5.2): their waiting frames are dropped and a frame being written finishes."""
        old, self.pairs = self.pairs, pairs
        writing = []
        for path in self._rx[pairs:old]:
            self.rx_dropped += len(path.inbox)
            path.inbox.clear()
            path.kick()  # a frame waiting for a buffer there is dropped
            if path.pump is not None and not path.pump.done():
                writing.append(path.pump)
        if writing:
            await asyncio.wait(writing)

    # -- receive --------------------------------------------------------------------------------
    def _deliver(self, frame: bytes) -> None:
        """A frame from the link (called by the switch; must not block)."""
        if not self.link_up or (self._has(NetFeature.MTU) and len(frame) > self.max_frame):
            self.rx_dropped += 1  # §5.1.4: never a frame larger than the MTU negotiated
            return
        if not self.filter.accepts(bytes(frame[0:6]), self.mac):
            self.rx_filtered += 1
            return
        pair = 0 if self.pairs == 1 else self.steering.pick(frame, self.pairs)
        path = self._rx[pair]
        if len(path.inbox) >= self.queue_num_max:
            self.rx_dropped += 1  # the driver has not kept up: a NIC drops too
            return
        path.inbox.append(frame)
        if path.pump is None or path.pump.done():
            path.pump = asyncio.get_running_loop().create_task(self._write_frames(pair))

    async def _write_frames(self, pair: int) -> None:
        """Put waiting frames into receive buffers, in order; one without room is dropped."""
        # a reset takes the buffers back (StaleQueueError); _stop() has emptied the inbox then
        with contextlib.suppress(StaleQueueError):
            await self._fill_buffers(pair, self.queue(2 * pair))

    async def _fill_buffers(self, pair: int, receiveq: Queue) -> None:
        path = self._rx[pair]
        while path.inbox:
            frame = path.inbox.popleft()
            if self._has(NetFeature.MRG_RXBUF):
                written = await self._write_merged(receiveq, pair, frame)
            else:
                written = await self._write_one(receiveq, pair, frame)
            if written:
                self.rx_frames += 1
                self.rx_pair_frames[pair] += 1
            else:
                self.rx_dropped += 1

    async def _take(self, receiveq: Queue, pair: int, *, wait: bool) -> DescriptorChain | None:
        """A buffer for pair ``pair``'s frame at hand: one held, else the ring's next. With
        ``wait``, a ring the driver has not refilled yet is waited on until its next
        notification, as QEMU holds a frame while the guest has no buffers
        (virtio_net_has_buffers) rather than drop it: a burst on the link (broadcasts reach
        every port at once) waits for a driver that reads and reposts its buffers, and only
        the bounded inbox behind it overflows. None: no buffer now (without ``wait``), or the
        pair went out of use meanwhile (VQ_PAIRS_SET)."""
        path = self._rx[pair]
        if path.held:
            return path.held.popleft()
        while pair < self.pairs:
            # armed before the look, so that a notification that comes while pop() awaits
            # guest memory (proxied) is not lost
            kicked = path.kicked = asyncio.get_running_loop().create_future()
            chain = await receiveq.pop()
            if chain is not None or not wait:
                return chain
            await kicked
        return None

    async def _write_one(self, receiveq: Queue, pair: int, frame: bytes) -> bool:
        path = self._rx[pair]
        chain = await self._take(receiveq, pair, wait=True)
        if chain is None:
            return False
        data = receive_header(self.header_size) + frame
        if chain.writable_len < len(data):
            # §5.1.6.3.1: without MRG_RXBUF each buffer must hold a whole frame; this one stays
            # for the next, smaller frame (QEMU puts it back in the ring: virtqueue_unpop)
            path.held.appendleft(chain)
            return False
        receiveq.complete(chain, await chain.write(data))
        return True

    async def _write_merged(self, receiveq: Queue, pair: int, frame: bytes) -> bool:
        """MRG_RXBUF (§5.1.6.4): the header and frame across as many buffers as they need,
        each but the last filled completely, all completed in one go. The first is waited for;
        a frame that finds too few after it is dropped (a driver whose ring can never hold it
        must not stall the frames behind it)."""
        path = self._rx[pair]
        hdr = self.header_size
        need, room = hdr + len(frame), 0
        chains: list[DescriptorChain] = []
        while room < need:
            chain = await self._take(receiveq, pair, wait=not chains)
            if chain is None:
                path.held.extendleft(reversed(chains))  # for the next frame, in ring order
                return False
            if not chain.writable_len:
                receiveq.complete(chain, 0)  # nowhere to write: give it back empty
                continue
            chains.append(chain)
            room += chain.writable_len
        data = receive_header(hdr, len(chains)) + frame
        written, at = [], 0
        for chain in chains:
            written.append(await chain.write(data[at : at + chain.writable_len]))
            at += written[-1]
        for chain, length in zip(chains, written, strict=True):
            receiveq.complete(chain, length)  # one loop turn: published together
        return True

    # -- lifecycle ------------------------------------------------------------------------------
    def _stop(self) -> None:
        for path in self._rx:
            path.stop()
        if self.port is not None:
            links.release(self.port)
            self.port = None

    def queue_reset(self, index: int) -> None:
        role, pair = self._role(index)
        if role == "rx":
            self._rx[pair].stop()  # the chains the pump held are the driver's again

    def reset(self) -> None:
        self._stop()
        self.filter = RxFilter()
        self.announcing = False
        self.pairs = 1
        self.steering.clear()
        self.mac = self.default_mac  # QEMU: the MAC set by command lasts until reset

    def close(self) -> None:
        self._stop()
