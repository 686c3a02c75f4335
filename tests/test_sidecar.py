"""FD_SIDECAR: descriptors ride a SOCK_SEQPACKET socket passed with HELLO, so both ends of a Unix
connection can read the stream with the event loop's own transport (uvloop's C transport) while
memfds and notification channels still reach the server.

Against the real server on real Unix sockets: the sidecar carries what it must, a session
without it works as before, and a hostile sidecar or HELLO gets the session refused or degraded
cleanly, with every descriptor closed and the other sessions unaffected.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket

import pytest
from servers import url_of
from test_bad_input import (
    ALL_FEATURES,
    BLK,
    RAM_BASE,
    RawPeer,
    _no_server_bugs,  # noqa: F401  (autouse: no ERROR records from the server)
    fds_settle,
    healthy,
    hello_msg,
    mem_register,
    memfd,
    open_fds,
    sessions_drained,
    until,
)

from viowire.client.connection import connect
from viowire.client.drivers.blk import BlockDriver
from viowire.fdsocket import FdSocketTransport
from viowire.protocol import messages as m
from viowire.protocol.codec import encode
from viowire.server.session import ServerSession

pytestmark = pytest.mark.timeout(60)

SIDECAR = ALL_FEATURES | m.ProtoFeature.FD_SIDECAR


async def blk_roundtrip(conn) -> BlockDriver:
    info = next(d for d in await conn.platform() if d.base == BLK)
    blk = await BlockDriver.attach(await conn.attach(info))
    await blk.write(0, b"s" * 4096)
    assert await blk.read(0, 4096) == b"s" * 4096
    return blk


def only_session(server) -> ServerSession:
    (session,) = server.sessions
    return session


async def test_unix_sessions_move_to_the_loops_own_transport(server):
    async with await connect(url_of(server, "unix")) as conn:
        assert conn.features & m.ProtoFeature.FD_SIDECAR
        assert conn.memory_mode == "shared"  # the memfd went by the sidecar
        blk = await blk_roundtrip(conn)
        assert blk.dev._channel is not None  # so did the notification channel's socket
        session = only_session(server)
        assert not isinstance(conn.transport, FdSocketTransport)
        assert not isinstance(session.transport, FdSocketTransport)
        await blk.detach()


async def test_without_a_sidecar_the_stream_carries_the_descriptors(server, monkeypatch):
    monkeypatch.setattr(ServerSession, "_adopt_sidecar", lambda self: False)
    async with await connect(url_of(server, "unix")) as conn:
        assert not conn.features & m.ProtoFeature.FD_SIDECAR and conn._sidecar is None
        assert isinstance(conn.transport, FdSocketTransport)
        assert conn.memory_mode == "shared"
        blk = await blk_roundtrip(conn)
        assert blk.dev._channel is not None
        await blk.detach()


# -- a hostile client ----------------------------------------------------------------------------
async def hello_with(peer: RawPeer, fds: list[int], features: int = SIDECAR, **hello) -> object:
    request_id = await peer.send_msg(hello_msg(features=features, **hello), fds=fds)
    frame = await peer.reply()
    assert frame.request_id == request_id and frame.type == m.MsgType.HELLO_REPLY, frame
    return m.HelloReply(**_fields(frame))


def _fields(frame) -> dict:
    from viowire.protocol.codec import decode_body

    msg = decode_body(frame.type, frame.body)
    return {name: getattr(msg, name) for name in msg.__slots__}


def _pipe() -> tuple[int, list[int]]:
    read_end, write_end = os.pipe()
    return read_end, [write_end]


def _socketpair(kind: int) -> tuple[int, list[int]]:
    ours, theirs = socket.socketpair(socket.AF_UNIX, kind)
    return theirs.detach(), [ours.detach()]


@pytest.mark.parametrize(
    "make",
    [
        pytest.param(lambda: (None, []), id="no-descriptor"),
        pytest.param(_pipe, id="pipe"),
        pytest.param(lambda: _socketpair(socket.SOCK_STREAM), id="stream-socket"),
        pytest.param(lambda: _socketpair(socket.SOCK_DGRAM), id="dgram"),
        pytest.param(lambda: (os.eventfd(0), []), id="eventfd"),
    ],
)
async def test_a_hello_without_a_usable_sidecar_gets_a_session_without_one(server, make):
    baseline = open_fds()
    peer = await RawPeer.connect(server, "unix")
    fd, others = make()
    try:
        reply = await hello_with(peer, [fd] if fd is not None else [])
        assert not reply.features & m.ProtoFeature.FD_SIDECAR
        assert isinstance(only_session(server).transport, FdSocketTransport)
        memory = memfd()
        try:  # descriptors still work on the stream
            await peer.expect_ok(mem_register(RAM_BASE, 64 << 10, m.MemoryKind.MEMFD), [memory])
        finally:
            os.close(memory)
    finally:
        for leftover in [fd, *others] if fd is not None else others:
            os.close(leftover)
        await peer.aclose()
    await sessions_drained(server)
    assert await fds_settle(baseline) == baseline


async def sidecar_peer(server, **hello) -> tuple[RawPeer, socket.socket]:
    peer = await RawPeer.connect(server, "unix")
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        reply = await hello_with(peer, [theirs.fileno()], **hello)
    finally:
        theirs.close()
    assert reply.features & m.ProtoFeature.FD_SIDECAR
    await until(lambda: not isinstance(only_session(server).transport, FdSocketTransport),
                "the server to move to the loop's transport")  # fmt: skip
    return peer, mine


async def test_sidecar_frames_are_answered_on_the_connection(server):
    baseline = open_fds()
    peer, sidecar = await sidecar_peer(server)
    try:
        memory = memfd()
        register = mem_register(RAM_BASE, 64 << 10, m.MemoryKind.MEMFD)
        socket.send_fds(sidecar, [encode(register, 77)], [memory])
        os.close(memory)
        frame = await peer.reply()
        assert (frame.request_id, frame.type) == (77, m.MsgType.OK)
        # Only frames that carry descriptors: the rest would dodge the connection's
        # back-pressure. They get an ERROR, on the connection.
        sidecar.send(encode(m.MmioRead(addr=BLK, width=4), 78))
        message = await peer.expect_error(m.ErrorCode.BAD_STATE, 78)
        assert "not the sidecar" in message
        # Descriptors on the stream now are dropped by the kernel, never queued or leaked.
        stray = os.eventfd(0)
        await peer.send(encode(m.MmioRead(addr=BLK, width=4), 79), [stray])
        os.close(stray)
        frame = await peer.reply()
        assert (frame.request_id, frame.type) == (79, m.MsgType.MMIO_READ_REPLY)
        assert not only_session(server)._fds
    finally:
        sidecar.close()
        await peer.aclose()
    await sessions_drained(server)
    assert await fds_settle(baseline) == baseline


@pytest.mark.parametrize(
    "packet",
    [
        pytest.param(b"\xff" * 16, id="bad-header"),
        pytest.param(b"\x00" * 3, id="short"),
        # descriptor frames go one a packet: thousands in one would be answered all at once
        pytest.param(encode(m.NotifyChannel(base=0, attach=0), 5) * 1000, id="many-frames"),
    ],
)
async def test_a_malformed_sidecar_frame_ends_the_session(server, packet):
    peer, sidecar = await sidecar_peer(server)
    try:
        sidecar.send(packet)
        frames = await peer.expect_closed()
        assert frames and frames[-1].type == m.MsgType.ERROR
    finally:
        sidecar.close()
        await peer.aclose()
    await sessions_drained(server)
    await healthy(server, "unix")


async def test_an_oversized_or_closed_sidecar_only_ends_the_sidecar(server):
    peer, sidecar = await sidecar_peer(server, max_frame=m.MIN_MAX_FRAME)
    try:
        stray = os.eventfd(0)
        socket.send_fds(sidecar, [b"\x00" * (m.MIN_MAX_FRAME + 1)], [stray])
        os.close(stray)
        session = only_session(server)
        await until(lambda: session._sidecar is None, "the sidecar to end")
        assert not session._fds
        assert await peer.mmio_read(BLK) == 0x74726976  # the session goes on
    finally:
        sidecar.close()
        await peer.aclose()
    await sessions_drained(server)
    await healthy(server, "unix")


async def test_a_client_that_stops_reading_cannot_grow_the_server_through_the_sidecar(server):
    """Requests on the sidecar while the connection's replies pile up unread: the server stops
    reading the sidecar with the connection (the replies, ERRORs here, stay bounded)."""
    peer, sidecar = await sidecar_peer(server)
    try:
        peer.stop_reading()
        session = only_session(server)
        frame = encode(m.MmioRead(addr=BLK, width=4), 5) * 100
        sent = 0
        sidecar.setblocking(False)
        with contextlib.suppress(BlockingIOError):
            for _ in range(20_000):
                sidecar.send(frame)
                sent += 1
        await asyncio.sleep(0.2)
        buffered = session.transport.get_write_buffer_size()
        assert buffered < 4 << 20, buffered
        assert sent < 20_000  # the server stopped reading: the sidecar filled up
    finally:
        sidecar.close()
        await peer.aclose()
    await sessions_drained(server)
    await healthy(server, "unix")


async def test_other_sessions_keep_working_beside_a_hostile_sidecar(server):
    peer, sidecar = await sidecar_peer(server)
    try:
        for _ in range(50):
            sidecar.send(os.urandom(64))
        async with await connect(url_of(server, "unix")) as conn:
            blk = await blk_roundtrip(conn)
            await blk.detach()
    finally:
        sidecar.close()
        await peer.aclose()
    await asyncio.sleep(0)
