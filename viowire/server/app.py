"""The device server: listeners on TCP (plain or TLS) and Unix sockets, one ServerSession per
connection, and what a listener requires of its clients (:class:`Security`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import ssl
import stat
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial

from viowire import auth
from viowire.fdsocket import FdSocketTransport
from viowire.options import UsageError
from viowire.server.limits import Budget, Limits
from viowire.server.linkpeer import LinkPeer, LinkSpec
from viowire.server.platform import PlatformSpec
from viowire.server.service import Started
from viowire.server.session import HELLO_TIMEOUT, ServerSession, Turns
from viowire.urls import Endpoint, parse_endpoint

log = logging.getLogger("viowire.server")
ACCEPT_RETRY = 0.5  # seconds: how long to stop accepting when out of file descriptors
SOCKET_MODE = 0o600  # a Unix socket is the server's user's alone unless told otherwise
PROBE_TIMEOUT = 1.0  # seconds a live server has to accept the takeover probe
ACCEPTS_PER_TURN = 64  # connections a listener accepts per turn of the event loop
LISTEN_BACKLOG = 512  # connections the kernel holds until they are accepted


@dataclass(frozen=True)
class Security:
    """What the listeners require: ``token`` (every session proves it in AUTH, on every
    listener), ``tls`` (the context of ``tls://`` listeners; ``client_certs`` when it requires
    client certificates), ``insecure`` (serve a non-loopback TCP listener that authenticates
    nobody), ``socket_mode`` (of Unix socket files). ``peer_tls``: the client context of
    ``--link NAME,connect=tls://`` (viowire.server.linkpeer)."""

    token: bytes | None = None
    tls: ssl.SSLContext | None = None
    client_certs: bool = False
    peer_tls: ssl.SSLContext | None = None
    insecure: bool = False
    socket_mode: int = SOCKET_MODE

    def check(self, urls: list[str]) -> None:
        """Refuse, before anything is bound, a listener that would serve devices to anyone on
        the network: a non-loopback TCP address without a token or client certificates."""
        for url in urls:
            endpoint = parse_endpoint(url, tls=True)
            if endpoint.scheme == "tls" and self.tls is None:
                raise UsageError(
                    f"{url}: a tls:// listener needs --tls-cert FILE and --tls-key FILE"
                )
            proven = self.token is not None or (endpoint.scheme == "tls" and self.client_certs)
            if auth.exposed(endpoint, proven=proven, insecure=self.insecure):
                raise UsageError(
                    f"refusing to listen on {url} without authentication (anyone who reaches it "
                    f"would get devices): give a token (--token-file FILE or {auth.TOKEN_ENV}), or "
                    "tls:// with --tls-client-ca, or say --insecure"
                )


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
        security: Security | None = None,
        limits: Limits | None = None,
    ) -> None:
        """``allow_shm=False`` refuses named /dev/shm segments: a same-host peer could shrink
        its segment under the server (a SIGBUS); memfds over Unix sockets are sealed instead.
        ``poll_us``: after serving a queue in shared memory, poll it up to this long for more with
        the driver's notifications off (vhost's busy-polling: fewer wake-ups, more CPU); the
        window adapts to the traffic (viowire.server.service). ``links``: in-server links to
        join with other servers' (viowire.server.linkpeer), once the server listens.
        ``security``: the token, TLS and socket mode of the listeners (default: none of them,
        and only loopback TCP addresses). ``limits``: what its sessions may take
        (viowire.server.limits; default: Limits())."""
        if poll_us < 0:
            raise ValueError(f"poll_us {poll_us}: 0 (off) or a number of microseconds")
        self.spec = spec or PlatformSpec.default()
        self.name = name
        self.allow_shm = allow_shm
        self.poll_us = poll_us
        self.security = security or Security()
        self.budget = Budget(limits)
        self.turns = Turns()
        self.endpoints: list[Endpoint] = []
        self.sessions: set[ServerSession] = set()
        self._listeners: list[tuple[socket.socket, Callable[[socket.socket], None]]] = []
        self._adopting: set[asyncio.Task] = set()  # TCP connections becoming transports
        self._own_paths: list[str] = []
        self.link_peers = [LinkPeer(spec, security=self.security) for spec in links or ()]

    async def start(self, urls: list[str]) -> list[Endpoint]:
        """Listen on every URL; TCP port 0 picks a free port (the endpoint tells which)."""
        self.spec.validate()
        self.security.check(urls)
        for peer in self.link_peers:
            peer.check()
        listeners = [bind(url, self.security.socket_mode) for url in urls]
        self._own_paths = [endpoint.path for endpoint, _ in listeners if endpoint.path]
        endpoints = await self.serve(listeners)
        for peer in self.link_peers:
            await peer.start()
        return endpoints

    async def serve(self, listeners: list[tuple[Endpoint, socket.socket]]) -> list[Endpoint]:
        """Accept on sockets bound already (by :func:`bind`, maybe in a parent process)."""
        for endpoint, sock in listeners:
            if endpoint.inet:
                tls = self.security.tls if endpoint.scheme == "tls" else None
                self._listen(sock, partial(self._adopt_tcp, tls=tls))
            else:
                self._listen(sock, self._adopt_unix)
            self.endpoints.append(endpoint)
        return self.endpoints

    def _session(self, fd_passing: bool) -> ServerSession:
        session = ServerSession(
            self.spec,
            fd_passing=fd_passing,
            allow_shm=self.allow_shm,
            name=self.name,
            poll_us=self.poll_us,
            token=self.security.token,
            budget=self.budget,
            turns=self.turns,
        )
        made, lost = session.connection_made, session.connection_lost

        # A session counts from its connection: a TLS handshake that fails never makes it (and
        # never loses it either), so it must not be counted at creation.
        def connection_made(transport: asyncio.BaseTransport) -> None:
            self.sessions.add(session)
            made(transport)

        def connection_lost(exc: Exception | None) -> None:
            self.sessions.discard(session)
            lost(exc)

        session.connection_made = connection_made
        session.connection_lost = connection_lost
        return session

    # -- accepting ---------------------------------------------------------------------------
    # The listeners are accepted on here, not by loop.create_server: uvloop (libuv) accepts one
    # connection per turn of the event loop, and under a flood a turn serves many slices, so a
    # burst of connections (200 in issue 12's flood) queued for a second in the kernel, and a
    # fresh client's connection waited behind them. Here every turn takes up to
    # ACCEPTS_PER_TURN of them.
    def _listen(self, sock: socket.socket, adopt: Callable[[socket.socket], None]) -> None:
        sock.setblocking(False)
        asyncio.get_running_loop().add_reader(sock.fileno(), self._accept, sock, adopt)
        self._listeners.append((sock, adopt))

    def _accept(self, listener: socket.socket, adopt: Callable[[socket.socket], None]) -> None:
        loop = asyncio.get_running_loop()
        for _ in range(ACCEPTS_PER_TURN):
            try:
                conn, _ = listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                # EMFILE and friends: the listener stays readable, so watching it now would spin.
                # Look away for a moment (asyncio's own servers do the same).
                log.warning("accept on %s failed: %s; retrying in %g s", listener.getsockname(),
                            exc, ACCEPT_RETRY)  # fmt: skip
                loop.remove_reader(listener.fileno())
                loop.call_later(ACCEPT_RETRY, self._resume_accepting, listener, adopt)
                return
            adopt(conn)

    def _resume_accepting(
        self, listener: socket.socket, adopt: Callable[[socket.socket], None]
    ) -> None:
        if any(sock is listener for sock, _ in self._listeners) and listener.fileno() >= 0:
            asyncio.get_running_loop().add_reader(listener.fileno(), self._accept, listener, adopt)

    def _adopt_unix(self, conn: socket.socket) -> None:
        # Unix connections use our own transport so the guest's memfd can arrive by SCM_RIGHTS.
        FdSocketTransport(asyncio.get_running_loop(), conn, self._session(True))

    def _adopt_tcp(self, conn: socket.socket, tls: ssl.SSLContext | None) -> None:
        """The loop's own transport for a TCP connection (TLS: once its handshake is done).
        Both loops build the transport before the coroutine first waits, so it is stepped here
        at once: the connection is made in this turn of the loop, not a task's turn later."""
        conn.setblocking(False)
        loop = asyncio.get_running_loop()
        adopting = loop.connect_accepted_socket(
            lambda: self._session(False),
            conn,
            ssl=tls,
            ssl_handshake_timeout=HELLO_TIMEOUT if tls else None,
        )
        try:
            waiting_on = adopting.send(None)
        except StopIteration:
            return
        except Exception:  # before a transport owns it: only the protocol factory raises here
            log.exception("an accepted connection could not be adopted; closed")
            conn.close()
            return
        task = loop.create_task(Started(adopting, waiting_on))
        self._adopting.add(task)
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task) -> None:
        self._adopting.discard(task)
        if not task.cancelled() and task.exception() is not None:
            # A peer's failed TLS handshake, or a connection gone before it was adopted: the
            # loop has closed its socket.
            log.info("connection not adopted: %s", task.exception())

    async def close(self) -> None:
        """Stop listening and close every session."""
        loop = asyncio.get_running_loop()
        for peer in self.link_peers:
            await peer.close()
        for sock, _adopt in self._listeners:
            loop.remove_reader(sock.fileno())
            sock.close()
        for path in self._own_paths:  # a worker leaves the socket file to its supervisor
            with contextlib.suppress(FileNotFoundError):
                os.unlink(path)
        for task in list(self._adopting):
            task.cancel()
        await asyncio.gather(*self._adopting, return_exceptions=True)
        for session in list(self.sessions):
            if session.transport is not None:
                session.transport.close()
        await asyncio.sleep(0)
        self._listeners.clear()

    async def __aenter__(self) -> Server:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class ListenError(OSError):
    """A listener that cannot be opened; the message names it."""

    def __str__(self) -> str:
        return self.strerror


