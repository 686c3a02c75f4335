"""virtio-net's features end to end, Version 1 and Version 2 devices, over a real server (Unix
socket): MRG_RXBUF, the control queue (CTRL_RX filter, MAC table, MAC_ADDR_SET, MQ), STATUS
at runtime, and the transmit header's checks.

Spec numbers are written out here (feature bits, command classes, ack values) rather than taken
from viowire.virtio.net, as an independent check.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct

import pytest
from servers import running_server, url_of
from test_net import BROADCAST, TIMEOUT, Session, frame, next_frame, wait_until

from viowire.client.connection import connect
from viowire.client.drivers.net import NetCommandError, NetDriver, NetFeatureError
from viowire.server import link as links
from viowire.server.platform import DeviceSpec, PlatformSpec
from viowire.virtio.constants import Status

LINK = "netfeatures"
PLAIN, MQ, BIG = 0, 1, 2  # the platform's slots, per version below
SLOTS = 3
VERSIONS = [2, 1]

# feature bits (§5.1.3)
MRG_RXBUF, STATUS, CTRL_VQ, CTRL_RX, CTRL_RX_EXTRA, MQ_BIT, CTRL_MAC_ADDR = (
    15,
    16,
    17,
    18,
    20,
    22,
    23,
)
OK, ERR = 0, 1  # ack (§5.1.6.5)
RX, MAC, MQ_CLASS = 0, 1, 4  # classes
GROUP = bytes.fromhex("01005e000001")
GROUP2 = bytes.fromhex("01005e000002")
STRANGER = bytes.fromhex("02aaaaaaaaaa")


def net_platform() -> PlatformSpec:
    specs = []
    for version in VERSIONS:
        v = f",version={version}"
        specs += [
            DeviceSpec.parse(f"net,link={LINK}{v}"),
            DeviceSpec.parse(f"net,link={LINK},queues=4{v}"),
            DeviceSpec.parse(f"net,link={LINK},mtu=9000{v}"),
        ]
    return PlatformSpec(specs)


def slot(version: int, kind: int) -> int:
    return VERSIONS.index(version) * SLOTS + kind


@pytest.fixture
async def server(tmp_path):
    async with running_server(tmp_path, net_platform()) as server:
        yield server


@pytest.fixture
async def sessions(tmp_path):
    async with (
        running_server(tmp_path, net_platform()) as server,
        contextlib.AsyncExitStack() as stack,
    ):

        async def new() -> Session:
            return await Session(server, stack).open()

        yield new
    links.link(LINK).set_up(True)  # a test that took it down and failed leaves it up again


@pytest.fixture(params=VERSIONS, ids=lambda v: f"v{v}")
def version(request) -> int:
    return request.param


async def pair(sessions, version: int, kind: int = PLAIN, **opts):
    """Two drivers in two sessions on the link: the one under test (of ``version``) and a
    modern peer; the peer's device, and the one under test's."""
    st, sp = await sessions(), await sessions()
    drv = await st.attach(slot(version, kind), **opts)
    peer = await sp.attach(slot(2, PLAIN))
    return drv, peer, st.device(slot(version, kind)), sp.device(slot(2, PLAIN))


async def expect_only(drv: NetDriver, wanted: bytes, sender: NetDriver) -> None:
    """The next frame ``drv`` receives is ``wanted``: what was sent before it was filtered."""
    await sender.send(wanted)
    assert await next_frame(drv) == wanted


async def raw_command(drv: NetDriver, cls: int, cmd: int, data: bytes = b"") -> int:
    """A control command as bytes, past the driver's own checks; the ack byte."""
    async with asyncio.timeout(TIMEOUT):
        used = await drv.request(drv.ctrl_queue, out=[bytes([cls, cmd]), data], in_sizes=1)
    return used.data[0]


