"""Limits (viowire.server.limits, ``serve --max-*``): a refused request gets ERROR LIMIT_EXCEEDED
naming the limit, and the session (where it goes on) and every other session keep working.

Sessions, devices and RAM-disk bytes are charged when a session connects or is opened, and given
back when it ends; memory regions and mapped bytes are counted per session.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
from collections.abc import AsyncIterator

import pytest
from servers import small_platform, url_of
from test_bad_input import RAM_BASE, RawPeer, hello_msg, mem_register, memfd

from viowire.client.connection import Connection, ProtocolError, connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.errors import RequestError
from viowire.protocol import messages as m
from viowire.protocol.codec import decode_body
from viowire.server.app import Server
from viowire.server.limits import Limits
from viowire.virtio.blk import BlkStatus
from viowire.virtio.constants import MAGIC_VALUE, Reg

TIMEOUT = 5.0
PAGE = mmap.PAGESIZE
SESSION_DEVICES = 4
BASE = 0x1000_1000
BLK = 0x1000_2000  # small_platform()'s modern RAM disk


@contextlib.asynccontextmanager
async def limited_server(tmp_path, **limits) -> AsyncIterator[Server]:
    server = Server(small_platform(), limits=Limits(**limits))
    await server.start(["tcp://127.0.0.1:0", f"unix://{tmp_path}/viowire.sock"])
    try:
        yield server
    finally:
        await server.close()


async def open_client(server: Server, scheme: str = "tcp") -> Connection:
    return await asyncio.wait_for(connect(url_of(server, scheme), memory="proxied"), TIMEOUT)


async def works(conn: Connection) -> None:
    value = await asyncio.wait_for(conn.mmio_read(BASE + Reg.MAGIC_VALUE, 4), TIMEOUT)
    assert value == MAGIC_VALUE


async def refused(server: Server, match: str) -> None:
    with pytest.raises(ProtocolError, match=match) as info:
        await open_client(server)
    assert info.value.code == m.ErrorCode.LIMIT_EXCEEDED


async def until_sessions(server: Server, count: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while len(server.sessions) != count or server.budget.sessions != count:
            await asyncio.sleep(0.01)


async def test_sessions_per_server(tmp_path):
    async with limited_server(tmp_path, sessions=2) as server:
        first, second = await open_client(server), await open_client(server)
        await refused(server, "--max-sessions 2")
        await works(first)
        await works(second)
        await first.close()
        await until_sessions(server, 1)
        third = await open_client(server)  # the room came back with the session's end
        await works(third)
        await works(second)
        await second.close()
        await third.close()


async def test_connections_in_their_handshake_are_capped_apart_from_sessions(tmp_path):
    """Peers that never finish the handshake (without the token, say) hold no session's place;
    they are capped at the same number, apart."""
    async with limited_server(tmp_path, sessions=2) as server:
        session = await open_client(server)
        silent = [await RawPeer.connect(server, "tcp") for _ in range(2)]
        late = await RawPeer.connect(server, "tcp")
        try:
            message = await late.expect_error(m.ErrorCode.LIMIT_EXCEEDED, 0, flags=0)
            assert "in their handshake" in message and "--max-sessions 2" in message
            await late.expect_closed()
            await works(session)
            second = await silent[0].request(hello_msg())  # a place in the handshake frees
            assert isinstance(second, m.HelloReply)
            assert (server.budget.sessions, server.budget.handshakes) == (2, 1)
            again = await RawPeer.connect(server, "tcp")
            await again.expect_quiet()  # in the handshake, not refused
            await again.aclose()
        finally:
            for peer in (*silent, late):
                await peer.aclose()
            await session.close()


async def blk_of(conn: Connection) -> BlockDriver:
    """The modern RAM disk of small_platform() (4 MiB)."""
    entry = next(e for e in await conn.platform() if e.base == BLK)
    return await asyncio.wait_for(BlockDriver.attach(await conn.attach(entry)), TIMEOUT)


async def test_ram_disk_bytes_per_server_are_charged_as_they_are_written(tmp_path):
    """Pages are charged on their first write: a write past --max-ram-disk fails with IOERR,
    rewriting written pages costs nothing, and a session's pages come back when it ends."""
    async with limited_server(tmp_path, ram_disk_bytes=16 * PAGE) as server:
        first, second = await open_client(server), await open_client(server)
        disk_a, disk_b = await blk_of(first), await blk_of(second)
        await disk_a.write(0, b"a" * 12 * PAGE)
        assert server.budget.ram_disk_bytes == 12 * PAGE
        with pytest.raises(RequestError) as info:
            await disk_b.write(0, b"b" * 8 * PAGE)  # 4 pages left: refused whole
        assert info.value.status == BlkStatus.IOERR
        assert await disk_b.read(0, PAGE) == bytes(PAGE)  # nothing of it was written
        await disk_b.write(0, b"b" * 4 * PAGE)
        await disk_a.write(0, b"A" * 12 * PAGE)  # its own pages again: no charge
        assert await disk_a.read(0, 2 * PAGE) == b"A" * 2 * PAGE
        assert server.budget.ram_disk_bytes == 16 * PAGE
        await first.close()
        await until_sessions(server, 1)
        assert server.budget.ram_disk_bytes == 4 * PAGE
        await disk_b.write(8 * PAGE, b"b" * 8 * PAGE)
        assert await disk_b.read(0, PAGE) == b"b" * PAGE
        await second.close()
        await until_sessions(server, 0)
        assert server.budget.ram_disk_bytes == 0


