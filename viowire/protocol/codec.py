"""The hot-path codec: ``struct`` formats derived at import time from the construct schemas.

Interpreting construct costs 15-40 µs per message; a precompiled ``struct.Struct`` costs well
under 1 µs. ``messages.py`` stays the only definition of the wire format: this module walks each
schema's subcons once, at import, and builds one fused ``Struct`` per run of fixed-size fields
(and, for messages that are fixed-size throughout, one ``Struct`` for header + body). A schema
that uses a construct this walk does not know stops the import, so the two cannot silently drift.

``encode_construct`` and ``decode_body_construct`` run construct itself; the tests prove with
hypothesis that both paths produce the same bytes and the same messages.
"""

from __future__ import annotations

import codecs
import io
import struct
import timeit
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from operator import attrgetter

from construct import (
    Array,
    Bytes,
    Construct,
    ConstructError,
    FocusedSeq,
    FormatField,
    GreedyBytes,
    Prefixed,
    Rebuild,
    Renamed,
    StringEncoded,
    Struct,
)

from viowire.protocol.messages import (
    HEADER_SIZE,
    LENGTH_FIELD_SIZE,
    MESSAGE_CLASSES,
    SCHEMAS,
    ErrorCode,
    Header,
    MsgType,
)

__all__ = [
    "HEADER",
    "DecodeError",
    "FieldSpec",
    "body_fields",
    "decode_body",
    "decode_body_construct",
    "encode",
    "encode_body",
    "encode_construct",
    "frame_packer",
    "layout",
    "measure",
]

_INT_CODES = "bBhHiIlLqQ"
_CANONICAL = {"L": "I", "l": "i"}  # same size in standard mode; '<IBBHI' reads better
_GREEDY_BYTES = type(GreedyBytes)  # construct exports GreedyBytes as an instance