# -- negotiation ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind, pairs, ctrlq", [(PLAIN, 1, 2), (MQ, 4, 8)])
async def test_negotiates_what_is_offered(sessions, version, kind, pairs, ctrlq):
    drv, _, dev, _ = await pair(sessions, version, kind)
    for bit in (MRG_RXBUF, STATUS, CTRL_VQ, CTRL_RX, CTRL_RX_EXTRA, CTRL_MAC_ADDR):
        assert drv.has_feature(bit), bit
    assert drv.has_feature(MQ_BIT) == (pairs > 1)
    assert drv.header_size == 12  # MRG_RXBUF: 12 bytes for legacy too (§5.1.6)
    assert (drv.max_pairs, drv.pairs, drv.ctrl_queue) == (pairs, 1, ctrlq)
    assert len(drv.vqs) == 2 * pairs + 1
    assert dev.transport.negotiated_features == drv.negotiated_features


async def test_old_driver_without_control_queue_works(sessions, version):
    """A driver that knows nothing past MAC/STATUS/MTU (as before): two queues, 10-byte legacy
    header, frames both ways; commands refused before they reach the device."""
    exclude = 1 << MRG_RXBUF | 1 << CTRL_VQ
    drv, peer, dev, _ = await pair(sessions, version, MQ, exclude_features=exclude)
    assert not drv.has_feature(CTRL_RX) and not drv.has_feature(MQ_BIT)  # orphans dropped
    assert len(drv.vqs) == 2 and drv.ctrl_queue is None
    assert drv.header_size == (10 if version == 1 else 12)
    await drv.send(frame(BROADCAST, drv.mac, b"old"))
    assert await next_frame(peer) == frame(BROADCAST, drv.mac, b"old")
    await peer.send(frame(drv.mac, peer.mac, b"back"))
    assert await next_frame(drv) == frame(drv.mac, peer.mac, b"back")
    with pytest.raises(NetFeatureError, match="CTRL_VQ"):
        await drv.set_rx_mode(promisc=False)
    assert dev.ctrl_ok == dev.ctrl_err == 0


# -- MRG_RXBUF --------------------------------------------------------------------------------


