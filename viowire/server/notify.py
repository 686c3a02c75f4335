"""A device's notification channel: an AF_UNIX datagram socket the client passes once.

Same-host sessions can take a device's notifications off the connection, as vhost-user's kick and
call eventfds do: driver → device a 4-byte datagram is a QueueNotify write of its value, device →
driver a 1-byte datagram is a used-buffer notification. A socket and not an eventfd because the
file status flags are shared with the client: a client that clears O_NONBLOCK on an eventfd could
make the server's read or write block, while ``MSG_DONTWAIT`` on a socket never does.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import stat
import struct
from collections.abc import Callable

log = logging.getLogger("viowire.server")

KICK = struct.Struct("<I")
USED = b"\x01"
MAX_KICKS_PER_WAKE = 64  # then yield to the other sessions; the rest stay queued


class ChannelError(ValueError):
    """The descriptor cannot be a notification channel; the message says what to send."""


def adopt_socket(fd: int) -> socket.socket:
    """``fd`` as a datagram socket of the AF_UNIX family, or ChannelError. The socket owns
    ``fd`` once returned; on error the caller still does."""
    if not stat.S_ISSOCK(os.fstat(fd).st_mode):
        raise ChannelError(
            "the descriptor is not a socket: pass one end of an AF_UNIX SOCK_DGRAM socketpair"
        )
    sock = socket.socket(fileno=fd)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_DGRAM:
        family, kind = sock.family, sock.type
        sock.detach()
        raise ChannelError(
            f"the socket is {getattr(family, 'name', family)}/{getattr(kind, 'name', kind)}: pass "
            "one end of an AF_UNIX SOCK_DGRAM "
            "socketpair"
        )
    return sock


class NotifyChannel:
    """The server end: kicks go to ``on_kick(value)``, :meth:`used` sends a notification."""

    def __init__(
        self, loop: asyncio.AbstractEventLoop, sock: socket.socket, on_kick: Callable[[int], None]
    ) -> None:
        self._loop = loop
        self._sock = sock
        self._fileno = sock.fileno()
        self._on_kick = on_kick
        self._buffer = bytearray(16)
        self.kicks = 0
        self.dropped = 0
        self.bad_datagrams = 0
        loop.add_reader(self._fileno, self._readable)

    def _readable(self) -> None:
        recv_into, buffer = self._sock.recv_into, self._buffer
        for _ in range(MAX_KICKS_PER_WAKE):
            try:
                size = recv_into(buffer, 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("notification channel: %s; detaching it", exc)
                self.close()
                return
            if size != KICK.size:
                self.bad_datagrams += 1
                continue  # counted; the register path logs what a wrong notify means
            self.kicks += 1
            self._on_kick(KICK.unpack_from(buffer)[0])

    def used(self) -> None:
        """A used-buffer notification; never blocks. A full socket means the driver has one
        unread already, and one is all a notification needs."""
        try:
            self._sock.send(USED, socket.MSG_DONTWAIT)
        except OSError:  # full (EAGAIN, ENOBUFS) or the driver closed its end: nothing to wake
            self.dropped += 1

    def close(self) -> None:
        if self._fileno >= 0:
            self._loop.remove_reader(self._fileno)
            self._fileno = -1
            self._sock.close()