class DecodeError(ValueError):
    """A body that does not decode as its type; ``code`` is what an ERROR reply should carry."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


# --- derivation: construct schema -> field specs -------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    """One field of a message as the fast codec (and the docs) see it.

    kind is ``int`` or ``bytes`` (fixed size, ``fmt`` is its struct code), ``text`` or ``array``
    (``fmt`` is the struct code of the length or count prefix), or ``greedy`` (rest of the body).
    """

    name: str
    kind: str
    fmt: str
    elements: tuple[FieldSpec, ...] = ()  # an array's element fields, all fixed-size

    @property
    def size(self) -> int | None:
        """Bytes on the wire, or None when the size depends on the value."""
        return struct.calcsize("<" + self.fmt) if self.kind in ("int", "bytes") else None

    @property
    def type_name(self) -> str:
        """Short wire type for error messages and docs: u32, bytes[16], text, array, bytes."""
        if self.kind == "int":
            return ("u" if self.fmt.isupper() else "i") + str(8 * struct.calcsize(self.fmt))
        if self.kind == "bytes":
            return f"bytes[{self.size}]"
        prefix = FieldSpec("", "int", self.fmt).type_name if self.fmt else ""
        return {
            "text": f"{prefix} length + UTF-8",
            "array": f"{prefix} count + elements",
            "greedy": "bytes to end of body",
        }[self.kind]

    def problem(self, value: object) -> str | None:
        """Why ``value`` cannot be encoded as this field, or None; used only on the error path."""
        if self.kind == "int":
            return _int_problem(self.fmt, value)
        if self.kind == "bytes":
            ok = isinstance(value, (bytes, bytearray)) and len(value) == self.size
            return None if ok else f"needs exactly {self.size} bytes, got {value!r:.60}"
        if self.kind == "greedy":
            ok = isinstance(value, (bytes, bytearray, memoryview))
            return None if ok else f"needs bytes, got {type(value).__name__}"
        if self.kind == "text":
            return _text_problem(self.fmt, value)
        return _array_problem(self, value)


def _int_problem(fmt: str, value: object) -> str | None:
    if not isinstance(value, int):
        return f"needs an int, got {type(value).__name__}"
    bits = 8 * struct.calcsize(fmt)
    lo, hi = (0, (1 << bits) - 1) if fmt.isupper() else (-(1 << bits - 1), (1 << bits - 1) - 1)
    return None if lo <= value <= hi else f"{value} is outside {lo}..{hi}"


def _text_problem(len_fmt: str, value: object) -> str | None:
    if not isinstance(value, str):
        return f"needs a str, got {type(value).__name__}"
    try:
        return _int_problem(len_fmt, len(value.encode("utf-8")))
    except UnicodeEncodeError as exc:
        return f"is not encodable as UTF-8 ({exc.reason})"


def _array_problem(spec: FieldSpec, value: object) -> str | None:
    if not isinstance(value, Sequence):
        return f"needs a sequence of tuples, got {type(value).__name__}"
    if problem := _int_problem(spec.fmt, len(value)):
        return f"count {problem}"
    for index, element in enumerate(value):
        if not isinstance(element, Sequence) or len(element) != len(spec.elements):
            names = ", ".join(e.name for e in spec.elements)
            return f"[{index}] needs a tuple ({names}), got {element!r:.60}"
        for element_spec, item in zip(spec.elements, element, strict=True):
            if problem := element_spec.problem(item):
                return f"[{index}].{element_spec.name} {problem}"
    return None


def layout(schema: Construct) -> tuple[FieldSpec, ...]:
    """The fields of a message schema; raises TypeError for any construct it cannot derive."""
    if type(schema) is not Struct:
        raise TypeError(f"a message schema must be a Struct, not {schema!r}")
    specs = tuple(_field(sub) for sub in schema.subcons)
    if any(spec.kind == "greedy" for spec in specs[:-1]):
        raise TypeError("GreedyBytes must be the last field of a message")
    return specs


def _field(sub: Construct) -> FieldSpec:
    if type(sub) is not Renamed or not sub.name:
        raise TypeError(f"every message field must be named, not {sub!r}")
    name, con = sub.name, sub.subcon
    while type(con) is Renamed:  # a docstring (`* "doc"`) wraps the field once more
        con = con.subcon
    if type(con) is FormatField:
        return FieldSpec(name, "int", _int_code(con))
    if type(con) is Bytes and isinstance(con.length, int):
        return FieldSpec(name, "bytes", f"{con.length}s")
    if type(con) is _GREEDY_BYTES:
        return FieldSpec(name, "greedy", "")
    if _is_utf8_pascal_string(con):
        return FieldSpec(name, "text", _int_code(con.subcon.lengthfield))
    if _is_prefixed_array(con):
        count, items = (s.subcon for s in con.subcons)
        elements = layout(items.subcon)
        if not elements or any(e.size is None for e in elements):
            raise TypeError(f"field {name!r}: array elements must be non-empty and fixed-size")
        return FieldSpec(name, "array", _int_code(count.subcon), elements)
    raise TypeError(f"field {name!r}: the fast codec cannot derive a format for {con!r}")


def _int_code(con: Construct) -> str:
    fmt = getattr(con, "fmtstr", "")
    if type(con) is not FormatField or len(fmt) != 2 or fmt[1] not in _INT_CODES:
        raise TypeError(f"{con!r} ({fmt!r}) is not a fixed-size integer")
    if fmt[0] != "<" and struct.calcsize(fmt) != 1:
        raise TypeError(f"{con!r} ({fmt!r}) is not little-endian")
    return _CANONICAL.get(fmt[1], fmt[1])


def _is_utf8_pascal_string(con: Construct) -> bool:
    """PascalString(lengthfield, 'utf8') is StringEncoded(Prefixed(lengthfield, GreedyBytes))."""
    return (
        type(con) is StringEncoded
        and codecs.lookup(con.encoding).name == "utf-8"
        and type(con.subcon) is Prefixed
        and not con.subcon.includelength
        and type(con.subcon.subcon) is _GREEDY_BYTES
        and type(con.subcon.lengthfield) is FormatField
    )


def _is_prefixed_array(con: Construct) -> bool:
    """PrefixedArray(countfield, subcon) is FocusedSeq('items', count/Rebuild, items/Array)."""
    if type(con) is not FocusedSeq or con.parsebuildfrom != "items":
        return False
    if [s.name for s in con.subcons] != ["count", "items"]:
        return False
    count, items = (s.subcon for s in con.subcons)
    return (
        type(count) is Rebuild
        and type(items) is Array
        and repr(items.count) == "this['count']"
        and not items.discard
    )


def _struct(specs: Sequence[FieldSpec]) -> struct.Struct:
    return struct.Struct("<" + "".join(spec.fmt for spec in specs))


HEADER: struct.Struct = _struct(layout(Header))
if HEADER.format != "<IBBHI" or HEADER.size != HEADER_SIZE:
    raise TypeError(f"messages.Header derives to {HEADER.format!r}, expected '<IBBHI'")
_HEADER_REST = HEADER_SIZE - LENGTH_FIELD_SIZE  # the length field counts these header bytes too


# --- segments: runs of fields that encode and decode as one unit ----------------------------


class _Invalid(Exception):
    """A value the fast path refuses; the caller turns it into a precise ValueError."""


class _FixedRun:
    """Consecutive fixed-size fields, packed by one fused Struct."""

    def __init__(self, specs: Sequence[FieldSpec]) -> None:
        self.specs = tuple(specs)
        self.struct = _struct(specs)
        self.size = self.struct.size
        # struct pads or truncates 's' fields silently, so their lengths are checked first
        sized = [(i, s.size) for i, s in enumerate(specs) if s.kind == "bytes"]
        self.pack: Callable[..., bytes] = self._checked_pack(sized) if sized else self.struct.pack

    def _checked_pack(self, sized: list[tuple[int, int]]) -> Callable[..., bytes]:
        pack = self.struct.pack

        def checked(*values: object) -> bytes:
            for index, size in sized:
                value = values[index]
                if not isinstance(value, (bytes, bytearray)) or len(value) != size:
                    raise _Invalid
            return pack(*values)

        return checked

    def encode(self, values: tuple, out: list) -> None:
        out.append(self.pack(*values))

    def decode(self, body: bytes | memoryview, offset: int, out: list) -> int:
        end = offset + self.size
        if end > len(body):
            raise _short(self.specs[0].name, self.size, offset, body)
        out.extend(self.struct.unpack_from(body, offset))
        return end


class _TextField:
    """A length-prefixed UTF-8 string."""

    def __init__(self, spec: FieldSpec) -> None:
        self.specs = (spec,)
        self.prefix = struct.Struct("<" + spec.fmt)
        self.limit = (1 << 8 * self.prefix.size) - 1

    def encode(self, values: tuple, out: list) -> None:
        (text,) = values
        if not isinstance(text, str):
            raise _Invalid
        data = text.encode("utf-8")
        if len(data) > self.limit:
            raise _Invalid
        out.append(self.prefix.pack(len(data)))
        out.append(data)

    def decode(self, body: bytes | memoryview, offset: int, out: list) -> int:
        name = self.specs[0].name
        start = offset + self.prefix.size
        if start > len(body):
            raise _short(name, self.prefix.size, offset, body)
        (length,) = self.prefix.unpack_from(body, offset)
        if start + length > len(body):
            raise _short(name, length, start, body)
        try:
            out.append(str(body[start : start + length], "utf-8"))
        except UnicodeDecodeError as exc:
            raise DecodeError(ErrorCode.BAD_MESSAGE, f"{name}: invalid UTF-8 ({exc})") from None
        return start + length


class _ArrayField:
    """A count followed by that many fixed-size elements; values are tuples of tuples."""

    def __init__(self, spec: FieldSpec) -> None:
        self.specs = (spec,)
        self.prefix = struct.Struct("<" + spec.fmt)
        self.element = _FixedRun(spec.elements)

    def encode(self, values: tuple, out: list) -> None:
        (items,) = values
        pack = self.element.pack
        out.append(self.prefix.pack(len(items)))
        out.append(b"".join([pack(*item) for item in items]))

    def decode(self, body: bytes | memoryview, offset: int, out: list) -> int:
        name = self.specs[0].name
        start = offset + self.prefix.size
        if start > len(body):
            raise _short(name, self.prefix.size, offset, body)
        (count,) = self.prefix.unpack_from(body, offset)
        end = start + count * self.element.size
        if end > len(body):
            raise _short(name, count * self.element.size, start, body)
        out.append(tuple(self.element.struct.iter_unpack(body[start:end])))
        return end


class _GreedyField:
    """The rest of the body, as bytes."""

    def __init__(self, spec: FieldSpec) -> None:
        self.specs = (spec,)

    def encode(self, values: tuple, out: list) -> None:
        (data,) = values
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise _Invalid
        out.append(data)

    def decode(self, body: bytes | memoryview, offset: int, out: list) -> int:
        out.append(bytes(body[offset:]))
        return len(body)


def _short(name: str, needed: int, offset: int, body: bytes | memoryview) -> DecodeError:
    return DecodeError(
        ErrorCode.BAD_MESSAGE,
        f"{name}: needs {needed} bytes at body offset {offset}, body has {len(body)}",
    )


def _segments(specs: Sequence[FieldSpec]) -> list:
    segments: list = []
    run: list[FieldSpec] = []
    for spec in specs:
        if spec.size is not None:
            run.append(spec)
            continue
        if run:
            segments.append(_FixedRun(run))
            run = []
        field = {"text": _TextField, "array": _ArrayField, "greedy": _GreedyField}[spec.kind]
        segments.append(field(spec))
    if run:
        segments.append(_FixedRun(run))
    return segments


# --- one codec per message type ------------------------------------------------------------

_ENCODE_ERRORS = (struct.error, _Invalid, TypeError, UnicodeEncodeError)


def _values_getter(names: Sequence[str]) -> Callable[[object], tuple]:
    if not names:
        return lambda msg: ()
    if len(names) == 1:
        get = attrgetter(names[0])
        return lambda msg: (get(msg),)
    return attrgetter(*names)


def _encode_error(
    cls: type, specs: Sequence[FieldSpec], values: tuple, request_id: int = 0, flags: int = 0
) -> ValueError | None:
    """The precise ValueError for a failed encode, or None if no value is at fault (a bug)."""
    checks = [("request_id", _int_problem("I", request_id)), ("flags", _int_problem("B", flags))]
    checks += [(spec.name, spec.problem(value)) for spec, value in zip(specs, values, strict=True)]
    for name, problem in checks:
        if problem:
            return ValueError(f"{cls.__name__}.{name}: {problem}")
    return None


class _Codec:
    """Encoder and decoder for one message type; fixed-size types get fused fast paths."""

    def __init__(self, msg_type: MsgType, cls: type, schema: Struct) -> None:
        self.type, self.cls = int(msg_type), cls
        self.specs = layout(schema)
        self.values = _values_getter([spec.name for spec in self.specs])
        self.segments = _segments(self.specs)
        # one fused header + body Struct when struct.pack alone validates every field
        ints_only = all(spec.kind == "int" for spec in self.specs)
        fixed = all(spec.size is not None for spec in self.specs)
        self.encode_frame = self._fixed_frame_encoder() if ints_only else self._encode_frame
        self.decode = self._fixed_decoder() if fixed else self._decode

    def _fail(self, exc: Exception, values: tuple, request_id: int = 0, flags: int = 0) -> None:
        error = _encode_error(self.cls, self.specs, values, request_id, flags)
        if error is None:
            raise exc
        raise error from None

    def encode_body(self, msg: object) -> bytes:
        values = self.values(msg)
        out: list = []
        index = 0
        try:
            for segment in self.segments:
                count = len(segment.specs)
                segment.encode(values[index : index + count], out)
                index += count
        except _ENCODE_ERRORS as exc:
            self._fail(exc, values)
        return b"".join(out)

    def _encode_frame(self, msg: object, request_id: int, flags: int) -> bytes:
        body = self.encode_body(msg)
        try:
            header = HEADER.pack(_HEADER_REST + len(body), self.type, flags, 0, request_id)
        except struct.error as exc:
            self._fail(exc, self.values(msg), request_id, flags)
        return header + body

    def _fixed_frame_encoder(self) -> Callable[[object, int, int], bytes]:
        (run,) = self.segments or [_FixedRun(())]
        frame = struct.Struct(HEADER.format + run.struct.format[1:])
        pack, values, fail = frame.pack, self.values, self._fail
        length, msg_type = _HEADER_REST + run.size, self.type

        def encode_frame(msg: object, request_id: int, flags: int) -> bytes:
            try:
                return pack(length, msg_type, flags, 0, request_id, *values(msg))
            except struct.error as exc:
                fail(exc, values(msg), request_id, flags)

        return encode_frame

    def _decode(self, body: bytes | memoryview) -> object:
        out: list = []
        offset = 0
        for segment in self.segments:
            offset = segment.decode(body, offset, out)
        if offset != len(body):
            raise DecodeError(
                ErrorCode.BAD_MESSAGE,
                f"{self.cls.__name__}: {len(body) - offset} bytes after the last field",
            )
        return self.cls(*out)

    def _fixed_decoder(self) -> Callable[[bytes | memoryview], object]:
        (run,) = self.segments or [_FixedRun(())]
        unpack, cls, size = run.struct.unpack, self.cls, run.size

        def decode(body: bytes | memoryview) -> object:
            try:
                return cls(*unpack(body))
            except struct.error:
                raise DecodeError(
                    ErrorCode.BAD_MESSAGE,
                    f"{cls.__name__}: body is {len(body)} bytes, expected {size}",
                ) from None

        return decode


_CODECS: dict[int, _Codec] = {
    int(t): _Codec(t, MESSAGE_CLASSES[t], schema) for t, schema in SCHEMAS.items()
}
_BY_CLASS: dict[type, _Codec] = {codec.cls: codec for codec in _CODECS.values()}
_FRAME_ENCODERS = {cls: codec.encode_frame for cls, codec in _BY_CLASS.items()}
_DECODERS = {t: codec.decode for t, codec in _CODECS.items()}


def _codec_of(msg: object) -> _Codec:
    codec = _BY_CLASS.get(type(msg))
    if codec is None:
        raise TypeError(f"{type(msg).__name__} is not a viowire message class")
    return codec


def _unknown(msg_type: int) -> DecodeError:
    return DecodeError(ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type:#04x}")


# --- public API ----------------------------------------------------------------------------


def encode(msg: object, request_id: int = 0, flags: int = 0) -> bytes:
    """The whole frame (header + body) for ``msg``; ValueError names any field that does not fit."""
    encoder = _FRAME_ENCODERS.get(type(msg)) or _codec_of(msg).encode_frame
    return encoder(msg, request_id, flags)


def encode_body(msg: object) -> bytes:
    """The body of ``msg`` without a header (for callers that build headers themselves)."""
    return _codec_of(msg).encode_body(msg)


def decode_body(msg_type: int, body: bytes | memoryview) -> object:
    """The message of type ``msg_type`` in ``body``; DecodeError if it does not decode exactly."""
    decoder = _DECODERS.get(msg_type)
    if decoder is None:
        raise _unknown(msg_type)
    return decoder(body)


def body_fields(msg_type: int) -> tuple[tuple[str, ...], Callable[[bytes], tuple]]:
    """The field names of a fixed-size message type and a function from its body to the field
    values, in that order, without building the message object (for the hottest requests).

    The function raises ``struct.error`` for a body of the wrong size; ``decode_body`` then
    gives the precise DecodeError. TypeError for a type whose body is not fixed-size.
    """
    codec = _CODECS[msg_type]
    if any(spec.size is None for spec in codec.specs):
        raise TypeError(f"{codec.cls.__name__} is not a fixed-size message")
    (run,) = codec.segments or [_FixedRun(())]
    return tuple(spec.name for spec in codec.specs), run.struct.unpack


def named(derived: tuple[tuple[str, ...], Callable], names: tuple[str, ...]) -> Callable:
    """The function of a :func:`body_fields` or :func:`frame_packer` result, once its fields are
    known to be ``names`` in order (a message definition that changes fails at import)."""
    if derived[0] != names:
        raise TypeError(f"message fields changed: {derived[0]}, expected {names}")
    return derived[1]


def frame_packer(msg_type: int) -> tuple[tuple[str, ...], Callable[..., bytes]]:
    """The field names of a message type made of integers only, and
    ``pack(request_id, flags, *values)`` giving the whole frame, as ``encode`` would, without
    building the message object. Values are checked by ``struct`` only (``struct.error``)."""
    codec = _CODECS[msg_type]
    if any(spec.kind != "int" for spec in codec.specs):
        raise TypeError(f"{codec.cls.__name__} has fields that are not integers")
    (run,) = codec.segments or [_FixedRun(())]
    frame = struct.Struct(HEADER.format + run.struct.format[1:])
    pack, length, type_ = frame.pack, _HEADER_REST + run.size, codec.type

    def pack_frame(request_id: int, flags: int, *values: int) -> bytes:
        return pack(length, type_, flags, 0, request_id, *values)

    return tuple(spec.name for spec in codec.specs), pack_frame


def encode_construct(msg: object, request_id: int = 0, flags: int = 0) -> bytes:
    """Reference encoder: the same frame as ``encode``, built by construct (slow, for tests)."""
    codec = _codec_of(msg)
    values = codec.values(msg)
    pairs = zip(codec.specs, values, strict=True)
    obj = {spec.name: _to_construct(spec, value) for spec, value in pairs}
    try:
        body = SCHEMAS[MsgType(codec.type)].build(obj)
        header = Header.build(
            dict(
                length=_HEADER_REST + len(body),
                type=codec.type,
                flags=flags,
                reserved=0,
                request_id=request_id,
            )
        )
    except Exception as exc:  # construct raises more than ConstructError for bad values
        raise _encode_error(codec.cls, codec.specs, values, request_id, flags) or exc from None
    return header + body


def _to_construct(spec: FieldSpec, value: object) -> object:
    """Dataclass value -> construct value: arrays become lists of dicts, buffers become bytes."""
    if spec.kind == "array" and isinstance(value, Sequence):
        names = [e.name for e in spec.elements]
        for item in value:
            if not isinstance(item, Sequence) or len(item) != len(names):
                return value  # construct rejects it; _encode_error names the element
        return [dict(zip(names, item, strict=True)) for item in value]
    if spec.kind in ("bytes", "greedy") and isinstance(value, (bytearray, memoryview)):
        return bytes(value)
    return value


def decode_body_construct(msg_type: int, body: bytes | memoryview) -> object:
    """Reference decoder: construct's parse, with the same DecodeError rules as ``decode_body``."""
    codec = _CODECS.get(msg_type)
    if codec is None:
        raise _unknown(msg_type)
    stream = io.BytesIO(bytes(body))
    try:
        parsed = SCHEMAS[MsgType(msg_type)].parse_stream(stream)
    except ConstructError as exc:
        raise DecodeError(ErrorCode.BAD_MESSAGE, f"{codec.cls.__name__}: {exc}") from None
    trailing = len(body) - stream.tell()
    if trailing:
        raise DecodeError(
            ErrorCode.BAD_MESSAGE, f"{codec.cls.__name__}: {trailing} bytes after the last field"
        )
    return codec.cls(*(_from_construct(spec, parsed[spec.name]) for spec in codec.specs))