async def test_mergeable_frame_spans_buffers(sessions, version):
    """§5.1.6.4: num_buffers in the first header, every buffer but the last filled, all used
    together; frames() joins them."""
    drv, peer, dev, _ = await pair(sessions, version, rx_buffer_size=64)
    big = frame(drv.mac, peer.mac, bytes(range(256)) * 2)  # 526 bytes + 12 = 538: 9 buffers
    await peer.send(big)
    async with asyncio.timeout(TIMEOUT):
        stream = drv.receive(0)
        first = await anext(stream)
        (count,) = struct.unpack_from("<H", first, 10)
        rest = [await anext(stream) for _ in range(count - 1)]
    assert count == -(-(12 + len(big)) // 64) == 9
    assert [len(b) for b in [first, *rest]] == [64] * 8 + [538 - 8 * 64]
    assert first[:10] == bytes(10) and first[12:] + b"".join(rest) == big
    await peer.send(big)
    assert await next_frame(drv) == big  # reassembled by the driver
    assert dev.rx_frames == 2 and drv.rx_errors == 0


async def test_mergeable_jumbo_frames_with_default_buffers(sessions, version):
    """An MTU of 9000 and Linux-sized (1530-byte) buffers: a jumbo frame takes several."""
    st, sp = await sessions(), await sessions()
    a = await st.attach(slot(version, BIG))
    b = await sp.attach(slot(2, BIG))
    jumbo = frame(b.mac, a.mac, bytes(9000))
    await a.send(jumbo)
    assert await next_frame(b) == jumbo
    await b.send(frame(a.mac, b.mac, b"x" * 9000))
    assert await next_frame(a) == frame(a.mac, b.mac, b"x" * 9000)


async def test_frame_too_big_without_mergeable_is_dropped(sessions, version):
    """Without MRG_RXBUF a frame must fit one buffer: one that does not is dropped and counted,
    nothing written, and the buffer takes the next frame that fits."""
    drv, peer, dev, _ = await pair(
        sessions, version, exclude_features=1 << MRG_RXBUF, rx_buffer_size=100, rx_buffers=1
    )
    await peer.send(frame(drv.mac, peer.mac, bytes(120)))  # 134 + header > 100
    await wait_until(lambda: dev.rx_dropped == 1)
    small = frame(drv.mac, peer.mac, b"fits")
    await peer.send(small)
    async with asyncio.timeout(TIMEOUT):
        raw = await anext(drv.receive(0))
    assert raw[drv.header_size :] == small  # the one buffer, untouched by the big frame
    assert (dev.rx_frames, dev.rx_dropped) == (1, 1)
    assert not dev.transport.status & Status.DEVICE_NEEDS_RESET


async def test_mergeable_frame_without_enough_buffers_is_dropped_buffers_kept(sessions, version):
    drv, peer, dev, _ = await pair(sessions, version, rx_buffer_size=64, rx_buffers=4)
    await peer.send(frame(drv.mac, peer.mac, bytes(300)))  # needs 6 buffers of 64
    await wait_until(lambda: dev.rx_dropped == 1)
    fits = frame(drv.mac, peer.mac, bytes(100))  # 126 bytes: 2 buffers
    await peer.send(fits)
    assert await next_frame(drv) == fits
    assert (dev.rx_frames, dev.rx_dropped) == (1, 1)


# -- control queue: receive filter, MAC --------------------------------------------------------


async def test_rx_modes_and_mac_table_filter(sessions, version):
    drv, peer, dev, _ = await pair(sessions, version)
    mine, hello = frame(drv.mac, peer.mac, b"mine"), frame(BROADCAST, peer.mac, b"hi")
    await peer.send(frame(STRANGER, peer.mac, b"promisc"))  # promiscuous after reset (QEMU)
    assert await next_frame(drv) == frame(STRANGER, peer.mac, b"promisc")

    await drv.set_rx_mode(promisc=False)
    for filtered in (frame(STRANGER, peer.mac), frame(GROUP, peer.mac)):
        await peer.send(filtered)
    await expect_only(drv, mine, peer)
    await expect_only(drv, hello, peer)
    assert dev.rx_filtered == 2

    await drv.set_rx_mode(allmulti=True)
    await expect_only(drv, frame(GROUP, peer.mac, b"all multicast"), peer)
    await drv.set_rx_mode(allmulti=False)
    await drv.set_mac_table(unicast=[STRANGER], multicast=[GROUP2])
    await peer.send(frame(GROUP, peer.mac))  # not in the table
    await expect_only(drv, frame(GROUP2, peer.mac, b"table"), peer)
    await expect_only(drv, frame(STRANGER, peer.mac, b"table"), peer)
    await drv.set_mac_table()  # empty: the table is gone
    await peer.send(frame(STRANGER, peer.mac))

    await drv.set_rx_mode(alluni=True, nobcast=True)  # CTRL_RX_EXTRA
    await peer.send(hello)
    await expect_only(drv, frame(STRANGER, peer.mac, b"all unicast"), peer)
    await drv.set_rx_mode(nouni=True, allmulti=True, nomulti=True)
    await peer.send(mine)
    await peer.send(frame(GROUP, peer.mac))
    await drv.set_rx_mode(promisc=True)  # over every other mode (§5.1.6.5.1)
    await expect_only(drv, frame(GROUP, peer.mac, b"promisc again"), peer)
    assert dev.rx_filtered == 2 + 1 + 1 + 1 + 2
    assert dev.ctrl_err == 0


async def test_set_mac_moves_the_filter_and_config(sessions, version):
    drv, peer, dev, _ = await pair(sessions, version)
    old, new = drv.mac, bytes.fromhex("020000abcdef")
    await drv.set_rx_mode(promisc=False)
    await drv.set_mac(new)
    assert await drv.config_bytes(0, 6) == new == dev.mac  # config space follows (§5.1.6.5.2)
    await peer.send(frame(old, peer.mac))
    await expect_only(drv, frame(new, peer.mac, b"new"), peer)
    await drv.reinitialise()  # a reset: the configured MAC again, promiscuous again
    assert drv.mac == old == dev.mac and dev.filter.promisc


async def test_legacy_driver_without_ctrl_mac_addr_writes_config(sessions):
    drv, _, dev, _ = await pair(sessions, 1, exclude_features=1 << CTRL_MAC_ADDR)
    await drv.set_mac("02:00:00:00:12:34")
    assert await drv.config_bytes(0, 6) == bytes.fromhex("020000001234") == dev.mac


async def test_modern_driver_without_ctrl_mac_addr_cannot_set_mac(sessions):
    drv, _, dev, _ = await pair(sessions, 2, exclude_features=1 << CTRL_MAC_ADDR)
    with pytest.raises(NetFeatureError, match="CTRL_MAC_ADDR"):
        await drv.set_mac("02:00:00:00:12:34")
    assert dev.mac == drv.mac


# -- control queue: bad commands --------------------------------------------------------------


BAD_COMMANDS = [
    (9, 0, b"\x01"),  # no such class
    (RX, 9, b"\x01"),  # no such command
    (RX, 0, b""),  # PROMISC without its byte
    (RX, 0, b"\x01\x00"),  # two bytes
    (RX, 0, b"\x02"),  # neither 0 nor 1
    (MAC, 1, bytes(5)),  # ADDR_SET of 5 bytes
    (MAC, 1, GROUP),  # a multicast MAC for the device
    (MAC, 0, struct.pack("<I", 2) + STRANGER + struct.pack("<I", 0)),  # 2 entries, 1 given
    (MAC, 0, struct.pack("<I", 0) + struct.pack("<I", 1) + GROUP + b"!"),  # bytes after
    (MAC, 0, struct.pack("<I", 0)),  # no multicast table
    (MQ_CLASS, 0, struct.pack("<H", 2)),  # MQ not negotiated
    (2, 0, struct.pack("<H", 1)),  # VLAN: not offered
    (3, 0, b""),  # ANNOUNCE_ACK, but no announcement was asked for
    (MAC, 0, struct.pack("<I", 11000) + bytes(66000) + struct.pack("<I", 0)),  # > 64 KiB
]


@pytest.mark.parametrize("cls, cmd, data", BAD_COMMANDS)
async def test_bad_command_gets_err_and_changes_nothing(sessions, version, cls, cmd, data):
    drv, peer, dev, _ = await pair(sessions, version)
    assert await raw_command(drv, cls, cmd, data) == ERR
    assert dev.filter.promisc and dev.mac == drv.mac and dev.filter.unicast == []
    await drv.set_rx_mode(promisc=False)  # the queue still answers
    await expect_only(drv, frame(drv.mac, peer.mac), peer)
    assert (dev.ctrl_err, dev.ctrl_ok) == (1, 1)
    assert not dev.transport.status & Status.DEVICE_NEEDS_RESET


@pytest.mark.parametrize("data", [struct.pack("<H", 0), struct.pack("<H", 5), b"\x02"])
async def test_bad_queue_pairs_get_err(sessions, version, data):
    drv, _, dev, _ = await pair(sessions, version, MQ)
    assert await raw_command(drv, MQ_CLASS, 0, data) == ERR
    assert dev.pairs == 1
    with pytest.raises(ValueError, match=r"1\.\.4"):
        await drv.set_queue_pairs(5)


async def test_command_of_a_feature_not_negotiated_gets_err(sessions, version):
    drv, _, dev, _ = await pair(sessions, version, exclude_features=1 << CTRL_RX_EXTRA)
    assert await raw_command(drv, RX, 2, b"\x01") == ERR  # ALLUNI needs CTRL_RX_EXTRA
    assert not dev.filter.alluni
    with pytest.raises(NetFeatureError, match="CTRL_RX_EXTRA"):
        await drv.set_rx_mode(alluni=True)


async def test_driver_raises_on_err(sessions, version):
    drv, *_ = await pair(sessions, version)
    with pytest.raises(NetCommandError, match="VIRTIO_NET_CTRL_MAC_ADDR_SET with VIRTIO_NET_ERR"):
        await drv.command(MAC, 1, bytes(5))


@pytest.mark.parametrize(
    "out, in_sizes",
    [([b"\x00\x00", b"\x01"], 0), ([b"\x00"], 1), ([], 1)],
    ids=["no-ack-byte", "one-byte-header", "nothing-readable"],
)
async def test_malformed_control_chain_needs_reset_others_keep_working(
    sessions, version, out, in_sizes
):
    """§5.1.6.5: class, command and an ack byte are the least a command has; without them the
    device stops (DEVICE_NEEDS_RESET, QEMU's virtio_error), its neighbours do not."""
    st, so = await sessions(), await sessions()
    drv = await st.attach(slot(version, PLAIN))
    same_session = await st.attach(slot(version, MQ))
    other = await so.attach(slot(version, PLAIN))
    dev = st.device(slot(version, PLAIN))
    request = asyncio.ensure_future(drv.request(drv.ctrl_queue, out=out, in_sizes=in_sizes))
    try:
        await wait_until(lambda: dev.transport.status & Status.DEVICE_NEEDS_RESET)
        if version == 2:  # a legacy driver cannot see DEVICE_NEEDS_RESET: its request waits
            with pytest.raises(Exception, match=r"needs reset|NEEDS_RESET"):
                async with asyncio.timeout(TIMEOUT):
                    await request
    finally:
        request.cancel()
        with contextlib.suppress(BaseException):
            await request
    for sender, receiver in ((same_session, other), (other, same_session)):
        out_frame = frame(BROADCAST, sender.mac, b"still here")
        await sender.send(out_frame)
        assert await next_frame(receiver) == out_frame
    await same_session.set_rx_mode(promisc=False)
    await drv.reinitialise()  # the device recovers with a reset
    await drv.set_rx_mode(promisc=False)


# -- MQ ---------------------------------------------------------------------------------------


def flow(dst: bytes, src: bytes, n: int) -> bytes:
    """An IPv4/UDP frame of flow ``n`` (its source port)."""
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0, 10, 203, 0, 1, 10, 203, 0, 2])
    udp = struct.pack(">HHHH", 1000 + n, 53, 8, 0)
    return dst + src + b"\x08\x00" + ip + udp


