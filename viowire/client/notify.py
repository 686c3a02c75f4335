"""The driver end of a device's notification channel (protocol feature NOTIFY_CHANNEL).

On the same host a device's notifications can skip the connection: the driver passes one end of
an AF_UNIX datagram socketpair to the server once, then a QueueNotify is one ``send`` (4 bytes,
the value the register would get) and a used-buffer notification one readable socket, as
vhost-user's kick and call eventfds are. The connection stays ordered and the channel is not:
:class:`viowire.client.mmio.VirtioMmioDevice` sends a notification on the channel only once its
earlier posted writes are known to be applied.
"""

from __future__ import annotations

import asyncio
import socket
from collections.abc import Callable

from viowire.protocol.codec import CHANNEL_KICK


class DriverChannel:
    """A socketpair: :attr:`peer` goes to the server, kicks go out, used notifications come in."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._sock, self.peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.setblocking(False)
        self._on_used: Callable[[], None] | None = None
        self._buffer = bytearray(16)
        self.kicks = 0
        self.used = 0

    def start(self, on_used: Callable[[], None]) -> None:
        """The server has the other end: call ``on_used`` for each burst of notifications."""
        self.release_peer()
        self._on_used = on_used
        self._loop.add_reader(self._sock.fileno(), self._readable)

    def release_peer(self) -> None:
        """Close our copy of the server's end (once it has been sent, or was refused)."""
        if self.peer is not None:
            self.peer.close()
            self.peer = None

    def kick(self, value: int) -> bool:
        """Send a QueueNotify of ``value``; False if it could not go (the caller uses the
        connection: a notification must never be lost)."""
        try:
            self._sock.send(CHANNEL_KICK.pack(value), socket.MSG_DONTWAIT)
        except OSError:
            return False
        self.kicks += 1
        return True

    def _readable(self) -> None:
        recv_into, buffer = self._sock.recv_into, self._buffer
        got = False
        while True:
            try:
                recv_into(buffer, 16, socket.MSG_DONTWAIT)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                self.close()  # the server is gone; the connection reports why
                break
            got = True
        if got and self._on_used is not None:
            self.used += 1
            self._on_used()

    @property
    def closed(self) -> bool:
        return self._sock.fileno() < 0

    def close(self) -> None:
        self.release_peer()
        if not self.closed:
            if self._on_used is not None:
                self._loop.remove_reader(self._sock.fileno())
            self._sock.close()
        self._on_used = None
