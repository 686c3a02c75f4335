"""The device server: listeners on TCP and Unix sockets, one ServerSession per connection."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import stat

from viowire.fdsocket import FdSocketTransport
from viowire.server.platform import PlatformSpec
from viowire.server.session import ServerSession
from viowire.urls import Endpoint, parse_endpoint

log = logging.getLogger("viowire.server")


class Server:
    """Hosts one platform description; every connection gets its own instance of it."""

    def __init__(
        self, spec: PlatformSpec | None = None, *, name: str = "viowire", allow_shm: bool = True
    ) -> None:
        """``allow_shm=False`` refuses named /dev/shm segments: a same-host peer could shrink
        its segment under the server (a SIGBUS); memfds over Unix sockets are sealed instead."""
        self.spec = spec or PlatformSpec.default()
        self.name = name
        self.allow_shm = allow_shm
        self.endpoints: list[Endpoint] = []
        self.sessions: set[ServerSession] = set()
        self._tcp_servers: list[asyncio.base_events.Server] = []
        self._unix_socks: list[tuple[socket.socket, str]] = []

    async def start(self, urls: list[str]) -> list[Endpoint]:
        """Listen on every URL; TCP port 0 picks a free port (the endpoint tells which)."""
        self.spec.validate()
        for url in urls:
            endpoint = parse_endpoint(url)
            if endpoint.scheme == "tcp":
                self.endpoints.append(await self._listen_tcp(endpoint))
            else:
                self.endpoints.append(self._listen_unix(endpoint))
        return self.endpoints

    def _session(self, fd_passing: bool) -> ServerSession:
        session = ServerSession(
            self.spec, fd_passing=fd_passing, allow_shm=self.allow_shm, name=self.name
        )
        self.sessions.add(session)
        original = session.connection_lost

        def connection_lost(exc: Exception | None) -> None:
            self.sessions.discard(session)
            original(exc)

        session.connection_lost = connection_lost
        return session

    async def _listen_tcp(self, endpoint: Endpoint) -> Endpoint:
        loop = asyncio.get_running_loop()
        server = await loop.create_server(
            lambda: self._session(False), endpoint.host, endpoint.port, reuse_address=True
        )
        self._tcp_servers.append(server)
        for sock in server.sockets:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = server.sockets[0].getsockname()[:2]
        return Endpoint("tcp", host=host, port=port)

    def _listen_unix(self, endpoint: Endpoint) -> Endpoint:
        path = endpoint.path
        with contextlib.suppress(FileNotFoundError):
            if stat.S_ISSOCK(os.stat(path).st_mode):
                os.unlink(path)  # a stale socket from an earlier run
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(path)
        sock.listen(512)
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept_unix, sock)
        self._unix_socks.append((sock, path))
        return endpoint

    def _accept_unix(self, listener: socket.socket) -> None:
        # Unix connections use our own transport so the guest's memfd can arrive by SCM_RIGHTS.
        loop = asyncio.get_running_loop()
        for _ in range(64):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: keep the listener, drop this one
                log.warning("accept on %s failed: %s", listener.getsockname(), exc)
                return
            FdSocketTransport(loop, conn, self._session(True))

    async def close(self) -> None:
        """Stop listening and close every session."""
        loop = asyncio.get_running_loop()
        for server in self._tcp_servers:
            server.close()
        for sock, path in self._unix_socks:
            loop.remove_reader(sock.fileno())
            sock.close()
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
