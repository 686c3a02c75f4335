"""Notification channels (NOTIFY_CHANNEL): a device's kicks and used-buffer notifications on an
AF_UNIX datagram socket passed once, against the real server on real sockets.

What must hold: the channel carries the notifications and the drivers work exactly as on the
connection; a kick never overtakes a posted write it depends on; the server never blocks on a
channel whatever the client does with its end; every refusal is a clear ERROR, every descriptor is
closed, and the other sessions keep working.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import struct

import pytest
from servers import url_of
from test_bad_input import (
    ALL_FEATURES,
    BLK,
    BLK_V1,
    RAM_BASE,
    RNG,
    TIMEOUT,
    RawPeer,
    _no_server_bugs,  # noqa: F401  (autouse: no ERROR records from the server)
    device_of,
    fds_settle,
    healthy,
    mem_register,
    memfd,
    open_fds,
    session_of,
    sessions_drained,
    until,
)

import viowire.server.session as server_session
from viowire.client.connection import Connection, connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.protocol import messages as m
from viowire.server.notify import NotifyChannel
from viowire.virtio.constants import Interrupt, Reg

pytestmark = pytest.mark.timeout(60)

WITH_CHANNELS = ALL_FEATURES | m.ProtoFeature.NOTIFY_CHANNEL | m.ProtoFeature.IRQ_STATUS


async def open_driver(conn: Connection, base: int, driver=BlockDriver):
    info = next(d for d in await conn.platform() if d.base == base)
    return await driver.attach(await conn.attach(info))


def server_channel(server, conn: Connection, base: int) -> NotifyChannel | None:
    return session_of(server, conn.session_id)._channels.get(base)


# -- the channel at work -------------------------------------------------------------------------
@pytest.mark.parametrize("base", [BLK_V1, BLK], ids=["v1", "v2"])
async def test_blk_io_runs_on_the_channel(server, base):
    async with await connect(url_of(server, "unix")) as conn:
        blk = await open_driver(conn, base)
        for i in range(64):
            await blk.write(i * 4096, bytes([i]) * 4096)
        results = await asyncio.gather(*(blk.read(i * 4096, 4096) for i in range(64)))
        assert results == [bytes([i]) * 4096 for i in range(64)]
        channel = blk.dev._channel
        assert channel is not None and channel.kicks > 0 and channel.used > 0
        served = server_channel(server, conn, base)
        assert served is not None and served.kicks == channel.kicks
        # The InterruptACKs ride later frames (or a short timer): InterruptStatus settles at 0.
        device = device_of(server, conn, base)
        await until(lambda: device.interrupt_status == 0, "the late InterruptACK")
        await blk.detach()
        await until(lambda: server_channel(server, conn, base) is None, "the channel detached")


async def test_entropy_and_interrupt_subscribers_on_the_channel(server):
    async with await connect(url_of(server, "unix")) as conn:
        rng = await open_driver(conn, RNG, EntropyDriver)
        interrupts = rng.dev.interrupts()
        assert len(await rng.read(64)) == 64
        assert rng.dev._channel is not None
        async with asyncio.timeout(TIMEOUT):
            assert await anext(interrupts) == Interrupt.VRING
        interrupts.close()
        await rng.detach()


@pytest.mark.parametrize(
    "scheme, memory", [("tcp", "proxied"), ("unix", "proxied")], ids=["tcp", "unix-proxied"]
)
async def test_no_channel_without_fd_passing_and_shared_memory(server, scheme, memory):
    """Across hosts there are no descriptors; with proxied memory a datagram could overtake the
    MEM_WRITE of the used ring it announces. Both notify on the connection."""
    async with await connect(url_of(server, scheme), memory=memory) as conn:
        blk = await open_driver(conn, BLK)
        await blk.write(0, b"p" * 4096)
        assert await blk.read(0, 4096) == b"p" * 4096
        assert blk.dev._channel is None
        assert not session_of(server, conn.session_id)._channels
        await blk.detach()


async def test_a_kick_waits_until_earlier_posted_writes_are_applied(server):
    """After posted writes that a kick may depend on, the kick takes the (ordered) connection."""
    async with await connect(url_of(server, "unix")) as conn:
        blk = await open_driver(conn, BLK)
        await blk.write(0, b"a" * 512)
        channel = blk.dev._channel
        kicks = channel.kicks
        await blk.dev._write(Reg.QUEUE_SEL, 0)  # posted, not known to be applied yet
        assert blk.dev._posted_seq != blk.dev._synced_seq
        await blk.write(512, b"b" * 512)
        assert channel.kicks == kicks  # that kick went on the connection, after the write
        await blk.dev.get_status()  # a round trip: everything before it is applied
        await blk.write(1024, b"c" * 512)
        assert channel.kicks > kicks
        assert await blk.read(0, 1536) == b"a" * 512 + b"b" * 512 + b"c" * 512
        await blk.detach()


async def test_config_change_still_arrives_as_an_irq_frame(server):
    async with await connect(url_of(server, "unix")) as conn:
        blk = await open_driver(conn, BLK)
        await blk.write(0, b"x" * 4096)  # opens the channel
        assert blk.dev._channel is not None
        io = asyncio.ensure_future(
            asyncio.gather(*(blk.read((i % 64) * 4096, 4096) for i in range(256)))
        )
        device_of(server, conn, BLK).backend.resize(8 << 20)
        await until(lambda: blk.capacity == (8 << 20) // 512, "the new capacity")
        await asyncio.wait_for(io, TIMEOUT)
        await blk.write((8 << 20) - 512, b"e" * 512)
        await blk.detach()


async def test_channel_budget_and_server_cap_fall_back_to_the_connection(server, monkeypatch):
    monkeypatch.setattr(server_session, "MAX_NOTIFY_CHANNELS", 1)
    async with await connect(url_of(server, "unix")) as conn:
        first = await open_driver(conn, BLK_V1)
        second = await open_driver(conn, BLK)
        await first.write(0, b"1" * 512)
        await second.write(0, b"2" * 512)  # refused by the server: notifies on the connection
        assert first.dev._channel is not None and second.dev._channel is None
        assert conn.notify_channels == 1
        assert await second.read(0, 512) == b"2" * 512
        await first.detach()
        await second.detach()


async def test_session_end_closes_every_channel(server):
    baseline = open_fds()
    conns = [await connect(url_of(server, "unix")) for _ in range(3)]
    for conn in conns:
        blk = await open_driver(conn, BLK)
        await blk.write(0, b"s" * 512)
        assert blk.dev._channel is not None
    for conn in conns:
        await conn.close()
    await sessions_drained(server)
    assert await fds_settle(baseline) == baseline


# -- a hostile client ----------------------------------------------------------------------------
async def hostile_peer(server, *, features: int = WITH_CHANNELS, memory: bool = True) -> RawPeer:
    peer = await RawPeer.connect(server, "unix")
    await peer.hello(features=features)
    if memory:
        fd = memfd(1 << 20)
        try:
            await peer.expect_ok(mem_register(RAM_BASE, 1 << 20, m.MemoryKind.MEMFD), fds=[fd])
        finally:
            os.close(fd)
    return peer


def attach(base: int = BLK) -> object:
    return m.NotifyChannel(base=base, attach=1)


async def test_refusals_are_clear_and_use_up_their_descriptor(server, tmp_path):
    baseline = open_fds()
    peers = []
    try:
        unnegotiated = await hostile_peer(server, features=ALL_FEATURES)
        no_memory = await hostile_peer(server, memory=False)
        peer = await hostile_peer(server)
        peers += [unnegotiated, no_memory, peer]
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        message = await unnegotiated.request_error(
            attach(), m.ErrorCode.UNSUPPORTED, fds=[b.fileno()]
        )
        assert "NOTIFY_CHANNEL was not negotiated" in message
        message = await no_memory.request_error(attach(), m.ErrorCode.UNSUPPORTED, fds=[b.fileno()])
        assert "shared guest memory" in message
        message = await peer.request_error(attach(), m.ErrorCode.BAD_MESSAGE)
        assert "without a descriptor" in message
        for base in (BLK + 4, 0x10, 2**64 - 1):
            message = await peer.request_error(
                attach(base), m.ErrorCode.BUS_ERROR, fds=[b.fileno()]
            )
            assert "no device window starts at" in message
        # Not a datagram socket of AF_UNIX: refused, never written to.
        image = tmp_path / "image"
        image.write_bytes(b"x" * 4096)
        read_r, write_r = os.pipe()
        stream_a, stream_b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        bad = [
            read_r,
            write_r,
            os.eventfd(0),
            os.open(image, os.O_RDWR),
            stream_b.fileno(),
            udp.fileno(),
            memfd(),
        ]
        for fd in bad:
            message = await peer.request_error(attach(), m.ErrorCode.BAD_MESSAGE, fds=[fd])
            assert "SOCK_DGRAM socketpair" in message
        assert image.read_bytes() == b"x" * 4096
        for fd in (read_r, write_r, bad[2], bad[3], bad[6]):
            os.close(fd)
        for sock in (a, b, stream_a, stream_b, udp):
            sock.close()
        await peer.expect_ok(m.NotifyChannel(base=BLK, attach=0))  # detaching nothing is fine
    finally:
        for peer in peers:
            await peer.aclose()
    await sessions_drained(server)
    assert await fds_settle(baseline) == baseline
    await healthy(server, "unix")


async def test_garbage_on_the_channel_is_dropped_and_the_device_works(server):
    async with await connect(url_of(server, "unix")) as conn:
        blk = await open_driver(conn, BLK)
        await blk.write(0, b"g" * 4096)
        client_end = blk.dev._channel._sock
        for datagram in (b"", b"\x00", b"\x00" * 3, b"\x00" * 5, b"\xff" * 16, os.urandom(64)):
            client_end.send(datagram)
        for value in (1, 7, 0xFFFF, 0x1_0000, 0xFFFF_FFFF):  # kicks of queues that do not exist
            client_end.send(struct.pack("<I", value))
        served = server_channel(server, conn, BLK)
        await until(lambda: served.bad_datagrams >= 6, "the server to read the garbage")
        assert await blk.read(0, 4096) == b"g" * 4096
        assert device_of(server, conn, BLK).broken is False
        await blk.detach()


async def test_a_client_that_never_reads_its_end_cannot_block_the_server(server):
    """The client's end fills up: the server's sends fail at once (MSG_DONTWAIT) and count as
    dropped; I/O goes on (each request still wakes the driver: one datagram is enough)."""
    async with await connect(url_of(server, "unix")) as conn:
        blk = await open_driver(conn, BLK)
        await blk.write(0, b"f" * 512)
        served = server_channel(server, conn, BLK)
        for _ in range(100_000):  # what a stream of completions would do to a full socket
            served.used()
        assert served.dropped > 0
        assert await blk.read(0, 512) == b"f" * 512
        async with await connect(url_of(server, "unix")) as other:  # other sessions unaffected
            other_blk = await open_driver(other, BLK)
            await other_blk.write(0, b"o" * 512)
            await other_blk.detach()
        await blk.detach()


async def test_a_blocking_client_end_does_not_matter(server):
    """O_NONBLOCK lives in the open file description the client controls; the server's end of a
    socketpair is a description of its own, and it sends with MSG_DONTWAIT anyway."""
    peer = await hostile_peer(server)
    try:
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        theirs.setblocking(True)
        mine.setblocking(True)
        await peer.expect_ok(attach(), fds=[theirs.fileno()])
        theirs.close()
        channel = next(iter(session_of(server, peer_session_id(server))._channels.values()))
        for _ in range(10_000):
            channel.used()
        assert channel.dropped > 0
        mine.close()  # the driver is gone: sends fail, nothing else happens
        channel.used()
        await healthy(server, "unix")
    finally:
        await peer.aclose()


def peer_session_id(server) -> int:
    (session,) = [s for s in server.sessions if s._channels]
    return session.session_id


async def test_out_of_descriptors_the_device_notifies_on_the_connection(server, monkeypatch):
    import viowire.client.notify as client_notify

    def no_socketpair(*args):
        raise OSError(24, "Too many open files")

    async with await connect(url_of(server, "unix")) as conn:
        monkeypatch.setattr(client_notify.socket, "socketpair", no_socketpair)
        blk = await open_driver(conn, BLK)
        await blk.write(0, b"m" * 512)
        monkeypatch.undo()
        assert blk.dev._channel is None and conn.notify_channels == 0
        assert await blk.read(0, 512) == b"m" * 512
        await blk.detach()


# -- a channel that goes away ----------------------------------------------------------------
@pytest.mark.parametrize("how", ["shutdown", "close"])
async def test_a_channel_the_driver_drops_falls_back_to_the_connection(server, how):
    """The server notices (no busy loop on a shut-down socket), detaches it, and announces a
    pending bit 0 with an IRQ frame; I/O goes on over the connection."""
    async with await connect(url_of(server, "unix")) as conn:
        blk = await open_driver(conn, BLK)
        await blk.write(0, b"d" * 4096)
        channel = blk.dev._channel
        if how == "shutdown":
            channel._sock.shutdown(socket.SHUT_RDWR)
        else:
            conn._forget_channel(channel)  # closes our end, the server still has its own
        for i in range(20):
            await asyncio.wait_for(blk.write(i * 512, bytes([i]) * 512), TIMEOUT)
            assert await asyncio.wait_for(blk.read(i * 512, 512), TIMEOUT) == bytes([i]) * 512
        await until(lambda: server_channel(server, conn, BLK) is None, "the server to detach")
        assert device_of(server, conn, BLK).used_notifier is None
        await blk.detach()


async def test_a_cancelled_channel_open_is_taken_back(server):
    async with await connect(url_of(server, "unix")) as conn:
        blk = await open_driver(conn, BLK)
        attach_sent = asyncio.Event()
        original = conn.request

        async def request(msg, **kw):
            if isinstance(msg, m.NotifyChannel) and msg.attach:
                attach_sent.set()
            return await original(msg, **kw)

        conn.request = request
        first = asyncio.ensure_future(blk.write(0, b"c" * 512))  # its kick opens the channel
        await asyncio.wait_for(attach_sent.wait(), TIMEOUT)
        first.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await first
        conn.request = original
        # Whatever the server did with the attach, it is detached again, and I/O works.
        await until(lambda: server_channel(server, conn, BLK) is None, "the channel taken back")
        for i in range(10):
            await asyncio.wait_for(blk.write(i * 512, b"k" * 512), TIMEOUT)
        assert await asyncio.wait_for(blk.read(0, 512 * 10), TIMEOUT) == b"k" * 5120
        await blk.detach()
