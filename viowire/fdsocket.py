"""An asyncio transport for a connected Unix stream socket that also carries file descriptors.

asyncio's transports cannot receive SCM_RIGHTS ancillary data, and the shared-memory mode passes
the guest's memfd that way. This transport reads with ``recvmsg_into`` from a persistent
``loop.add_reader`` callback and hands descriptors to the protocol's ``fds_received`` before the
bytes they came with, so a protocol sees a descriptor no later than the frame it belongs to.
Reads land in one preallocated buffer per thread (``socket.recv_fds`` would allocate, and for
a 256 KiB read mmap, a fresh buffer every time); the protocol gets ``bytes`` of what arrived. It
offers the asyncio.Transport surface the protocols use (write, pause/resume reading, write-buffer
limits with pause_writing/resume_writing, close), plus ``write_with_fds``.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import logging
import os
import socket
import threading
from typing import Any

log = logging.getLogger("viowire.fdsocket")

READ_SIZE = 256 * 1024
MAX_FDS_PER_READ = 4
_FD_SIZE = array.array("i").itemsize
_ANCILLARY_SIZE = socket.CMSG_SPACE(MAX_FDS_PER_READ * _FD_SIZE)
"""Room for MAX_FDS_PER_READ descriptors a read; the kernel closes any that do not fit."""


class _ReadBuffer(threading.local):
    """The buffer every transport of a thread reads into: a read is copied out before the next
    one can start (callbacks of one loop never interleave), and a thread has one loop."""

    def __init__(self) -> None:
        self.view = memoryview(bytearray(READ_SIZE))


_read_buffer = _ReadBuffer()


def _descriptors(ancdata: list[tuple[int, int, bytes]]) -> list[int]:
    """The descriptors of every SCM_RIGHTS message in ``ancdata`` (as ``socket.recv_fds``)."""
    fds = array.array("i")
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            fds.frombytes(data[: len(data) - len(data) % _FD_SIZE])
    return fds.tolist()


class FdSocketTransport(asyncio.Transport):
    """Transport over a non-blocking AF_UNIX SOCK_STREAM socket, with descriptor passing."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, protocol: asyncio.Protocol
    ) -> None:
        super().__init__()
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._fileno = sock.fileno()
        self._protocol = protocol
        self._buffer: collections.deque[tuple[memoryview, list[int]]] = collections.deque()
        self._buffer_size = 0
        self._high, self._low = 256 * 1024, 64 * 1024
        self._writing_paused = False
        self._reading = False
        self._closing = False
        self._closed = False
        loop.call_soon(protocol.connection_made, self)
        loop.call_soon(self.resume_reading)

    # -- reading -------------------------------------------------------------------------------
    def _read_ready(self) -> None:
        view = _read_buffer.view
        try:
            size, ancdata, _flags, _addr = self._sock.recvmsg_into(
                [view], _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._fatal(exc)
            return
        if ancdata:
            fds = _descriptors(ancdata)
            if fds:
                self._deliver_fds(fds)
        if not size:
            self._eof()
            return
        self._protocol.data_received(view[:size].tobytes())

    def _deliver_fds(self, fds: list[int]) -> None:
        handler = getattr(self._protocol, "fds_received", None)
        if handler is None:
            for fd in fds:  # a peer that sends descriptors nobody asked for gets them closed
                os.close(fd)
            return
        handler(fds)

    def _eof(self) -> None:
        self.pause_reading()
        keep_open = (
            self._protocol.eof_received() if hasattr(self._protocol, "eof_received") else None
        )
        if not keep_open:
            self.close()

    def pause_reading(self) -> None:
        if self._reading and not self._closed:
            self._loop.remove_reader(self._fileno)
        self._reading = False

    def resume_reading(self) -> None:
        if not self._reading and not self._closing:
            self._loop.add_reader(self._fileno, self._read_ready)
            self._reading = True

    def is_reading(self) -> bool:
        return self._reading

    # -- writing -------------------------------------------------------------------------------
    def write(self, data: bytes | bytearray | memoryview) -> None:
        self.write_with_fds(data, [])

    def writelines(self, list_of_data: Any) -> None:
        self.write(b"".join(list_of_data))

    def write_with_fds(self, data: bytes | bytearray | memoryview, fds: list[int]) -> None:
        """Send ``data``; ``fds`` ride with its first byte. The caller keeps ownership of fds."""
        if self._closing:
            return
        view = memoryview(data).cast("B")
        if not self._buffer:
            sent = self._try_send(view, fds)
            if sent is None:
                return
            if sent == len(view):
                return
            view, fds = view[sent:], [] if sent else fds
            self._loop.add_writer(self._fileno, self._write_ready)
        if fds:
            fds = [os.dup(fd) for fd in fds]  # keep them alive until they are sent
        self._buffer.append((view, fds))
        self._buffer_size += len(view)
        self._maybe_pause_protocol()

    def _try_send(self, view: memoryview, fds: list[int]) -> int | None:
        try:
            if fds:
                return socket.send_fds(self._sock, [view], fds)
            return self._sock.send(view)
        except (BlockingIOError, InterruptedError):
            return 0
        except OSError as exc:
            self._fatal(exc)
            return None

    def _write_ready(self) -> None:
        while self._buffer:
            view, fds = self._buffer[0]
            sent = self._try_send(view, fds)
            if sent is None:
                return
            self._buffer_size -= sent
            for fd in fds if sent else []:
                os.close(fd)
            if sent < len(view):
                self._buffer[0] = (view[sent:], [] if sent else fds)
                return
            self._buffer.popleft()
        self._loop.remove_writer(self._fileno)
        self._maybe_resume_protocol()
        if self._closing:
            self._finish()

    def _maybe_pause_protocol(self) -> None:
        if not self._writing_paused and self._buffer_size > self._high:
            self._writing_paused = True
            self._protocol.pause_writing()

    def _maybe_resume_protocol(self) -> None:
        if self._writing_paused and self._buffer_size <= self._low:
            self._writing_paused = False
            self._protocol.resume_writing()

    def get_write_buffer_size(self) -> int:
        return self._buffer_size

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._low, self._high

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._high = 256 * 1024 if high is None else high
        self._low = self._high // 4 if low is None else low

    def can_write_eof(self) -> bool:
        return False

    # -- closing -------------------------------------------------------------------------------
    def detach(self) -> socket.socket | None:
        """Hand the socket over (to the loop's own transport) once nothing waits to be sent:
        reading stops, the protocol is not told, and this transport is done with. None while
        data is queued (the caller keeps this transport)."""
        if self._buffer or self._closing:
            return None
        self.pause_reading()
        self._closing = self._closed = True
        return self._sock

    def is_closing(self) -> bool:
        return self._closing

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        self.pause_reading()
        if not self._buffer:
            self._finish()

    def abort(self) -> None:
        self._closing = True
        self.pause_reading()
        self._finish()

    def _fatal(self, exc: Exception) -> None:
        log.debug("unix connection failed: %s", exc)
        self._closing = True
        self.pause_reading()
        self._finish(exc)

    def _finish(self, exc: Exception | None = None) -> None:
        if self._closed:
            return
        self._closed = True
        self._reading = False
        self._loop.remove_reader(self._fileno)
        self._loop.remove_writer(self._fileno)
        for _view, fds in self._buffer:
            for fd in fds:
                os.close(fd)
        self._buffer.clear()
        self._buffer_size = 0
        with contextlib.suppress(OSError):
            self._sock.close()
        self._loop.call_soon(self._protocol.connection_lost, exc)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        if name == "socket":
            return self._sock
        if name == "peername":
            return self._sock.getpeername()
        if name == "sockname":
            return self._sock.getsockname()
        if name == "peercred":
            return self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return default


class SidecarReader:
    """The server end of an FD_SIDECAR socket (AF_UNIX SOCK_SEQPACKET): each packet is handed to
    ``on_packet(data, fds)`` with the descriptors it carried; ``on_packet(None, [])`` once at
    the end (EOF, an error, or a packet too large for ``max_size``, whose descriptors are
    closed)."""

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_packet: Any,
        max_size: int,
    ) -> None:
        sock.setblocking(False)
        self._loop = loop
        self._sock = sock
        self._on_packet = on_packet
        self._buffer = memoryview(bytearray(max_size))
        self._reading = False
        self.resume()

    def pause(self) -> None:
        if self._reading and self._sock.fileno() >= 0:
            self._loop.remove_reader(self._sock.fileno())
        self._reading = False

    def resume(self) -> None:
        if not self._reading and self._sock.fileno() >= 0:
            self._loop.add_reader(self._sock.fileno(), self._read_ready)
            self._reading = True

    def _read_ready(self) -> None:
        try:
            size, ancdata, flags, _addr = self._sock.recvmsg_into(
                [self._buffer], _ANCILLARY_SIZE, socket.MSG_CMSG_CLOEXEC
            )
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            log.debug("sidecar failed: %s", exc)
            self._end()
            return
        fds = _descriptors(ancdata) if ancdata else []
        if flags & socket.MSG_TRUNC or (not size and not fds):
            for fd in fds:
                os.close(fd)
            self._end()
            return
        self._on_packet(self._buffer[:size].tobytes(), fds)

    def _end(self) -> None:
        if self._sock.fileno() >= 0:
            self.close()
            self._on_packet(None, [])

    def close(self) -> None:
        self.pause()
        self._sock.close()


def is_seqpacket_socket(sock: socket.socket) -> bool:
    return sock.family == socket.AF_UNIX and sock.type == socket.SOCK_SEQPACKET
