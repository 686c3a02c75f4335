"""Links that span servers (``serve --link NAME,listen=URL|connect=URL``): QEMU's stream framing
(4-byte big-endian length, then the frame; written out here by hand), a peer as one port of the
local switch, bad input, a full peer, reconnection; then two real server processes joined over
Unix sockets, a net device on each, frames both ways through the real client.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct

import pytest
from cli_run import serve, viowire
from qemu import QEMU, needs_qemu

from viowire.client.connection import connect
from viowire.client.drivers.net import NetDriver
from viowire.server import link as links
from viowire.server.linkpeer import (
    LinkPeer,
    LinkSpec,
    StreamDeframer,
    StreamFramingError,
    encode,
)

TIMEOUT = 5.0
NET = 1
BROADCAST = b"\xff" * 6
A, B = bytes.fromhex("020000000a0a"), bytes.fromhex("020000000b0b")


def frame(dst: bytes, src: bytes, payload: bytes = b"hello") -> bytes:
    return dst + src + b"\x88\xb5" + payload


def qemu_framed(data: bytes) -> bytes:
    return len(data).to_bytes(4, "big") + data  # net/stream.c: htonl(size), then the frame


# -- the framing, sans-IO ----------------------------------------------------------------------


def test_framing_is_qemus_and_survives_any_read_boundaries():
    frames = [frame(BROADCAST, A, bytes([i]) * i) for i in range(1, 40)]
    stream = b"".join(qemu_framed(f) for f in frames)
    assert stream == b"".join(encode(f) for f in frames)
    for step in (1, 3, 7, 64, len(stream)):
        deframer, out = StreamDeframer(), []
        for i in range(0, len(stream), step):
            out += deframer.feed(stream[i : i + step])
        assert out == frames, step


def test_an_absurd_length_is_not_a_frame():
    deframer = StreamDeframer()
    good = frame(BROADCAST, A)
    with pytest.raises(StreamFramingError, match="not QEMU's stream framing"):
        deframer.feed(qemu_framed(good) + b"\xff\xff\xff\xff" + b"garbage")
    assert StreamDeframer().feed(qemu_framed(good)) == [good]


@pytest.mark.parametrize(
    "text", ["lan", "lan,listen", "lan,bind=tcp://a:1", ",listen=unix:///x", "lan,connect=ftp://x"]
)
def test_bad_link_options_say_what_to_write(text):
    with pytest.raises(ValueError, match=r"listen=|tcp://HOST:PORT"):
        LinkSpec.parse(text)


def test_link_specs_parse():
    assert LinkSpec.parse("lan,listen=tcp://127.0.0.1:7100") == LinkSpec(
        "lan", "listen", "tcp://127.0.0.1:7100"
    )
    assert LinkSpec.parse("x,connect=unix:///run/p.sock").mode == "connect"


# -- one LinkPeer in this process, a raw socket as its peer ------------------------------------


@contextlib.asynccontextmanager
async def listening(tmp_path, name: str, **kw):
    """A LinkPeer listening on a Unix socket for link ``name``, and a device-like port on that
    link collecting what arrives."""
    got: list[bytes] = []
    port = links.attach(name, "test port", got.append)
    peer = LinkPeer(LinkSpec(name, "listen", f"unix://{tmp_path}/peer.sock"), **kw)
    await peer.start()
    try:
        yield peer, port, got, f"{tmp_path}/peer.sock"
    finally:
        await peer.close()
        links.release(port)


async def wait_until(predicate) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_a_peer_is_one_port_of_the_switch_both_ways(tmp_path):
    async with listening(tmp_path, "lp-both") as (peer, port, got, path):
        reader, writer = await asyncio.open_unix_connection(path)
        await wait_until(lambda: peer.stats.connections == 1)
        writer.write(qemu_framed(frame(BROADCAST, A, b"from the peer")))
        await wait_until(lambda: got)
        assert got == [frame(BROADCAST, A, b"from the peer")]
        port.send(frame(A, B, b"to the peer"))  # A was learned behind the peer's port
        async with asyncio.timeout(TIMEOUT):
            length = int.from_bytes(await reader.readexactly(4), "big")
            assert await reader.readexactly(length) == frame(A, B, b"to the peer")
        writer.close()
        await wait_until(lambda: not peer.peers)
        assert peer.stats.frames_in == 1 and peer.stats.frames_out == 1


async def test_garbage_drops_that_peer_with_a_log_line_and_others_go_on(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.linkpeer")
    async with listening(tmp_path, "lp-bad") as (peer, _, got, path):
        bad_reader, bad = await asyncio.open_unix_connection(path)
        _, good = await asyncio.open_unix_connection(path)
        bad.write(b"\x7f\x00\x00\x00GET / HTTP/1.1\r\n\r\n")  # a length of 2 GiB
        async with asyncio.timeout(TIMEOUT):
            assert await bad_reader.read() == b""  # closed by the server
        assert peer.stats.bad_peers == 1
        assert "dropping the peer connection" in caplog.text
        good.write(qemu_framed(frame(BROADCAST, B, b"still here")))
        await wait_until(lambda: got)
        assert got == [frame(BROADCAST, B, b"still here")]
        for writer in (bad, good):
            writer.close()


async def test_a_peer_that_does_not_read_costs_drops_not_memory(tmp_path):
    async with listening(tmp_path, "lp-full", send_limit=4096) as (peer, port, _, path):
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(path)  # and never reads
        try:
            await wait_until(lambda: peer.stats.connections == 1)
            for _ in range(2000):
                port.send(frame(BROADCAST, A, bytes(1000)))
                await asyncio.sleep(0)
            assert peer.stats.dropped > 0
            assert peer.stats.frames_out + peer.stats.dropped == 2000
            (conn,) = peer.peers
            assert conn.transport.get_write_buffer_size() <= 4096 + 1100
        finally:
            sock.close()


async def test_connect_retries_until_the_peer_listens_and_after_it_restarts(tmp_path):
    path = f"{tmp_path}/later.sock"
    got: list[bytes] = []
    port = links.attach("lp-retry", "test port", got.append)
    peer = LinkPeer(LinkSpec("lp-retry", "connect", f"unix://{path}"))
    await peer.start()
    try:
        for round_ in range(2):
            await asyncio.sleep(0.3)  # a few failed attempts first
            accepted: asyncio.Queue = asyncio.Queue()
            listener = await asyncio.start_unix_server(
                lambda r, w, q=accepted: q.put_nowait((r, w)), path
            )
            async with asyncio.timeout(TIMEOUT):
                _, writer = await accepted.get()
            writer.write(qemu_framed(frame(BROADCAST, A, bytes([round_]))))
            await wait_until(lambda n=round_ + 1: len(got) == n)
            writer.close()
            listener.close()
            await listener.wait_closed()
            await wait_until(lambda: not peer.peers)
        assert got == [frame(BROADCAST, A, b"\x00"), frame(BROADCAST, A, b"\x01")]
        assert peer.stats.connections == 2
    finally:
        await peer.close()
        links.release(port)


# -- two real server processes -----------------------------------------------------------------


async def attach_net(url: str, stack: contextlib.AsyncExitStack) -> NetDriver:
    conn = await stack.enter_async_context(await connect(url))
    info = next(d for d in await conn.platform() if d.device_id == NET)
    drv = await NetDriver.attach(await conn.attach(info))
    stack.push_async_callback(drv.detach)
    return drv


async def next_frame(drv: NetDriver) -> bytes:
    async with asyncio.timeout(1.0):
        return await anext(drv.frames())


async def test_two_servers_joined_by_a_link_exchange_frames_both_ways(tmp_path):
    peer_url = f"unix://{tmp_path}/peer.sock"
    with (
        serve("--listen", f"unix://{tmp_path}/a.sock", "--device", "net,link=lan",
              "--link", f"lan,listen={peer_url}") as a,
        serve("--listen", f"unix://{tmp_path}/b.sock", "--device", "net,link=lan",
              "--link", f"lan,connect={peer_url}") as b,
    ):  # fmt: skip
        async with contextlib.AsyncExitStack() as stack:
            on_a = await attach_net(a.url("unix"), stack)
            on_b = await attach_net(b.url("unix"), stack)
            hello = frame(BROADCAST, on_a.mac, b"hello from server a")
            async with asyncio.timeout(TIMEOUT):  # b connects with a backoff: try until it has
                while True:
                    await on_a.send(hello)
                    with contextlib.suppress(TimeoutError):
                        got = await next_frame(on_b)
                        break
            assert got == hello
            reply = frame(on_a.mac, on_b.mac, b"and back from b")
            await on_b.send(reply)
            assert await next_frame(on_a) == reply


def test_link_with_workers_is_refused(tmp_path):
    result = viowire(
        "serve", "--workers", "2", "--listen", f"unix://{tmp_path}/s.sock",
        "--link", f"lan,listen=unix://{tmp_path}/p.sock",
    )  # fmt: skip
    assert result.returncode == 2 and "--workers 1" in result.stderr


def test_links_from_the_config_file(tmp_path):
    from viowire.server.linkpeer import from_toml

    config = tmp_path / "server.toml"
    config.write_text(
        '[[device]]\ntype = "net"\nlink = "lan"\n\n'
        '[[link]]\nname = "lan"\nconnect = "tcp://127.0.0.1:7100"\n'
    )
    assert from_toml(str(config)) == [LinkSpec("lan", "connect", "tcp://127.0.0.1:7100")]
    config.write_text('[[link]]\nname = "lan"\nlisten = "x"\nconnect = "y"\n')
    result = viowire("serve", "--config", str(config), "--listen", f"unix://{tmp_path}/s.sock")
    assert result.returncode == 2 and "one of listen= or connect=" in result.stderr


def test_a_frame_length_field_is_big_endian():
    assert encode(b"\x01" * 258)[:4] == struct.pack(">I", 258) == b"\x00\x00\x01\x02"


@needs_qemu
async def test_a_qemu_netdev_stream_joins_a_viowire_link(tmp_path):
    """QEMU's own stream netdev (server=off, a Unix socket) as the peer of a viowire link. With
    no guest, its hub joins the stream to a datagram netdev whose other end is this test: a
    frame the viowire device sends comes out of QEMU's datagram socket, and one sent into that
    socket comes back through QEMU's stream framing to the device."""
    peer = f"{tmp_path}/peer.sock"
    here, qemu_end = f"{tmp_path}/here.sock", f"{tmp_path}/qemu.sock"
    dgram = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dgram.bind(here)
    dgram.setblocking(False)
    loop = asyncio.get_running_loop()
    with (
        dgram,
        serve("--listen", f"unix://{tmp_path}/s.sock", "--device", "net,link=lan",
              "--link", f"lan,listen=unix://{peer}") as served,
    ):  # fmt: skip
        qemu = await asyncio.create_subprocess_exec(
            QEMU, "-machine", "none", "-nodefaults", "-display", "none",
            "-netdev", f"stream,id=s0,server=off,addr.type=unix,addr.path={peer}",
            "-netdev", f"dgram,id=d0,local.type=unix,local.path={qemu_end},"
            f"remote.type=unix,remote.path={here}",
            "-netdev", "hubport,id=p0,hubid=0,netdev=s0",
            "-netdev", "hubport,id=p1,hubid=0,netdev=d0",
            stderr=asyncio.subprocess.DEVNULL,
        )  # fmt: skip
        try:
            async with contextlib.AsyncExitStack() as stack:
                drv = await attach_net(served.url("unix"), stack)
                hello = frame(BROADCAST, drv.mac, b"to qemu")
                async with asyncio.timeout(TIMEOUT):  # until QEMU has connected
                    while True:
                        await drv.send(hello)
                        with contextlib.suppress(TimeoutError):
                            async with asyncio.timeout(0.2):
                                got = await loop.sock_recv(dgram, 2048)
                                break
                assert got == hello
                back = frame(drv.mac, A, b"from qemu")
                await loop.sock_sendto(dgram, back, qemu_end)
                assert await next_frame(drv) == back
        finally:
            with contextlib.suppress(ProcessLookupError):
                qemu.kill()
            await qemu.wait()
