"""Every viowire message, defined once with ``construct``: the single source of truth.

A frame on the wire is a 12-byte header followed by a body::

    u32 length      bytes that follow this field (8 + body), at most the negotiated max_frame
    u8  type        MsgType
    u8  flags       Flags: REPLY, POSTED
    u16 reserved    0
    u32 request_id  chosen by the sender of a request; a reply carries the request's id

All integers are little-endian. The message classes below are generated from the construct
structs, so a field's name and order exist in exactly one place. ``docs/protocol.md`` is
generated from this module (``python -m viowire.protocol.doc``).
"""

from __future__ import annotations

import dataclasses
import enum

from construct import (
    Bytes,
    GreedyBytes,
    Int8ul,
    Int16ul,
    Int32ul,
    Int64ul,
    PascalString,
    PrefixedArray,
    Struct,
)

PROTOCOL_VERSION = 2  # 2: AUTH after HELLO; MEMORY_SHM only with a same-host proof
HELLO_MAGIC = 0x52495756  # "VWIR"
HEADER_SIZE = 12
LENGTH_FIELD_SIZE = 4
DEFAULT_MAX_FRAME = 1 << 20
DEFAULT_MAX_INFLIGHT = 256
MIN_MAX_FRAME = 4096  # a peer must accept frames of at least this size

Header = Struct(
    "length" / Int32ul,
    "type" / Int8ul,
    "flags" / Int8ul,
    "reserved" / Int16ul,
    "request_id" / Int32ul,
)


class MsgType(enum.IntEnum):
    HELLO = 0x01
    HELLO_REPLY = 0x02
    ERROR = 0x03
    OK = 0x04
    AUTH = 0x05
    AUTH_REPLY = 0x06
    MMIO_READ = 0x10
    MMIO_READ_REPLY = 0x11
    MMIO_WRITE = 0x12
    PLATFORM_QUERY = 0x20
    PLATFORM_INFO = 0x21
    MEM_REGISTER = 0x30
    MEM_UNREGISTER = 0x31
    MEM_READ = 0x32
    MEM_READ_REPLY = 0x33
    MEM_WRITE = 0x34
    IRQ = 0x40
    NOTIFY_CHANNEL = 0x50


class Flags(enum.IntFlag):
    REPLY = 0x01  # this frame answers the request with the same request_id
    POSTED = 0x02  # the sender wants no reply (errors still come back as ERROR)


class ProtoFeature(enum.IntFlag):
    """Session feature bits offered in HELLO; the session uses the intersection."""

    POSTED_WRITES = 1 << 0  # MMIO_WRITE with POSTED gets no reply
    MEMORY_PROXIED = 1 << 1  # the server reaches guest RAM with MEM_READ / MEM_WRITE
    MEMORY_MEMFD = 1 << 2  # memfd passed with SCM_RIGHTS (Unix sockets)
    MEMORY_SHM = 1 << 3  # named POSIX shared-memory segment (same host, proven in AUTH or Unix)
    IRQ_STATUS = 1 << 4  # the driver trusts IRQ.status and posts its ACK; no lower after an ACK
    NOTIFY_CHANNEL = 1 << 5  # notifications of a device on a datagram socket passed once (Unix)
    FD_SIDECAR = 1 << 6  # descriptors ride a SOCK_SEQPACKET socket passed with HELLO (Unix)


class AuthMethod(enum.IntFlag):
    """What a server requires in AUTH before it opens the session (HELLO_REPLY ``auth``)."""

    TOKEN = 1 << 0  # an HMAC-SHA256 proof of the shared-secret token


class MemoryKind(enum.IntEnum):
    PROXIED = 0  # the server reads and writes this region with MEM_READ / MEM_WRITE
    MEMFD = 1  # the file descriptor rides with the frame (SCM_RIGHTS)
    SHM = 2  # a named segment under /dev/shm


