"""The handshake state machines (viowire.protocol.handshake), both ends, from bytes alone.

Every message crosses as a frame: encoded, cut by a FrameReader, decoded; no socket, no loop.
"""

from __future__ import annotations

import pytest

from viowire import auth
from viowire.auth import AuthError
from viowire.protocol import messages as m
from viowire.protocol.codec import decode_body, encode
from viowire.protocol.framing import FrameReader
from viowire.protocol.handshake import (
    ClientHandshake,
    HandshakeError,
    ServerHandshake,
    ServerState,
    may_prove_same_host,
)

TOKEN = b"t" * 32
HOST = bytes(range(1, 17))
F = m.ProtoFeature
SERVER_OFFER = int(F.POSTED_WRITES | F.MEMORY_PROXIED | F.IRQ_STATUS)
CLIENT_ASKS = int(F.POSTED_WRITES | F.MEMORY_PROXIED | F.MEMORY_SHM | F.NOTIFY_CHANNEL)


def wire(msg: object, request_id: int = 1, flags: int = 0) -> object:
    """``msg`` as the peer reads it: through bytes, in two reads split mid-frame."""
    data = encode(msg, request_id, flags)
    reader = FrameReader()
    frames = reader.feed(data[:5]) + reader.feed(data[5:])
    (frame,) = frames
    assert frame.request_id == request_id
    return decode_body(frame.type, frame.body)


def hello(**changes: object) -> m.Hello:
    fields = dict(
        magic=m.HELLO_MAGIC,
        version=m.PROTOCOL_VERSION,
        reserved=0,
        features=CLIENT_ASKS,
        max_frame=m.DEFAULT_MAX_FRAME,
        max_inflight=m.DEFAULT_MAX_INFLIGHT,
        host_id=HOST,
        name="test-client",
    )
    fields.update(changes)
    return m.Hello(**fields)


def server_hello(server: ServerHandshake, client: ClientHandshake, shm_proof: str = ""):
    """HELLO across, HELLO_REPLY back; both ends' view of what was settled."""
    settled = server.receive_hello(wire(client.hello), SERVER_OFFER)
    reply = server.hello_reply(settled, session_id=7, host_id=HOST, name="srv", shm_proof=shm_proof)
    return settled, client.receive_hello_reply(wire(reply, flags=int(m.Flags.REPLY)))


def error(exc: HandshakeError) -> m.Error:
    return wire(m.Error(code=exc.code, message=str(exc)), flags=int(m.Flags.REPLY))


# -- the whole handshake ---------------------------------------------------------------------------
def test_without_a_token_the_session_opens_at_hello_and_needs_no_auth():
    server, client = ServerHandshake(), ClientHandshake(hello())
    ours, theirs = server_hello(server, client)
    assert ours == theirs
    assert ours.features == CLIENT_ASKS & SERVER_OFFER
    assert server.state is ServerState.AUTH_OPTIONAL and server.established
    assert client.reply.auth == 0 and client.reply.session_id == 7
    assert client.auth_request(None) is None  # nothing to prove
    server.check_request(int(m.MsgType.MMIO_READ))
    assert server.state is ServerState.OPEN


def test_limits_are_the_smaller_of_both_ends():
    server = ServerHandshake()
    settled = server.receive_hello(
        wire(hello(max_frame=m.MIN_MAX_FRAME, max_inflight=4)), SERVER_OFFER
    )
    assert (settled.max_frame, settled.max_inflight) == (m.MIN_MAX_FRAME, 4)
    big = ServerHandshake().receive_hello(
        wire(hello(max_frame=1 << 30, max_inflight=0xFFFF)), SERVER_OFFER
    )
    assert (big.max_frame, big.max_inflight) == (m.DEFAULT_MAX_FRAME, m.DEFAULT_MAX_INFLIGHT)


def test_with_a_token_both_ends_prove_it():
    server, client = ServerHandshake(TOKEN), ClientHandshake(hello())
    server_hello(server, client)
    assert server.state is ServerState.AWAIT_AUTH and not server.established
    assert client.reply.auth == m.AuthMethod.TOKEN and len(client.reply.nonce) == auth.NONCE_SIZE
    request = client.auth_request(TOKEN)
    server.check_request(int(m.MsgType.AUTH))
    answer = server.receive_auth(wire(request))
    assert server.state is ServerState.OPEN
    assert client.receive_auth_reply(wire(answer, flags=int(m.Flags.REPLY))) == (
        CLIENT_ASKS & SERVER_OFFER
    )


def test_the_token_itself_never_crosses_the_wire():
    server, client = ServerHandshake(TOKEN), ClientHandshake(hello())
    server_hello(server, client)
    request = client.auth_request(TOKEN)
    answer = server.receive_auth(request)
    for msg in (client.hello, request, answer):
        assert TOKEN not in encode(msg, 1)


