"""Writing a trace: one Recorder per process, one Stream per connection end.

The server sessions and client connections ask :func:`active` for the recorder when they are
made and keep ``None`` when tracing is off, so an untraced read or write costs one ``is None``
test. Traced, each read or write costs a clock read, a 24-byte header and a buffered file write
(docs/trace.md has the figures).
"""

from __future__ import annotations

import atexit
import itertools
import os
import time
from pathlib import Path

from viowire.trace.format import FILE_HEADER, MAGIC, RECORD, VERSION, End, Event

_BUFFER = 1 << 16
_FLUSH_NS = 1_000_000_000  # a trace read while the server runs is at most this far behind
_RECEIVED, _SENT, _CLOSE = int(Event.RECEIVED), int(Event.SENT), int(Event.CLOSE)


class Recorder:
    """Appends records to a trace file; one per process (see :func:`start`)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.pid = os.getpid()
        self._file = open(self.path, "wb", buffering=_BUFFER)  # noqa: SIM115 (lives until stop)
        self._write = self._file.write
        self._pack = RECORD.pack
        self._clients = itertools.count(1)
        self._flushed = time.monotonic_ns()
        self._write(
            FILE_HEADER.pack(MAGIC, VERSION, 0, self.pid, time.time_ns(), time.monotonic_ns())
        )

    def stream(self, end: End, connection: int | None = None, peer: str = "") -> Stream:
        """The records of one connection end; a client end gets the next number of this
        process when ``connection`` is None. Writes the OPEN record."""
        if connection is None:
            connection = next(self._clients)
        stream = Stream(self, connection, int(end))
        stream.record(Event.OPEN, peer.encode("utf-8", "replace"))
        return stream

    def record(self, connection: int, end: int, event: int, data: bytes | memoryview) -> None:
        if self._file.closed:
            return
        now = time.monotonic_ns()
        self._write(self._pack(now, connection, end, event, 0, len(data)))
        self._write(data)
        if now - self._flushed > _FLUSH_NS:
            self._flushed = now
            self._file.flush()

    def flush(self) -> None:
        if not self._file.closed:
            self._file.flush()

    def close(self) -> None:
        if not self._file.closed:
            self._file.close()


class Stream:
    """One end of one connection: what it received and what it sent."""

    __slots__ = ("_record", "connection", "end")

    def __init__(self, recorder: Recorder, connection: int, end: int) -> None:
        self.connection = connection
        self.end = end
        self._record = recorder.record

    def record(self, event: Event, data: bytes | memoryview = b"") -> None:
        self._record(self.connection, self.end, event, data)

    def received(self, data: bytes | memoryview) -> None:
        self._record(self.connection, self.end, _RECEIVED, data)

    def sent(self, data: bytes | memoryview) -> None:
        self._record(self.connection, self.end, _SENT, data)

    def closed(self) -> None:
        self._record(self.connection, self.end, _CLOSE, b"")


_active: Recorder | None = None


def start(path: str | Path) -> Recorder:
    """Trace every connection this process makes or serves from now on into ``path``."""
    global _active
    stop()
    _active = Recorder(path)
    return _active


def active() -> Recorder | None:
    """The recorder, or None when tracing is off (or in a process forked from the tracing one:
    its records would interleave with the parent's in one file)."""
    recorder = _active
    return recorder if recorder is not None and recorder.pid == os.getpid() else None


def stop() -> None:
    """Flush and close the trace; connections still open record nothing more."""
    global _active
    if _active is not None and _active.pid == os.getpid():
        _active.close()
    _active = None


def _flush_before_fork() -> None:
    # A child would otherwise inherit the unwritten buffer and write it a second time.
    if _active is not None:
        _active.flush()


os.register_at_fork(before=_flush_before_fork)
atexit.register(stop)