def bind(url: str, socket_mode: int = SOCKET_MODE) -> tuple[Endpoint, socket.socket]:
    """:func:`_bind`, with an error that names the listener (a server may have several)."""
    try:
        return _bind(url, socket_mode)
    except OSError as exc:
        reason = exc.strerror or str(exc)
        reason = reason.removeprefix(url.split("://", 1)[-1] + ": ")  # said once is enough
        raise ListenError(exc.errno, f"cannot listen on {url}: {reason}") from exc


def _bind(url: str, socket_mode: int = SOCKET_MODE) -> tuple[Endpoint, socket.socket]:
    """A listening socket for ``url``; TCP port 0 becomes a free port (the endpoint says which).
    A Unix socket file gets ``socket_mode``; a live server's socket is never taken over.

    Separate from serving, so that a supervisor can bind once and its forked workers share the
    sockets (the kernel hands each connection to one of them).
    """
    endpoint = parse_endpoint(url, tls=True)
    if endpoint.inet:
        sock = socket.create_server(
            (endpoint.host, endpoint.port),
            family=socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET,
            backlog=LISTEN_BACKLOG,
            reuse_port=False,
        )
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        host, port = sock.getsockname()[:2]
        return Endpoint(endpoint.scheme, host=host, port=port), sock
    path = endpoint.path
    _reclaim(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    # Created closed (umask), then opened as far as asked: never a moment open to everyone.
    umask = os.umask(0o177)
    try:
        sock.bind(path)
        os.chmod(path, socket_mode)
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        raise
    finally:
        os.umask(umask)
    return endpoint, sock


def _reclaim(path: str) -> None:
    """Remove a stale socket file from an earlier run; refuse one a live server accepts on."""
    try:
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            return  # bind fails with EADDRINUSE and says so
    except FileNotFoundError:
        return
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(PROBE_TIMEOUT)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)  # nobody listens: stale
        return
    except OSError as exc:  # a timeout (a full backlog), no permission: someone may be there
        raise OSError(
            f"{path}: cannot tell whether a server listens there ({exc}); not taking it over"
        ) from None
    finally:
        probe.close()
    raise OSError(
        f"{path}: another server is listening there; stop it or listen on another path "
        "(not taking over a live socket)"
    )


def security_from_args(args: object) -> Security:
    """The Security of ``serve``'s options (viowire.options.add_serve_security_options)."""
    from viowire import tls

    context = peer_tls = None
    if args.tls_cert or args.tls_key:
        if not (args.tls_cert and args.tls_key):
            raise UsageError("TLS needs both --tls-cert FILE and --tls-key FILE")
        context = tls.server_context(args.tls_cert, args.tls_key, args.tls_client_ca)
        # --link connect=tls://: the same certificate, and the same CA for the peer's
        peer_tls = tls.client_context(args.tls_client_ca, args.tls_cert, args.tls_key)
    elif args.tls_client_ca:
        raise UsageError("--tls-client-ca needs a tls:// listener with --tls-cert and --tls-key")
    try:
        token = auth.token_from(args.token_file)
    except auth.AuthError as exc:
        raise UsageError(str(exc)) from None
    return Security(
        token=token,
        tls=context,
        client_certs=bool(args.tls_client_ca),
        peer_tls=peer_tls,
        insecure=args.insecure,
        socket_mode=args.socket_mode,
    )
