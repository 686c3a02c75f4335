"""The host side of a virtio-console port, as QEMU's chardevs are: where the bytes a guest writes
go, and where the bytes it reads come from.

A backend is named by a short spec (``--device console,backend=SPEC``):

``echo``
    What the guest writes comes back to it (a loopback; the default).
``pty``
    A new pseudo-terminal; its path (``/dev/pts/N``) is logged, and a host program opens it
    (``screen /dev/pts/N``, ``picocom``). The device keeps the terminal's other end open, so
    the port stays connected whether or not a program has it open.
``pty:PROGRAM [ARGS]``
    PROGRAM runs on a new pseudo-terminal as its controlling terminal, as a getty would: a shell
    there prompts, echoes and edits lines (``pty:/bin/sh``).
``exec:PROGRAM [ARGS]``
    PROGRAM's stdin and stdout (stderr too) are the port, through pipes: bytes exactly as sent
    (``exec:cat``, ``exec:sh -c 'echo ready; exec cat'``); a program's stdio may hold its output
    back until a buffer fills, as on any pipe (``stdbuf -o0``, or ``pty:``).
``unix:PATH`` / ``tcp:HOST:PORT``
    A connection to a program listening there (``socat UNIX-LISTEN:PATH -``).

Every backend is read only when the device has a guest buffer to put the bytes in, and a guest
write completes only once the backend took the bytes: the kernel's pipe, socket or terminal
buffers fill and the other side waits; nothing is dropped and memory stays bounded.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import os
import shlex
import signal
import subprocess
import termios
import tty
from collections.abc import Sequence
from typing import BinaryIO

log = logging.getLogger("viowire.console")

ECHO_LIMIT = 64 * 1024
"""Bytes the echo backend holds before a guest write waits for the guest to read."""
KILL_WAIT = 1.0
"""Seconds close() waits for a killed program to be reaped."""
SPECS = "echo, pty, pty:PROGRAM, exec:PROGRAM, unix:PATH or tcp:HOST:PORT"


class Chardev:
    """One backend: opened once, read and written by the device, closed with the session.

    ``read(n)`` returns b"" once the host side has gone (the program ended, the peer closed);
    ``write(data)`` returns once the backend took the bytes.
    """

    spec = ""

    async def open(self) -> None:
        """Connect or start; OSError (with the reason) when it cannot."""

    async def read(self, n: int) -> bytes:
        raise NotImplementedError

    async def write(self, data: bytes) -> None:
        raise NotImplementedError

    def close(self) -> None:
        """Release the host side: sockets, descriptors, programs (killed)."""


class EchoChardev(Chardev):
    """What is written comes back, at most :data:`ECHO_LIMIT` bytes held."""

    spec = "echo"

    def __init__(self) -> None:
        self._data = bytearray()
        self._changed = asyncio.Event()

    async def read(self, n: int) -> bytes:
        while not self._data:
            self._changed.clear()
            await self._changed.wait()
        chunk = bytes(self._data[:n])
        del self._data[:n]
        self._changed.set()  # a writer waiting for room looks again
        return chunk

    async def write(self, data: bytes) -> None:
        while len(self._data) >= ECHO_LIMIT:
            self._changed.clear()
            await self._changed.wait()
        self._data += data
        self._changed.set()


class StreamChardev(Chardev):
    """A backend reached through asyncio streams: sockets, pipes, a terminal's master side."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def read(self, n: int) -> bytes:
        assert self.reader is not None, "read before open"
        try:
            return await self.reader.read(n)
        except OSError:  # a terminal whose program ended reads EIO: the host side is gone
            return b""

    async def write(self, data: bytes) -> None:
        assert self.writer is not None, "write before open"
        # the peer or program may have gone: the bytes are discarded, as for a host side that
        # is not connected, and the reader sees the end and closes the port
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            self.writer.write(data)
            await self.writer.drain()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


class SocketChardev(StreamChardev):
    """``unix:PATH`` or ``tcp:HOST:PORT``: a connection to a listening program."""

    async def open(self) -> None:
        kind, _, where = self.spec.partition(":")
        if kind == "unix":
            self.reader, self.writer = await asyncio.open_unix_connection(where)
        else:
            host, _, port = where.rpartition(":")
            self.reader, self.writer = await asyncio.open_connection(host.strip("[]"), int(port))


