"""virtio-net (issue 10, first slice): the learning switch on its own, then net devices of
different client sessions on one real server (Unix socket) talking over in-server links.

Header sizes are the spec's numbers (§5.1.6: 10 bytes legacy without MRG_RXBUF, 12 with
VERSION_1), written out here rather than taken from viowire.virtio.net, as an independent check.
"""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from servers import running_server, url_of

from viowire.client.connection import connect
from viowire.client.drivers.net import NetDriver
from viowire.client.errors import DeviceNeedsResetError
from viowire.server.link import Link
from viowire.server.platform import DeviceSpec, PlatformSpec
from viowire.virtio.constants import Status

TIMEOUT = 5.0
NET = 1  # §5: virtio-net's device ID
LAN, LAN_LEGACY, OTHER = 0, 1, 2  # slots of the platform below

A, B, C = (
    bytes.fromhex("020000000001"),
    bytes.fromhex("020000000002"),
    bytes.fromhex("020000000003"),
)
BROADCAST = b"\xff" * 6
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental


def frame(dst: bytes, src: bytes, payload: bytes = b"hello") -> bytes:
    return dst + src + ETHERTYPE + payload


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def switch(**kw):
    link = Link("test", **kw)
    got: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}
    ports = {name: link.attach(name, got[name].append) for name in got}
    return link, ports, got


def test_switch_floods_broadcast_never_back_to_sender():
    _, ports, got = switch()
    ports["a"].send(frame(BROADCAST, A))
    assert got == {"a": [], "b": [frame(BROADCAST, A)], "c": [frame(BROADCAST, A)]}


def test_switch_learns_and_forwards_unicast_to_one_port():
    link, ports, got = switch()
    ports["a"].send(frame(BROADCAST, A))
    ports["b"].send(frame(A, B, b"reply"))
    assert got["a"] == [frame(A, B, b"reply")]
    assert got["c"] == [frame(BROADCAST, A)]  # the broadcast only, not the reply
    assert link.forwarded == 1


def test_switch_floods_unknown_unicast_and_multicast():
    _, ports, got = switch()
    ports["a"].send(frame(C, A))
    group = bytes.fromhex("01005e000001")
    ports["a"].send(frame(group, A))
    assert got["b"] == got["c"] == [frame(C, A), frame(group, A)]


def test_switch_filters_frame_for_senders_own_side():
    link, ports, got = switch()
    ports["a"].send(frame(BROADCAST, A))
    ports["a"].send(frame(A, A))
    assert got["a"] == [] and len(got["b"]) == 1 and link.filtered == 1


def test_switch_ages_out_learned_macs():
    clock = Clock()
    _, ports, got = switch(clock=clock, aging=300.0)
    ports["a"].send(frame(BROADCAST, A))
    clock.now = 299.0
    ports["b"].send(frame(A, B))
    assert got["c"] == [frame(BROADCAST, A)]  # still learned: unicast to a only
    clock.now = 299.0 + 300.0  # a silent for 300 s since its last frame
    ports["b"].send(frame(A, B, b"again"))
    assert got["c"][-1] == frame(A, B, b"again")  # aged out: flooded


def test_switch_detach_forgets_port_and_its_macs():
    link, ports, got = switch()
    ports["a"].send(frame(BROADCAST, A))
    ports["a"].detach()
    ports["b"].send(frame(A, B))
    assert got["a"] == [] and got["c"] == [frame(BROADCAST, A), frame(A, B)]
    assert A not in link.table


def test_switch_table_is_bounded_and_never_learns_group_sources():
    link, ports, _ = switch(max_entries=2)
    for i in range(10):
        ports["a"].send(frame(BROADCAST, bytes([2, 0, 0, 0, 1, i])))
    ports["a"].send(frame(BROADCAST, bytes.fromhex("010000000009")))
    assert len(link.table) == 2
    assert bytes.fromhex("010000000009") not in link.table


def test_switch_drops_runt_frames():
    _, ports, got = switch()
    ports["a"].send(BROADCAST + A)  # 12 bytes: no ethertype
    assert got == {"a": [], "b": [], "c": []}