def test_a_wrong_token_is_refused_and_fatal():
    server, client = ServerHandshake(TOKEN), ClientHandshake(hello(), "srv:1")
    server_hello(server, client)
    with pytest.raises(HandshakeError, match="wrong token") as info:
        server.receive_auth(wire(client.auth_request(b"w" * 32)))
    assert info.value.code == m.ErrorCode.AUTH_FAILED and info.value.fatal
    with pytest.raises(AuthError, match="srv:1 refused us: AUTH_FAILED: wrong token"):
        client.receive_auth_reply(error(info.value))


def test_a_recorded_auth_proves_nothing_on_another_connection():
    first, client = ServerHandshake(TOKEN), ClientHandshake(hello())
    server_hello(first, client)
    recorded = encode(client.auth_request(TOKEN), 2)
    first.receive_auth(decode_body(m.MsgType.AUTH, recorded[m.HEADER_SIZE :]))
    second = ServerHandshake(TOKEN)
    second.receive_hello(wire(hello()), SERVER_OFFER)
    assert second.nonce != first.nonce
    with pytest.raises(HandshakeError, match="wrong token") as info:
        second.receive_auth(decode_body(m.MsgType.AUTH, recorded[m.HEADER_SIZE :]))
    assert info.value.fatal


# -- TLS channel binding -------------------------------------------------------------------------
BINDING = bytes(range(48))  # as a TLS 1.3 connection's (viowire.tls.channel_binding): opaque here


def test_the_proofs_over_tls_are_the_documented_hmacs_of_the_binding():
    """docs/protocol.md section 3, exactly: HMAC-SHA256(token, label | server nonce | client
    nonce | binding), written out here with hmac and hashlib."""
    import hashlib
    import hmac

    server = ServerHandshake(TOKEN, nonce=b"s" * 32)
    client = ClientHandshake(hello())
    server_hello(server, client)
    request = client.auth_request(TOKEN, nonce=b"c" * 32, binding=BINDING)
    expected = hmac.new(
        TOKEN, b"viowire-auth client\x00" + b"s" * 32 + b"c" * 32 + BINDING, hashlib.sha256
    )
    assert request.mac == expected.digest()
    answer = server.receive_auth(wire(request), binding=BINDING)
    expected = hmac.new(
        TOKEN, b"viowire-auth server\x00" + b"s" * 32 + b"c" * 32 + BINDING, hashlib.sha256
    )
    assert answer.mac == expected.digest()
    assert client.receive_auth_reply(wire(answer, flags=int(m.Flags.REPLY))) == server.features
    # Without TLS the binding is empty, and the proof is the one of version 2 before binding.
    assert (
        auth.client_mac(TOKEN, b"s" * 32, b"c" * 32)
        == hmac.new(
            TOKEN, b"viowire-auth client\x00" + b"s" * 32 + b"c" * 32, hashlib.sha256
        ).digest()
    )


def test_a_proof_made_for_another_tls_connection_is_refused():
    """A man in the middle who terminates the client's TLS and opens his own to the server
    relays the client's AUTH: the server, on another TLS connection, has another binding."""
    server, client = ServerHandshake(TOKEN), ClientHandshake(hello(), "srv:1")
    server_hello(server, client)
    relayed = wire(client.auth_request(TOKEN, binding=b"client side" * 4))
    with pytest.raises(HandshakeError, match="bound to the TLS connection") as info:
        server.receive_auth(relayed, binding=b"server side" * 4)
    assert info.value.code == m.ErrorCode.AUTH_FAILED and info.value.fatal
    # The same AUTH on the connection it was made for passes: only the channel differed.
    honest = ServerHandshake(TOKEN, nonce=server.nonce)
    honest.receive_hello(wire(hello()), SERVER_OFFER)
    honest.receive_auth(relayed, binding=b"client side" * 4)


def test_a_server_proof_made_for_another_tls_connection_is_refused():
    """The other way: the relay hands the client the real server's AUTH_REPLY, made on the
    relay's own TLS connection to it; the client's binding differs."""
    server = ServerHandshake(TOKEN, nonce=b"s" * 32)
    client = ClientHandshake(hello(), "srv:1")
    server_hello(server, client)
    request = client.auth_request(TOKEN, nonce=b"c" * 32, binding=b"client side" * 4)
    relayed = m.AuthReply(
        features=server.features,
        mac=auth.server_mac(TOKEN, b"s" * 32, b"c" * 32, b"server side" * 4),
    )
    assert request.nonce == b"c" * 32
    with pytest.raises(AuthError, match="did not prove it holds our token"):
        client.receive_auth_reply(wire(relayed, flags=int(m.Flags.REPLY)))


