"""The trace file, defined once with construct (fixed-size structs for the hot path derive from it).

A file is a header, then records until the end of the file::

    file header  magic "VWTRACE1", version, the recording process, its clocks at the start
    record       time_ns, connection, end, event, length, then ``length`` bytes

A record holds what one read returned or one write sent on a connection, byte for byte, so a
trace shows what went over the wire even where it does not frame (the decoder cuts the frames
out with the protocol's own FrameReader). docs/trace.md is the prose version of this module.
"""

from __future__ import annotations

import enum
import struct

from construct import Bytes, Int8ul, Int16ul, Int32ul, Int64ul, Struct

from viowire.protocol.codec import layout

MAGIC = b"VWTRACE1"
VERSION = 1

FileHeader = Struct(
    "magic" / Bytes(8),
    "version" / Int16ul,
    "reserved" / Int16ul,
    "pid" / Int32ul,  # the process that recorded
    "wall_ns" / Int64ul,  # time.time_ns() when the file was opened
    "monotonic_ns" / Int64ul,  # time.monotonic_ns() at that same moment
)

RecordHeader = Struct(
    "time_ns" / Int64ul,  # time.monotonic_ns() of the read or write
    "connection" / Int64ul,  # server end: the session_id; client end: a number per process
    "end" / Int8ul,  # End: which side recorded it
    "event" / Int8ul,  # Event
    "reserved" / Int16ul,
    "length" / Int32ul,  # bytes that follow
)


class End(enum.IntEnum):
    CLIENT = 0
    SERVER = 1


class Event(enum.IntEnum):
    OPEN = 1  # a connection starts; data: UTF-8 text naming the peer (URL or address)
    RECEIVED = 2  # data: the bytes one read of the connection returned
    SENT = 3  # data: the bytes one write put on the connection
    SIDECAR_RECEIVED = 4  # data: one packet of the FD_SIDECAR socket (whole frames)
    SIDECAR_SENT = 5
    CLOSE = 6  # the connection ended; no data


def _struct(schema: Struct) -> struct.Struct:
    return struct.Struct("<" + "".join(spec.fmt for spec in layout(schema)))


FILE_HEADER = _struct(FileHeader)
RECORD = _struct(RecordHeader)
