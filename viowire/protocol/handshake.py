"""The handshake of a session, both ends, with no I/O: HELLO, HELLO_REPLY, AUTH, AUTH_REPLY.

Each end is a small state machine fed decoded messages; it checks them (magic, version, limits,
the order they come in, the token's proof), says what the session settled (features, max_frame,
max_inflight) and builds the messages to send back. What needs the outside world stays with the
caller: which features a transport can offer (descriptor passing, the peer's uid), the
same-host proof file, building the devices. docs/protocol.md, sections 2 and 3, is the
specification.

Server states: ``AWAIT_HELLO`` → ``AWAIT_AUTH`` (a token is required) or ``AUTH_OPTIONAL`` (the
session is open; AUTH may still come, as the first request after HELLO, to prove same-host) →
``OPEN``. The client sends HELLO, then AUTH where the server requires a token or offers a
same-host proof the client can answer.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from viowire import auth
from viowire.protocol import messages as m

_HELLO = int(m.MsgType.HELLO)
_AUTH = int(m.MsgType.AUTH)
_TOKEN = int(m.AuthMethod.TOKEN)
_MEMORY_SHM = int(m.ProtoFeature.MEMORY_SHM)


class HandshakeError(Exception):
    """A handshake message refused: answer it with ERROR ``code``; ``fatal``: then close."""

    def __init__(self, code: m.ErrorCode, message: str, *, fatal: bool = False) -> None:
        super().__init__(message)
        self.code = code
        self.fatal = fatal


@dataclass(frozen=True)
class Negotiated:
    """What HELLO and HELLO_REPLY settled for the session."""

    features: int
    max_frame: int
    max_inflight: int


class ServerState(enum.Enum):
    AWAIT_HELLO = "await HELLO"
    AWAIT_AUTH = "await AUTH"  # HELLO answered, the token not proven: nothing else goes
    AUTH_OPTIONAL = "AUTH optional"  # open; AUTH may still come, nothing else has
    OPEN = "open"


class ServerHandshake:
    """The server's end. ``token``: the shared secret a client must prove (None: none)."""

    def __init__(self, token: bytes | None = None, nonce: bytes | None = None) -> None:
        self.token = token
        self.state = ServerState.AWAIT_HELLO
        self.nonce = b""  # the server's AUTH nonce, fresh per connection (sent in HELLO_REPLY)
        self._nonce = nonce  # tests pin it; else drawn at HELLO
        self.features = 0  # as HELLO settled them, then as AUTH added to them

    @property
    def awaiting_auth(self) -> bool:
        return self.state is ServerState.AWAIT_AUTH

    @property
    def established(self) -> bool:
        """Whether the session is open (requests other than the handshake's are served)."""
        return self.state in (ServerState.AUTH_OPTIONAL, ServerState.OPEN)

    def check_request(self, msg_type: int) -> None:
        """Before any request of type ``msg_type`` is handled (call only while not OPEN):
        raises HandshakeError where it comes out of order; a request other than AUTH closes
        the window for an optional AUTH."""
        state = self.state
        if state is ServerState.AWAIT_HELLO:
            if msg_type != _HELLO:
                raise HandshakeError(m.ErrorCode.BAD_STATE, "the first message must be HELLO")
        elif msg_type != _AUTH:
            if state is ServerState.AWAIT_AUTH:
                if msg_type != _HELLO:  # a second HELLO is answered by receive_hello
                    raise HandshakeError(
                        m.ErrorCode.AUTH_FAILED,
                        f"message type {msg_type:#x} before AUTH: this server requires a token "
                        f"(viowire clients: --token-file FILE or {auth.TOKEN_ENV})",
                        fatal=True,
                    )
            elif state is ServerState.AUTH_OPTIONAL:
                self.state = ServerState.OPEN  # too late for an optional AUTH now

    def receive_hello(self, hello: m.Hello, offered: int) -> Negotiated:
        """Check HELLO and settle the session: the features both offer (``offered``: what
        this server can give this transport), the smaller max_frame and max_inflight."""
        if self.state is not ServerState.AWAIT_HELLO:
            raise HandshakeError(m.ErrorCode.BAD_STATE, "HELLO was already received")
        if hello.magic != m.HELLO_MAGIC:
            raise HandshakeError(m.ErrorCode.UNSUPPORTED, f"bad HELLO magic {hello.magic:#x}")
        if hello.version != m.PROTOCOL_VERSION:
            raise HandshakeError(
                m.ErrorCode.UNSUPPORTED,
                f"protocol version {hello.version} is not supported (this server speaks "
                f"{m.PROTOCOL_VERSION}; version 2 added AUTH): upgrade the client",
            )
        if hello.max_inflight < 1:
            raise HandshakeError(m.ErrorCode.UNSUPPORTED, "max_inflight 0 allows no request")
        if hello.max_frame < m.MIN_MAX_FRAME:
            raise HandshakeError(
                m.ErrorCode.UNSUPPORTED,
                f"max_frame {hello.max_frame} is below {m.MIN_MAX_FRAME}",
            )
        self.features = hello.features & offered
        self.nonce = self._nonce if self._nonce is not None else auth.new_nonce()
        self.state = ServerState.AWAIT_AUTH if self.token is not None else ServerState.AUTH_OPTIONAL
        return Negotiated(
            features=self.features,
            max_frame=min(hello.max_frame, m.DEFAULT_MAX_FRAME),
            max_inflight=min(hello.max_inflight, m.DEFAULT_MAX_INFLIGHT),
        )

    def hello_reply(
        self,
        negotiated: Negotiated,
        *,
        session_id: int,
        host_id: bytes,
        name: str,
        shm_proof: str = "",
    ) -> m.HelloReply:
        """HELLO_REPLY, with ``negotiated.features`` as the session's (the caller may have
        taken some back, e.g. a sidecar it could not adopt)."""
        if self.state is ServerState.AWAIT_HELLO:
            raise HandshakeError(m.ErrorCode.BAD_STATE, "HELLO_REPLY before HELLO")
        self.features = negotiated.features
        return m.HelloReply(
            version=m.PROTOCOL_VERSION,
            reserved=0,
            features=negotiated.features,
            max_frame=negotiated.max_frame,
            max_inflight=negotiated.max_inflight,
            session_id=session_id,
            host_id=host_id,
            auth=_TOKEN if self.awaiting_auth else 0,
            nonce=self.nonce,
            name=name,
            shm_proof=shm_proof,
        )

    def receive_auth(
        self, msg: m.Auth, shm_secret: bytes | None = None, binding: bytes = b""
    ) -> m.AuthReply:
        """Check AUTH: the token's proof where one is required, bound to ``binding`` (the
        connection's TLS channel binding, viowire.tls.channel_binding; b"" without TLS);
        MEMORY_SHM is added where ``shm_secret`` (the proof file's bytes, None if none was
        offered) comes back."""
        if self.state not in (ServerState.AWAIT_AUTH, ServerState.AUTH_OPTIONAL):
            raise HandshakeError(
                m.ErrorCode.BAD_STATE, "AUTH comes once, as the first request after HELLO"
            )
        self.state = ServerState.OPEN
        mac = bytes(auth.MAC_SIZE)
        if self.token is not None:
            expected = auth.client_mac(self.token, self.nonce, msg.nonce, binding)
            if not auth.verify(expected, msg.mac):
                raise HandshakeError(
                    m.ErrorCode.AUTH_FAILED,
                    "wrong token: the AUTH proof does not match this server's token (give both "
                    f"ends the same --token-file or {auth.TOKEN_ENV}){auth.binding_hint(binding)}",
                    fatal=True,
                )
            mac = auth.server_mac(self.token, self.nonce, msg.nonce, binding)
        if shm_secret is not None and auth.verify(shm_secret, msg.shm_proof):
            self.features |= _MEMORY_SHM
        return m.AuthReply(features=self.features, mac=mac)


