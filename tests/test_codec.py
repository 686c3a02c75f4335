"""The fast codec against construct, for every message type, with strategies built from the schemas.

Strategies come from ``codec.layout`` (the same walk the codec derives its formats with), so a
message type added to messages.py is covered here without touching this file.
"""

from __future__ import annotations

import struct

import pytest
from construct import Float32l, GreedyBytes, Int8ul, Int32ub, PascalString, PrefixedArray, Struct
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from viowire.protocol import codec, doc
from viowire.protocol import messages as m
from viowire.protocol.codec import (
    HEADER,
    DecodeError,
    FieldSpec,
    body_fields,
    decode_body,
    decode_body_construct,
    encode,
    encode_body,
    encode_construct,
    frame_packer,
    layout,
)

ALL_TYPES = list(m.SCHEMAS)
FAST = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def int_range(fmt: str) -> tuple[int, int]:
    bits = 8 * struct.calcsize(fmt)
    return (0, (1 << bits) - 1) if fmt.isupper() else (-(1 << bits - 1), (1 << bits - 1) - 1)


def field_values(spec: FieldSpec) -> st.SearchStrategy:
    if spec.kind == "int":
        return st.integers(*int_range(spec.fmt))
    if spec.kind == "bytes":
        return st.binary(min_size=spec.size, max_size=spec.size)
    if spec.kind == "text":
        return st.text(max_size=20)
    if spec.kind == "array":
        element = st.tuples(*(field_values(e) for e in spec.elements))
        return st.lists(element, max_size=4).map(tuple)
    assert spec.kind == "greedy"
    return st.binary(max_size=48)


def messages_of(msg_type: m.MsgType) -> st.SearchStrategy:
    cls = m.MESSAGE_CLASSES[msg_type]
    fields = [field_values(spec) for spec in layout(m.SCHEMAS[msg_type])]
    return st.tuples(*fields).map(lambda values: cls(*values))


def outcome(decoder, msg_type: int, body: bytes) -> tuple:
    """('ok', message) or ('error', code); any other exception fails the test."""
    try:
        return ("ok", decoder(msg_type, body))
    except DecodeError as exc:
        return ("error", exc.code)


# --- agreement with construct --------------------------------------------------------------


@pytest.mark.parametrize("msg_type", ALL_TYPES, ids=lambda t: t.name)
@FAST
@given(data=st.data(), request_id=st.integers(0, 2**32 - 1), flags=st.integers(0, 255))
def test_fast_encode_is_construct_encode(msg_type, data, request_id, flags):
    msg = data.draw(messages_of(msg_type))
    frame = encode(msg, request_id, flags)
    assert frame == encode_construct(msg, request_id, flags)
    assert HEADER.unpack_from(frame) == (len(frame) - 4, msg_type, flags, 0, request_id)
    assert encode_body(msg) == frame[HEADER.size :]


@pytest.mark.parametrize("msg_type", ALL_TYPES, ids=lambda t: t.name)
@FAST
@given(data=st.data())
def test_fast_decode_is_construct_decode(msg_type, data):
    msg = data.draw(messages_of(msg_type))
    body = encode_body(msg)
    assert decode_body(msg_type, body) == msg
    assert decode_body(msg_type, memoryview(body)) == msg
    assert decode_body_construct(msg_type, body) == msg


def mutated_bodies(msg_type: m.MsgType) -> st.SearchStrategy:
    """Valid bodies cut short, extended or with one byte changed, and plain random bytes."""
    valid = messages_of(msg_type).map(encode_body)
    return st.one_of(
        st.binary(max_size=64),
        st.tuples(valid, st.integers(0, 64)).map(lambda vb: vb[0][: vb[1]]),
        st.tuples(valid, st.binary(min_size=1, max_size=8)).map(lambda vb: vb[0] + vb[1]),
        st.tuples(valid, st.integers(0, 63), st.integers(0, 255)).map(
            lambda v: v[0][: v[1]] + bytes([v[2]]) + v[0][v[1] + 1 :] if v[0] else v[0]
        ),
    )


@pytest.mark.parametrize("msg_type", ALL_TYPES, ids=lambda t: t.name)
@FAST
@given(data=st.data())
def test_both_decoders_agree_on_any_body(msg_type, data):
    body = data.draw(mutated_bodies(msg_type))
    fast = outcome(decode_body, msg_type, body)
    assert fast == outcome(decode_body_construct, msg_type, body)
    if fast[0] == "error":
        assert fast[1] == m.ErrorCode.BAD_MESSAGE