def reply(frame_: bytes) -> bytes:
    """The same flow the other way: MACs, addresses and ports swapped."""
    ip = bytearray(frame_[14:34])
    ip[12:16], ip[16:20] = frame_[30:34], frame_[26:30]
    udp = frame_[36:38] + frame_[34:36] + frame_[38:42]
    return frame_[6:12] + frame_[0:6] + b"\x08\x00" + bytes(ip) + udp


async def test_queue_pairs_spread_and_steer(sessions, version):
    drv, peer, dev, _ = await pair(sessions, version, MQ)
    flows = [flow(drv.mac, peer.mac, n) for n in range(32)]
    for f in flows:
        await peer.send(f)
    got = [await next_frame(drv) for _ in flows]
    assert dev.rx_pair_frames == [32, 0, 0, 0]  # §5.1.6.5.5: receiveq0 only until the command
    assert sorted(got) == sorted(flows)

    await drv.set_queue_pairs(4)
    assert dev.pairs == drv.pairs == 4
    for f in flows:
        await peer.send(f)
    got = [await next_frame(drv) for _ in flows]
    assert sorted(got) == sorted(flows)
    spread = [n - 32 * (k == 0) for k, n in enumerate(dev.rx_pair_frames)]
    assert sum(spread) == 32 and sum(1 for n in spread if n) > 1  # by a hash of the flow

    # a flow the driver sent on pair 3 comes back on receiveq3
    before = list(dev.rx_pair_frames)
    mine = reply(flows[0])
    await drv.send(mine, queue_pair=3)
    assert await next_frame(peer) == mine
    await peer.send(flows[0])
    assert await next_frame(drv) == flows[0]
    assert dev.rx_pair_frames[3] == before[3] + 1

    await drv.set_queue_pairs(1)
    with pytest.raises(ValueError, match="1 pair"):
        await drv.send(mine, queue_pair=3)
    before = list(dev.rx_pair_frames)
    for f in flows[:8]:
        await peer.send(f)
    assert sorted([await next_frame(drv) for _ in range(8)]) == sorted(flows[:8])
    assert dev.rx_pair_frames[0] == before[0] + 8 and dev.rx_pair_frames[1:] == before[1:]
    await drv.reinitialise()
    assert dev.pairs == drv.pairs == 1


