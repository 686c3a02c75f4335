"""Sans-IO frame reader: bytes in, complete frames out, whatever the reads' boundaries.

A socket read may hold half a frame or a hundred of them. ``FrameReader.feed`` keeps the
incomplete tail in one ``bytearray`` and cuts every complete frame out of the read (slices of a
``bytes`` read, or of a memoryview over the tail buffer), so a read with many small frames costs
one pass and one compaction, never a copy of the stream per frame. Bodies are handed out as
``bytes`` for ``codec.decode_body``; the reader does not look at the type byte, which is the
codec's business.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from viowire.protocol.codec import HEADER
from viowire.protocol.messages import (
    DEFAULT_MAX_FRAME,
    HEADER_SIZE,
    LENGTH_FIELD_SIZE,
    ErrorCode,
)

__all__ = ["DEFAULT_MAX_FRAME", "Frame", "FrameError", "FrameReader"]

_LENGTH = struct.Struct("<I")
_HEADER_REST = HEADER_SIZE - LENGTH_FIELD_SIZE


class FrameError(Exception):
    """The byte stream cannot be framed; the peer gets ERROR(code) and the connection closes.

    ``frames`` holds the frames that were complete before the bad header in the same ``feed``
    call, so a server can still answer them in order before it closes.
    """

    def __init__(self, code: ErrorCode, message: str, frames: list[Frame] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.frames = frames or []


@dataclass(slots=True)
class Frame:
    """One frame without its length field; ``body`` is what ``codec.decode_body`` takes."""

    type: int
    flags: int
    request_id: int
    body: bytes


class FrameReader:
    """Cuts a byte stream into frames; ``max_frame`` (whole frame, length field included) may be
    lowered or raised once the handshake has negotiated it."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self.max_frame = max_frame
        self._buffer = bytearray()
        self._start = 0  # where the unread part of _buffer begins
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as frames."""
        return len(self._buffer) - self._start

    def feed(self, data: bytes | bytearray | memoryview, limit: int | None = None) -> list[Frame]:
        """Every frame completed by ``data``, or at most ``limit`` of them (the rest stay
        buffered: ``feed(b"", limit)`` hands out the next ones); FrameError if the stream is not
        valid framing. A limit lets a server cut a large read into slices without parsing it
        all at once.

        After a FrameError the reader stays broken: the stream has lost its frame boundaries.
        """
        if self._error is not None:
            raise FrameError(self._error.code, str(self._error))
        frames: list[Frame] = []
        try:
            if self._buffer:
                self._buffer += data
                with memoryview(self._buffer) as view:
                    self._start = self._cut(view, frames, self._start, limit)
                self._compact()
            elif type(data) is bytes:  # the usual read: bodies are slices, no view needed
                consumed = self._cut(data, frames, 0, limit)
                if consumed < len(data):
                    self._buffer += data[consumed:]
            else:  # a view the caller may reuse: what is kept is copied
                with memoryview(data) as view:
                    consumed = self._cut(view, frames, 0, limit)
                    if consumed < len(view):
                        self._buffer += view[consumed:]
        except FrameError as exc:
            exc.frames = frames
            self._error = exc
            raise
        return frames

    def _compact(self) -> None:
        # Once per feed when it is all used; else only when the used part is the larger: slices
        # of a large read never move its unread tail more than once or twice.
        if self._start == len(self._buffer):
            self._buffer.clear()
            self._start = 0
        elif self._start * 2 > len(self._buffer):
            del self._buffer[: self._start]
            self._start = 0

    def _cut(
        self, view: bytes | memoryview, frames: list[Frame], offset: int, limit: int | None
    ) -> int:
        """Append the complete frames in ``view`` from ``offset`` to ``frames`` (at most
        ``limit``); return the offset after the last."""
        size = len(view)
        views = type(view) is not bytes  # a slice of bytes is bytes; of a view, it is copied
        unpack_header = HEADER.unpack_from
        append = frames.append
        longest = self.max_frame - LENGTH_FIELD_SIZE
        room = -1 if limit is None else limit
        while size - offset >= HEADER_SIZE and room:
            length, msg_type, flags, reserved, request_id = unpack_header(view, offset)
            if length < _HEADER_REST or length > longest:
                self._check_length(length)  # raises the precise error
            if reserved:
                raise FrameError(ErrorCode.MALFORMED_FRAME, f"reserved header field is {reserved}")
            end = offset + LENGTH_FIELD_SIZE + length
            if end > size:
                break
            body = view[offset + HEADER_SIZE : end]
            append(Frame(msg_type, flags, request_id, body.tobytes() if views else body))
            offset = end
            room -= 1
        else:
            if room and size - offset >= LENGTH_FIELD_SIZE:  # a partial header: checked now
                self._check_length(_LENGTH.unpack_from(view, offset)[0])
        return offset

    def _check_length(self, length: int) -> None:
        # checked as soon as the length field is in, so an oversized frame is refused unread
        if length < _HEADER_REST:
            raise FrameError(
                ErrorCode.MALFORMED_FRAME,
                f"frame length {length} is less than the {_HEADER_REST} header bytes it counts",
            )
        if length + LENGTH_FIELD_SIZE > self.max_frame:
            raise FrameError(
                ErrorCode.FRAME_TOO_LARGE,
                f"frame of {length + LENGTH_FIELD_SIZE} bytes exceeds max_frame {self.max_frame}",
            )
