"""Links that span servers: ``serve --link NAME,listen=URL`` and ``--link NAME,connect=URL``
join link NAME of two server processes over a stream socket (TCP, TLS or Unix), as QEMU's
``-netdev stream`` joins two QEMUs, with its framing: each Ethernet frame is preceded by its
length, 4 bytes big-endian (QEMU net/stream.c sends ``htonl(size)`` then the frame, and
net_fill_rstate reads it back), no virtio header. So a QEMU guest with
``-netdev stream,id=n0,server=off,addr.type=unix,addr.path=PATH`` can join a viowire link too,
where the link has ``auth=none``.

With ``auth=token`` (the default where serve has a token) the two ends first prove the token
to each other, by the session AUTH's HMAC challenge-response (viowire.auth, under labels of
their own, bound to the TLS connection where there is one): a short preamble
(:class:`LinkPreamble`) before the first frame, which QEMU cannot speak. A non-loopback link
with neither a token nor TLS certificates naming the other end is refused before it is bound
or dialled, by the rule serve's listeners follow (viowire.auth.exposed), unless ``--insecure``.
docs/containers.md gives the preamble's bytes.

Each connection is one uplink port of the local switch (:mod:`viowire.server.link`). A frame for
the peer is written at once; while the socket's buffer holds more than ``send_limit`` bytes (a
slow or stuck peer) frames are dropped and counted, never queued without a bound. A length
above QEMU's own buffer (``MAX_FRAME``) is not a frame: the connection is dropped with a log
line, and the server goes on. ``connect=`` retries with a backoff (0.1 s doubling up to 5 s) for
as long as the server runs; ``listen=`` takes any number of peers, each a port.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import struct
from dataclasses import dataclass
from typing import TYPE_CHECKING

from viowire import auth
from viowire.options import UsageError
from viowire.server import link as links
from viowire.tls import channel_binding
from viowire.urls import Endpoint, parse_endpoint

if TYPE_CHECKING:
    from viowire.server.app import Security

log = logging.getLogger("viowire.linkpeer")

LENGTH = struct.Struct("!I")
MAX_FRAME = 4096 + 65536  # QEMU's NET_BUFSIZE: the largest frame its stream peer takes
SEND_LIMIT = 256 * 1024  # bytes waiting in a peer's socket buffer before frames are dropped
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
STABLE = 1.0  # seconds a joined connection must last for the backoff to start again
MODES = ("listen", "connect")
AUTH_CHOICES = ("token", "none")
PREAMBLE_TIMEOUT = 10.0  # seconds an end has to finish the preamble (as a session's HELLO)
SPEC_HELP = "NAME,listen=URL or NAME,connect=URL, then optionally ,auth=token|none"
URL_HELP = "URL: tcp://HOST:PORT, tls://HOST:PORT or unix:///PATH"


class StreamFramingError(ValueError):
    """The byte stream is not QEMU's stream framing (a length beyond ``MAX_FRAME``)."""


class StreamDeframer:
    """Sans-IO: bytes in, whole frames out, whatever the reads' boundaries."""

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buf = bytearray()

    def feed(self, data: bytes) -> list[bytes]:
        """The frames ``data`` completes; StreamFramingError on a length that cannot be."""
        self._buf += data
        frames, pos, buf = [], 0, self._buf
        while len(buf) - pos >= LENGTH.size:
            (length,) = LENGTH.unpack_from(buf, pos)
            if length > self.max_frame:
                if buf[pos : pos + LENGTH.size] == PREAMBLE_MAGIC:
                    raise StreamFramingError(
                        "the peer starts the link preamble: it has auth=token; give this end "
                        "auth=token and the same token, or the peer auth=none"
                    )
                raise StreamFramingError(
                    f"a frame length of {length} bytes (at most {self.max_frame}): not QEMU's "
                    "stream framing (4-byte big-endian length, then the frame)"
                )
            end = pos + LENGTH.size + length
            if end > len(buf):
                break
            frames.append(bytes(buf[pos + LENGTH.size : end]))
            pos = end
        del buf[:pos]
        return frames


def encode(frame: bytes) -> bytes:
    """One frame as QEMU's stream peer expects it."""
    return LENGTH.pack(len(frame)) + frame


