"""The session core (viowire.protocol.session) from bytes alone: what each frame the peer sends
is to this end, answers matched to the requests they answer, the limits HELLO settles, and a
stream that loses its framing."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viowire.protocol import messages as m
from viowire.protocol.codec import encode
from viowire.protocol.events import Answer, Closing, PostedAnswer, Request, Stray
from viowire.protocol.handshake import Negotiated
from viowire.protocol.outstanding import Outstanding, Unmatched
from viowire.protocol.requests import client_ids, server_read_ids, server_write_ids
from viowire.protocol.session import BrokenStream, SessionCore, SessionState

REPLY = m.Flags.REPLY


def client_core(window: int = 4, timeout: float = 10.0) -> SessionCore:
    return SessionCore(Outstanding(client_ids(), window, timeout))


def server_core() -> tuple[SessionCore, object]:
    writes = server_write_ids()
    return SessionCore(Outstanding(server_read_ids(), 4, 10.0), posted=writes), writes


def error(code: m.ErrorCode, request_id: int, flags: int = REPLY) -> bytes:
    return encode(m.Error(code=code, message="no"), request_id, flags)


def test_a_reply_is_matched_to_the_request_it_answers():
    core = client_core()
    first = core.outstanding.open(0, "first")
    second = core.outstanding.open(0, "second")
    data = encode(m.MmioReadReply(value=7), second, REPLY) + encode(m.Ok(), first, REPLY)
    answers = core.receive_data(data)
    assert [(type(a), a.what, a.frame.request_id) for a in answers] == [
        (Answer, "second", second),
        (Answer, "first", first),
    ]
    assert len(core.outstanding) == 0


def test_requests_and_events_of_the_peer_are_requests():
    core = client_core()
    irq = encode(m.Irq(irq=5, level=1, status=1), 0, 0)
    mem_read = encode(m.MemRead(ranges=((0x1000, 4),)), 3, 0)
    events = core.receive_data(irq + mem_read)
    assert [type(e) for e in events] == [Request, Request]
    assert [e.frame.type for e in events] == [m.MsgType.IRQ, m.MsgType.MEM_READ]


def test_frames_split_anywhere_give_the_same_events():
    core = client_core()
    request_id = core.outstanding.open(0, "read")
    data = encode(m.Irq(irq=1, level=0, status=0), 0, 0)
    data += encode(m.MmioReadReply(value=0x74726976), request_id, REPLY)
    events = [event for byte in data for event in core.receive_data(bytes([byte]))]
    assert [type(e) for e in events] == [Request, Answer]
    assert events[1].what == "read"


def test_a_late_answer_and_an_answer_to_nothing_are_strays():
    core = client_core(timeout=1)
    late = core.outstanding.open(0, "late")
    assert core.outstanding.expired(2) == [(late, "late")]
    events = core.receive_data(
        encode(m.Ok(), late, REPLY)
        + error(m.ErrorCode.BUS_ERROR, 99)
        + error(m.ErrorCode.BUS_ERROR, 0)
    )
    assert [(type(e), e.why) for e in events] == [
        (Stray, Unmatched.LATE),
        (Stray, Unmatched.UNKNOWN),  # a posted write's failure, say
        (Stray, Unmatched.FOREIGN),  # an ERROR with REPLY and id 0 answers nothing
    ]


def test_an_error_with_id_0_and_no_reply_flag_fails_everything_awaiting():
    core = client_core()
    opened = [core.outstanding.open(0, what) for what in ("a", "b")]
    (closing,) = core.receive_data(error(m.ErrorCode.LIMIT_EXCEEDED, 0, 0))
    assert type(closing) is Closing and closing.failed == ["a", "b"]
    assert len(core.outstanding) == 0
    events = core.receive_data(b"".join(encode(m.Ok(), i, REPLY) for i in opened))
    assert [e.why for e in events] == [Unmatched.LATE, Unmatched.LATE]


def test_the_server_tells_answers_to_its_mem_writes_by_their_id_space():
    core, writes = server_core()
    read = core.outstanding.open(0, "MemRead")
    write = writes.next()  # a posted MEM_WRITE: not in the table
    events = core.receive_data(
        error(m.ErrorCode.MEMORY_FAULT, write)
        + encode(m.MemReadReply(data=b"abcd"), read, REPLY)
        + error(m.ErrorCode.MEMORY_FAULT, read)
    )
    assert [type(e) for e in events] == [PostedAnswer, Answer, Stray]
    assert events[0].frame.request_id == write and events[1].what == "MemRead"
    assert events[2].why is Unmatched.UNKNOWN


def test_settle_applies_max_frame_and_max_inflight():
    core = client_core(window=256)
    core.settle(Negotiated(features=0, max_frame=64, max_inflight=2))
    assert core.outstanding.window == 2 and core.max_frame == 64
    core.outstanding.open(0, "a")
    core.outstanding.open(0, "b")
    assert core.outstanding.open(0, "c") is None
    big = encode(m.MemReadReply(data=bytes(100)), 1, REPLY)
    with pytest.raises(BrokenStream, match="exceeds max_frame 64") as raised:
        core.receive_data(big)
    assert raised.value.code == m.ErrorCode.FRAME_TOO_LARGE


def test_a_broken_stream_hands_over_the_frames_before_it_and_closes():
    core, _writes = server_core()
    good = encode(m.MmioRead(addr=0x1000, width=4), 1, 0)
    bad = b"\x03\x00\x00\x00"  # a length shorter than the header it counts
    with pytest.raises(BrokenStream) as raised:
        core.receive_data(good + bad)
    assert raised.value.code == m.ErrorCode.MALFORMED_FRAME
    assert [type(e) for e in raised.value.events] == [Request]
    assert core.state is SessionState.CLOSED
    assert core.receive_data(good) == []


def test_states_go_handshake_open_closed():
    core = client_core()
    assert core.state is SessionState.HANDSHAKE
    core.open()
    assert core.state is SessionState.OPEN
    awaiting = core.outstanding.open(0, "a")
    assert core.close() == ["a"]
    assert core.state is SessionState.CLOSED
    core.open()  # too late: closed stays closed
    assert core.state is SessionState.CLOSED
    assert awaiting not in core.outstanding


def test_a_slice_limit_leaves_the_rest_buffered():
    core, _writes = server_core()
    data = b"".join(encode(m.MmioRead(addr=0x1000, width=4), i, 0) for i in range(1, 6))
    frame_size = len(data) // 5
    assert len(core.receive_data(data, 2)) == 2
    assert core.buffered == 3 * frame_size  # what a server checks to let a pipeliner wait
    assert len(core.receive_data(b"", 2)) == 2
    assert len(core.receive_data(b"")) == 1
    assert core.buffered == 0


@given(st.binary(max_size=300))
def test_any_bytes_give_events_or_a_broken_stream(data):
    """Random bytes never raise anything but BrokenStream, whatever the table holds."""
    core, _writes = server_core()
    core.outstanding.open(0, "a")
    try:
        events = core.receive_data(data)
    except BrokenStream as exc:
        events = exc.events
    for event in events:
        assert type(event) in (Request, Answer, Stray, PostedAnswer, Closing)
