"""Reading a trace: records back out of the file, frames cut out of them, one line a message.

Frames are cut with the protocol's FrameReader (one per connection end and stream, so a frame
split over two reads is whole again) and decoded with ``codec.decode_body``, which derives from
the construct definitions in ``protocol/messages.py``: the trace has no message format of its own.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

from viowire.protocol import messages as m
from viowire.protocol.codec import DecodeError, decode_body
from viowire.protocol.framing import Frame, FrameError, FrameReader
from viowire.trace.format import FILE_HEADER, MAGIC, RECORD, VERSION, End, Event

_HEX_FIELDS = frozenset(
    ("addr", "value", "gpa", "base", "size", "features", "magic", "offset", "status", "session_id")
)
_ENDS = frozenset(End)
_EVENTS = frozenset(Event)
_SHOWN_BYTES = 16  # of a data field; the rest is counted


class TraceError(ValueError):
    """A file that is not a viowire trace, or one cut short."""


@dataclass(frozen=True)
class Record:
    time_ns: int
    connection: int
    end: End
    event: Event
    data: bytes


@dataclass
class Trace:
    pid: int
    wall_ns: int
    monotonic_ns: int
    records: Iterator[Record] = field(repr=False)


def read(path: str | Path) -> Trace:
    """The trace at ``path``; its records are read lazily, a file cut short ends them early."""
    handle = open(path, "rb")  # noqa: SIM115 (closed by the records generator)
    header = handle.read(FILE_HEADER.size)
    if len(header) < FILE_HEADER.size or header[:8] != MAGIC:
        handle.close()
        raise TraceError(f"{path} is not a viowire trace (no {MAGIC.decode()} header)")
    _magic, version, _, pid, wall_ns, monotonic_ns = FILE_HEADER.unpack(header)
    if version != VERSION:
        handle.close()
        raise TraceError(f"{path}: trace format version {version}; this viowire reads {VERSION}")
    return Trace(pid, wall_ns, monotonic_ns, _records(handle))


def _records(handle: BinaryIO) -> Iterator[Record]:
    with handle:
        while len(head := handle.read(RECORD.size)) == RECORD.size:
            time_ns, connection, end, event, _, length = RECORD.unpack(head)
            if end not in _ENDS or event not in _EVENTS:
                raise TraceError(
                    f"damaged trace: the record at byte {handle.tell() - RECORD.size} has end "
                    f"{end} and event {event}, which name nothing"
                )
            data = handle.read(length)
            if len(data) < length:
                return  # the recorder was killed mid-record: what came before stands
            yield Record(time_ns, connection, End(end), Event(event), data)


@dataclass(frozen=True)
class Message:
    """One frame of a trace, decoded (``message`` is None where the body does not decode)."""

    time_ns: int
    session: int  # the session_id of HELLO_REPLY, 0 until it is seen
    connection: int
    end: End
    to_server: bool
    frame: Frame | None
    message: object | None
    problem: str = ""


_TO_SERVER = {
    (End.CLIENT, Event.SENT): True,
    (End.CLIENT, Event.SIDECAR_SENT): True,
    (End.CLIENT, Event.RECEIVED): False,
    (End.SERVER, Event.RECEIVED): True,
    (End.SERVER, Event.SIDECAR_RECEIVED): True,
    (End.SERVER, Event.SENT): False,
}


def client_sessions(records: Iterable[Record]) -> dict[tuple[int, End], int]:
    """The session id of each client connection, from its HELLO_REPLY: a first pass, so that
    the frames a client sent before the reply (its HELLO) are named by the session as well."""
    found: dict[tuple[int, End], int] = {}
    readers: dict[tuple[int, End], FrameReader] = {}
    for record in records:
        key = (record.connection, record.end)
        if record.end is not End.CLIENT or record.event is not Event.RECEIVED or key in found:
            continue
        try:
            frames = readers.setdefault(key, FrameReader(max_frame=1 << 32)).feed(record.data)
        except FrameError:
            continue
        for frame in frames:
            message, _ = _decode(frame)
            if isinstance(message, m.HelloReply):
                found[key] = message.session_id
    return found


def messages(
    records: Iterable[Record], sessions: dict[tuple[int, End], int] | None = None
) -> Iterator[Message]:
    """Every frame of ``records``, in the order they were recorded; ``sessions`` (from
    :func:`client_sessions`) names a client's frames from its first."""
    readers: dict[tuple, FrameReader] = {}
    sessions = dict(sessions or {})
    for record in records:
        key = (record.connection, record.end)
        if record.event in (Event.OPEN, Event.CLOSE):
            continue
        to_server = _TO_SERVER[(record.end, record.event)]
        if record.end is End.SERVER:
            sessions[key] = record.connection  # the server end is named by its session_id
        reader = readers.setdefault((*key, record.event), FrameReader(max_frame=1 << 32))
        try:
            frames = reader.feed(record.data)
            problem = ""
        except FrameError as exc:
            frames, problem = exc.frames, f"framing error: {exc}; the rest of this stream is lost"
        for frame in frames:
            message, bad = _decode(frame)
            if isinstance(message, m.HelloReply):
                sessions[key] = message.session_id
            yield Message(
                record.time_ns, sessions.get(key, 0), record.connection, record.end,
                to_server, frame, message, bad,
            )  # fmt: skip
        if problem:
            yield Message(
                record.time_ns, sessions.get(key, 0), record.connection, record.end,
                to_server, None, None, problem,
            )  # fmt: skip


