"""What a frame from the peer is to this end of a session (docs/protocol.md, section 2).

:class:`viowire.protocol.session.SessionCore` turns received bytes into these; each end acts on
them. They hold the frame as read (its body undecoded: the hot paths unpack register accesses
straight from it). Plain slotted classes, not frozen: one is made per frame received, and a
frozen dataclass's ``__init__`` costs several times more.
"""

from __future__ import annotations

from dataclasses import dataclass

from viowire.protocol.framing import Frame
from viowire.protocol.outstanding import Unmatched

__all__ = ["Answer", "Closing", "Event", "PostedAnswer", "Request", "Stray"]


@dataclass(slots=True)
class Request:
    """A request of the peer's, or an event (IRQ: request_id 0): answer it unless POSTED (an
    event, never)."""

    frame: Frame


@dataclass(slots=True)
class Answer:
    """A reply or ERROR answering one of this end's requests: ``what``, as it was opened in the
    table of requests awaiting answers (no longer awaiting)."""

    frame: Frame
    what: object


@dataclass(slots=True)
class Stray:
    """A reply or ERROR that answers no request awaiting one (``why``): log or drop it, never
    answer it (errors do not ping-pong). An ERROR here may be a posted request's failure."""

    frame: Frame
    why: Unmatched


@dataclass(slots=True)
class PostedAnswer:
    """An answer to one of this end's posted requests, told apart by its id space (the server's
    MEM_WRITEs): an ERROR says the request failed; an OK (the peer did not agree to
    POSTED_WRITES) says nothing."""

    frame: Frame


@dataclass(slots=True)
class Closing:
    """ERROR with request_id 0 and no REPLY: the peer is closing the session and says why.
    ``failed``: the requests that were awaiting answers (``what`` each), which will get none;
    the caller fails them with this error rather than a bare "connection closed"."""

    frame: Frame
    failed: list


Event = Request | Answer | Stray | PostedAnswer | Closing
