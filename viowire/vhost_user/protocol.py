"""The vhost-user wire format (QEMU's docs/interop/vhost-user.rst), sans-IO.

A message is a 12-byte header and a payload::

    u32 request   Request (front-end messages)
    u32 flags     bits 0-1 version (1), bit 2 REPLY, bit 3 NEED_REPLY
    u32 size      payload bytes that follow

The specification says "machine native byte order"; viowire speaks it little-endian, the order
of every host it runs on (x86-64, arm64). File descriptors travel as SCM_RIGHTS ancillary data
with a message's first byte: the I/O layer (:mod:`viowire.vhost_user.server`) reads one
message at a time, so every descriptor it receives belongs to the message being read.

:class:`Decoder` is the framing: it says how many bytes it wants next (never past the end of
the current message) and turns what it is fed into :class:`Message` objects. The payload types
are construct structs, defined once here and shared by the back-end, the test front-end and
docs/vhost-user.md.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from construct import Array, Bytes, Int16ul, Int32ul, Int64ul, Padding, Struct, this

VERSION = 0x1
HEADER_SIZE = 12
MAX_PAYLOAD = 4096
"""The largest payload accepted: the largest message of the protocol is a 268-byte GET_CONFIG
(12 + 256); anything near 4 KiB is a broken or hostile front-end."""
MAX_FDS = 8
"""Descriptors one message may carry: SET_MEM_TABLE's eight regions."""
MAX_REGIONS = 8
"""Regions in one SET_MEM_TABLE (VHOST_MEMORY_BASELINE_NREGIONS)."""
MAX_CONFIG_SIZE = 256
VRING_INDEX_MASK = 0xFF
VRING_NOFD_MASK = 1 << 8
"""SET_VRING_KICK/CALL/ERR: bits 0-7 are the ring, bit 8 says no descriptor came with it."""

PROTOCOL_FEATURES_BIT = 30
"""VHOST_USER_F_PROTOCOL_FEATURES, in the virtio feature word (GET/SET_FEATURES)."""


class Flag(enum.IntFlag):
    VERSION_MASK = 0x3
    REPLY = 1 << 2
    NEED_REPLY = 1 << 3


class Request(enum.IntEnum):
    """Front-end message types (vhost-user.rst "Front-end message types")."""

    NONE = 0
    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40


class ProtocolFeature(enum.IntEnum):
    """VHOST_USER_PROTOCOL_F_* bit numbers (GET/SET_PROTOCOL_FEATURES)."""

    MQ = 0
    LOG_SHMFD = 1
    RARP = 2
    REPLY_ACK = 3
    MTU = 4
    BACKEND_REQ = 5
    CROSS_ENDIAN = 6
    CRYPTO_SESSION = 7
    PAGEFAULT = 8
    CONFIG = 9
    BACKEND_SEND_FD = 10
    HOST_NOTIFIER = 11
    INFLIGHT_SHMFD = 12
    RESET_DEVICE = 13
    INBAND_NOTIFICATIONS = 14
    CONFIGURE_MEM_SLOTS = 15
    STATUS = 16


# -- payloads: each defined once ----------------------------------------------------------------
Header = Struct("request" / Int32ul, "flags" / Int32ul, "size" / Int32ul)

U64 = Struct("value" / Int64ul)
"""A single 64-bit integer: features, a ring index with flags (KICK/CALL/ERR), a status."""

VringState = Struct("index" / Int32ul, "num" / Int32ul)
"""SET_VRING_NUM/BASE/ENABLE, GET_VRING_BASE (request and reply)."""

VringAddr = Struct(
    "index" / Int32ul,
    "flags" / Int32ul,
    "desc_user_addr" / Int64ul,
    "used_user_addr" / Int64ul,
    "avail_user_addr" / Int64ul,
    "log_guest_addr" / Int64ul,
)
"""SET_VRING_ADDR: front-end *virtual* addresses of the three ring areas (note the order:
descriptor table, used ring, available ring)."""

MemoryRegion = Struct(
    "guest_phys_addr" / Int64ul,
    "memory_size" / Int64ul,
    "userspace_addr" / Int64ul,
    "mmap_offset" / Int64ul,
)

