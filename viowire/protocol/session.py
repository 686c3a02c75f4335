"""One end of a session with no I/O: bytes in, events out (as h11 does for HTTP).

:class:`SessionCore` puts together what both ends do alike with what they receive: cut the
stream into frames (:mod:`~viowire.protocol.framing`, bounded by max_frame), tell a request of
the peer's from an answer to one of ours and match the answer to its request
(:mod:`~viowire.protocol.outstanding`, bounded by max_inflight), recognise the peer's fatal
ERROR, and apply what the handshake (:mod:`~viowire.protocol.handshake`) settled. The server
session and the client connection each own one and feed it their socket's bytes; what a request
means, and the asyncio around it, is theirs.

States: ``HANDSHAKE`` (HELLO, and AUTH where required, not yet settled) → ``OPEN`` →
``CLOSED`` (the stream lost its framing, or the connection ended).
"""

from __future__ import annotations

import enum

from viowire.protocol import messages as m
from viowire.protocol.events import Answer, Closing, Event, PostedAnswer, Request, Stray
from viowire.protocol.framing import Frame, FrameError, FrameReader
from viowire.protocol.handshake import Negotiated
from viowire.protocol.outstanding import Outstanding, Unmatched
from viowire.protocol.requests import RequestIds

__all__ = ["BrokenStream", "SessionCore", "SessionState"]

_REPLY = int(m.Flags.REPLY)
_ERROR = int(m.MsgType.ERROR)


class SessionState(enum.Enum):
    HANDSHAKE = "handshake"
    OPEN = "open"
    CLOSED = "closed"


_CLOSED = SessionState.CLOSED  # (an enum member's lookup costs a call in Python 3.11)


class BrokenStream(Exception):
    """The stream lost its framing (a FrameError): act on ``events``, complete before the bad
    header, then send ERROR ``code`` and close."""

    def __init__(self, error: FrameError, events: list[Event]) -> None:
        super().__init__(str(error))
        self.code = error.code
        self.events = events


class SessionCore:
    """One end's view of a session. ``outstanding``: the requests this end awaits answers to
    (its window is max_inflight); ``posted``: the ids of posted requests kept apart from them,
    whose answers are recognised without remembering each (the server's MEM_WRITEs), or None."""

    def __init__(
        self,
        outstanding: Outstanding,
        posted: RequestIds | None = None,
        max_frame: int = m.DEFAULT_MAX_FRAME,
    ) -> None:
        self.outstanding = outstanding
        self.posted = posted
        self.reader = FrameReader(max_frame)
        self.max_frame = max_frame
        self.state = SessionState.HANDSHAKE

    @property
    def buffered(self) -> int:
        """Bytes received and not yet handed out as events (a slice's limit left them)."""
        return self.reader.buffered

    def settle(self, negotiated: Negotiated) -> None:
        """HELLO has settled the session's limits: frames are bounded by its max_frame both
        ways, and at most its max_inflight of our requests await answers."""
        self.max_frame = self.reader.max_frame = negotiated.max_frame
        self.outstanding.window = negotiated.max_inflight

    def open(self) -> None:
        """The handshake is done: the session serves every request."""
        if self.state is SessionState.HANDSHAKE:
            self.state = SessionState.OPEN

    def close(self) -> list:
        """The connection is gone: what awaited answers (``what`` each), to fail."""
        self.state = _CLOSED
        return self.outstanding.fail_all()

    def receive_data(self, data: bytes, limit: int | None = None) -> list[Event]:
        """The events of every frame ``data`` completes (at most ``limit``: the rest stay
        buffered, and ``receive_data(b"", limit)`` hands out the next); raises BrokenStream
        once the stream cannot be framed (then the session is CLOSED)."""
        if self.state is _CLOSED or (not data and not self.reader.buffered):
            return []  # (the second is a server's look for more after a slice: the usual case)
        try:
            frames = self.reader.feed(data, limit)
        except FrameError as exc:
            self.state = _CLOSED
            raise BrokenStream(exc, [self.event(frame) for frame in exc.frames]) from None
        # Each frame is replaced by its event in the reader's list. The usual request and the
        # usual answer are told here, the rest by event(): this is the server's request path
        # and the client's register-read path, where a call more per frame shows.
        events: list = frames
        take = self.outstanding.take
        for i in range(len(frames)):
            frame = frames[i]
            if not frame.flags & _REPLY:
                events[i] = Request(frame) if frame.type != _ERROR else self.event(frame)
            elif (what := take(frame.request_id)) is not None:
                events[i] = Answer(frame, what)
            else:
                events[i] = self.event(frame)
        return events

    def event(self, frame: Frame) -> Event:
        """What ``frame``, from the peer, is to this end (an answer is matched, and no longer
        awaited)."""
        if not frame.flags & _REPLY and frame.type != _ERROR:
            return Request(frame)
        request_id = frame.request_id
        if not request_id and not frame.flags & _REPLY:  # an ERROR before the peer closes
            return Closing(frame, self.outstanding.fail_all())
        if self.posted is not None and request_id in self.posted:
            return PostedAnswer(frame)
        what = self.outstanding.answer(request_id)
        if what.__class__ is Unmatched:
            return Stray(frame, what)
        return Answer(frame, what)