async def test_mq_driver_without_mq_uses_queue_2_for_control(sessions, version):
    drv, _, dev, _ = await pair(sessions, version, MQ, exclude_features=1 << MQ_BIT)
    assert (drv.max_pairs, drv.ctrl_queue, len(drv.vqs)) == (1, 2, 3)
    await drv.set_rx_mode(promisc=False)
    assert not dev.filter.promisc
    with pytest.raises(NetFeatureError, match="MQ"):
        await drv.set_queue_pairs(1)


# -- STATUS -----------------------------------------------------------------------------------


async def test_link_down_and_up_at_runtime(sessions, version):
    drv, peer, dev, _ = await pair(sessions, version)
    events = drv.link_events()
    async with asyncio.timeout(TIMEOUT):
        assert await anext(events) is True
        dev.set_link(False)
        assert await anext(events) is False
    assert not drv.link_up
    await peer.send(frame(drv.mac, peer.mac, b"lost"))
    await drv.send(frame(peer.mac, drv.mac, b"lost too"))
    assert (dev.rx_dropped, dev.tx_dropped, dev.rx_frames, dev.tx_frames) == (1, 1, 0, 0)
    async with asyncio.timeout(TIMEOUT):
        dev.set_link(True)
        assert await anext(events) is True
    await expect_only(drv, frame(drv.mac, peer.mac, b"back"), peer)
    await drv.send(frame(peer.mac, drv.mac, b"me too"))
    assert await next_frame(peer) == frame(peer.mac, drv.mac, b"me too")


