"""The device server: listeners on TCP and Unix sockets, one ServerSession per connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat

from viowire.fdsocket import FdSocketTransport
from viowire.server.linkpeer import LinkPeer, LinkSpec
from viowire.server.platform import PlatformSpec
from viowire.server.session import ServerSession
from viowire.urls import Endpoint, parse_endpoint

log = logging.getLogger("viowire.server")
ACCEPT_RETRY = 0.5  # seconds: how long to stop accepting when out of file descriptors


class Server:
    """Hosts one platform description; every connection gets its own instance of it."""

    def __init__(
        self,
        spec: PlatformSpec | None = None,
        *,
        name: str = "viowire",
        allow_shm: bool = True,
        poll_us: int = 0,
        links: list[LinkSpec] | None = None,
    ) -> None:
        """``allow_shm=False`` refuses named /dev/shm segments: a same-host peer could shrink
        its segment under the server (a SIGBUS); memfds over Unix sockets are sealed instead.
        ``poll_us``: after serving a queue in shared memory, poll it up to this long for more with
        the driver's notifications off (vhost's busy-polling: fewer wake-ups, more CPU); the
        window adapts to the traffic (viowire.server.service). ``links``: in-server links to
        join with other servers' (viowire.server.linkpeer), once the server listens."""
        if poll_us < 0:
            raise ValueError(f"poll_us {poll_us}: 0 (off) or a number of microseconds")
        self.spec = spec or PlatformSpec.default()
        self.name = name
        self.allow_shm = allow_shm
        self.poll_us = poll_us
        self.endpoints: list[Endpoint] = []
        self.sessions: set[ServerSession] = set()
        self._tcp_servers: list[asyncio.base_events.Server] = []
        self._unix_socks: list[tuple[socket.socket, str]] = []
        self._own_paths: list[str] = []
        self.link_peers = [LinkPeer(spec) for spec in links or ()]

    async def start(self, urls: list[str]) -> list[Endpoint]:
        """Listen on every URL; TCP port 0 picks a free port (the endpoint tells which)."""
        self.spec.validate()
        listeners = [bind(url) for url in urls]
        self._own_paths = [endpoint.path for endpoint, _ in listeners if endpoint.path]
        endpoints = await self.serve(listeners)
        for peer in self.link_peers:
            await peer.start()
        return endpoints

    async def serve(self, listeners: list[tuple[Endpoint, socket.socket]]) -> list[Endpoint]:
        """Accept on sockets bound already (by :func:`bind`, maybe in a parent process)."""
        for endpoint, sock in listeners:
            if endpoint.scheme == "tcp":
                await self._serve_tcp(sock)
            else:
                self._serve_unix(sock, endpoint.path)
            self.endpoints.append(endpoint)
        return self.endpoints

    def _session(self, fd_passing: bool) -> ServerSession:
        session = ServerSession(
            self.spec,
            fd_passing=fd_passing,
            allow_shm=self.allow_shm,
            name=self.name,
            poll_us=self.poll_us,
        )
        self.sessions.add(session)
        original = session.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            self.sessions.discard(session)
            original(exc)

        session.connection_lost = connection_lost
        return session

    async def _serve_tcp(self, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(lambda: self._session(False), sock=sock)
        self._tcp_servers.append(server)

    def _serve_unix(self, sock: socket.socket, path: str) -> None:
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_unix, sock)
        self._unix_socks.append((sock, path))

    def _accept_unix(self, listener: socket.socket) -> None:
        # Unix connections use our own transport so the guest's memfd can arrive by SCM_RIGHTS.
        loop = asyncio.get_running_loop()
        for _ in range(64):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: the listener stays readable, so watching it now would spin.
                # Look away for a moment (TCP listeners: asyncio does the same).
                log.warning("accept on %s failed: %s; retrying in %g s", listener.getsockname(),
                            exc, ACCEPT_RETRY)  # fmt: skip
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_RETRY, self._resume_accepting, listener)
                return
            FdSocketTransport(loop, conn, self._session(True))

    def _resume_accepting(self, listener: socket.socket) -> None:
        if any(sock is listener for sock, _ in self._unix_socks) and listener.fileno() >= 0:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept_unix, listener)

    async def close(self) -> None:
        """Stop listening and close every session."""
        loop = asyncio.get_running_loop()
        for peer in self.link_peers:
            await peer.close()
        for server in self._tcp_servers:
            server.close()
        for sock, _path in self._unix_socks:
            loop.remove_reader(sock.fileno())
            sock.close()
        for path in self._own_paths:  # a worker leaves the socket file to its supervisor
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        for server in self._tcp_servers:
            await server.wait_closed()
        await asyncio.sleep(0)
        self._tcp_servers.clear()
        self._unix_socks.clear()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ListenError(OSError):
    """A listener that cannot be opened; the message names it."""

    def __str__(self) -> str:
        return self.strerror


def bind(url: str) -> tuple[Endpoint, socket.socket]:
    """:func:`_bind`, with an error that names the listener (a server may have several)."""
    try:
        return _bind(url)
    except OSError as exc:
        raise ListenError(exc.errno, f"cannot listen on {url}: {exc.strerror or exc}") from exc


def _bind(url: str) -> tuple[Endpoint, socket.socket]:
    """A listening socket for ``url``; TCP port 0 becomes a free port (the endpoint says which).

    Separate from serving, so that a supervisor can bind once and its forked workers share the
    sockets (the kernel hands each connection to one of them).
    """
    endpoint = parse_endpoint(url)
    if endpoint.scheme == "tcp":
        sock = socket.create_server(
            (endpoint.host, endpoint.port),
            family=socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET,
            backlog=512,
            reuse_port=False,
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = sock.getsockname()[:2]
        return Endpoint("tcp", host=host, port=port), sock
    path = endpoint.path
    with contextlib.suppress(FileNotFoundError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)  # a stale socket from an earlier run
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        sock.listen(512)
    except OSError:
        sock.close()
        raise
    return endpoint, sock