FIXED_TYPES = [t for t in ALL_TYPES if all(s.size is not None for s in layout(m.SCHEMAS[t]))]
INT_TYPES = [t for t in ALL_TYPES if all(s.kind == "int" for s in layout(m.SCHEMAS[t]))]


@pytest.mark.parametrize("msg_type", FIXED_TYPES, ids=lambda t: t.name)
@FAST
@given(data=st.data())
def test_body_fields_are_the_decoded_fields(msg_type, data):
    """The server's shortcut for register accesses: the same values decode_body gives, and a
    struct.error exactly where decode_body raises DecodeError."""
    names, fields = body_fields(msg_type)
    body = data.draw(mutated_bodies(msg_type))
    decoded = outcome(decode_body, msg_type, body)
    if decoded[0] == "ok":
        assert fields(body) == tuple(getattr(decoded[1], name) for name in names)
    else:
        with pytest.raises(struct.error):
            fields(body)


@pytest.mark.parametrize("msg_type", INT_TYPES, ids=lambda t: t.name)
@FAST
@given(data=st.data(), request_id=st.integers(0, 2**32 - 1), flags=st.integers(0, 255))
def test_frame_packer_is_encode(msg_type, data, request_id, flags):
    names, pack = frame_packer(msg_type)
    msg = data.draw(messages_of(msg_type))
    values = [getattr(msg, name) for name in names]
    assert pack(request_id, flags, *values) == encode(msg, request_id, flags)


def test_shortcuts_refuse_variable_sized_types():
    with pytest.raises(TypeError):
        body_fields(m.MsgType.HELLO)
    with pytest.raises(TypeError):
        frame_packer(m.MsgType.HELLO)


def test_trailing_and_short_bodies_are_bad_messages():
    body = encode_body(m.MmioRead(addr=0x1000, width=4))
    for bad in (body[:-1], body + b"\0", b""):
        for decoder in (decode_body, decode_body_construct):
            with pytest.raises(DecodeError) as info:
                decoder(m.MsgType.MMIO_READ, bad)
            assert info.value.code == m.ErrorCode.BAD_MESSAGE
    error_body = struct.pack("<IH", 3, 2) + b"\xff\xfe"
    with pytest.raises(DecodeError, match="UTF-8"):
        decode_body(m.MsgType.ERROR, error_body)


@pytest.mark.parametrize("msg_type", sorted(set(range(256)) - set(m.SCHEMAS)))
def test_unknown_types(msg_type):
    for decoder in (decode_body, decode_body_construct):
        with pytest.raises(DecodeError) as info:
            decoder(msg_type, b"")
        assert info.value.code == m.ErrorCode.UNKNOWN_TYPE


# --- encoding refuses values that do not fit -------------------------------------------------


def sample(msg_type: m.MsgType) -> object:
    return codec._sample(msg_type)


def bad_values(spec: FieldSpec) -> list:
    if spec.kind == "int":
        lo, hi = int_range(spec.fmt)
        return [lo - 1, hi + 1, "1", 1.0]
    if spec.kind == "bytes":
        return [b"\0" * (spec.size - 1), b"\0" * (spec.size + 1), "x" * spec.size]
    if spec.kind == "text":
        return [b"bytes", "x" * 65536, "\ud800"]
    if spec.kind == "array":
        lo, hi = int_range(spec.elements[0].fmt)
        too_big = (hi + 1,) + (0,) * (len(spec.elements) - 1)
        return [((1,),), (too_big,), (None,), 5]
    return ["not bytes", 5]


BAD_FIELDS = [
    (t, spec.name, value)
    for t in ALL_TYPES
    for spec in layout(m.SCHEMAS[t])
    for value in bad_values(spec)
]


@pytest.mark.parametrize(
    ("msg_type", "field", "value"),
    BAD_FIELDS,
    ids=[f"{t.name}.{f}-{i}" for i, (t, f, _) in enumerate(BAD_FIELDS)],
)
def test_values_that_do_not_fit_raise_value_error(msg_type, field, value):
    msg = sample(msg_type)
    object.__setattr__(msg, field, value)  # bypass the frozen dataclass to build a bad message
    for encoder in (encode, encode_construct):
        with pytest.raises(ValueError, match=field):
            encoder(msg)
    with pytest.raises(ValueError, match=field):
        encode_body(msg)


