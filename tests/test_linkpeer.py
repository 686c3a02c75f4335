"""Links that span servers (``serve --link NAME,listen=URL|connect=URL``): QEMU's stream framing
(4-byte big-endian length, then the frame; written out here by hand), a peer as one port of the
local switch, bad input, a full peer, reconnection; the auth=token preamble (from bytes, then
between two LinkPeers: right and wrong token, TLS, a peer without it) and the rule that refuses
a link anyone could join; then two real server processes joined over Unix sockets, a net device
on each, frames both ways through the real client. Every listener here is on loopback or a Unix
socket; the refusals of non-loopback addresses happen before anything is bound.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import socket
import ssl
import struct

import pytest
from cli_run import serve, viowire
from qemu import QEMU, needs_qemu
from test_auth import pki, relay  # noqa: F401 (pki: a fixture, a CA and certificates)

from viowire import auth, tls
from viowire.auth import ClientCredentials
from viowire.client.connection import connect
from viowire.client.drivers.net import NetDriver
from viowire.options import UsageError
from viowire.server import link as links
from viowire.server.app import Security, Server
from viowire.server.linkpeer import (
    LinkPeer,
    LinkPreamble,
    LinkSpec,
    PreambleError,
    StreamDeframer,
    StreamFramingError,
    encode,
)
from viowire.server.platform import DeviceSpec, PlatformSpec

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
    assert LinkSpec.parse("x,connect=tls://[::1]:7100,auth=token") == LinkSpec(
        "x", "connect", "tls://[::1]:7100", "token"
    )
    assert LinkSpec.parse("x,auth=none,listen=unix:///q").auth == "none"
    with pytest.raises(ValueError, match="write auth=token or auth=none"):
        LinkSpec.parse("x,listen=unix:///q,auth=yes")
    with pytest.raises(ValueError, match="auth=token"):
        LinkSpec.parse("x,listen=unix:///q,auth=none,auth=token")


# -- the auth=token preamble, sans-IO -------------------------------------------------------------
TOKEN = b"link-test-token-0123456789"
LISTEN_NONCE, CONNECT_NONCE = b"L" * 32, b"C" * 32


def ends(listen_token=TOKEN, connect_token=TOKEN, listen_binding=b"", connect_binding=b""):
    listen = LinkPreamble("listen", listen_token, listen_binding, nonce=LISTEN_NONCE)
    connect = LinkPreamble("connect", connect_token, connect_binding, nonce=CONNECT_NONCE)
    return listen, connect


def _hmac(label: bytes, binding: bytes = b"") -> bytes:
    message = label + LISTEN_NONCE + CONNECT_NONCE + binding
    return hmac.new(TOKEN, message, hashlib.sha256).digest()


@pytest.mark.parametrize("binding", [b"", b"\x5a" * 48])
def test_the_preamble_is_the_documented_bytes_and_frames_follow_it(binding):
    """docs/containers.md, written out by hand: CHALLENGE, ANSWER, CONFIRM, then frames (here in
    the same read as CONFIRM, cut into single bytes)."""
    listen, connect = ends(listen_binding=binding, connect_binding=binding)
    challenge = listen.start()
    assert challenge == b"VWLK\x01" + LISTEN_NONCE and connect.start() == b""
    answer, rest = connect.feed(challenge)
    assert answer == b"VWLK\x01" + CONNECT_NONCE + _hmac(b"viowire-link connect\x00", binding)
    assert rest == b"" and not connect.done
    confirm, rest = listen.feed(answer)
    assert confirm == _hmac(b"viowire-link listen\x00", binding)
    assert listen.done and rest == b""
    stream = confirm + encode(frame(BROADCAST, A))
    sent = [connect.feed(stream[i : i + 1]) for i in range(len(stream))]
    assert b"".join(out for out, _ in sent) == b"" and connect.done
    assert b"".join(rest for _, rest in sent) == encode(frame(BROADCAST, A))


def _run(listen: LinkPreamble, connect: LinkPreamble) -> None:
    answer, _ = connect.feed(listen.start())
    confirm, _ = listen.feed(answer)
    connect.feed(confirm)


def test_a_wrong_token_fails_the_preamble_at_the_end_that_checks():
    listen, connect = ends(connect_token=b"another-token-0123456789")
    with pytest.raises(PreambleError, match=r"wrong token.*same --token-file"):
        _run(listen, connect)
    assert not listen.done
    # A listener with another token that skips its check and confirms with what it has.
    impostor, connect = ends(listen_token=b"another-token-0123456789")
    connect.feed(impostor.start())
    forged = auth.proof(
        b"another-token-0123456789", auth.LINK_LISTEN_LABEL, LISTEN_NONCE, CONNECT_NONCE
    )
    with pytest.raises(PreambleError, match="did not prove it holds our token"):
        connect.feed(forged)
    assert not connect.done


def test_a_proof_made_for_another_tls_connection_fails():
    """A relay that terminates TLS at both ends: each end has its own connection's binding."""
    listen, connect = ends(
        listen_binding=b"relay-to-listener" * 3, connect_binding=b"c-to-relay" * 5
    )
    with pytest.raises(PreambleError, match=r"wrong token.*bound to the TLS connection"):
        _run(listen, connect)