# -- the preamble of an auth=token link ----------------------------------------------------------
PREAMBLE_MAGIC = b"VWLK"  # as a frame length, 1.4 GiB: no stream peer mistakes it for a frame
PREAMBLE_VERSION = 1
CHALLENGE = struct.Struct(f"!4sB{auth.NONCE_SIZE}s")  # listen end: magic, version, its nonce
ANSWER = struct.Struct(f"!4sB{auth.NONCE_SIZE}s{auth.MAC_SIZE}s")  # connect end: + nonce, mac
CONFIRM = struct.Struct(f"!{auth.MAC_SIZE}s")  # listen end: its mac


class PreambleError(Exception):
    """The peer did not prove the token (or speaks no preamble); the message says what to do."""


class LinkPreamble:
    """Sans-IO: one end's side of the preamble that proves the token before the first frame.

    The listen end sends CHALLENGE (magic, version, a fresh nonce); the connect end answers
    ANSWER (magic, version, its own fresh nonce, HMAC-SHA256(token, LINK_CONNECT_LABEL |
    listen nonce | connect nonce | channel binding)); the listen end checks it and sends CONFIRM
    (the HMAC under LINK_LISTEN_LABEL), which the connect end checks. Then frames. ``binding``:
    the connection's TLS channel binding (b"" without TLS)."""

    def __init__(
        self, mode: str, token: bytes, binding: bytes = b"", nonce: bytes | None = None
    ) -> None:
        self.mode = mode
        self.token = token
        self.binding = binding
        self.nonce = nonce if nonce is not None else auth.new_nonce()  # this end's
        self.done = False
        self._listen_nonce = self.nonce if mode == "listen" else b""
        self._buf = bytearray()

    def start(self) -> bytes:
        """What this end sends first: the listen end's CHALLENGE; nothing for the connect end."""
        if self.mode == "listen":
            return CHALLENGE.pack(PREAMBLE_MAGIC, PREAMBLE_VERSION, self.nonce)
        return b""

    def feed(self, data: bytes) -> tuple[bytes, bytes]:
        """Bytes from the peer: what to send it, and, once :attr:`done`, the bytes that follow
        the preamble (the first frames). PreambleError where the peer fails."""
        if self.done:
            return b"", data
        self._buf += data
        awaiting_header = self.mode == "listen" or not self._listen_nonce
        if awaiting_header and len(self._buf) >= len(PREAMBLE_MAGIC):
            self._check_header(bytes(self._buf[: len(PREAMBLE_MAGIC)]), PREAMBLE_VERSION)
        if self.mode == "listen":
            return self._feed_listen()
        if not self._listen_nonce:
            return self._feed_challenge()
        return self._feed_confirm()

    def _take(self, size: int) -> bytes | None:
        if len(self._buf) < size:
            return None
        taken = bytes(self._buf[:size])
        del self._buf[:size]
        return taken

    def _rest(self) -> bytes:
        self.done = True
        rest = bytes(self._buf)
        self._buf.clear()
        return rest

    def _check_header(self, magic: bytes, version: int) -> None:
        if magic != PREAMBLE_MAGIC:
            raise PreambleError(
                f"the peer sent no link preamble (its first bytes are {magic.hex()}): it has "
                "auth=none, or is QEMU's -netdev stream (which cannot prove a token); give both "
                "ends auth=token and the same token, or both auth=none"
            )
        if version != PREAMBLE_VERSION:
            raise PreambleError(
                f"link preamble version {version} (this end speaks {PREAMBLE_VERSION}): run the "
                "same viowire version at both ends"
            )

    def _mac(self, label: bytes, connect_nonce: bytes) -> bytes:
        return auth.proof(self.token, label, self._listen_nonce, connect_nonce, self.binding)

    def _feed_listen(self) -> tuple[bytes, bytes]:
        answer = self._take(ANSWER.size)
        if answer is None:
            return b"", b""
        magic, version, connect_nonce, mac = ANSWER.unpack(answer)
        self._check_header(magic, version)
        if not auth.verify(self._mac(auth.LINK_CONNECT_LABEL, connect_nonce), mac):
            raise PreambleError(
                "wrong token: its proof does not match this server's token (give both servers "
                f"the same --token-file or {auth.TOKEN_ENV}){auth.binding_hint(self.binding)}"
            )
        confirm = CONFIRM.pack(self._mac(auth.LINK_LISTEN_LABEL, connect_nonce))
        return confirm, self._rest()

    def _feed_challenge(self) -> tuple[bytes, bytes]:
        challenge = self._take(CHALLENGE.size)
        if challenge is None:
            return b"", b""
        magic, version, self._listen_nonce = CHALLENGE.unpack(challenge)
        self._check_header(magic, version)
        mac = self._mac(auth.LINK_CONNECT_LABEL, self.nonce)
        out = ANSWER.pack(PREAMBLE_MAGIC, PREAMBLE_VERSION, self.nonce, mac)
        confirm_out, rest = self._feed_confirm()
        return out + confirm_out, rest

    def _feed_confirm(self) -> tuple[bytes, bytes]:
        confirm = self._take(CONFIRM.size)
        if confirm is None:
            return b"", b""
        (mac,) = CONFIRM.unpack(confirm)
        if not auth.verify(self._mac(auth.LINK_LISTEN_LABEL, self.nonce), mac):
            raise PreambleError(
                "the peer did not prove it holds our token (its CONFIRM mac is wrong): another "
                f"token, or not the server we meant to reach{auth.binding_hint(self.binding)}"
            )
        return b"", self._rest()