# -- end to end: sessions of one real server on a Unix socket ----------------------------------


def net_platform() -> PlatformSpec:
    return PlatformSpec(
        [
            DeviceSpec.parse("net,link=lan"),
            DeviceSpec.parse("net,link=lan,version=1"),
            DeviceSpec.parse("net,link=other"),
        ]
    )


@pytest.fixture
async def server(tmp_path):
    async with running_server(tmp_path, net_platform()) as srv:
        yield srv


class Session:
    """One client connection: its own net devices, attached by slot."""

    def __init__(self, server, stack: contextlib.AsyncExitStack) -> None:
        self.server, self.stack = server, stack
        self.conn = None

    async def open(self) -> Session:
        self.conn = await self.stack.enter_async_context(await connect(url_of(self.server, "unix")))
        return self

    async def attach(self, slot: int, **opts) -> NetDriver:
        infos = [d for d in await self.conn.platform() if d.device_id == NET]
        drv = await NetDriver.attach(await self.conn.attach(infos[slot]), **opts)
        await drv.config()  # a round trip: the server has seen the driver's kick by now
        return drv

    def device(self, slot: int):
        """The server-side device in this session's slot."""
        session = next(s for s in self.server.sessions if s.session_id == self.conn.session_id)
        return session.platform.slots[slot].device.backend


@pytest.fixture
async def sessions(server):
    async with contextlib.AsyncExitStack() as stack:

        async def new() -> Session:
            return await Session(server, stack).open()

        yield new


async def next_frame(drv: NetDriver) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        return await anext(drv.frames())


async def wait_until(predicate) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not predicate():
            await asyncio.sleep(0.001)


async def test_config_offers_mac_link_up_and_mtu(sessions):
    a, b = await (await sessions()).attach(LAN), await (await sessions()).attach(LAN)
    assert a.link_up and a.mtu == 1500
    assert a.mac[0] & 0x03 == 0x02  # locally administered, unicast
    assert a.mac != b.mac


async def test_broadcast_reply_isolation_and_flood(sessions):
    sa, sb, sc = await sessions(), await sessions(), await sessions()
    a, b, c = await sa.attach(LAN), await sb.attach(LAN), await sc.attach(LAN)
    far = await sc.attach(OTHER)  # the same session, another link
    hello = frame(BROADCAST, a.mac, b"who is there?")
    await a.send(hello)
    assert await next_frame(b) == hello
    assert await next_frame(c) == hello
    reply = frame(a.mac, b.mac, b"b is")
    await b.send(reply)
    assert await next_frame(a) == reply
    # c's next frame is the flood below, not b's reply: the reply went to a alone
    unknown = frame(bytes.fromhex("02aaaaaaaaaa"), a.mac, b"anyone?")
    await a.send(unknown)
    assert await next_frame(b) == unknown
    assert await next_frame(c) == unknown
    assert sc.device(OTHER).rx_frames == 0 and sc.device(OTHER).rx_dropped == 0
    assert far.link_up


MRG_RXBUF = 1 << 15  # §5.1.3


@pytest.mark.parametrize(
    "version, exclude, header", [(1, MRG_RXBUF, 10), (1, 0, 12), (2, MRG_RXBUF, 12), (2, 0, 12)]
)
async def test_headers_round_trip(sessions, version, exclude, header):
    """§5.1.6: 10 bytes for legacy without MRG_RXBUF, 12 (num_buffers) with VERSION_1 or
    MRG_RXBUF; num_buffers is 1 for a frame in one buffer."""
    sa, sb = await sessions(), await sessions()
    a = await sa.attach(LAN_LEGACY if version == 1 else LAN, exclude_features=exclude)
    b = await sb.attach(LAN)  # modern on the other side: the frame itself is what crosses
    assert a.header_size == header
    out = frame(BROADCAST, a.mac, b"x" * 100)
    await a.request(1, out=[bytes(header), out])  # a raw chain: our header, then the frame
    assert await next_frame(b) == out
    back = frame(a.mac, b.mac, b"y" * 60)
    await b.send(back)
    async with asyncio.timeout(TIMEOUT):
        raw = await anext(a.receive(0))
    assert len(raw) == header + len(back)
    assert raw[header:] == back
    num_buffers = b"\x01\x00" if header == 12 else b""
    assert raw[:header] == bytes(10) + num_buffers