def test_an_impostor_server_without_the_token_is_found_out():
    server, client = ServerHandshake(TOKEN), ClientHandshake(hello(), "srv:1")
    server_hello(server, client)
    client.auth_request(TOKEN)
    forged = m.AuthReply(features=CLIENT_ASKS, mac=bytes(auth.MAC_SIZE))
    with pytest.raises(AuthError, match="did not prove it holds our token"):
        client.receive_auth_reply(wire(forged, flags=int(m.Flags.REPLY)))


def test_a_client_without_the_token_learns_what_to_do():
    server, client = ServerHandshake(TOKEN), ClientHandshake(hello(), "srv:1")
    server_hello(server, client)
    with pytest.raises(AuthError, match="srv:1 requires a token: give --token-file"):
        client.auth_request(None)


def test_an_unknown_auth_method_is_refused_by_the_client():
    client, server = ClientHandshake(hello()), ServerHandshake()
    settled = server.receive_hello(wire(hello()), SERVER_OFFER)
    reply = server.hello_reply(settled, session_id=1, host_id=HOST, name="x")
    client.receive_hello_reply(wire(m.HelloReply(**{**_fields(reply), "auth": 2})))
    with pytest.raises(AuthError, match="authentication this client does not know"):
        client.auth_request(TOKEN)


def _fields(msg: object) -> dict:
    return {name: getattr(msg, name) for name in msg.__slots__}


# -- the same-host proof ---------------------------------------------------------------------------
def test_the_same_host_proof_adds_named_memory_and_nothing_else():
    secret = b"s" * auth.NONCE_SIZE
    server, client = ServerHandshake(), ClientHandshake(hello())
    server_hello(server, client, shm_proof="viowire-proof-" + "0" * 32)
    assert client.shm_proof.startswith("viowire-proof-")
    request = client.auth_request(None, secret)
    answer = server.receive_auth(wire(request), secret)
    assert answer.features & F.MEMORY_SHM and answer.mac == bytes(auth.MAC_SIZE)
    assert client.receive_auth_reply(wire(answer)) == (CLIENT_ASKS & SERVER_OFFER) | F.MEMORY_SHM
    # A server cannot hand out in AUTH_REPLY what HELLO_REPLY did not settle, but MEMORY_SHM.
    greedy = ClientHandshake(hello())
    server_hello(ServerHandshake(), greedy)
    greedy.auth_request(None, secret)
    assert greedy.receive_auth_reply(m.AuthReply(features=0x7F, mac=bytes(32))) == (
        (CLIENT_ASKS & SERVER_OFFER) | F.MEMORY_SHM
    )


def test_a_wrong_same_host_proof_grants_nothing_and_is_not_fatal():
    server, client = ServerHandshake(), ClientHandshake(hello())
    server_hello(server, client)
    answer = server.receive_auth(wire(client.auth_request(None, b"x" * 32)), b"s" * 32)
    assert not answer.features & F.MEMORY_SHM and server.state is ServerState.OPEN


def test_the_proof_file_is_offered_only_to_a_peer_claiming_our_host_and_asking_for_shm():
    assert may_prove_same_host(hello(), HOST)
    assert not may_prove_same_host(hello(), bytes(reversed(HOST)))
    assert not may_prove_same_host(hello(features=int(F.MEMORY_PROXIED)), HOST)
    assert not may_prove_same_host(hello(host_id=bytes(16)), bytes(16))


# -- out of order ----------------------------------------------------------------------------------
@pytest.mark.parametrize("msg_type", [m.MsgType.MMIO_READ, m.MsgType.AUTH, m.MsgType.OK])
def test_anything_before_hello_is_bad_state_and_not_fatal(msg_type):
    server = ServerHandshake(TOKEN)
    with pytest.raises(HandshakeError, match="first message must be HELLO") as info:
        server.check_request(int(msg_type))
    assert info.value.code == m.ErrorCode.BAD_STATE and not info.value.fatal
    assert server.state is ServerState.AWAIT_HELLO
    server.check_request(int(m.MsgType.HELLO))  # HELLO may still come


def test_a_request_before_the_required_auth_closes_the_session():
    server = ServerHandshake(TOKEN)
    server.receive_hello(wire(hello()), SERVER_OFFER)
    with pytest.raises(HandshakeError, match="before AUTH: this server requires a token") as info:
        server.check_request(int(m.MsgType.MMIO_READ))
    assert info.value.code == m.ErrorCode.AUTH_FAILED and info.value.fatal


@pytest.mark.parametrize("token", [None, TOKEN])
def test_a_second_hello_is_bad_state(token):
    server = ServerHandshake(token)
    server.receive_hello(wire(hello()), SERVER_OFFER)
    server.check_request(int(m.MsgType.HELLO))  # passes the gate: receive_hello answers it
    with pytest.raises(HandshakeError, match="already received") as info:
        server.receive_hello(wire(hello()), SERVER_OFFER)
    assert info.value.code == m.ErrorCode.BAD_STATE and not info.value.fatal