def test_a_peer_without_the_preamble_is_told_what_to_do():
    qemu_like = qemu_framed(frame(BROADCAST, A))  # a stream peer's first bytes: a frame
    listen, connect = ends()
    listen.start()
    with pytest.raises(PreambleError, match=r"no link preamble.*auth=none.*QEMU"):
        listen.feed(qemu_like[:4])  # four bytes are enough to tell
    with pytest.raises(PreambleError, match="no link preamble"):
        connect.feed(qemu_like)
    # And the other way: a link end without auth meets the preamble as a frame length.
    with pytest.raises(StreamFramingError, match="it has auth=token"):
        StreamDeframer().feed(ends()[0].start())
    listen, _ = ends()
    listen.start()
    with pytest.raises(PreambleError, match="version 2"):
        listen.feed(b"VWLK\x02" + bytes(64))


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


# -- two LinkPeers in this process, with auth=token or TLS -------------------------------------
@contextlib.asynccontextmanager
async def joined(url: str, listen_security: Security, connect_security: Security, tag: str, **kw):
    """A listening LinkPeer on link ``l-TAG`` at ``url`` (a port 0 resolved), and a connecting
    one on link ``c-TAG``; a device-like port on each link. Two link names, so that the two
    ends, in one process, are two switches joined only by the peer connection."""
    got_l: list[bytes] = []
    got_c: list[bytes] = []
    port_l = links.attach(f"l-{tag}", "test port", got_l.append)
    port_c = links.attach(f"c-{tag}", "test port", got_c.append)
    listener = LinkPeer(LinkSpec(f"l-{tag}", "listen", url), security=listen_security, **kw)
    connector = None
    try:
        listener.check()
        await listener.start()
        target = str(listener.endpoint).replace("tcp://", url.partition("://")[0] + "://")
        connector = LinkPeer(
            LinkSpec(f"c-{tag}", "connect", target), security=connect_security, **kw
        )
        connector.check()
        await connector.start()
        yield listener, connector, (port_l, got_l), (port_c, got_c)
    finally:
        if connector is not None:
            await connector.close()
        await listener.close()
        links.release(port_l)
        links.release(port_c)


async def frames_cross_both_ways(listener, connector, l_end, c_end) -> None:
    (port_l, got_l), (port_c, got_c) = l_end, c_end
    await wait_until(lambda: listener.peers and connector.peers)
    port_c.send(frame(BROADCAST, A, b"from the connect end"))
    await wait_until(lambda: got_l)
    assert got_l == [frame(BROADCAST, A, b"from the connect end")]
    port_l.send(frame(A, B, b"from the listen end"))  # A was learned behind the peer
    await wait_until(lambda: got_c)
    assert got_c == [frame(A, B, b"from the listen end")]