def _decode(frame: Frame) -> tuple[object | None, str]:
    try:
        return decode_body(frame.type, frame.body), ""
    except DecodeError as exc:
        return None, str(exc)


def format_message(msg: Message, start_ns: int) -> str:
    """One line: seconds since the trace began, session, direction, who recorded, the message."""
    arrow = "C->S" if msg.to_server else "S->C"
    head = (
        f"{(msg.time_ns - start_ns) / 1e9:12.6f}  {msg.session:>12x}  {arrow}  "
        f"{msg.end.name.lower():6}"
    )
    if msg.frame is None:
        return f"{head}  {msg.problem}"
    frame = msg.frame
    flags = "|".join(f.name for f in m.Flags if frame.flags & f) or "-"
    name = m.MsgType(frame.type).name if frame.type in m.MsgType._value2member_map_ else None
    what = f"{name or f'type {frame.type:#04x}'} #{frame.request_id} {flags}"
    if msg.message is None:
        return f"{head}  {what}  ({msg.problem or 'unknown type'}; {len(frame.body)} bytes)"
    return f"{head}  {what}  {_fields(msg.message)}".rstrip()


def _fields(message: object) -> str:
    parts = []
    for name in message.__dataclass_fields__:
        value = getattr(message, name)
        parts.append(f"{name}={_value(name, value)}")
    return " ".join(parts)


def _value(name: str, value: object) -> str:
    if isinstance(value, enum.Enum):
        return value.name
    if isinstance(value, int):
        if name == "code" and value in m.ErrorCode._value2member_map_:
            return m.ErrorCode(value).name
        if name == "kind" and value in m.MemoryKind._value2member_map_:
            return m.MemoryKind(value).name
        return hex(value) if name in _HEX_FIELDS else str(value)
    if isinstance(value, bytes | bytearray | memoryview):
        data = bytes(value)
        more = f"..(+{len(data) - _SHOWN_BYTES})" if len(data) > _SHOWN_BYTES else ""
        return f"[{len(data)}]{data[:_SHOWN_BYTES].hex()}{more}"
    if isinstance(value, str):
        return repr(value)
    if isinstance(value, tuple):  # an array of ranges or device entries
        shown = ",".join("(" + ",".join(hex(v) for v in item) + ")" for item in value[:4])
        return f"[{len(value)}]{shown}{'..' if len(value) > 4 else ''}"
    return repr(value)
