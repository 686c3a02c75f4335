"""FrameReader: any split of a valid stream gives the same frames; bad framing gives FrameError."""

from __future__ import annotations

import itertools

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from viowire.protocol import messages as m
from viowire.protocol.codec import HEADER, decode_body, encode
from viowire.protocol.framing import Frame, FrameError, FrameReader

FAST = settings(deadline=None)

frames_st = st.builds(
    Frame,
    type=st.integers(0, 255),
    flags=st.integers(0, 255),
    request_id=st.integers(0, 2**32 - 1),
    body=st.binary(max_size=40),
)


def wire(frame: Frame) -> bytes:
    header = HEADER.pack(8 + len(frame.body), frame.type, frame.flags, 0, frame.request_id)
    return header + frame.body


def chunks(data: bytes, cuts: list[int]) -> list[bytes]:
    points = [0, *sorted(c % (len(data) + 1) for c in cuts), len(data)]
    return [data[a:b] for a, b in itertools.pairwise(points)]


def feed_all(reader: FrameReader, pieces: list) -> list[Frame]:
    out: list[Frame] = []
    for piece in pieces:
        out += reader.feed(piece)
    return out


@FAST
@given(frames=st.lists(frames_st, max_size=8), cuts=st.lists(st.integers(0, 10**6), max_size=12))
def test_any_split_gives_the_same_frames(frames, cuts):
    data = b"".join(map(wire, frames))
    reader = FrameReader()
    assert feed_all(reader, chunks(data, cuts)) == frames
    assert reader.buffered == 0


@FAST
@given(frames=st.lists(frames_st, min_size=1, max_size=4))
def test_byte_at_a_time_and_coalesced(frames):
    data = b"".join(map(wire, frames))
    assert feed_all(FrameReader(), [data[i : i + 1] for i in range(len(data))]) == frames
    assert FrameReader().feed(data) == frames
    assert FrameReader().feed(memoryview(bytearray(data))) == frames


def test_partial_frame_stays_buffered():
    data = encode(m.MmioWrite(addr=0x1000, width=4, value=7), request_id=9)
    reader = FrameReader()
    assert reader.feed(data[:5]) == []
    assert reader.buffered == 5
    (frame,) = reader.feed(data[5:] + data[:3])
    assert reader.buffered == 3
    assert (frame.type, frame.flags, frame.request_id) == (m.MsgType.MMIO_WRITE, 0, 9)
    assert decode_body(frame.type, frame.body) == m.MmioWrite(addr=0x1000, width=4, value=7)


def test_many_small_frames_in_one_read():
    data = b"".join(encode(m.Irq(irq=i % 32, level=1, status=1)) for i in range(20000))
    frames = FrameReader().feed(data)
    assert len(frames) == 20000
    assert decode_body(frames[-1].type, frames[-1].body) == m.Irq(irq=19999 % 32, level=1, status=1)


def refused(reader: FrameReader, data: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        reader.feed(data)
    return info.value


@pytest.mark.parametrize("length", range(8))
def test_length_below_header_is_malformed(length):
    error = refused(FrameReader(), length.to_bytes(4, "little"))
    assert error.code == m.ErrorCode.MALFORMED_FRAME


def test_oversize_frame_is_refused_before_its_body_arrives():
    reader = FrameReader(max_frame=64)
    assert reader.feed(wire(Frame(1, 0, 1, b"x" * 52))) != []  # 4 + 8 + 52 = 64: fits
    error = refused(reader, (61).to_bytes(4, "little"))  # 4 + 61 = 65 bytes
    assert error.code == m.ErrorCode.FRAME_TOO_LARGE


def test_max_frame_can_change_after_the_handshake():
    reader = FrameReader()
    big = wire(Frame(1, 0, 1, b"y" * 100))
    assert len(reader.feed(big)) == 1
    reader.max_frame = 64
    assert refused(reader, big).code == m.ErrorCode.FRAME_TOO_LARGE


def test_nonzero_reserved_is_malformed():
    bad = HEADER.pack(8, 4, 0, 1, 5)
    assert refused(FrameReader(), bad).code == m.ErrorCode.MALFORMED_FRAME


def test_reader_is_poisoned_and_keeps_earlier_frames():
    good = wire(Frame(4, 1, 3, b""))
    reader = FrameReader()
    error = refused(reader, good + (3).to_bytes(4, "little"))
    assert error.frames == [Frame(4, 1, 3, b"")]
    again = refused(reader, good)
    assert again.code == m.ErrorCode.MALFORMED_FRAME
    assert again.frames == []


@FAST
@given(
    garbage=st.binary(max_size=200),
    cuts=st.lists(st.integers(0, 10**6), max_size=6),
    max_frame=st.integers(12, 256),
)
def test_garbage_raises_only_frame_error(garbage, cuts, max_frame):
    reader = FrameReader(max_frame=max_frame)
    try:
        for frame in feed_all(reader, chunks(garbage, cuts)):
            assert 12 + len(frame.body) <= max_frame
    except FrameError as exc:
        assert exc.code in (m.ErrorCode.MALFORMED_FRAME, m.ErrorCode.FRAME_TOO_LARGE)
        with pytest.raises(FrameError):
            reader.feed(b"")


@FAST
@given(
    st.lists(frames_st, max_size=30), st.lists(st.integers(0, 200), max_size=8), st.integers(1, 7)
)
def test_a_limit_hands_out_the_same_frames_in_slices(frames, cuts, limit):
    """A server takes a large read a slice at a time: feed(data, limit) then feed(b"", limit)
    until nothing comes gives the frames of an unlimited reader, in order."""
    stream = b"".join(wire(f) for f in frames)
    reader = FrameReader()
    got: list[Frame] = []
    for piece in chunks(stream, cuts):
        batch = reader.feed(piece, limit)
        while batch:
            assert len(batch) <= limit
            got += batch
            batch = reader.feed(b"", limit)
    assert got == frames
    assert reader.buffered == 0


def test_a_limit_of_zero_only_buffers():
    reader = FrameReader()
    data = wire(Frame(1, 0, 1, b"x")) * 3
    assert reader.feed(data, 0) == []
    assert reader.buffered == len(data)
    assert len(reader.feed(b"", 2)) == 2
    assert len(reader.feed(b"")) == 1