@pytest.mark.parametrize("scheme", ["unix", "tcp"])
async def test_the_right_token_passes_frames_both_ways(tmp_path, scheme, caplog):
    caplog.set_level(logging.INFO, logger="viowire.linkpeer")
    url = f"unix://{tmp_path}/p.sock" if scheme == "unix" else "tcp://127.0.0.1:0"
    security = Security(token=TOKEN)
    async with joined(url, security, security, f"ok-{scheme}") as (lp, cp, l_end, c_end):
        assert lp.auth == cp.auth == "token"  # the default where the server has a token
        await frames_cross_both_ways(lp, cp, l_end, c_end)
        assert lp.stats.refused == cp.stats.refused == 0
    assert "token proven both ways" in caplog.text


async def test_a_wrong_token_is_refused_with_a_log_line_and_no_frame_passes(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.linkpeer")
    url = f"unix://{tmp_path}/p.sock"
    other = Security(token=b"not-the-link-token-0123456789")
    async with joined(url, Security(token=TOKEN), other, "wrong") as (lp, cp, l_end, c_end):
        await wait_until(lambda: lp.stats.refused >= 2)  # the connect end keeps trying
        (port_l, got_l), (port_c, got_c) = l_end, c_end
        port_l.send(frame(BROADCAST, A, b"nobody gets this"))
        port_c.send(frame(BROADCAST, B, b"nor this"))
        await asyncio.sleep(0.05)
        assert got_l == got_c == [] and not lp.peers and not cp.peers
        assert lp.stats.connections == cp.stats.connections == 0
        assert lp.stats.frames_in == lp.stats.frames_out == 0
    assert "refusing peer" in caplog.text and "wrong token" in caplog.text
    assert "--token-file" in caplog.text


async def test_frames_sent_with_a_wrong_proof_go_nowhere(tmp_path, caplog):
    """A raw peer that answers the challenge with a forged proof and frames right behind it,
    in one write: the frames never reach the link."""
    caplog.set_level(logging.WARNING, logger="viowire.linkpeer")
    got: list[bytes] = []
    port = links.attach("lp-forged", "test port", got.append)
    peer = LinkPeer(LinkSpec("lp-forged", "listen", f"unix://{tmp_path}/p.sock"),
                    security=Security(token=TOKEN))  # fmt: skip
    await peer.start()
    try:
        reader, writer = await asyncio.open_unix_connection(f"{tmp_path}/p.sock")
        async with asyncio.timeout(TIMEOUT):
            challenge = await reader.readexactly(37)
        assert challenge[:5] == b"VWLK\x01"
        writer.write(b"VWLK\x01" + bytes(32) + bytes(32) + qemu_framed(frame(BROADCAST, A)))
        async with asyncio.timeout(TIMEOUT):
            assert await reader.read() == b""  # closed, no CONFIRM
        writer.close()
        await asyncio.sleep(0.05)
        assert got == [] and peer.stats.refused == 1 and peer.stats.frames_in == 0
        assert "wrong token" in caplog.text
    finally:
        await peer.close()
        links.release(port)


async def test_a_stream_peer_without_the_preamble_gets_nothing_in(tmp_path, caplog):
    """A QEMU -netdev stream (here its bytes) at an auth=token listener; and an auth=token
    connect end at an auth=none listener, which never sends a CHALLENGE."""
    caplog.set_level(logging.WARNING, logger="viowire.linkpeer")
    got: list[bytes] = []
    port = links.attach("lp-qemu", "test port", got.append)
    peer = LinkPeer(LinkSpec("lp-qemu", "listen", f"unix://{tmp_path}/p.sock"),
                    security=Security(token=TOKEN))  # fmt: skip
    await peer.start()
    try:
        reader, writer = await asyncio.open_unix_connection(f"{tmp_path}/p.sock")
        writer.write(qemu_framed(frame(BROADCAST, A)))
        async with asyncio.timeout(TIMEOUT):
            assert (await reader.read())[:4] == b"VWLK"  # the CHALLENGE, then closed
        writer.close()
        assert got == [] and peer.stats.refused == 1
        assert "no link preamble" in caplog.text and "auth=none" in caplog.text
    finally:
        await peer.close()
        links.release(port)
    caplog.clear()
    none, token = Security(), Security(token=TOKEN)
    async with joined(f"unix://{tmp_path}/q.sock", none, token, "mixed",
                      preamble_timeout=0.2) as (lp, cp, _, _):  # fmt: skip
        assert lp.auth == "none" and cp.auth == "token"
        await wait_until(lambda: cp.stats.refused >= 1)
        assert cp.stats.connections == 0
    assert "no link preamble within 0.2 s (it sent no CHALLENGE)" in caplog.text


@pytest.mark.parametrize("token", [None, TOKEN], ids=["mutual-tls", "tls-and-token"])
async def test_a_tls_link_passes_frames(pki, token):  # noqa: F811
    """listen=tls:// with the server's certificate, asking for one of its CA (mutual TLS);
    connect=tls:// checks the listener's certificate and presents its own. With a token too,
    the preamble's proofs are bound to the TLS connection."""
    listen = Security(
        token=token,
        tls=tls.server_context(pki["server"] + ".pem", pki["server"] + ".key", pki["ca"] + ".pem"),
        client_certs=True,
    )
    peer_tls = tls.client_context(
        pki["ca"] + ".pem", pki["client"] + ".pem", pki["client"] + ".key"
    )
    connect = Security(token=token, peer_tls=peer_tls)
    tag = "tls-token" if token else "mtls"
    async with joined("tls://127.0.0.1:0", listen, connect, tag) as (lp, cp, l_end, c_end):
        await frames_cross_both_ways(lp, cp, l_end, c_end)
        (conn,) = cp.peers
        assert conn.transport.get_extra_info("ssl_object") is not None
        assert (conn.preamble is not None) == (token is not None)
        if token is not None:
            assert len(conn.preamble.binding) >= 12  # bound: tls-unique or TLS 1.3's Finished


async def test_a_tls_link_refuses_a_connect_end_without_a_certificate_of_its_ca(pki):  # noqa: F811
    listen = Security(
        tls=tls.server_context(pki["server"] + ".pem", pki["server"] + ".key", pki["ca"] + ".pem"),
        client_certs=True,
    )
    stranger = tls.client_context(
        pki["ca"] + ".pem", pki["stranger"] + ".pem", pki["stranger"] + ".key"
    )
    async with joined("tls://127.0.0.1:0", listen, Security(peer_tls=stranger), "stranger",
                      preamble_timeout=1.0) as (lp, cp, _, _):  # fmt: skip
        await asyncio.sleep(0.5)
        assert not lp.peers and lp.stats.connections == 0
        # TLS 1.3 ends the client's handshake before the server checks its certificate: the
        # connect end may join, then learns of the refusal, and retries at its backoff's pace.
        assert cp.stats.connections <= 4


async def test_a_relay_that_terminates_tls_cannot_join_a_token_link(pki, caplog):  # noqa: F811
    """Between the two ends a relay with a certificate they trust ends each TLS connection and
    passes every byte on: the preamble's proofs are bound to one TLS connection each, so the
    listen end refuses the ANSWER and no frame crosses."""
    caplog.set_level(logging.WARNING, logger="viowire.linkpeer")
    context = tls.server_context(pki["server"] + ".pem", pki["server"] + ".key")
    listener = LinkPeer(LinkSpec("lr-l", "listen", "tls://127.0.0.1:0"),
                        security=Security(token=TOKEN, tls=context))  # fmt: skip
    got: list[bytes] = []
    port = links.attach("lr-l", "test port", got.append)
    await listener.start()
    try:
        async with relay(str(listener.endpoint).replace("tcp://", "tls://"), context,
                         pki["ca"] + ".pem") as mitm:  # fmt: skip
            connect = Security(token=TOKEN, peer_tls=tls.client_context(pki["ca"] + ".pem"))
            connector = LinkPeer(LinkSpec("lr-c", "connect", mitm), security=connect)
            await connector.start()
            try:
                await wait_until(lambda: listener.stats.refused >= 1)
            finally:
                await connector.close()
        assert "bound to the TLS connection" in caplog.text
        assert got == [] and listener.stats.connections == connector.stats.connections == 0
    finally:
        await listener.close()
        links.release(port)


async def test_a_connect_end_refuses_a_listener_its_ca_did_not_sign(pki, caplog):  # noqa: F811
    caplog.set_level(logging.WARNING, logger="viowire.linkpeer")
    listen = Security(tls=tls.server_context(pki["server"] + ".pem", pki["server"] + ".key"))
    wrong_ca = Security(peer_tls=tls.client_context(pki["other-ca"] + ".pem"))
    async with joined("tls://127.0.0.1:0", listen, wrong_ca, "wrong-ca") as (lp, cp, _, _):
        await wait_until(lambda: "certificate verify failed" in caplog.text)
        assert not lp.peers and lp.stats.connections == cp.stats.connections == 0


def test_serve_options_give_a_tls_link_both_ends_contexts(pki):  # noqa: F811
    """--tls-cert/--tls-key/--tls-client-ca as serve parses them: the listen end's context
    asks for client certificates, the connect end's checks the peer and its name."""
    from viowire.cli import build_parser
    from viowire.server.app import security_from_args

    args = build_parser().parse_args(
        ["serve", "--tls-cert", pki["server"] + ".pem", "--tls-key", pki["server"] + ".key",
         "--tls-client-ca", pki["ca"] + ".pem"]
    )  # fmt: skip
    security = security_from_args(args)
    assert security.tls.verify_mode == ssl.CERT_REQUIRED and security.client_certs
    assert security.peer_tls.verify_mode == ssl.CERT_REQUIRED and security.peer_tls.check_hostname
    for spec in ("lan,listen=tls://0.0.0.0:7100", "lan,connect=tls://192.0.2.1:7100"):
        LinkPeer(LinkSpec.parse(spec), security=security).check()  # checks only: binds nothing


# -- the rule: no link anyone could join --------------------------------------------------------
def _check(spec: str, **security) -> None:
    LinkPeer(LinkSpec.parse(spec), security=Security(**security)).check()


@pytest.mark.parametrize(
    "spec", ["lan,listen=tcp://0.0.0.0:7100", "lan,connect=tcp://192.0.2.1:7100",
             "lan,listen=tcp://[::]:7100,auth=none", "lan,listen=tls://0.0.0.0:7100"],
)  # fmt: skip
def test_a_link_off_loopback_without_authentication_is_refused(spec, pki):  # noqa: F811
    context = tls.server_context(pki["server"] + ".pem", pki["server"] + ".key")
    token = TOKEN if "auth=none" in spec else None  # auth=none: even where a token exists
    with pytest.raises(UsageError) as info:
        _check(spec, token=token, tls=context)
    message = str(info.value)
    assert message.startswith("refusing to ") and "without authentication" in message
    assert "--token-file" in message and "tls://" in message and "--insecure" in message
    _check(spec, token=token, tls=context, insecure=True)


def test_a_link_with_a_token_or_certificates_or_on_loopback_passes(pki):  # noqa: F811
    server = tls.server_context(pki["server"] + ".pem", pki["server"] + ".key", pki["ca"] + ".pem")
    client = tls.client_context(pki["ca"] + ".pem")
    _check("lan,listen=tcp://0.0.0.0:7100", token=TOKEN)
    _check("lan,connect=tcp://192.0.2.1:7100,auth=token", token=TOKEN)
    _check("lan,listen=tls://0.0.0.0:7100", tls=server, client_certs=True)
    _check("lan,connect=tls://192.0.2.1:7100", peer_tls=client)  # its certificate is checked
    for spec in ("lan,listen=tcp://127.0.0.1:7100", "lan,connect=tcp://[::1]:7100",
                 "lan,listen=unix:///run/lan.sock", "lan,listen=unix:///x,auth=none"):  # fmt: skip
        _check(spec, token=TOKEN)
        _check(spec)
    with pytest.raises(UsageError, match="auth=token, but no token: give --token-file"):
        _check("lan,listen=unix:///run/lan.sock,auth=token")
    with pytest.raises(UsageError, match="a tls:// listener needs --tls-cert"):
        _check("lan,listen=tls://127.0.0.1:7100", token=TOKEN)
    with pytest.raises(UsageError, match="connect=tls:// needs --tls-cert"):
        _check("lan,connect=tls://127.0.0.1:7100", token=TOKEN)


def test_serve_refuses_an_exposed_link_in_one_line_before_binding(tmp_path):
    result = viowire(
        "serve", "--listen", f"unix://{tmp_path}/s.sock", "--device", "net,link=lan",
        "--link", "lan,listen=tcp://0.0.0.0:7100",
    )  # fmt: skip
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to listen on tcp://0.0.0.0:7100 for link lan" in lines[0]
    assert "--insecure" in lines[0] and "--token-file" in lines[0]
    assert not (tmp_path / "s.sock").exists()  # refused before anything was bound


async def test_two_servers_with_a_token_join_a_link_over_tls(pki, tmp_path):  # noqa: F811
    """Two Servers in this process, as serve builds them: the token for sessions and the link,
    the link over TLS; a net device on each, frames both ways through the real client."""
    token_file = tmp_path / "token"
    token_file.write_bytes(TOKEN)
    server_tls = tls.server_context(pki["server"] + ".pem", pki["server"] + ".key")
    security = Security(
        token=TOKEN, tls=server_tls, peer_tls=tls.client_context(pki["ca"] + ".pem")
    )
    # In one process links are shared by name: two names, joined only by the TLS connection.
    platform_a = PlatformSpec([DeviceSpec.parse("net,link=tl-a")])
    platform_b = PlatformSpec([DeviceSpec.parse("net,link=tl-b")])
    a = Server(
        platform_a, links=[LinkSpec("tl-a", "listen", "tls://127.0.0.1:0")], security=security
    )
    await a.start([f"unix://{tmp_path}/a.sock"])
    try:
        (listening,) = a.link_peers
        port = listening.endpoint.port
        b = Server(platform_b, links=[LinkSpec("tl-b", "connect", f"tls://127.0.0.1:{port}")],
                   security=security)  # fmt: skip
        await b.start([f"unix://{tmp_path}/b.sock"])
        try:
            await exchange_frames(f"unix://{tmp_path}/a.sock", f"unix://{tmp_path}/b.sock",
                                  ClientCredentials(token=TOKEN))  # fmt: skip
            assert listening.stats.connections == 1 and listening.stats.refused == 0
        finally:
            await b.close()
    finally:
        await a.close()


# -- two real server processes -----------------------------------------------------------------


async def attach_net(
    url: str, stack: contextlib.AsyncExitStack, credentials: ClientCredentials | None = None
) -> NetDriver:
    conn = await stack.enter_async_context(await connect(url, credentials=credentials))
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
        await exchange_frames(a.url("unix"), b.url("unix"))


async def exchange_frames(url_a: str, url_b: str, credentials: ClientCredentials | None = None):
    """A net device on each server, a frame from a to b and one back (b connects with a backoff:
    try until it has)."""
    async with contextlib.AsyncExitStack() as stack:
        on_a = await attach_net(url_a, stack, credentials)
        on_b = await attach_net(url_b, stack, credentials)
        hello = frame(BROADCAST, on_a.mac, b"hello from server a")
        async with asyncio.timeout(TIMEOUT):
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
    config.write_text('[[link]]\nname = "q"\nlisten = "unix:///run/q.sock"\nauth = "none"\n')
    assert from_toml(str(config)) == [LinkSpec("q", "listen", "unix:///run/q.sock", "none")]
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