async def test_link_state_of_the_whole_link(sessions, version):
    """Link.set_up(False) is a cable pulled on every port: each device's LINK_UP goes, each
    driver hears, nothing crosses; up again, all of it comes back."""
    drv, peer, dev, peer_dev = await pair(sessions, version)
    mine, theirs = drv.link_events(), peer.link_events()
    async with asyncio.timeout(TIMEOUT):
        assert await anext(mine) is True and await anext(theirs) is True
        links.link(LINK).set_up(False)
        assert await anext(mine) is False and await anext(theirs) is False
    await peer.send(frame(BROADCAST, peer.mac))
    assert peer_dev.tx_dropped == 1 and dev.rx_frames == 0
    async with asyncio.timeout(TIMEOUT):
        links.link(LINK).set_up(True)
        assert await anext(mine) is True and await anext(theirs) is True
    await expect_only(drv, frame(BROADCAST, peer.mac, b"up"), peer)


async def test_link_events_need_status(sessions, version):
    drv, *_ = await pair(sessions, version, exclude_features=1 << STATUS)
    with pytest.raises(NetFeatureError, match="STATUS"):
        await anext(drv.link_events())


# -- GUEST_ANNOUNCE ---------------------------------------------------------------------------

GUEST_ANNOUNCE = 21
RARP = b"\x80\x35"


def is_rarp_of(got: bytes, mac: bytes) -> bool:
    """A broadcast RARP request for ``mac`` (RFC 903), as QEMU's self-announce, 60 bytes."""
    arp = bytes.fromhex("0001080006040003")  # Ethernet, IPv4, 6, 4, reverse request
    return (
        got[:14] == BROADCAST + mac + RARP
        and got[14:22] == arp
        and got[22:28] == mac
        and got[32:38] == mac
        and len(got) == 60
    )