MemoryTable = Struct(
    "nregions" / Int32ul,
    "padding" / Int32ul,
    "regions" / Array(this.nregions, MemoryRegion),
)
"""SET_MEM_TABLE: up to eight regions, one descriptor each, in the same order."""

SingleMemoryRegion = Struct("padding" / Int64ul, "region" / MemoryRegion)
"""ADD_MEM_REG (one descriptor) and REM_MEM_REG (none)."""

Config = Struct(
    "offset" / Int32ul,
    "size" / Int32ul,
    "flags" / Int32ul,
    "payload" / Bytes(this.size),
)
"""GET_CONFIG / SET_CONFIG: a window of the device's configuration space."""
CONFIG_HEADER_SIZE = 12

Inflight = Struct(
    "mmap_size" / Int64ul,
    "mmap_offset" / Int64ul,
    "num_queues" / Int16ul,
    "queue_size" / Int16ul,
    Padding(4),
)
"""GET/SET_INFLIGHT_FD: the shared buffer tracking requests in flight across reconnects
(:mod:`viowire.vhost_user.inflight`). 24 bytes: QEMU and libvhost-user send the C struct with
its trailing padding (it is not packed). GET_INFLIGHT_FD asks with ``num_queues`` and
``queue_size`` set, and the reply carries the buffer's descriptor."""

PAYLOADS: dict[Request, Struct] = {
    Request.GET_FEATURES: U64,
    Request.SET_FEATURES: U64,
    Request.GET_PROTOCOL_FEATURES: U64,
    Request.SET_PROTOCOL_FEATURES: U64,
    Request.SET_VRING_NUM: VringState,
    Request.SET_VRING_BASE: VringState,
    Request.GET_VRING_BASE: VringState,
    Request.SET_VRING_ENABLE: VringState,
    Request.SET_VRING_ADDR: VringAddr,
    Request.SET_VRING_KICK: U64,
    Request.SET_VRING_CALL: U64,
    Request.SET_VRING_ERR: U64,
    Request.SET_MEM_TABLE: MemoryTable,
    Request.ADD_MEM_REG: SingleMemoryRegion,
    Request.REM_MEM_REG: SingleMemoryRegion,
    Request.GET_CONFIG: Config,
    Request.SET_CONFIG: Config,
    Request.GET_QUEUE_NUM: U64,
    Request.GET_MAX_MEM_SLOTS: U64,
    Request.SET_STATUS: U64,
    Request.GET_STATUS: U64,
    Request.GET_INFLIGHT_FD: Inflight,
    Request.SET_INFLIGHT_FD: Inflight,
}
"""The payload of each request (and of its reply, which has the same type)."""

REPLIES = frozenset(
    {
        Request.GET_FEATURES,
        Request.GET_PROTOCOL_FEATURES,
        Request.GET_VRING_BASE,
        Request.GET_QUEUE_NUM,
        Request.GET_CONFIG,
        Request.GET_MAX_MEM_SLOTS,
        Request.GET_INFLIGHT_FD,
        Request.GET_STATUS,
    }
)
"""Requests whose sender waits for a reply body whether or not it set NEED_REPLY."""

NO_PAYLOAD = frozenset(
    {
        Request.SET_OWNER,
        Request.RESET_OWNER,
        Request.RESET_DEVICE,
        Request.SET_BACKEND_REQ_FD,
        Request.SET_LOG_FD,
    }
)


class BackendRequest(enum.IntEnum):
    """Back-end message types (vhost-user.rst "Back-end message types"), sent by the back-end
    on the channel SET_BACKEND_REQ_FD gives it (protocol feature BACKEND_REQ)."""

    IOTLB_MSG = 1
    CONFIG_CHANGE_MSG = 2
    VRING_HOST_NOTIFIER_MSG = 3
    VRING_CALL = 4
    VRING_ERR = 5


class ProtocolError(Exception):
    """A message that breaks the protocol (its header or payload): the connection ends."""