def test_an_optional_auth_comes_first_or_never():
    server = ServerHandshake()
    server.receive_hello(wire(hello()), SERVER_OFFER)
    server.check_request(int(m.MsgType.PLATFORM_QUERY))
    assert server.state is ServerState.OPEN
    server.check_request(int(m.MsgType.AUTH))
    with pytest.raises(HandshakeError, match="AUTH comes once") as info:
        server.receive_auth(wire(_any_auth()))
    assert info.value.code == m.ErrorCode.BAD_STATE and not info.value.fatal


def _any_auth() -> m.Auth:
    return m.Auth(nonce=bytes(32), mac=bytes(32), shm_proof=bytes(32))


@pytest.mark.parametrize("token", [None, TOKEN])
def test_auth_is_accepted_once(token):
    server, client = ServerHandshake(token), ClientHandshake(hello())
    server_hello(server, client)
    request = client.auth_request(token, b"p" * 32)
    server.receive_auth(wire(request))
    with pytest.raises(HandshakeError, match="AUTH comes once"):
        server.receive_auth(wire(request))


def test_auth_before_hello_is_refused_by_both_ends():
    with pytest.raises(HandshakeError, match="AUTH comes once"):
        ServerHandshake(TOKEN).receive_auth(_any_auth())
    with pytest.raises(HandshakeError, match="AUTH before HELLO_REPLY"):
        ClientHandshake(hello()).auth_request(TOKEN)
    with pytest.raises(HandshakeError, match="AUTH_REPLY before AUTH"):
        ClientHandshake(hello()).receive_auth_reply(m.AuthReply(features=0, mac=bytes(32)))


def test_no_hello_reply_before_hello():
    settled = ServerHandshake().receive_hello(hello(), SERVER_OFFER)
    with pytest.raises(HandshakeError, match="HELLO_REPLY before HELLO"):
        ServerHandshake().hello_reply(settled, session_id=1, host_id=HOST, name="x")


def test_the_client_takes_one_hello_reply():
    server, client = ServerHandshake(), ClientHandshake(hello())
    server_hello(server, client)
    with pytest.raises(HandshakeError, match="a second HELLO_REPLY"):
        client.receive_hello_reply(client.reply)


# -- refused HELLOs --------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"magic": 0x12345678}, "bad HELLO magic 0x12345678"),
        ({"version": 1}, "protocol version 1 is not supported .*upgrade the client"),
        ({"version": m.PROTOCOL_VERSION + 1}, "protocol version 3 is not supported"),
        ({"max_inflight": 0}, "max_inflight 0 allows no request"),
        ({"max_frame": m.MIN_MAX_FRAME - 1}, f"max_frame 4095 is below {m.MIN_MAX_FRAME}"),
    ],
)
def test_a_bad_hello_is_unsupported_and_hello_may_come_again(changes, match):
    server, client = ServerHandshake(TOKEN), ClientHandshake(hello(**changes))
    with pytest.raises(HandshakeError, match=match) as info:
        server.receive_hello(wire(client.hello), SERVER_OFFER)
    assert info.value.code == m.ErrorCode.UNSUPPORTED and not info.value.fatal
    assert server.state is ServerState.AWAIT_HELLO
    with pytest.raises(HandshakeError, match=match) as seen:  # the client reads it as an error
        client.receive_hello_reply(error(info.value))
    assert seen.value.code == m.ErrorCode.UNSUPPORTED
    server.receive_hello(wire(hello()), SERVER_OFFER)
    assert server.state is ServerState.AWAIT_AUTH


def test_the_client_refuses_a_server_that_allows_nothing_in_flight():
    server = ServerHandshake()
    settled = server.receive_hello(hello(), SERVER_OFFER)
    reply = server.hello_reply(settled, session_id=1, host_id=HOST, name="x")
    zero = m.HelloReply(**{**_fields(reply), "max_inflight": 0})
    with pytest.raises(HandshakeError, match="allows no request in flight") as info:
        ClientHandshake(hello()).receive_hello_reply(wire(zero))
    assert info.value.code == m.ErrorCode.UNSUPPORTED


def test_the_client_refuses_another_message_for_hello_reply():
    with pytest.raises(HandshakeError, match="unexpected reply to HELLO") as info:
        ClientHandshake(hello()).receive_hello_reply(wire(m.Ok()))
    assert info.value.code == m.ErrorCode.BAD_MESSAGE
    client = ClientHandshake(hello())
    server_hello(ServerHandshake(), client)
    client.auth_request(None, b"p" * 32)
    with pytest.raises(HandshakeError, match="unexpected reply to AUTH"):
        client.receive_auth_reply(wire(m.Ok()))