async def test_device_asks_the_driver_to_announce(sessions, version):
    """§5.1.6.5.4: status.ANNOUNCE and a config change; the driver announces and acks, the
    device clears the bit."""
    drv, peer, dev, _ = await pair(sessions, version)
    assert drv.has_feature(GUEST_ANNOUNCE)
    dev.announce()
    assert is_rarp_of(await next_frame(peer), drv.mac)
    await wait_until(lambda: not dev.announcing and drv.announcements == 1)
    assert dev.ctrl_ok == 1 and not await drv.config_read(6, 2) & 2
    assert await raw_command(drv, 3, 0) == ERR  # an ack of nothing asked: ERR, as QEMU's


async def test_device_announces_itself_for_a_driver_without_guest_announce(sessions, version):
    drv, peer, dev, _ = await pair(sessions, version, exclude_features=1 << GUEST_ANNOUNCE)
    dev.announce()
    assert is_rarp_of(await next_frame(peer), drv.mac)
    assert not dev.announcing and drv.announcements == 0


# -- transmit header --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "flags, gso_type, error",
    [(1, 0, True), (0, 1, True), (0, 4, True), (0, 3, True), (0, 0x81, True), (2, 0, False)],
    ids=["needs-csum", "tso4", "tso6", "ufo", "ecn", "data-valid-ignored"],
)
async def test_offload_not_negotiated_is_a_tx_error(sessions, version, flags, gso_type, error):
    """§5.1.6.2: offloads stay off; a header asking for one is dropped as a tx error (Linux's
    tap refuses it too), a flag the device does not act on is ignored (§5.1.6.2.2)."""
    drv, peer, dev, _ = await pair(sessions, version)
    header = bytes([flags, gso_type]) + bytes(drv.header_size - 2)
    sent = frame(peer.mac, drv.mac, b"offload?")
    async with asyncio.timeout(TIMEOUT):
        await drv.request(1, out=[header, sent])
    after = frame(peer.mac, drv.mac, b"plain")
    await drv.send(after)
    assert await next_frame(peer) == (after if error else sent)
    assert (dev.tx_errors, dev.tx_frames) == ((1, 1) if error else (0, 2))
    assert not dev.transport.status & Status.DEVICE_NEEDS_RESET


# -- proxied guest memory -----------------------------------------------------------------------


async def test_merged_frames_and_commands_over_proxied_memory(server, version):
    """The device's writes of merged buffers and its command reads go through the wire."""
    async with contextlib.AsyncExitStack() as stack:
        drivers = []
        for kind in (version, 2):
            conn = await stack.enter_async_context(
                await connect(url_of(server, "tcp"), memory="proxied")
            )
            infos = [d for d in await conn.platform() if d.device_id == 1]
            drv = await NetDriver.attach(
                await conn.attach(infos[slot(kind, MQ)]), rx_buffer_size=100
            )
            stack.push_async_callback(drv.detach)
            drivers.append(drv)
        drv, peer = drivers
        await drv.set_rx_mode(promisc=False)
        await drv.set_queue_pairs(4)
        assert await raw_command(drv, MAC, 1, bytes(5)) == ERR
        big = frame(drv.mac, peer.mac, bytes(range(250)) * 2)
        await peer.send(big)
        assert await next_frame(drv) == big
        await peer.send(frame(STRANGER, peer.mac))
        await expect_only(drv, frame(drv.mac, peer.mac, b"after"), peer)


# -- virtqueue reset ----------------------------------------------------------------------------


async def test_receive_queue_reset_forgets_held_buffers(sessions):
    """§2.6.1: after receiveq0 is reset the device holds none of its old buffers (a merged
    frame that found too few left some held); frames go to the new ring's."""
    drv, peer, dev, _ = await pair(sessions, 2, rx_buffer_size=64, rx_buffers=4)
    await peer.send(frame(drv.mac, peer.mac, bytes(300)))  # 6 buffers needed, 4 held
    await wait_until(lambda: dev.rx_dropped == 1)
    assert len(dev._rx[0].held) == 4
    await drv.reset_vq(0)
    await drv.config()  # a round trip: the reset is done
    assert len(dev._rx[0].held) == 0
    fits = frame(drv.mac, peer.mac, b"new ring")
    await peer.send(fits)
    assert await next_frame(drv) == fits
    assert not dev.transport.status & Status.DEVICE_NEEDS_RESET