async def test_malformed_transmit_breaks_that_device_only(sessions):
    s = await sessions()
    broken, other = await s.attach(LAN), await s.attach(OTHER)
    with pytest.raises(DeviceNeedsResetError):
        async with asyncio.timeout(TIMEOUT):
            await broken.request(1, out=bytes(11))  # shorter than the 12-byte header
    assert s.device(LAN).transport.status & Status.DEVICE_NEEDS_RESET
    async with asyncio.timeout(TIMEOUT):
        await other.send(frame(BROADCAST, other.mac))
    assert not s.device(OTHER).transport.status & Status.DEVICE_NEEDS_RESET
    assert s.device(OTHER).tx_frames == 1


async def test_frames_wait_for_a_receive_buffer_in_order(sessions):
    """A frame that finds the receiveq empty waits until the driver posts a buffer again (its
    notification), as QEMU holds it (virtio_net_has_buffers); none is dropped, none reordered."""
    sa, sb = await sessions(), await sessions()
    a, b = await sa.attach(LAN), await sb.attach(LAN, rx_buffers=1)
    sent = [frame(BROADCAST, a.mac, bytes([i]) * 20) for i in range(3)]
    for f in sent:
        await a.send(f)
    dev = sb.device(LAN)
    # the one buffer holds the first; the second waits at hand, the third in the inbox
    await wait_until(lambda: dev.rx_frames == 1 and len(dev._rx[0].inbox) == 1)
    assert dev.rx_dropped == 0
    for f in sent:
        assert await next_frame(b) == f  # each read posts the buffer again: the next comes
    assert (dev.rx_frames, dev.rx_dropped) == (3, 0)


async def test_detach_unplugs_the_port(sessions):
    sa, sb = await sessions(), await sessions()
    a, b = await sa.attach(LAN), await sb.attach(LAN)
    await b.send(frame(BROADCAST, b.mac))
    assert await next_frame(a) == frame(BROADCAST, b.mac)
    await b.detach()
    dev = sb.device(LAN)
    assert dev.port is None
    await a.send(frame(b.mac, a.mac))
    assert dev.rx_frames == 0 and dev.rx_dropped == 0


@pytest.mark.parametrize("spec", ["net", "net,version=1"])
async def test_conform_drives_a_net_device_io_included(tmp_path, spec):
    from test_any_device import conform, fails

    (results,) = (await conform(tmp_path, spec)).values()
    assert not fails(results), fails(results)
    for id_ in ("io.requests", "io.indirect", "driver.linux-flow", "config.widths"):
        assert results[id_].verdict.name == "PASS", results[id_]


async def test_runt_and_oversize_frames_are_dropped_not_fatal(sessions):
    s = await sessions()
    drv = await s.attach(LAN)
    async with asyncio.timeout(TIMEOUT):
        await drv.request(1, out=[bytes(12), BROADCAST + drv.mac])  # 12 bytes: no ethertype
        await drv.request(1, out=[bytes(12), frame(BROADCAST, drv.mac, bytes(1501 + 4))])
        await drv.send(frame(BROADCAST, drv.mac, bytes(1500)))  # the largest that fits
    dev = s.device(LAN)
    assert (dev.tx_dropped, dev.tx_frames) == (2, 1)
    assert not dev.transport.status & Status.DEVICE_NEEDS_RESET


@pytest.mark.parametrize(
    "text, words",
    [
        ("net,mac=01:00:00:00:00:01", "multicast"),
        ("net,mac=02:00:00:00:01", "six hex octets"),
        ("net,mtu=67", "68..65535"),
        ("net,speed=10", "unknown option 'speed'"),
    ],
)
def test_bad_options_say_what_to_write(text, words):
    from viowire.server.platform import PlatformError

    with pytest.raises(PlatformError, match=words):
        DeviceSpec.parse(text)