async def test_ram_disk_bytes_per_session(tmp_path, caplog):
    async with limited_server(tmp_path, session_ram_disk_bytes=4 * PAGE) as server:
        first, second = await open_client(server), await open_client(server)
        disk_a, disk_b = await blk_of(first), await blk_of(second)
        await disk_a.write(0, b"a" * 4 * PAGE)
        with pytest.raises(RequestError):
            await disk_a.write(4 * PAGE, b"a" * 512)
        await disk_b.write(0, b"b" * 4 * PAGE)  # another session has its own
        await works(first)
        assert any("--max-session-ram-disk" in r.getMessage() for r in caplog.records)
        await first.close()
        await second.close()


async def test_the_handshake_is_refused_from_bytes_when_the_devices_do_not_fit(tmp_path):
    async with limited_server(tmp_path, devices=2 * SESSION_DEVICES) as server:
        first, second = await open_client(server), await open_client(server)
        peer = await RawPeer.connect(server, "unix")
        try:
            request_id = await peer.send_msg(hello_msg())
            message = await peer.expect_error(m.ErrorCode.LIMIT_EXCEEDED, request_id)
            assert "--max-devices" in message and "closing" in message
            await peer.expect_closed()
        finally:
            await peer.aclose()
        await works(first)
        await works(second)
        await first.close()
        await until_sessions(server, 1)
        third = await open_client(server)
        await works(third)
        await second.close()
        await third.close()


async def test_devices_per_server(tmp_path):
    async with limited_server(tmp_path, devices=SESSION_DEVICES + 3) as server:
        first = await open_client(server)
        await refused(server, "--max-devices 7")
        await works(first)
        await first.close()


async def test_a_platform_above_the_session_device_limit_is_refused_every_time(tmp_path):
    async with limited_server(tmp_path, session_devices=SESSION_DEVICES - 1) as server:
        await refused(server, "--max-session-devices 3")
        await refused(server, "--max-session-devices 3")
        await until_sessions(server, 0)
        assert server.budget.devices == 0


async def test_memory_regions_per_session(tmp_path):
    async with limited_server(tmp_path, regions=2) as server:
        peer = await RawPeer.connect(server, "tcp")
        other = await open_client(server)
        try:
            await peer.hello()
            for i in range(2):
                await peer.expect_ok(mem_register(RAM_BASE + i * 4096, 4096, m.MemoryKind.PROXIED))
            message = await peer.request_error(
                mem_register(RAM_BASE + 2 * 4096, 4096, m.MemoryKind.PROXIED),
                m.ErrorCode.LIMIT_EXCEEDED,
            )
            assert "--max-regions" in message
            # the session goes on
            reply = await peer.request(m.MmioRead(addr=BASE + Reg.MAGIC_VALUE, width=4))
            assert reply.value == MAGIC_VALUE
            await works(other)
        finally:
            await peer.aclose()
            await other.close()


async def test_mapped_bytes_per_session(tmp_path):
    async with limited_server(tmp_path, mapped_bytes=96 << 10) as server:
        peer = await RawPeer.connect(server, "unix")
        fds = [memfd(64 << 10), memfd(64 << 10)]
        try:
            await peer.hello()
            register = mem_register(RAM_BASE, 64 << 10, m.MemoryKind.MEMFD)
            await peer.expect_ok(register, fds=[fds[0]])
            message = await peer.request_error(
                mem_register(RAM_BASE + (64 << 10), 64 << 10, m.MemoryKind.MEMFD),
                m.ErrorCode.LIMIT_EXCEEDED,
                fds=[fds[1]],
            )
            assert "--max-mapped" in message
            frame = await peer.send_msg(m.MmioRead(addr=BASE + Reg.MAGIC_VALUE, width=4))
            reply = await peer.reply()
            assert reply.request_id == frame
            assert decode_body(reply.type, reply.body).value == MAGIC_VALUE
        finally:
            for fd in fds:
                os.close(fd)
            await peer.aclose()


def test_serve_help_names_every_limit_with_its_default():
    from cli_run import viowire

    out = viowire("serve", "--help").stdout
    for flag, default in (
        ("--max-sessions", "256"),
        ("--max-devices", "131072"),
        ("--max-ram-disk", "4G"),
        ("--max-session-ram-disk", "1G"),
        ("--max-regions", "64"),
        ("--max-mapped", "64G"),
    ):
        assert flag in out
        assert f"(default {default})" in " ".join(out.split()), flag


async def test_serve_applies_its_limit_options(tmp_path):
    from cli_run import serve

    with serve("--listen", "tcp://127.0.0.1:0", "--device", "rng", "--max-sessions", "1") as served:
        url = served.url("tcp")
        first = await asyncio.wait_for(connect(url, memory="proxied"), TIMEOUT)
        try:
            with pytest.raises(ProtocolError, match="--max-sessions 1") as info:
                await asyncio.wait_for(connect(url, memory="proxied"), TIMEOUT)
            assert info.value.code == m.ErrorCode.LIMIT_EXCEEDED
            await works(first)
        finally:
            await first.close()