def _from_construct(spec: FieldSpec, value: object) -> object:
    if spec.kind == "array":
        return tuple(tuple(item[e.name] for e in spec.elements) for item in value)
    return value


# --- measurement ---------------------------------------------------------------------------


def _sample(msg_type: MsgType) -> object:
    """A plausible message of each type, for measure()."""

    def value(spec: FieldSpec) -> object:
        if spec.kind == "int":
            return 1
        if spec.kind == "array":
            return tuple(tuple(value(e) for e in spec.elements) for _ in range(4))
        return {"bytes": b"\x07" * (spec.size or 0), "text": "viowire", "greedy": b"\x5a" * 64}[
            spec.kind
        ]

    codec = _CODECS[msg_type]
    return codec.cls(*(value(spec) for spec in codec.specs))


def measure(number: int = 2000) -> dict[str, tuple[float, float]]:
    """µs per message for encode + decode, fast path and construct, printed as a table.

    The decode half takes the body as a FrameReader hands it over; best of 5 repeats.
    """
    results = {}
    print(f"{'message':16} {'fast µs':>8} {'construct µs':>13} {'ratio':>6}")
    for msg_type in SCHEMAS:
        msg = _sample(msg_type)
        body = encode(msg)[HEADER_SIZE:]
        fast = _best(encode, decode_body, msg, body, number)
        slow = _best(encode_construct, decode_body_construct, msg, body, max(1, number // 20))
        results[msg_type.name] = (fast, slow)
        print(f"{msg_type.name:16} {fast:8.2f} {slow:13.1f} {slow / fast:6.0f}")
    return results


def _best(encoder: Callable, decoder: Callable, msg: object, body: bytes, number: int) -> float:
    msg_type = msg.TYPE

    def round_trip() -> None:
        encoder(msg, 1)
        decoder(msg_type, body)

    return min(timeit.repeat(round_trip, number=number, repeat=5)) / number * 1e6


if __name__ == "__main__":
    measure()


# --- guest-memory traffic: the proxied hot path ----------------------------------------------
# MEM_READ and MEM_WRITE are a count of (u64 gpa, u32 length) ranges, MEM_WRITE then the data;
# MEM_READ_REPLY is the data. Packed and parsed here without message objects; tests/test_codec.py
# checks them against encode and decode_body byte for byte.
_COUNT = struct.Struct("<I")
_MEM_READ_TYPE = int(MsgType.MEM_READ)
_MEM_WRITE_TYPE = int(MsgType.MEM_WRITE)
_MEM_READ_REPLY_TYPE = int(MsgType.MEM_READ_REPLY)
for _type, _fields in (
    (_MEM_READ_TYPE, ["ranges"]),
    (_MEM_WRITE_TYPE, ["ranges", "data"]),
    (_MEM_READ_REPLY_TYPE, ["data"]),
):
    if [spec.name for spec in _CODECS[_type].specs] != _fields:
        raise TypeError(f"{MsgType(_type).name}'s fields changed: update the mem_* packers")


def _pack_ranges(
    msg_type: int, ranges: Sequence[tuple[int, int]], data: bytes, request_id: int, flags: int
) -> bytes:
    flat = [value for pair in ranges for value in pair]
    body = struct.pack(f"<I{len(ranges) * 'QI'}", len(ranges), *flat)
    header = HEADER.pack(len(body) + len(data) + _HEADER_REST, msg_type, flags, 0, request_id)
    return header + body + data


def _unpack_ranges(body: bytes) -> tuple[list[tuple[int, int]], int] | None:
    """The ranges and where they end, or None where the body is not well formed."""
    try:
        (count,) = _COUNT.unpack_from(body)
        if count * 12 + 4 > len(body):
            return None
        values = struct.unpack_from(f"<{count * 'QI'}", body, 4)
    except struct.error:
        return None
    return list(zip(values[::2], values[1::2], strict=True)), 4 + 12 * count


def pack_mem_write(
    ranges: Sequence[tuple[int, int]], data: bytes, request_id: int = 0, flags: int = 0
) -> bytes:
    """The MEM_WRITE frame ``encode`` makes, without the message object (ranges are
    ``(gpa, length)``; ``data`` their bytes, concatenated). Values are checked by ``struct``."""
    return _pack_ranges(_MEM_WRITE_TYPE, ranges, data, request_id, flags)


def unpack_mem_write(body: bytes) -> tuple[list[tuple[int, int]], memoryview]:
    """``(ranges, data)`` of a MEM_WRITE body, as ``decode_body`` would give them (ranges as a
    list, data as a view of ``body``); DecodeError where it does not decode."""
    parsed = _unpack_ranges(body)
    if parsed is None:
        msg = decode_body(_MEM_WRITE_TYPE, body)  # raises the DecodeError that says why
        return list(msg.ranges), memoryview(msg.data)
    ranges, end = parsed
    return ranges, memoryview(body)[end:]


def pack_mem_read(ranges: Sequence[tuple[int, int]], request_id: int, flags: int = 0) -> bytes:
    """The MEM_READ frame ``encode`` makes, without the message object."""
    return _pack_ranges(_MEM_READ_TYPE, ranges, b"", request_id, flags)


def unpack_mem_read(body: bytes) -> list[tuple[int, int]]:
    """The ranges of a MEM_READ body, as ``decode_body`` gives them; DecodeError otherwise."""
    parsed = _unpack_ranges(body)
    if parsed is None or parsed[1] != len(body):
        return list(decode_body(_MEM_READ_TYPE, body).ranges)  # raises, or is the same
    return parsed[0]


def pack_mem_read_reply(data: bytes, request_id: int, flags: int) -> bytes:
    """The MEM_READ_REPLY frame ``encode`` makes: the header, then the data."""
    return HEADER.pack(len(data) + _HEADER_REST, _MEM_READ_REPLY_TYPE, flags, 0, request_id) + data


# --- notification channels (NOTIFY_CHANNEL): datagrams, not frames ---------------------------
CHANNEL_KICK = struct.Struct("<I")  # driver -> device: the value a QueueNotify write would carry
CHANNEL_USED = b"\x01"  # device -> driver: a used-buffer notification