@dataclass(frozen=True)
class LinkSpec:
    """``NAME,listen=URL`` or ``NAME,connect=URL``, and ``auth=token|none`` (None: token where
    the server has a token, else none)."""

    name: str
    mode: str
    url: str
    auth: str | None = None

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        name, *options = (part.strip() for part in text.split(","))
        values: dict[str, str] = {"name": name}
        for option in options:
            key, sep, value = (part.strip() for part in option.partition("="))
            if not sep or key in values:
                raise ValueError(f"--link {text!r}: write {SPEC_HELP} ({URL_HELP})")
            values[key] = value
        if not name or not any(mode in values for mode in MODES):
            raise ValueError(f"--link {text!r}: write {SPEC_HELP} ({URL_HELP})")
        return cls.from_mapping(values, f"--link {text!r}")

    @classmethod
    def from_mapping(cls, values: dict, where: str) -> LinkSpec:
        """From ``{"name": ..., "listen" or "connect": URL, "auth": "token" or "none"}`` (a
        TOML [[link]] table)."""
        unknown = set(values) - {"name", "auth", *MODES}
        modes = [mode for mode in MODES if mode in values]
        name = values.get("name")
        if unknown or len(modes) != 1 or not isinstance(name, str) or not name:
            raise ValueError(
                f"{where}: give name and one of listen= or connect= ({URL_HELP}), and "
                "optionally auth=token|none"
            )
        choice = values.get("auth")
        if choice is not None and choice not in AUTH_CHOICES:
            raise ValueError(f"{where}: auth={choice}: write auth=token or auth=none")
        url = values[modes[0]]
        try:
            parse_endpoint(str(url), tls=True)
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return cls(name, modes[0], str(url), choice)

    def __str__(self) -> str:
        return f"{self.name},{self.mode}={self.url}" + (f",auth={self.auth}" if self.auth else "")


def from_toml(path: str) -> list[LinkSpec]:
    """The ``[[link]]`` tables of a serve --config file: ``name = "lan"`` and ``listen = URL``
    or ``connect = URL``, and optionally ``auth = "token"`` or ``"none"``, as ``--link``."""
    import tomllib  # with --config alone

    with open(path, "rb") as f:
        entries = tomllib.load(f).get("link", [])
    if not isinstance(entries, list):
        raise ValueError(f"config {path}: write links as [[link]] tables")
    specs = []
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict):
            raise ValueError(f"config {path}: [[link]] #{i} is not a table")
        specs.append(LinkSpec.from_mapping(entry, f"config {path} [[link]] #{i}"))
    return specs


@dataclass
class PeerStats:
    frames_in: int = 0  # from peers, onto the link
    frames_out: int = 0  # from the link, to peers
    dropped: int = 0  # for a peer whose socket buffer was full
    connections: int = 0  # joined to the link (after the preamble, with auth=token), in all
    bad_peers: int = 0  # connections dropped for bad framing
    refused: int = 0  # connections that failed the preamble (wrong token, none, too slow)