@dataclass
class Message:
    """One message: its request, flags, raw payload and the descriptors that came with it."""

    request: int
    flags: int = VERSION
    payload: bytes = b""
    fds: list[int] = field(default_factory=list)

    @property
    def name(self) -> str:
        try:
            return Request(self.request).name
        except ValueError:
            return f"request {self.request}"

    @property
    def need_reply(self) -> bool:
        return bool(self.flags & Flag.NEED_REPLY)

    def parse(self):  # -> construct Container
        """The payload decoded by its type, its size checked exactly; ProtocolError if not.
        A reply to a request that has no reply body of its own is a REPLY_ACK u64."""
        struct = PAYLOADS.get(self.request)  # type: ignore[call-overload]
        if self.flags & Flag.REPLY and self.request not in REPLIES:
            struct = U64
        if struct is None:
            raise ProtocolError(f"{self.name} has no payload to parse")
        try:
            value = struct.parse(self.payload)
        except Exception as exc:
            raise ProtocolError(
                f"{self.name}: payload of {len(self.payload)} bytes: {exc}"
            ) from None
        if len(struct.build(value)) != len(self.payload):
            raise ProtocolError(
                f"{self.name}: payload of {len(self.payload)} bytes, expected "
                f"{len(struct.build(value))}"
            )
        return value


def encode(request: int, payload: bytes = b"", flags: int = VERSION) -> bytes:
    """A whole message: header and payload."""
    return Header.build({"request": request, "flags": flags, "size": len(payload)}) + payload


def build(request: Request, flags: int = VERSION, /, **fields) -> bytes:
    """A message with its payload built from ``fields`` by the request's struct (none
    without fields: GET_FEATURES and the like ask with an empty payload)."""
    payload = PAYLOADS[request].build(fields) if fields else b""
    return encode(request, payload, flags)


def reply(message: Message, payload: bytes) -> bytes:
    """The back-end's reply to ``message`` (same request, REPLY set)."""
    return encode(message.request, payload, VERSION | Flag.REPLY)


def reply_u64(message: Message, value: int) -> bytes:
    return reply(message, U64.build({"value": value & (1 << 64) - 1}))


@dataclass
class Reply:
    """A reply that carries descriptors (GET_INFLIGHT_FD's buffer): the I/O layer sends them
    with the reply's first byte and then closes its copies."""

    data: bytes
    fds: list[int] = field(default_factory=list)


class Decoder:
    """Framing: feed it bytes and descriptors, take whole messages out.

    :attr:`needed` is how many bytes to read next; reading no more than that keeps every read
    inside one message, so the descriptors of a read belong to the message being read.
    """

    def __init__(self, max_payload: int = MAX_PAYLOAD) -> None:
        self.max_payload = max_payload
        self._buffer = bytearray()
        self._header: tuple[int, int, int] | None = None
        self._fds: list[int] = []

    @property
    def needed(self) -> int:
        if self._header is None:
            return HEADER_SIZE - len(self._buffer)
        return self._header[2] - len(self._buffer)

    @property
    def pending_fds(self) -> list[int]:
        """Descriptors received for a message not complete yet (the caller closes them when
        the connection ends)."""
        return self._fds

    def feed(self, data: bytes, fds: list[int] = ()) -> list[Message]:  # type: ignore[assignment]
        """Take ``data`` (at most :attr:`needed` bytes) and its descriptors; return the messages
        completed. ProtocolError for a header no front-end sends (the caller closes
        the connection, and the descriptors in :attr:`pending_fds`)."""
        self._fds.extend(fds)
        if len(self._fds) > MAX_FDS:
            raise ProtocolError(f"{len(self._fds)} descriptors for one message (at most {MAX_FDS})")
        self._buffer += data
        out: list[Message] = []
        while True:
            if self._header is None:
                if len(self._buffer) < HEADER_SIZE:
                    return out
                header = Header.parse(bytes(self._buffer[:HEADER_SIZE]))
                del self._buffer[:HEADER_SIZE]
                self._check_header(header)
                self._header = (header.request, header.flags, header.size)
            request, flags, size = self._header
            if len(self._buffer) < size:
                return out
            payload = bytes(self._buffer[:size])
            del self._buffer[:size]
            out.append(Message(request, flags, payload, self._fds))
            self._header, self._fds = None, []

    def _check_header(self, header) -> None:
        if header.flags & Flag.VERSION_MASK != VERSION:
            raise ProtocolError(
                f"message {header.request}: version {header.flags & Flag.VERSION_MASK}, "
                f"not {VERSION}"
            )
        if header.size > self.max_payload:
            raise ProtocolError(
                f"message {header.request}: payload of {header.size} bytes (at most "
                f"{self.max_payload})"
            )