class ErrorCode(enum.IntEnum):
    MALFORMED_FRAME = 1  # header or length is invalid; the connection is closed after this
    UNKNOWN_TYPE = 2  # the type byte names no message; the connection goes on
    BAD_MESSAGE = 3  # body does not decode as its type
    BUS_ERROR = 4  # no device window and no RAM at that physical address
    BAD_WIDTH = 5  # access width is not 1, 2, 4 or 8
    MEMORY_FAULT = 6  # a guest range outside registered memory
    UNSUPPORTED = 7  # protocol version, feature or memory kind not supported
    TOO_MANY_IN_FLIGHT = 8  # more requests awaiting replies than max_inflight
    FRAME_TOO_LARGE = 9  # a length field above max_frame; the connection is closed after this
    BAD_STATE = 10  # e.g. a request before HELLO
    INTERNAL = 11  # a server bug; the session goes on, the log has the traceback
    AUTH_FAILED = 12  # authentication missing or wrong; the connection is closed after this
    LIMIT_EXCEEDED = 13  # a limit of the server (the message names it); see section 9


Range = Struct("gpa" / Int64ul, "length" / Int32ul)

DeviceEntry = Struct(
    "base" / Int64ul,
    "size" / Int32ul,
    "irq" / Int32ul,
    "version" / Int32ul,
    "device_id" / Int32ul,
    "vendor_id" / Int32ul,
)

Text = PascalString(Int16ul, "utf8")

SCHEMAS: dict[MsgType, Struct] = {
    MsgType.HELLO: Struct(
        "magic" / Int32ul,
        "version" / Int16ul,
        "reserved" / Int16ul,
        "features" / Int64ul,
        "max_frame" / Int32ul,
        "max_inflight" / Int32ul,
        "host_id" / Bytes(16),
        "name" / Text,
    ),
    MsgType.HELLO_REPLY: Struct(
        "version" / Int16ul,
        "reserved" / Int16ul,
        "features" / Int64ul,
        "max_frame" / Int32ul,
        "max_inflight" / Int32ul,
        "session_id" / Int64ul,
        "host_id" / Bytes(16),
        "auth" / Int8ul,
        "nonce" / Bytes(32),
        "name" / Text,
        "shm_proof" / Text,
    ),
    MsgType.ERROR: Struct("code" / Int32ul, "message" / Text),
    MsgType.OK: Struct(),
    MsgType.AUTH: Struct("nonce" / Bytes(32), "mac" / Bytes(32), "shm_proof" / Bytes(32)),
    MsgType.AUTH_REPLY: Struct("features" / Int64ul, "mac" / Bytes(32)),
    MsgType.MMIO_READ: Struct("addr" / Int64ul, "width" / Int8ul),
    MsgType.MMIO_READ_REPLY: Struct("value" / Int64ul),
    MsgType.MMIO_WRITE: Struct("addr" / Int64ul, "width" / Int8ul, "value" / Int64ul),
    MsgType.PLATFORM_QUERY: Struct("first" / Int32ul, "max_count" / Int32ul),
    MsgType.PLATFORM_INFO: Struct(
        "total" / Int32ul, "first" / Int32ul, "devices" / PrefixedArray(Int32ul, DeviceEntry)
    ),
    MsgType.MEM_REGISTER: Struct(
        "gpa" / Int64ul,
        "size" / Int64ul,
        "kind" / Int8ul,
        "offset" / Int64ul,
        "name" / Text,
    ),
    MsgType.MEM_UNREGISTER: Struct("gpa" / Int64ul),
    MsgType.MEM_READ: Struct("ranges" / PrefixedArray(Int32ul, Range)),
    MsgType.MEM_READ_REPLY: Struct("data" / GreedyBytes),
    MsgType.MEM_WRITE: Struct("ranges" / PrefixedArray(Int32ul, Range), "data" / GreedyBytes),
    MsgType.IRQ: Struct("irq" / Int32ul, "level" / Int8ul, "status" / Int32ul),
    MsgType.NOTIFY_CHANNEL: Struct("base" / Int64ul, "attach" / Int8ul),
}