class PeerConnection(asyncio.Protocol):
    """One stream connection: an uplink port of the link once the peer has proven the token
    (with auth=token; at once otherwise), until it closes."""

    def __init__(self, owner: LinkPeer) -> None:
        self.owner = owner
        self.deframer = StreamDeframer()
        self.transport: asyncio.Transport | None = None
        self.port: links.Port | None = None
        self.preamble: LinkPreamble | None = None
        self.joined = False  # was a port of the link (the preamble, if any, passed)
        self.paused = False
        self.peer = owner.spec.url
        self._timer: asyncio.TimerHandle | None = None
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:  # uvloop's is no asyncio.Transport
        self.transport = transport
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple):
            peer = f"{peer[0]}:{peer[1]}"
        self.peer = peer or self.owner.spec.url
        token = self.owner.token
        if token is None:
            self._join()
            return
        # TLS is established by now (asyncio calls connection_made after its handshake).
        self.preamble = LinkPreamble(self.owner.spec.mode, token, channel_binding(transport))
        transport.write(self.preamble.start())
        loop = asyncio.get_running_loop()
        self._timer = loop.call_later(self.owner.preamble_timeout, self._preamble_timed_out)

    def _join(self) -> None:
        name = self.owner.spec.name
        self.port = links.attach_uplink(name, f"peer {self.peer}", self._deliver)
        self.joined = True
        self.owner.stats.connections += 1
        self.owner.peers.add(self)
        how = " (token proven both ways)" if self.preamble is not None else ""
        log.info("link %s: peer %s connected%s", name, self.peer, how)

    def _refuse(self, reason: str) -> None:
        self.owner.stats.refused += 1
        log.warning("link %s: refusing peer %s: %s", self.owner.spec.name, self.peer, reason)
        self.transport.abort()

    def _preamble_timed_out(self) -> None:
        side = "CHALLENGE" if self.owner.spec.mode == "connect" else "its ANSWER"
        self._refuse(
            f"no link preamble within {self.owner.preamble_timeout:g} s (it sent no {side}): "
            "it has auth=none, or is QEMU's -netdev stream; give both ends auth=token and the "
            "same token, or both auth=none"
        )

    def data_received(self, data: bytes) -> None:
        preamble = self.preamble
        if preamble is not None and not preamble.done:
            try:
                out, data = preamble.feed(data)
            except PreambleError as exc:
                self._refuse(str(exc))
                return
            if out:
                self.transport.write(out)
            if not preamble.done:
                return
            self._timer.cancel()
            self._join()
        self._frames(data)

    def _frames(self, data: bytes) -> None:
        try:
            frames = self.deframer.feed(data)
        except StreamFramingError as exc:
            self.owner.stats.bad_peers += 1
            log.warning("link %s: dropping the peer connection: %s", self.owner.spec.name, exc)
            self.transport.abort()
            return
        for frame in frames:
            self.owner.stats.frames_in += 1
            if self.port is not None:
                self.port.send(frame)

    def _deliver(self, frame: bytes) -> None:
        transport = self.transport
        if self.paused or transport is None or transport.is_closing():
            self.owner.stats.dropped += 1
            return
        if transport.get_write_buffer_size() > self.owner.send_limit:
            self.owner.stats.dropped += 1
            return
        transport.write(encode(frame))
        self.owner.stats.frames_out += 1

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        if self.port is not None:
            links.release(self.port)
            self.port = None
        self.owner.peers.discard(self)
        self.owner.open_conns.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)


