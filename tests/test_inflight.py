"""max_inflight, negotiated in HELLO, is kept by both ends: the client never has more requests
awaiting replies than that (the rest wait their turn), and neither has the server with its own
MEM_READs to a proxied client. Real server, real sockets."""

from __future__ import annotations

import asyncio

import pytest
from servers import url_of

from viowire.client.connection import Connection, connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.protocol import messages as m
from viowire.server.session import ServerSession

pytestmark = pytest.mark.timeout(60)
LIMIT = 3


@pytest.fixture
def small_limit(monkeypatch):
    """Both ends offer LIMIT (the client's HELLO and the server's ceiling read this name)."""
    monkeypatch.setattr(m, "DEFAULT_MAX_INFLIGHT", LIMIT)


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
async def test_the_client_keeps_at_most_max_inflight_requests_out(server, small_limit, scheme):
    seen = []
    original = Connection._queue

    def queue(self, frame):
        seen.append(len(self.outstanding))
        original(self, frame)

    async with await connect(url_of(server, scheme)) as conn:
        assert conn.max_inflight == LIMIT
        Connection._queue = queue
        try:
            base = (await conn.platform())[1].base
            values = await asyncio.wait_for(
                asyncio.gather(*(conn.mmio_read(base, 4) for _ in range(50))), 10
            )
        finally:
            Connection._queue = original
        assert values == [0x74726976] * 50
        assert seen and max(seen) <= LIMIT


async def test_the_server_keeps_at_most_max_inflight_mem_reads_out(server, small_limit):
    seen = []
    original = ServerSession._send_frame

    def send_frame(self, frame):
        if frame[4] == m.MsgType.MEM_READ:  # the type byte, after the length
            seen.append(len(self.outstanding))
        original(self, frame)

    ServerSession._send_frame = send_frame
    try:
        async with await connect(url_of(server, "tcp"), memory="proxied") as conn:
            platform = await conn.platform()
            blks = [await BlockDriver.attach(await conn.attach(d)) for d in platform[:2]]
            rngs = [await EntropyDriver.attach(await conn.attach(d)) for d in platform[2:]]
            work = [b.write(i * 4096, bytes([i]) * 4096) for b in blks for i in range(8)]
            work += [r.read(64) for r in rngs for _ in range(8)]
            await asyncio.wait_for(asyncio.gather(*work), 20)
            for blk in blks:
                assert await blk.read(4096, 4096) == b"\x01" * 4096
    finally:
        ServerSession._send_frame = original
    assert max(seen) == LIMIT  # reached, never passed (this one counted)


async def test_requests_waiting_for_a_slot_fail_cleanly_when_the_connection_goes(
    server, small_limit
):
    from viowire.client.connection import ConnectionClosed

    conn = await connect(url_of(server, "unix"))
    base = (await conn.platform())[1].base
    reads = [asyncio.ensure_future(conn.mmio_read(base, 4)) for _ in range(20)]
    await asyncio.sleep(0)  # LIMIT of them are out, the rest wait for a slot
    conn.transport.abort()
    results = await asyncio.wait_for(asyncio.gather(*reads, return_exceptions=True), 10)
    assert all(isinstance(r, (ConnectionClosed, int)) for r in results), results
    assert any(isinstance(r, ConnectionClosed) for r in results)
    await conn.close()
