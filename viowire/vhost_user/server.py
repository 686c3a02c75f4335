"""The I/O of the vhost-user back-end: listening sockets, one front-end per socket.

Each :class:`Listener` serves one device on one Unix socket (QEMU's ``-chardev socket,path=``
connects to it). One front-end at a time: another that connects meanwhile is told so in the log
and closed. The device's storage lives as long as the listener; its transport state (rings,
memory table, features) as long as the connection, and a front-end that reconnects starts
afresh.

A message is read with one ``recvmsg`` per header and one per payload, never past its end, so
the descriptors a read brings (SCM_RIGHTS) are the message's own.
"""

from __future__ import annotations

import array
import asyncio
import contextlib
import logging
import os
import socket
import stat

from viowire.device import Device
from viowire.vhost_user import protocol as p
from viowire.vhost_user.backend import VhostUserDevice
from viowire.vhost_user.memory import close_fds

log = logging.getLogger("viowire.vhost_user")

_FD_SIZE = array.array("i").itemsize
_ANCILLARY = socket.CMSG_SPACE(p.MAX_FDS * _FD_SIZE)


async def _readable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    waiter = loop.create_future()
    loop.add_reader(sock.fileno(), waiter.set_result, None)
    try:
        await waiter
    finally:
        loop.remove_reader(sock.fileno())


async def recv_message_part(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, size: int
) -> tuple[bytes, list[int]]:
    """Up to ``size`` bytes and the descriptors that came with them; b"" at EOF."""
    while True:
        try:
            data, ancdata, flags, _ = sock.recvmsg(size, _ANCILLARY, socket.MSG_CMSG_CLOEXEC)
        except (BlockingIOError, InterruptedError):
            await _readable(loop, sock)
            continue
        fds = array.array("i")
        for level, kind, raw in ancdata:
            if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
                fds.frombytes(raw[: len(raw) - len(raw) % _FD_SIZE])
        if flags & socket.MSG_CTRUNC:
            close_fds(fds.tolist())
            raise p.ProtocolError(f"more than {p.MAX_FDS} descriptors with one message")
        return data, fds.tolist()


async def send_reply(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, answer: bytes | p.Reply
) -> None:
    """A reply, with its descriptors (if any) on its first byte; our copies are closed after."""
    if isinstance(answer, bytes):
        await loop.sock_sendall(sock, answer)
        return
    data = answer.data
    try:
        while answer.fds:
            try:
                sent = socket.send_fds(sock, [data], answer.fds)
            except (BlockingIOError, InterruptedError):
                await _writable(loop, sock)
                continue
            data = data[sent:]
            break
    finally:
        close_fds(answer.fds)
    if data:
        await loop.sock_sendall(sock, data)


async def _writable(loop: asyncio.AbstractEventLoop, sock: socket.socket) -> None:
    waiter = loop.create_future()
    loop.add_writer(sock.fileno(), waiter.set_result, None)
    try:
        await waiter
    finally:
        loop.remove_writer(sock.fileno())


class Listener:
    """One socket, one device."""

    def __init__(self, path: str, device: Device, name: str = "") -> None:
        self.path = path
        self.device = device
        self.name = name or f"{device.type_name or type(device).__name__}@{path}"
        self.connection: VhostUserDevice | None = None
        self._sock: socket.socket | None = None
        self._task: asyncio.Task | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self) -> None:
        """Bind and listen; a stale socket file left by an earlier run is replaced."""
        _remove_stale_socket(self.path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(self.path)
            sock.listen(4)
            sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        self._sock = sock
        self._task = asyncio.get_running_loop().create_task(self._accept(), name=self.name)

    async def _accept(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            conn, _ = await loop.sock_accept(self._sock)
            if self.connection is not None:
                log.warning(
                    "%s: a second front-end connected while one is served: closed (one "
                    "front-end per socket)",
                    self.name,
                )
                conn.close()
                continue
            conn.setblocking(False)
            try:
                device = VhostUserDevice(self.device, self.name)
            except Exception:
                log.exception("%s: cannot serve the device: connection closed", self.name)
                conn.close()
                continue
            self.connection = device
            task = loop.create_task(self._serve(conn, device), name=f"{self.name} connection")
            self._connections.add(task)
            task.add_done_callback(self._connections.discard)

    async def _serve(self, conn: socket.socket, device: VhostUserDevice) -> None:
        loop = asyncio.get_running_loop()
        decoder = p.Decoder()
        log.info("%s: front-end connected", self.name)
        try:
            while True:
                data, fds = await recv_message_part(loop, conn, decoder.needed)
                if not data:
                    close_fds(fds)
                    if decoder.needed != p.HEADER_SIZE or decoder.pending_fds:
                        log.warning("%s: front-end closed the connection mid-message", self.name)
                    else:
                        log.info("%s: front-end disconnected", self.name)
                    return
                for message in decoder.feed(data, fds):
                    log.debug("%s: %s %s", self.name, message.name, message.payload.hex())
                    answer = await device.handle(message)
                    if answer is not None:
                        await send_reply(loop, conn, answer)
        except p.ProtocolError as exc:
            log.warning("%s: %s: closing the connection", self.name, exc)
        except (ConnectionError, OSError) as exc:
            log.warning("%s: connection failed: %s", self.name, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: internal error: closing the connection", self.name)
        finally:
            close_fds(decoder.pending_fds)
            conn.close()
            await device.close()
            if self.connection is device:
                self.connection = None

    async def close(self) -> None:
        tasks = [t for t in (self._task, *self._connections) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._sock is not None:
            self._sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
        try:
            self.device.close()
        except Exception:
            log.exception("%s: closing the device failed", self.name)


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.stat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise FileExistsError(f"{path} exists and is not a socket: give another --socket-path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        os.unlink(path)  # nobody listens: left by a run that ended
        return
    finally:
        probe.close()
    raise FileExistsError(f"{path}: another process serves this socket already")