DOCS: dict[MsgType, str] = {
    MsgType.HELLO: "client → server, first frame of a session. magic = 0x52495756; host_id = "
    "the client's kernel boot id (16 bytes), a hint only: it proves nothing. Over a Unix "
    "socket, a client that offers FD_SIDECAR sends one end of an AF_UNIX SOCK_SEQPACKET "
    "socketpair as SCM_RIGHTS with this frame; if the server accepts it, the frames that carry "
    "descriptors (MEM_REGISTER of a memfd, NOTIFY_CHANNEL; no other type is accepted there) go "
    "one a packet on that socket, their replies come on the connection, and the connection "
    "itself carries no descriptor after HELLO (so both ends may read it with their event loop's "
    "own transport). The two are read apart: a frame on one may be applied before an earlier "
    "one on the other.",
    MsgType.HELLO_REPLY: "server → client. features = intersection of both offers; limits = the "
    "smaller of both; session_id names the session in the server's logs. auth = the AuthMethod "
    "bits the server requires in AUTH before any other request (0: none, the session is open "
    "now); nonce = 32 fresh random bytes, the server's half of the AUTH proofs; shm_proof = the "
    "name of a file under /dev/shm that a client on this host may read to prove it shares the "
    "server's /dev/shm (empty: MEMORY_SHM is not on offer).",
    MsgType.AUTH: "client → server, the first request after HELLO_REPLY: required when "
    "HELLO_REPLY auth has TOKEN, optional otherwise (to claim MEMORY_SHM). nonce = 32 fresh "
    'random bytes; mac = HMAC-SHA256(token, "viowire-auth client\\0" | server nonce | client '
    "nonce | binding), binding being the TLS channel binding (section 3; empty without TLS), or "
    "32 zero bytes without a token; shm_proof = the 32 bytes of the shm_proof file, or "
    "32 zero bytes. A wrong or missing mac where TOKEN is required gets ERROR AUTH_FAILED and the "
    "connection is closed.",
    MsgType.AUTH_REPLY: "server → client. features = the session's features from now on (those "
    "of HELLO_REPLY, plus MEMORY_SHM if the shm_proof matched); mac = HMAC-SHA256(token, "
    '"viowire-auth server\\0" | server nonce | client nonce | binding) when TOKEN was required '
    "(the client checks it: the server knows the token too), else 32 zero bytes.",
    MsgType.ERROR: "reply to any request that failed, or to a POSTED request that failed "
    "(carrying its request_id). A MALFORMED_FRAME error is followed by closing the connection.",
    MsgType.OK: "empty reply to a request that succeeded and returns nothing.",
    MsgType.MMIO_READ: "read `width` (1, 2, 4, 8) bytes at physical address `addr`.",
    MsgType.MMIO_READ_REPLY: "value read, zero-extended.",
    MsgType.MMIO_WRITE: "write the low `width` bytes of `value` at `addr`. With POSTED no reply is "
    "sent; writes are applied in the order they arrive.",
    MsgType.PLATFORM_QUERY: "ask for the platform description, from entry `first`, at most "
    "`max_count` entries (the server may send fewer: the reply must fit in max_frame).",
    MsgType.PLATFORM_INFO: "`total` entries exist; these are entries `first`.. in address "
    "order, one per device window: base, window size, IRQ line, virtio-mmio Version, DeviceID, "
    "VendorID. Ask again from `first + len(devices)` until `total`.",
    MsgType.MEM_REGISTER: "client → server: guest RAM at [gpa, gpa+size). kind MEMFD carries the "
    "fd as SCM_RIGHTS ancillary data on this frame; SHM names a segment; PROXIED has no backing "
    "on the server. offset = where the region starts inside the fd or segment.",
    MsgType.MEM_UNREGISTER: "forget the region that starts at gpa.",
    MsgType.MEM_READ: "server → client (proxied memory): read each range; the reply concatenates "
    "them in order.",
    MsgType.MEM_READ_REPLY: "the bytes of every requested range, concatenated.",
    MsgType.MEM_WRITE: "server → client (proxied memory): `data` is the concatenation of the "
    "ranges' bytes. Usually POSTED; applied in order with every other frame.",
    MsgType.IRQ: "server → client event (request_id 0): the device's interrupt line `irq` changed "
    "to `level` (1 asserted while InterruptStatus != 0, 0 deasserted); `status` is InterruptStatus "
    "as the frame leaves. With IRQ_STATUS negotiated the driver may take `status` instead of "
    "reading the register and post its InterruptACK of the bits its frames carried: after that ACK "
    "the server sends a new raise frame for every bit the driver has not been told of (one set "
    "while the line was already high, or a notification made after a frame whose bit the ACK "
    "cleared), and it sends no level-0 frame for a drop the driver's own ACK caused.",
    MsgType.NOTIFY_CHANNEL: "client → server, with NOTIFY_CHANNEL and shared memory: the device "
    "at physical address `base` takes its notifications on an AF_UNIX SOCK_DGRAM socket. With "
    "`attach` = 1 the socket rides as SCM_RIGHTS on this frame; 0 detaches the current one. "
    "Driver → device: a 4-byte little-endian datagram is a QueueNotify write of that value. "
    "Device → driver: a 1-byte datagram 0x01 is a used-buffer notification; it sets "
    "InterruptStatus bit 0 as always, but no IRQ frame goes out for that bit and every "
    "notification sends a datagram (the driver's InterruptACK may come late). Configuration "
    "change notifications stay IRQ frames. The server never blocks on the socket: a datagram "
    "that does not fit is dropped (one is waiting already). The driver sends a notification on "
    "the connection instead while its earlier posted writes may not have been applied yet. A "
    "channel whose driver end is closed or shut down is detached by the server, which then "
    "notifies with IRQ frames again, starting with a raise frame if bit 0 is set.",
}


