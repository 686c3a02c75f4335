"""virtio-net (SPEC §5.1): Ethernet frames over receiveq/transmitq pairs, and a controlq.

Every frame either way starts with a ``virtio_net_hdr`` whose size follows the features in
force (:func:`viowire.virtio.net.header_size`: 12 bytes with VERSION_1 or MRG_RXBUF, else 10),
the same rule the device applies. Receive buffers stay posted on every receiveq and each is
posted again once its frame is read: without MRG_RXBUF each holds a whole frame (``mtu`` +
Ethernet header + VLAN tag + virtio header bytes); with it they are Linux's 1518 + header bytes
and a larger frame spans several, which :meth:`NetDriver.frames` joins again by the first
header's ``num_buffers``.

The driver accepts, as offered, MAC, STATUS, MTU, MRG_RXBUF, CTRL_VQ, CTRL_RX, CTRL_RX_EXTRA,
CTRL_MAC_ADDR, GUEST_ANNOUNCE and MQ (never one without the feature it depends on, §5.1.3.1),
and drives an old device that offers none of them as before. When the device asks (status
ANNOUNCE), it announces its MAC (a RARP, as QEMU's) and acknowledges, as Linux does::

    drv = await NetDriver.attach(dev)
    await drv.send(frame)                     # an Ethernet frame, no virtio header
    async for frame in drv.frames():          # the same, as they arrive, from every pair
        ...
    await drv.set_rx_mode(promisc=False, allmulti=True)   # CTRL_RX
    await drv.set_mac(b"\\x02\\x00\\x00\\x00\\x00\\x09")           # CTRL_MAC_ADDR
    await drv.set_mac_table(unicast=[...], multicast=[...])
    await drv.set_queue_pairs(4)              # MQ; then send(frame, queue_pair=3)
    async for up in drv.link_events():        # STATUS: the link now, then each change
        ...

A command the device answers with VIRTIO_NET_ERR raises :class:`NetCommandError`; one whose
feature was not negotiated raises :class:`NetFeatureError` without reaching the device.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Iterable, Sequence
from typing import Any

from viowire.client.drivers.generic import GenericDriver
from viowire.client.errors import VirtioError
from viowire.client.mmio import VirtioMmioDevice
from viowire.client.virtqueue import Virtqueue
from viowire.virtio.constants import Feature, Reg
from viowire.virtio.net import (
    COMMAND_FEATURE,
    DEVICE_ID,
    ETH_HEADER,
    ETH_VLAN_TAG,
    IMPLEMENTED,
    MAX_QUEUE_PAIRS,
    NET_CONFIG,
    VQ_PAIRS,
    Ack,
    CtrlAnnounce,
    CtrlClass,
    CtrlMac,
    CtrlMq,
    CtrlRx,
    NetFeature,
    NetStatus,
    announce_frame,
    ctrl_command,
    ctrl_queue,
    header_size,
    mac_table_data,
    num_buffers,
    parse_mac,
    queue_pairs,
    transmit_header,
    without_orphans,
)

log = logging.getLogger(__name__)

DEFAULT_MTU = 1500  # §5.1.4: without MTU the driver picks its own
RX_BUFFERS = 32
GOOD_PACKET_LEN = ETH_HEADER + ETH_VLAN_TAG + 1500  # Linux's mergeable buffer, less the header


class NetFeatureError(VirtioError):
    """A control command whose feature was not negotiated (the device does not offer it, or
    the driver was told not to accept it)."""

    def __init__(self, device: str, what: str, feature: int) -> None:
        self.feature = feature
        super().__init__(
            device,
            f"{what} needs VIRTIO_NET_F_{NetFeature(feature).name}, which was not negotiated "
            "(the device does not offer it, or exclude_features= left it out)",
            Reg.DEVICE_FEATURES,
        )


class NetCommandError(VirtioError):
    """The device answered a control command with VIRTIO_NET_ERR (or no ack at all)."""

    def __init__(self, device: str, what: str, ack: int) -> None:
        self.ack = ack
        answer = "VIRTIO_NET_ERR" if ack == Ack.ERR else f"ack {ack:#x}"
        super().__init__(
            device, f"the device answered {what} with {answer}: it refused the command"
        )


def _command_name(cls: int, command: int) -> str:
    kinds = {CtrlClass.RX: CtrlRx, CtrlClass.MAC: CtrlMac, CtrlClass.MQ: CtrlMq}
    try:
        klass = CtrlClass(cls)
        return f"VIRTIO_NET_CTRL_{klass.name}_{kinds[klass](command).name}"
    except (ValueError, KeyError):
        return f"control command class {cls} command {command}"


class NetDriver(GenericDriver):
    """A virtio-net device: ``mac``, ``link_up``, ``mtu`` and ``max_pairs`` from its config
    space, ``await send(frame)``, ``async for frame in frames()`` and the control commands."""

    device_id = DEVICE_ID
    feature_table = IMPLEMENTED
    queue_names = ("receiveq0", "transmitq0")
    config_layout = NET_CONFIG

    def __init__(
        self,
        dev: VirtioMmioDevice,
        *,
        rx_buffers: int = RX_BUFFERS,
        rx_buffer_size: int | None = None,
        **opts: Any,
    ) -> None:
        """``rx_buffers``: receive buffers kept posted on each receiveq (at most the queue's
        size); ``rx_buffer_size``: their size (default: a whole frame of the MTU without
        MRG_RXBUF, 1518 + header bytes with it)."""
        super().__init__(dev, **opts)
        self.rx_buffers = rx_buffers
        self.rx_buffer_size = rx_buffer_size
        self.mac = b""
        self.link_up = True
        self.mtu = DEFAULT_MTU
        self.max_pairs = 1  # pairs the device has (max_virtqueue_pairs with MQ)
        self.pairs = 1  # pairs in use (VQ_PAIRS_SET)
        self.rx_errors = 0  # frames with a bad num_buffers, dropped
        self.announce_asked = False  # status.ANNOUNCE, as last read
        self.announcements = 0  # announcements made when the device asked (GUEST_ANNOUNCE)
        self._announcing: asyncio.Task[None] | None = None
        self._ctrl_lock = asyncio.Lock()
        self._streams: dict[int, AsyncIterator[bytes]] = {}
        self._readers: dict[int, asyncio.Task[None]] = {}  # with more than one receiveq
        self._arrivals: asyncio.Queue[bytes | BaseException | None] | None = None
        self._partial: dict[int, tuple[int, list[bytes]]] = {}  # queue -> merged frame so far
        self._rx_locks: dict[int, asyncio.Lock] = {}

    @property
    def header_size(self) -> int:
        """Bytes of virtio_net_hdr before every frame, with the features negotiated."""
        return header_size(self.negotiated_features)

    @property
    def ctrl_queue(self) -> int | None:
        """The controlq's index, or None without CTRL_VQ."""
        return ctrl_queue(self.negotiated_features, self.max_pairs)

    def negotiate(self, offered: int) -> int:
        return without_orphans(super().negotiate(offered))

    async def setup(self) -> None:
        await self.read_config()
        self.max_pairs, self.pairs = 1, 1
        if self.has_feature(NetFeature.MQ):
            pairs = await self.config_read(8, 2)
            # Linux: a value outside 1..0x8000 means one pair
            self.max_pairs = pairs if 1 <= pairs <= MAX_QUEUE_PAIRS else 1
        names = []
        for k in range(queue_pairs(self.negotiated_features, self.max_pairs)):
            names += [f"receiveq{k}", f"transmitq{k}"]
        if self.ctrl_queue is not None:
            names.append("controlq")
        self._sizes, self._names = self._queue_plan(len(names), names)
        await super().setup()

    async def read_config(self) -> None:
        """Re-read mac, status and mtu (each only if its feature bit was negotiated)."""
        if self.has_feature(NetFeature.MAC):
            self.mac = await self.config_bytes(0, 6)
        if self.has_feature(NetFeature.STATUS):
            status = await self.config_read(6, 2)
            self.link_up = bool(status & NetStatus.LINK_UP)
            self.announce_asked = bool(status & NetStatus.ANNOUNCE)
        if self.has_feature(NetFeature.MTU):
            self.mtu = await self.config_read(10, 2)

    async def config_changed(self) -> None:
        await self.read_config()
        asked = self.has_feature(NetFeature.GUEST_ANNOUNCE) and self.announce_asked
        # in a task: the answers to the frame and the command come by interrupts too
        if asked and (self._announcing is None or self._announcing.done()):
            self._announcing = asyncio.get_running_loop().create_task(self._announce())
        await super().config_changed()

    async def _announce(self) -> None:
        """§5.1.6.5.4: announce this MAC (QEMU's RARP, so switches learn where it is), then
        VIRTIO_NET_CTRL_ANNOUNCE_ACK, as Linux's virtnet_config_changed_work."""
        try:
            await self.send(announce_frame(self.mac))
            await self.command(CtrlClass.ANNOUNCE, CtrlAnnounce.ACK)
            self.announcements += 1
        except Exception as exc:  # the device went away or broke: nothing left to announce to
            log.warning("%s: announcing the MAC failed: %s", self.dev.name, exc)

    # -- receive buffers ------------------------------------------------------------------------
    @property
    def receive_queues(self) -> list[int]:
        """receiveq_k's index (2k) for every pair the driver set up."""
        return [2 * k for k in range(len(self.vqs) // 2)]

    def _buffer_size(self) -> int:
        hdr = self.header_size
        if self.rx_buffer_size is not None:
            if self.has_feature(NetFeature.MRG_RXBUF) and self.rx_buffer_size < hdr:
                raise ValueError(
                    f"{self.dev.name}: rx_buffer_size={self.rx_buffer_size}: with MRG_RXBUF "
                    f"each buffer must hold the {hdr}-byte header (§5.1.6.3.1)"
                )
            return self.rx_buffer_size
        if self.has_feature(NetFeature.MRG_RXBUF):
            return hdr + GOOD_PACKET_LEN
        return hdr + ETH_HEADER + ETH_VLAN_TAG + self.mtu

    async def device_ready(self) -> None:
        self._partial.clear()  # a reset took the rest of any frame half read
        if self._receivers:
            await super().device_ready()  # a reinitialise: post them again
            return
        size = self._buffer_size()
        for queue in self.receive_queues:
            await super().post(queue, size, min(self.rx_buffers, self.vqs[queue].num))

    async def post(self, queue: int, size: int, count: int) -> None:
        """The receive queues' buffers are this driver's own (posted when the device went
        live, sized for the MTU): posting there again changes nothing, so tools that post on
        any type's receive queue (``viowire conform``) drive a net device too."""
        if queue in self._receivers:
            return
        await super().post(queue, size, count)

    # -- frames ---------------------------------------------------------------------------------
    async def send(self, frame: bytes | Sequence[bytes], queue_pair: int = 0) -> None:
        """Transmit one Ethernet frame (destination, source, ethertype, payload) on
        transmitq ``queue_pair`` (one of the pairs in use); returns once the device has taken
        it. The header goes in a descriptor of its own, as a legacy device without ANY_LAYOUT
        needs."""
        if not 0 <= queue_pair < self.pairs:
            raise ValueError(
                f"{self.dev.name}: queue_pair={queue_pair}: {self.pairs} pair(s) in use "
                "(set_queue_pairs() enables more, up to max_pairs)"
            )
        data = (
            bytes(frame) if isinstance(frame, bytes | bytearray | memoryview) else b"".join(frame)
        )
        await self.request(2 * queue_pair + 1, out=[transmit_header(self.header_size), data])

    async def frames(self) -> AsyncIterator[bytes]:
        """``async for frame in drv.frames()``: received frames, virtio header stripped, merged
        buffers joined, from every receiveq (each queue's in the order the device returned
        them); ends when the driver detaches. A merged frame half read when the reader stops
        (a timeout, a break) is finished by the next call, not lost."""
        while not self._detached:
            queues = self.receive_queues
            if not queues:
                return
            if len(queues) == 1 and not self._readers:
                frame = await self._read_frame(queues[0])  # one queue: read it here
            else:
                frame = await self._next_arrival(queues)
            if frame is None:
                return
            yield frame

    async def _next_arrival(self, queues: list[int]) -> bytes | None:
        """The next frame of any queue. A reader task per queue takes its frames off the ring
        and hands them over through ``_arrivals``, which holds as many as the rings' buffers
        (a NIC driver's backlog: taking frames in bursts keeps up with a busy link); past that
        the readers wait, the buffers stay used, and the device drops. Nothing read is lost
        between calls."""
        if self._arrivals is None:
            self._arrivals = asyncio.Queue(maxsize=self.rx_buffers * len(queues))
        for queue in queues:
            reader = self._readers.get(queue)
            if reader is None or reader.done():
                self._readers[queue] = asyncio.get_running_loop().create_task(
                    self._reader(queue, self._arrivals)
                )
        item = await self._arrivals.get()
        if isinstance(item, BaseException):
            raise item
        return item

    async def _reader(
        self, queue: int, arrivals: asyncio.Queue[bytes | BaseException | None]
    ) -> None:
        try:
            while (frame := await self._read_frame(queue)) is not None:
                await arrivals.put(frame)
        except Exception as exc:  # the queue stopped (DEVICE_NEEDS_RESET): frames() raises it
            await arrivals.put(exc)
            return
        await arrivals.put(None)  # detached

    def _stream(self, queue: int) -> AsyncIterator[bytes]:
        stream = self._streams.get(queue)
        if stream is None:
            stream = self._streams[queue] = aiter(self.receive(queue))
        return stream

    async def _read_frame(self, queue: int) -> bytes | None:
        """The next whole frame of receiveq ``queue`` (None once detached)."""
        lock = self._rx_locks.setdefault(queue, asyncio.Lock())
        async with lock:
            try:
                return await self._join_buffers(queue, self._stream(queue))
            except BaseException:
                self._streams.pop(queue, None)  # a generator ends with any exception
                raise

    async def _join_buffers(self, queue: int, stream: AsyncIterator[bytes]) -> bytes | None:
        """Read buffers until a frame is whole: with MRG_RXBUF the first header's num_buffers
        says how many (§5.1.6.4). A frame in progress is kept in ``_partial``, looked at anew
        after every wait (a reset forgets it: the next buffer starts a frame)."""
        hdr = self.header_size
        while (buffer := await anext(stream, None)) is not None:
            partial = self._partial.get(queue)
            if partial is not None:
                count, parts = partial
                parts.append(buffer)
                if len(parts) == count:
                    del self._partial[queue]
                    return b"".join(parts)
                continue
            if len(buffer) < hdr:
                self.rx_errors += 1  # Linux: rx_length_errors, the buffer is dropped
                continue
            if not self.has_feature(NetFeature.MRG_RXBUF):
                return buffer[hdr:]
            count = num_buffers(buffer)
            if count < 1:
                self.rx_errors += 1
                log.warning("%s: num_buffers 0 in a header: dropped", self.dev.name)
                continue
            if count == 1:
                return buffer[hdr:]
            self._partial[queue] = (count, [buffer[hdr:]])
        return None

    async def reset_vq(self, queue: int, num: int | None = None) -> Virtqueue:
        self._partial.pop(queue, None)  # the rest of a frame half read is gone with the ring
        return await super().reset_vq(queue, num)

    # -- control commands -----------------------------------------------------------------------
    async def command(self, cls: int, command: int, *data: bytes) -> None:
        """Send one control command (§5.1.6.5): header, each of ``data`` in a descriptor of
        its own, the ack byte; NetCommandError unless the device acks VIRTIO_NET_OK."""
        what = _command_name(cls, command)
        ctrlq = self.ctrl_queue
        if ctrlq is None:
            raise NetFeatureError(self.dev.name, what, NetFeature.CTRL_VQ)
        needs = COMMAND_FEATURE.get((cls, command))
        if needs is not None and not self.has_feature(needs):
            raise NetFeatureError(self.dev.name, what, needs)
        outs = [ctrl_command(cls, command), *(bytes(d) for d in data if d)]
        size = sum(map(len, outs))
        buffer = self.alloc(size + 1)
        try:
            # Linux sets the ack to ~0 first: an ack the device never wrote is not OK
            await self.dev.memory.write(buffer.gpa + size, b"\xff")
            async with self._ctrl_lock:
                used = await self.request(ctrlq, out=outs, in_sizes=1, buffer=buffer)
        finally:
            buffer.free_unless_lent()
        # legacy drivers SHOULD ignore used.len on the controlq (§5.1.6 legacy): read the byte
        ack = used.data[0]
        if ack != Ack.OK:
            raise NetCommandError(self.dev.name, what, ack)

    async def set_rx_mode(
        self,
        promisc: bool | None = None,
        allmulti: bool | None = None,
        *,
        alluni: bool | None = None,
        nomulti: bool | None = None,
        nouni: bool | None = None,
        nobcast: bool | None = None,
    ) -> None:
        """Switch receive modes on or off (each one given; CTRL_RX, and CTRL_RX_EXTRA for the
        keyword-only ones). A device is promiscuous after reset, as QEMU's: turn it off to
        receive only frames to this MAC, the MAC table, broadcast and multicast as set."""
        modes = {
            CtrlRx.PROMISC: promisc,
            CtrlRx.ALLMULTI: allmulti,
            CtrlRx.ALLUNI: alluni,
            CtrlRx.NOMULTI: nomulti,
            CtrlRx.NOUNI: nouni,
            CtrlRx.NOBCAST: nobcast,
        }
        for command, on in modes.items():
            if on is not None:
                await self.command(CtrlClass.RX, command, bytes([bool(on)]))

    async def set_mac(self, mac: bytes | str) -> None:
        """Make ``mac`` the device's address (the one its receive filter accepts):
        VIRTIO_NET_CTRL_MAC_ADDR_SET with CTRL_MAC_ADDR, or, as Linux, by writing ``mac`` in
        config space to a legacy device without it."""
        mac = parse_mac(mac) if isinstance(mac, str) else parse_mac(_mac_text(mac))
        if self.has_feature(NetFeature.CTRL_MAC_ADDR):
            await self.command(CtrlClass.MAC, CtrlMac.ADDR_SET, mac)
        elif self.has_feature(NetFeature.MAC) and not self.has_feature(Feature.VERSION_1):
            for i, octet in enumerate(mac):
                await self.config_write(i, octet, 1)
        else:
            raise NetFeatureError(self.dev.name, "setting the MAC", NetFeature.CTRL_MAC_ADDR)
        self.mac = mac

    async def set_mac_table(
        self, unicast: Iterable[bytes] = (), multicast: Iterable[bytes] = ()
    ) -> None:
        """VIRTIO_NET_CTRL_MAC_TABLE_SET: the addresses received besides the device's own
        (CTRL_RX); each table in a descriptor of its own, as legacy framing wants."""
        uni, multi = [bytes(m) for m in unicast], [bytes(m) for m in multicast]
        for mac in (*uni, *multi):
            if len(mac) != 6:
                raise ValueError(f"{self.dev.name}: {mac.hex()} is not a 6-byte MAC address")
        await self.command(
            CtrlClass.MAC, CtrlMac.TABLE_SET, mac_table_data(uni), mac_table_data(multi)
        )

    async def set_queue_pairs(self, pairs: int) -> None:
        """VIRTIO_NET_CTRL_MQ_VQ_PAIRS_SET (MQ): use ``pairs`` receiveq/transmitq pairs, 1 to
        ``max_pairs``; frames() reads every receiveq in any case."""
        if not 1 <= pairs <= self.max_pairs:
            raise ValueError(
                f"{self.dev.name}: set_queue_pairs({pairs}): the device has 1..{self.max_pairs}"
            )
        await self.command(CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET, VQ_PAIRS.pack(pairs))
        self.pairs = pairs

    # -- link state -----------------------------------------------------------------------------
    async def link_events(self) -> AsyncIterator[bool]:
        """``async for up in drv.link_events()``: the link state now, then each change that a
        configuration change notification brings (STATUS's LINK_UP); a change undone before it
        was read is not seen. Ends when the driver detaches."""
        if not self.has_feature(NetFeature.STATUS):
            raise NetFeatureError(self.dev.name, "watching the link", NetFeature.STATUS)
        seen = self._config_seq
        last = bool(await self.config_read(6, 2) & NetStatus.LINK_UP)
        yield last
        while not self._detached:
            if self._config_seq == seen:
                await self._config_signal.wait()
                continue
            seen = self._config_seq
            up = bool(await self.config_read(6, 2) & NetStatus.LINK_UP)
            if up != last:
                last = up
                yield up

    async def detach(self) -> None:
        await super().detach()
        if self._announcing is not None:
            self._announcing.cancel()
        for task in self._readers.values():
            task.cancel()
        self._readers.clear()
        self._streams.clear()


def _mac_text(mac: bytes) -> str:
    if len(mac) != 6:
        raise ValueError(f"{bytes(mac).hex()} is not a 6-byte MAC address")
    return ":".join(f"{b:02x}" for b in mac)