class LinkPeer:
    """One ``--link``: a listener for peers, or a connection kept to one. ``security``: the
    server's (viowire.server.app.Security): its token, its TLS contexts (``tls`` for a
    ``listen=tls://``, ``peer_tls`` for a ``connect=tls://``) and ``insecure``."""

    def __init__(
        self,
        spec: LinkSpec,
        *,
        security: Security | None = None,
        send_limit: int = SEND_LIMIT,
        preamble_timeout: float = PREAMBLE_TIMEOUT,
    ) -> None:
        from viowire.server.app import Security  # app imports this module

        self.spec = spec
        self.security = security or Security()
        self.send_limit = send_limit
        self.preamble_timeout = preamble_timeout
        self.stats = PeerStats()
        self.peers: set[PeerConnection] = set()  # open now and joined to the link
        self.open_conns: set[PeerConnection] = set()  # open now, in the preamble or joined
        self.endpoint: Endpoint | None = None  # where it listens (a port 0 resolved)
        self._server: asyncio.base_events.Server | None = None
        self._path: str | None = None
        self._task: asyncio.Task[None] | None = None

    @property
    def auth(self) -> str:
        """``token`` or ``none``: as the spec says, else token where the server has one."""
        return self.spec.auth or ("token" if self.security.token is not None else "none")

    @property
    def token(self) -> bytes | None:
        """The token the peers prove in the preamble; None: no preamble (auth=none)."""
        return self.security.token if self.auth == "token" else None

    def check(self) -> None:
        """Refuse, before anything is bound or dialled, a link that cannot work or that anyone
        could join: auth=token without a token, tls:// without the certificates it needs, a
        non-loopback address with no token and no TLS certificate naming the other end (the
        rule of serve's own listeners, viowire.auth.exposed), unless --insecure."""
        spec, security = self.spec, self.security
        endpoint = parse_endpoint(spec.url, tls=True)
        where = f"--link {spec}"
        if spec.auth == "token" and security.token is None:
            raise UsageError(
                f"{where}: auth=token, but no token: give --token-file FILE or {auth.TOKEN_ENV}"
            )
        tls_proves = False
        if endpoint.scheme == "tls" and spec.mode == "listen":
            if security.tls is None:
                raise UsageError(
                    f"{where}: a tls:// listener needs --tls-cert FILE and --tls-key FILE"
                )
            tls_proves = security.client_certs  # only certificates of --tls-client-ca get in
        elif endpoint.scheme == "tls":
            if security.peer_tls is None:
                raise UsageError(
                    f"{where}: connect=tls:// needs --tls-cert FILE and --tls-key FILE (this "
                    "end's certificate, for a peer that asks) and --tls-client-ca FILE (the CA "
                    "of the peer's certificate; default: the system's CAs)"
                )
            tls_proves = True  # the peer's certificate is checked against its name
        if auth.exposed(
            endpoint, proven=self.token is not None or tls_proves, insecure=security.insecure
        ):
            verb, who = ("listen on", "anyone who reaches it")
            if spec.mode == "connect":
                verb, who = ("connect to", "whoever answers there")
            raise UsageError(
                f"refusing to {verb} {spec.url} for link {spec.name} without authentication "
                f"({who} could put frames on the link): give both servers the same token "
                f"(--token-file FILE or {auth.TOKEN_ENV}; links then default to auth=token), "
                "or use tls:// (for listen=, with --tls-client-ca), or say --insecure"
            )

    async def start(self) -> None:
        if self.spec.mode == "listen":
            await self._listen()
        else:
            self._task = asyncio.get_running_loop().create_task(self._keep_connected())

    def _connection(self) -> PeerConnection:
        conn = PeerConnection(self)
        self.open_conns.add(conn)
        return conn

    async def _listen(self) -> None:
        from viowire.server.app import bind  # the one way a URL becomes a listening socket

        endpoint, sock = bind(self.spec.url)
        self.endpoint = endpoint
        loop = asyncio.get_running_loop()
        if endpoint.inet:
            context = self.security.tls if endpoint.scheme == "tls" else None
            self._server = await loop.create_server(
                self._connection,
                sock=sock,
                ssl=context,
                ssl_handshake_timeout=self.preamble_timeout if context else None,
            )
        else:
            self._path = endpoint.path
            self._server = await loop.create_unix_server(self._connection, sock=sock)
        log.info(
            "link %s: listening for peers on %s (auth=%s)", self.spec.name, endpoint, self.auth
        )

    async def _dial(self, endpoint: Endpoint) -> PeerConnection:
        loop = asyncio.get_running_loop()
        if endpoint.inet:
            context = self.security.peer_tls if endpoint.scheme == "tls" else None
            _, conn = await loop.create_connection(
                self._connection,
                endpoint.host,
                endpoint.port,
                ssl=context,
                server_hostname=endpoint.host if context else None,
                ssl_handshake_timeout=self.preamble_timeout if context else None,
            )
        else:
            _, conn = await loop.create_unix_connection(self._connection, endpoint.path)
        return conn

    async def _keep_connected(self) -> None:
        endpoint = parse_endpoint(self.spec.url, tls=True)
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        while True:
            try:
                conn = await self._dial(endpoint)
            except OSError as exc:  # a TLS failure too (ssl.SSLError), and a timeout
                # Nobody listening yet is routine; a certificate refused is the user's to fix.
                level = logging.WARNING if isinstance(exc, ssl.SSLError) else logging.DEBUG
                log.log(
                    level, "link %s: %s: %s; again in %g s", self.spec.name, endpoint, exc, delay
                )
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            since = loop.time()
            await conn.lost
            # A peer that refuses us (a wrong token; under TLS 1.3 our certificate, refused only
            # after our handshake is done) is tried again at the backoff's pace, not in a loop.
            if conn.joined and loop.time() - since >= STABLE:
                delay = BACKOFF_FIRST
                log.info("link %s: peer %s gone; reconnecting", self.spec.name, endpoint)
            else:
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            self._server.close()
        for conn in list(self.open_conns):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        await asyncio.sleep(0)  # connection_lost callbacks run: the ports are released
