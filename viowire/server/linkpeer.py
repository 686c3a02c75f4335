"""Links that span servers: ``serve --link NAME,listen=URL`` and ``--link NAME,connect=URL``
join link NAME of two server processes over a stream socket (TCP or Unix), as QEMU's
``-netdev stream`` joins two QEMUs, with its framing: each Ethernet frame is preceded by its
length, 4 bytes big-endian (QEMU net/stream.c sends ``htonl(size)`` then the frame, and
net_fill_rstate reads it back), no virtio header. So a QEMU guest with
``-netdev stream,id=n0,server=off,addr.type=unix,addr.path=PATH`` can join a viowire link too.

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
import struct
import tomllib
from dataclasses import dataclass

from viowire.server import link as links
from viowire.urls import parse_endpoint

log = logging.getLogger("viowire.linkpeer")

LENGTH = struct.Struct("!I")
MAX_FRAME = 4096 + 65536  # QEMU's NET_BUFSIZE: the largest frame its stream peer takes
SEND_LIMIT = 256 * 1024  # bytes waiting in a peer's socket buffer before frames are dropped
BACKOFF_FIRST, BACKOFF_MAX = 0.1, 5.0
MODES = ("listen", "connect")


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


@dataclass(frozen=True)
class LinkSpec:
    """``NAME,listen=URL`` or ``NAME,connect=URL``."""

    name: str
    mode: str
    url: str

    @classmethod
    def parse(cls, text: str) -> LinkSpec:
        name, _, rest = (part.strip() for part in text.partition(","))
        mode, sep, url = (part.strip() for part in rest.partition("="))
        if not name or not sep or mode not in MODES:
            raise ValueError(
                f"--link {text!r}: write NAME,listen=URL or NAME,connect=URL "
                "(URL: tcp://HOST:PORT or unix:///PATH)"
            )
        return cls.from_mapping({"name": name, mode: url}, f"--link {text!r}")

    @classmethod
    def from_mapping(cls, values: dict, where: str) -> LinkSpec:
        """From ``{"name": ..., "listen" or "connect": URL}`` (a TOML [[link]] table)."""
        unknown = set(values) - {"name", *MODES}
        modes = [mode for mode in MODES if mode in values]
        name = values.get("name")
        if unknown or len(modes) != 1 or not isinstance(name, str) or not name:
            raise ValueError(
                f"{where}: give name and one of listen= or connect= (a tcp:// or unix:// URL)"
            )
        url = values[modes[0]]
        try:
            parse_endpoint(str(url))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
        return cls(name, modes[0], str(url))


def from_toml(path: str) -> list[LinkSpec]:
    """The ``[[link]]`` tables of a serve --config file: ``name = "lan"`` and ``listen = URL``
    or ``connect = URL``, as ``--link``."""
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
    connections: int = 0  # made, in all
    bad_peers: int = 0  # connections dropped for bad framing


class PeerConnection(asyncio.Protocol):
    """One stream connection: an uplink port of the link while it is open."""

    def __init__(self, owner: LinkPeer) -> None:
        self.owner = owner
        self.deframer = StreamDeframer()
        self.transport: asyncio.Transport | None = None
        self.port: links.Port | None = None
        self.paused = False
        self.lost: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def connection_made(self, transport) -> None:  # uvloop's is no asyncio.Transport
        self.transport = transport
        peer = transport.get_extra_info("peername") or self.owner.spec.url
        self.port = links.attach_uplink(self.owner.spec.name, f"peer {peer}", self._deliver)
        self.owner.stats.connections += 1
        self.owner.peers.add(self)
        log.info("link %s: peer %s connected", self.owner.spec.name, peer)

    def data_received(self, data: bytes) -> None:
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
        if self.port is not None:
            links.release(self.port)
            self.port = None
        self.owner.peers.discard(self)
        if not self.lost.done():
            self.lost.set_result(None)


class LinkPeer:
    """One ``--link``: a listener for peers, or a connection kept to one."""

    def __init__(self, spec: LinkSpec, *, send_limit: int = SEND_LIMIT) -> None:
        self.spec = spec
        self.send_limit = send_limit
        self.stats = PeerStats()
        self.peers: set[PeerConnection] = set()  # open now
        self._server: asyncio.base_events.Server | None = None
        self._path: str | None = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        if self.spec.mode == "listen":
            await self._listen()
        else:
            self._task = asyncio.get_running_loop().create_task(self._keep_connected())

    async def _listen(self) -> None:
        from viowire.server.app import bind  # the one way a URL becomes a listening socket

        endpoint, sock = bind(self.spec.url)
        loop = asyncio.get_running_loop()
        if endpoint.scheme == "tcp":
            self._server = await loop.create_server(lambda: PeerConnection(self), sock=sock)
        else:
            self._path = endpoint.path
            self._server = await loop.create_unix_server(lambda: PeerConnection(self), sock=sock)
        log.info("link %s: listening for peers on %s", self.spec.name, endpoint)

    async def _keep_connected(self) -> None:
        endpoint = parse_endpoint(self.spec.url)
        loop = asyncio.get_running_loop()
        delay = BACKOFF_FIRST
        while True:
            try:
                if endpoint.scheme == "tcp":
                    _, conn = await loop.create_connection(
                        lambda: PeerConnection(self), endpoint.host, endpoint.port
                    )
                else:
                    _, conn = await loop.create_unix_connection(
                        lambda: PeerConnection(self), endpoint.path
                    )
            except OSError as exc:
                log.debug("link %s: %s: %s; again in %g s", self.spec.name, endpoint, exc, delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, BACKOFF_MAX)
                continue
            delay = BACKOFF_FIRST
            await conn.lost
            log.info("link %s: peer %s gone; reconnecting", self.spec.name, endpoint)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._server is not None:
            self._server.close()
        for conn in list(self.peers):
            if conn.transport is not None:
                conn.transport.abort()
        if self._server is not None:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), 1.0)
        if self._path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self._path)
        await asyncio.sleep(0)  # connection_lost callbacks run: the ports are released