def may_prove_same_host(hello: m.Hello, local_host_id: bytes) -> bool:
    """Whether to offer a TCP peer the same-host proof file (MEMORY_SHM): it asks for named
    memory and claims our boot id. The claim is a hint, to spare other hosts a file; the proof
    decides."""
    return (
        bool(hello.features & _MEMORY_SHM) and hello.host_id == local_host_id and any(hello.host_id)
    )


class ClientHandshake:
    """The client's end: :attr:`hello` to send, then :meth:`receive_hello_reply`, then
    :meth:`auth_request` (None: no AUTH needed) and :meth:`receive_auth_reply`. Errors are
    HandshakeError, or :class:`viowire.auth.AuthError` for what the user must fix; ``peer``
    names the server in their messages."""

    def __init__(self, hello: m.Hello, peer: str = "the server") -> None:
        self.hello = hello
        self.peer = peer
        self.reply: m.HelloReply | None = None
        self.features = 0
        self._token: bytes | None = None
        self._nonce = b""
        self._binding = b""

    def receive_hello_reply(self, reply: object) -> Negotiated:
        if self.reply is not None:
            raise HandshakeError(m.ErrorCode.BAD_STATE, "a second HELLO_REPLY")
        if isinstance(reply, m.Error):
            raise HandshakeError(reply.code, reply.message)
        if not isinstance(reply, m.HelloReply):
            raise HandshakeError(m.ErrorCode.BAD_MESSAGE, f"unexpected reply to HELLO: {reply}")
        if reply.max_inflight < 1:
            raise HandshakeError(m.ErrorCode.UNSUPPORTED, "the server allows no request in flight")
        self.reply = reply
        self.features = reply.features
        return Negotiated(reply.features, reply.max_frame, reply.max_inflight)

    @property
    def shm_proof(self) -> str:
        """The proof file the server offers (read it and pass its bytes to auth_request)."""
        return self.reply.shm_proof if self.reply is not None else ""

    def auth_request(
        self,
        token: bytes | None,
        shm_proof: bytes | None = None,
        nonce: bytes | None = None,
        binding: bytes = b"",
    ) -> m.Auth | None:
        """AUTH, where the server requires a token or ``shm_proof`` (the proof file's bytes)
        can prove same-host; else None and the session is established. ``binding``: the
        connection's TLS channel binding (viowire.tls.channel_binding; b"" without TLS), which
        both proofs are bound to."""
        reply = self.reply
        if reply is None:
            raise HandshakeError(m.ErrorCode.BAD_STATE, "AUTH before HELLO_REPLY")
        if reply.auth & ~_TOKEN:
            raise auth.AuthError(f"{self.peer} requires authentication this client does not know")
        required = bool(reply.auth & _TOKEN)
        if required and token is None:
            raise auth.AuthError(
                f"{self.peer} requires a token: give --token-file FILE or set {auth.TOKEN_ENV}"
            )
        if not required and shm_proof is None:
            return None
        self._token = token if required else None
        self._nonce = nonce if nonce is not None else auth.new_nonce()
        self._binding = binding
        mac = auth.client_mac(token, reply.nonce, self._nonce, binding) if required else None
        return m.Auth(
            nonce=self._nonce,
            mac=mac or bytes(auth.MAC_SIZE),
            shm_proof=shm_proof or bytes(auth.NONCE_SIZE),
        )

    def receive_auth_reply(self, answer: object) -> int:
        """Check AUTH_REPLY (the server's proof of the token); the session's features."""
        if not self._nonce:
            raise HandshakeError(m.ErrorCode.BAD_STATE, "AUTH_REPLY before AUTH")
        if isinstance(answer, m.Error):
            if answer.code == m.ErrorCode.AUTH_FAILED:
                name = m.ErrorCode.AUTH_FAILED.name
                raise auth.AuthError(f"{self.peer} refused us: {name}: {answer.message}")
            raise HandshakeError(answer.code, answer.message)
        if not isinstance(answer, m.AuthReply):
            raise HandshakeError(m.ErrorCode.BAD_MESSAGE, f"unexpected reply to AUTH: {answer}")
        token = self._token
        if token is not None:
            expected = auth.server_mac(token, self.reply.nonce, self._nonce, self._binding)
            if not auth.verify(expected, answer.mac):
                raise auth.AuthError(
                    f"{self.peer} did not prove it holds our token (its AUTH_REPLY mac is "
                    "wrong): not the server we meant to reach, or another token"
                )
        self._nonce = b""  # one AUTH_REPLY
        # AUTH can add MEMORY_SHM (on proof) to what HELLO_REPLY settled, nothing else.
        self.features = answer.features & (self.reply.features | _MEMORY_SHM)
        return self.features