@pytest.mark.parametrize("msg_type", ALL_TYPES, ids=lambda t: t.name)
def test_header_values_that_do_not_fit(msg_type):
    msg = sample(msg_type)
    for encoder in (encode, encode_construct):
        with pytest.raises(ValueError, match="request_id"):
            encoder(msg, request_id=2**32)
        with pytest.raises(ValueError, match="flags"):
            encoder(msg, flags=256)


def test_non_messages_are_refused():
    with pytest.raises(TypeError):
        encode(object())
    with pytest.raises(TypeError):
        encode_construct((1, 2))


# --- the derivation -------------------------------------------------------------------------


def test_header_format():
    assert HEADER.format == "<IBBHI"
    assert HEADER.size == m.HEADER_SIZE


@pytest.mark.parametrize(
    "schema",
    [
        Struct("x" / Float32l),
        Struct("x" / Int32ub),
        Struct("x" / GreedyBytes, "y" / Int8ul),
        Struct("x" / PascalString(Int8ul, "ascii")),
        Struct("x" / PrefixedArray(Int8ul, PascalString(Int8ul, "utf8"))),
        Struct("x" / PrefixedArray(Int8ul, Int8ul)),
        Int8ul,
    ],
)
def test_unknown_constructs_fail_loudly(schema):
    with pytest.raises(TypeError):
        layout(schema)


def test_measure_runs(capsys):
    results = codec.measure(number=3)
    assert set(results) == {t.name for t in ALL_TYPES}
    assert "MMIO_WRITE" in capsys.readouterr().out


# --- docs -----------------------------------------------------------------------------------


def test_checked_in_protocol_doc_is_current():
    assert doc.DOC_PATH.read_text(encoding="utf-8") == doc.generate(), (
        "docs/protocol.md is stale: run python -m viowire.protocol.doc --write"
    )


def test_protocol_doc_names_every_message_and_error_code():
    text = doc.generate()
    for name in [*m.MsgType.__members__, *m.ErrorCode.__members__, *m.ProtoFeature.__members__]:
        assert name in text


@FAST
@given(data=st.data(), request_id=st.integers(0, 2**32 - 1), flags=st.integers(0, 255))
def test_mem_write_shortcuts_are_encode_and_decode(data, request_id, flags):
    msg = data.draw(messages_of(m.MsgType.MEM_WRITE))
    frame = codec.pack_mem_write(list(msg.ranges), msg.data, request_id, flags)
    assert frame == encode(msg, request_id, flags)
    ranges, payload = codec.unpack_mem_write(frame[m.HEADER_SIZE :])
    assert (tuple(ranges), bytes(payload)) == (tuple(msg.ranges), msg.data)


@FAST
@given(body=st.binary(max_size=64))
def test_unpack_mem_write_refuses_what_decode_body_refuses(body):
    decoded = outcome(decode_body, m.MsgType.MEM_WRITE, body)
    if decoded[0] == "ok":
        ranges, payload = codec.unpack_mem_write(body)
        assert (tuple(ranges), bytes(payload)) == (tuple(decoded[1].ranges), decoded[1].data)
    else:
        with pytest.raises(DecodeError):
            codec.unpack_mem_write(body)


@FAST
@given(data=st.data(), request_id=st.integers(0, 2**32 - 1), flags=st.integers(0, 255))
def test_mem_read_shortcuts_are_encode_and_decode(data, request_id, flags):
    msg = data.draw(messages_of(m.MsgType.MEM_READ))
    frame = codec.pack_mem_read(list(msg.ranges), request_id, flags)
    assert frame == encode(msg, request_id, flags)
    assert tuple(codec.unpack_mem_read(frame[m.HEADER_SIZE :])) == tuple(msg.ranges)
    reply = data.draw(messages_of(m.MsgType.MEM_READ_REPLY))
    assert codec.pack_mem_read_reply(reply.data, request_id, flags) == encode(
        reply, request_id, flags
    )


@FAST
@given(body=st.binary(max_size=64))
def test_unpack_mem_read_refuses_what_decode_body_refuses(body):
    decoded = outcome(decode_body, m.MsgType.MEM_READ, body)
    if decoded[0] == "ok":
        assert tuple(codec.unpack_mem_read(body)) == tuple(decoded[1].ranges)
    else:
        with pytest.raises(DecodeError):
            codec.unpack_mem_read(body)
