"""A device's notification channel: an AF_UNIX datagram socket the client passes once.

Same-host sessions can take a device's notifications off the connection, as vhost-user's kick and
call eventfds do: driver → device a 4-byte datagram is a QueueNotify write of its value, device →
driver a 1-byte datagram is a used-buffer notification. A socket and not an eventfd because the
file status flags are shared with the client: a client that clears O_NONBLOCK on an eventfd could
make the server's read or write block, while ``MSG_DONTWAIT`` on a socket never does.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import socket
import stat
from collections.abc import Callable

from viowire.protocol.codec import CHANNEL_KICK, CHANNEL_USED

log = logging.getLogger("viowire.server")

MAX_KICKS_PER_WAKE = 64  # then yield to the other sessions; the rest stay queued
MAX_EMPTY_WAKES = 3  # readable with nothing to read: the driver shut its end down


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
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        on_kick: Callable[[int], None],
        on_lost: Callable[[], None],
    ) -> None:
        """``on_lost`` is called once if the channel fails (the driver closed or shut down its
        end): the device must notify on the connection again, or the driver hears nothing."""
        self._loop = loop
        self._sock = sock
        self._fileno = sock.fileno()
        self._on_kick = on_kick
        self._on_lost = on_lost
        self._empty_wakes = 0
        self._buffer = bytearray(16)
        self.kicks = 0
        self.dropped = 0
        self.bad_datagrams = 0
        loop.add_reader(self._fileno, self._readable)

    def _readable(self) -> None:
        recv_into, buffer = self._sock.recv_into, self._buffer
        for count in range(MAX_KICKS_PER_WAKE):
            try:
                size = recv_into(buffer, 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                # Readable yet empty, again and again: a shut-down peer, which would have this
                # callback run on every loop turn for good.
                self._empty_wakes = self._empty_wakes + 1 if count == 0 else 0
                if self._empty_wakes >= MAX_EMPTY_WAKES:
                    self._lose("the driver shut its end down")
                return
            except OSError as exc:
                self._lose(str(exc))
                return
            if size != CHANNEL_KICK.size:
                self.bad_datagrams += 1
                continue  # counted; the register path logs what a wrong notify means
            self.kicks += 1
            self._on_kick(CHANNEL_KICK.unpack_from(buffer)[0])

    def used(self) -> None:
        """A used-buffer notification; never blocks. A full socket means the driver has one
        unread already, and one is all a notification needs."""
        try:
            self._sock.send(CHANNEL_USED, socket.MSG_DONTWAIT)
        except (BlockingIOError, InterruptedError):  # full: the driver has one unread already
            self.dropped += 1
        except OSError as exc:  # ENOBUFS counts as full too; anything else: the end is gone
            if exc.errno == errno.ENOBUFS:
                self.dropped += 1
            else:
                self._lose(str(exc))

    def _lose(self, why: str) -> None:
        if self._fileno < 0:
            return
        log.warning("notification channel: %s; notifying on the connection again", why)
        self.close()
        self._on_lost()

    def close(self) -> None:
        if self._fileno >= 0:
            self._loop.remove_reader(self._fileno)
            self._fileno = -1
            self._sock.close()