def _message_class(msg_type: MsgType, schema: Struct) -> type:
    fields = [sub.name for sub in schema.subcons]
    cls = dataclasses.make_dataclass(
        "".join(part.capitalize() for part in msg_type.name.split("_")),
        fields,
        frozen=True,
        slots=True,
        namespace={"TYPE": msg_type, "__doc__": DOCS[msg_type]},
    )
    cls.__module__ = __name__
    return cls


MESSAGE_CLASSES: dict[MsgType, type] = {t: _message_class(t, s) for t, s in SCHEMAS.items()}

Hello = MESSAGE_CLASSES[MsgType.HELLO]
HelloReply = MESSAGE_CLASSES[MsgType.HELLO_REPLY]
Error = MESSAGE_CLASSES[MsgType.ERROR]
Ok = MESSAGE_CLASSES[MsgType.OK]
Auth = MESSAGE_CLASSES[MsgType.AUTH]
AuthReply = MESSAGE_CLASSES[MsgType.AUTH_REPLY]
MmioRead = MESSAGE_CLASSES[MsgType.MMIO_READ]
MmioReadReply = MESSAGE_CLASSES[MsgType.MMIO_READ_REPLY]
MmioWrite = MESSAGE_CLASSES[MsgType.MMIO_WRITE]
PlatformQuery = MESSAGE_CLASSES[MsgType.PLATFORM_QUERY]
PlatformInfo = MESSAGE_CLASSES[MsgType.PLATFORM_INFO]
MemRegister = MESSAGE_CLASSES[MsgType.MEM_REGISTER]
MemUnregister = MESSAGE_CLASSES[MsgType.MEM_UNREGISTER]
MemRead = MESSAGE_CLASSES[MsgType.MEM_READ]
MemReadReply = MESSAGE_CLASSES[MsgType.MEM_READ_REPLY]
MemWrite = MESSAGE_CLASSES[MsgType.MEM_WRITE]
Irq = MESSAGE_CLASSES[MsgType.IRQ]
NotifyChannel = MESSAGE_CLASSES[MsgType.NOTIFY_CHANNEL]