class PipeChardev(StreamChardev):
    """A backend reached through file descriptors (pipes, a terminal's master side), and the
    program behind them, if any: the program is killed and reaped when the port closes."""

    def __init__(self, spec: str, argv: Sequence[str]) -> None:
        super().__init__(spec)
        self.argv = list(argv)
        self.process: subprocess.Popen[bytes] | None = None
        self._read_transport: asyncio.BaseTransport | None = None

    async def _connect(self, read_file: BinaryIO, write_file: BinaryIO) -> None:
        loop = asyncio.get_running_loop()
        self.reader = asyncio.StreamReader()
        self._read_transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(self.reader), read_file
        )
        transport, protocol = await loop.connect_write_pipe(
            lambda: asyncio.StreamReaderProtocol(asyncio.StreamReader()), write_file
        )
        self.writer = asyncio.StreamWriter(transport, protocol, None, loop)

    def close(self) -> None:
        super().close()
        if self._read_transport is not None:
            self._read_transport.close()
        _kill(self.process)


class ExecChardev(PipeChardev):
    """``exec:PROGRAM``: the program's stdin and stdout (stderr joins stdout), through pipes."""

    async def open(self) -> None:
        self.process = _spawn(
            self.argv,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # the server's terminal signals (Ctrl-C) are not its own
        )
        assert self.process.stdout is not None and self.process.stdin is not None
        await self._connect(self.process.stdout, self.process.stdin)


class PtyChardev(PipeChardev):
    """``pty`` or ``pty:PROGRAM``: the master side of a new pseudo-terminal, in raw mode."""

    def __init__(self, spec: str, argv: Sequence[str]) -> None:
        super().__init__(spec, argv)
        self.path = ""
        self._slave: int | None = None

    async def open(self) -> None:
        master, slave = os.openpty()
        try:
            self.path = os.ttyname(slave)
            if self.argv:
                self.process = _spawn(
                    self.argv,
                    stdin=slave,
                    stdout=slave,
                    stderr=slave,
                    start_new_session=True,
                    preexec_fn=_take_terminal,  # only an ioctl: safe after fork
                )
                os.close(slave)  # the program's now: its end is the port's end
            else:
                tty.setraw(slave)  # bytes as they are: no echo, no line editing, no CR/NL
                self._slave = slave  # held, so the master never reads EIO between programs
            os.set_blocking(master, False)
            await self._connect(os.fdopen(master, "rb", 0), os.fdopen(os.dup(master), "wb", 0))
        except BaseException:
            for fd in (slave, master):
                with contextlib.suppress(OSError):
                    os.close(fd)
            raise
        log.warning("console: the port's host side is the terminal %s", self.path)

    def close(self) -> None:
        super().close()
        if self._slave is not None:
            os.close(self._slave)
            self._slave = None


def _spawn(argv: list[str], **kw: object) -> subprocess.Popen[bytes]:
    """Start a backend's program; OSError (with the reason) when it cannot start."""
    try:
        return subprocess.Popen(argv, **kw)  # type: ignore[call-overload]
    except subprocess.SubprocessError as exc:  # preexec_fn failed in the child
        raise OSError(f"{argv[0]}: {exc}") from None


def _take_terminal() -> None:
    """In the child: make stdin (the new terminal) the controlling terminal of its session."""
    fcntl.ioctl(0, termios.TIOCSCTTY, 0)


def _kill(process: subprocess.Popen[bytes] | None) -> None:
    """End a backend's program and its session's processes (a shell's children too), and
    reap it: SIGKILL leaves it no time to linger."""
    if process is None or process.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(ProcessLookupError):
        process.kill()
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=KILL_WAIT)


def parse(spec: str) -> str:
    """``spec`` checked (ValueError with what to write instead), for the device's options."""
    make(spec)
    return spec


def make(spec: str) -> Chardev:
    """The backend ``spec`` names (not opened yet)."""
    kind, sep, arg = spec.strip().partition(":")
    if kind == "echo" and not sep:
        return EchoChardev()
    if kind in ("exec", "pty") and sep:
        try:
            argv = shlex.split(arg)
        except ValueError as exc:
            raise ValueError(f"backend {spec!r}: {exc}") from None
        if not argv:
            raise ValueError(f"backend {spec!r}: name a program after {kind}:")
        return ExecChardev(spec, argv) if kind == "exec" else PtyChardev(spec, argv)
    if kind == "pty" and not sep:
        return PtyChardev(spec, ())
    if kind == "unix" and arg:
        return SocketChardev(spec)
    if kind == "tcp":
        _host, _, port = arg.rpartition(":")
        if _host and port.isdigit() and 0 < int(port) < 65536:
            return SocketChardev(spec)
        raise ValueError(f"backend {spec!r}: give tcp:HOST:PORT, e.g. tcp:127.0.0.1:4555")
    raise ValueError(f"backend {spec!r} is not one of {SPECS}")
