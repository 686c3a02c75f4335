"""virtio-net's facts from the spec (§5.1), in one place for every side that needs them: the
device (viowire/server/devices/net.py), the driver (viowire/client/drivers/net.py) and the tests.

Queues (§5.1.2): receiveq_k at 2k and transmitq_k at 2k+1 for k < N, then the controlq at
2N (with CTRL_VQ), where N is ``max_virtqueue_pairs`` if MQ was negotiated and 1 otherwise: ask
:func:`ctrl_queue`. Every frame on a data queue starts with a ``virtio_net_hdr`` (§5.1.6), whose
size depends on the features negotiated: 10 bytes for a legacy device without MRG_RXBUF, 12
(with ``num_buffers``) with VERSION_1 or MRG_RXBUF. Getting this wrong shifts every frame by two
bytes, so both sides ask :func:`header_size`.

Control commands (§5.1.6.5): ``class u8, command u8, data...`` device-readable, then one
device-writable ``ack`` byte (:class:`Ack`); :func:`ctrl_command` and the ``*_data`` helpers
build them, :func:`parse_mac_table` reads a MAC_TABLE_SET's two tables as QEMU does.
"""

from __future__ import annotations

import enum
import struct

from viowire.virtio.config import ConfigField
from viowire.virtio.constants import DeviceId, Feature

DEVICE_ID = DeviceId.NET

RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_NAMES = ("receiveq0", "transmitq0")
MAX_QUEUE_PAIRS = 0x8000  # §5.1.4: max_virtqueue_pairs is 1..0x8000


class NetFeature(enum.IntEnum):
    """virtio-net feature bits (§5.1.3), the ones below 24 (device-type bits)."""

    CSUM = 0
    GUEST_CSUM = 1
    CTRL_GUEST_OFFLOADS = 2
    MTU = 3
    MAC = 5
    GSO = 6  # legacy only
    GUEST_TSO4 = 7
    GUEST_TSO6 = 8
    GUEST_ECN = 9
    GUEST_UFO = 10
    HOST_TSO4 = 11
    HOST_TSO6 = 12
    HOST_ECN = 13
    HOST_UFO = 14
    MRG_RXBUF = 15
    STATUS = 16
    CTRL_VQ = 17
    CTRL_RX = 18
    CTRL_VLAN = 19
    CTRL_RX_EXTRA = 20
    GUEST_ANNOUNCE = 21
    MQ = 22
    CTRL_MAC_ADDR = 23


class NetStatus(enum.IntFlag):
    """The config space's ``status`` field (§5.1.4), valid with STATUS."""

    LINK_UP = 1
    ANNOUNCE = 2


class HdrFlags(enum.IntFlag):
    """``virtio_net_hdr.flags`` (§5.1.6)."""

    NEEDS_CSUM = 1
    DATA_VALID = 2
    RSC_INFO = 4


class GsoType(enum.IntEnum):
    """``virtio_net_hdr.gso_type`` (§5.1.6); ECN is a flag or-ed into the others."""

    NONE = 0
    TCPV4 = 1
    UDP = 3
    TCPV6 = 4
    UDP_L4 = 5
    ECN = 0x80


NET_CONFIG = (  # §5.1.4
    ConfigField("mac", 0x00, 6, NetFeature.MAC),
    ConfigField("status", 0x06, 2, NetFeature.STATUS),
    ConfigField("max_virtqueue_pairs", 0x08, 2, NetFeature.MQ),
    ConfigField("mtu", 0x0A, 2, NetFeature.MTU),
)
CONFIG = struct.Struct("<6sHHH")
"""mac, status, max_virtqueue_pairs, mtu: the prefix of the config space viowire's device has."""

HEADER = struct.Struct("<BBHHHH")
"""flags, gso_type, hdr_len, gso_size, csum_start, csum_offset: the legacy 10-byte header."""
NUM_BUFFERS = struct.Struct("<H")
"""num_buffers, after HEADER: present with VERSION_1 or MRG_RXBUF."""
HEADER_SIZE_LEGACY = HEADER.size  # 10
HEADER_SIZE_MRG = HEADER.size + NUM_BUFFERS.size  # 12

ETH_HEADER = 14  # destination, source, ethertype
ETH_VLAN_TAG = 4
BROADCAST = b"\xff" * 6


class Ack(enum.IntEnum):
    """The control queue's ack byte (§5.1.6.5)."""

    OK = 0
    ERR = 1


class CtrlClass(enum.IntEnum):
    """``virtio_net_ctrl.class`` (§5.1.6.5)."""

    RX = 0
    MAC = 1
    VLAN = 2
    ANNOUNCE = 3
    MQ = 4
    GUEST_OFFLOADS = 5


class CtrlRx(enum.IntEnum):
    """Commands of class RX (§5.1.6.5.1); data: one byte, 0 (off) or 1 (on). PROMISC and
    ALLMULTI need CTRL_RX, the others CTRL_RX_EXTRA."""

    PROMISC = 0
    ALLMULTI = 1
    ALLUNI = 2
    NOMULTI = 3
    NOUNI = 4
    NOBCAST = 5


class CtrlMac(enum.IntEnum):
    """Commands of class MAC (§5.1.6.5.2)."""

    TABLE_SET = 0  # two tables: le32 entries, then entries x 6 bytes; unicast, then multicast
    ADDR_SET = 1  # the 6-byte MAC


class CtrlAnnounce(enum.IntEnum):
    """Commands of class ANNOUNCE (§5.1.6.5.4)."""

    ACK = 0  # no data: the driver has announced itself; the device clears status.ANNOUNCE


class CtrlMq(enum.IntEnum):
    """Commands of class MQ (§5.1.6.5.6)."""

    VQ_PAIRS_SET = 0  # le16 virtqueue_pairs, 1..max_virtqueue_pairs


CTRL_HEADER = struct.Struct("<BB")
"""class, command: the device-readable start of every control command."""
CTRL_ACK_SIZE = 1
MAC_ENTRIES = struct.Struct("<I")
"""A MAC table's count: le32 (legacy: guest-native, little-endian for viowire's guests)."""
VQ_PAIRS = struct.Struct("<H")
MAC_TABLE_ENTRIES = 64
"""MACs a device keeps in its filter table (QEMU's); more in a table switch that table's kind
(unicast or multicast) to accept all, as the spec's footnote allows."""

# A command's feature: the driver MUST NOT issue it without (§5.1.6.5.1, .2, .6).
COMMAND_FEATURE = {
    (CtrlClass.RX, CtrlRx.PROMISC): NetFeature.CTRL_RX,
    (CtrlClass.RX, CtrlRx.ALLMULTI): NetFeature.CTRL_RX,
    (CtrlClass.RX, CtrlRx.ALLUNI): NetFeature.CTRL_RX_EXTRA,
    (CtrlClass.RX, CtrlRx.NOMULTI): NetFeature.CTRL_RX_EXTRA,
    (CtrlClass.RX, CtrlRx.NOUNI): NetFeature.CTRL_RX_EXTRA,
    (CtrlClass.RX, CtrlRx.NOBCAST): NetFeature.CTRL_RX_EXTRA,
    (CtrlClass.MAC, CtrlMac.TABLE_SET): NetFeature.CTRL_RX,
    (CtrlClass.MAC, CtrlMac.ADDR_SET): NetFeature.CTRL_MAC_ADDR,
    (CtrlClass.ANNOUNCE, CtrlAnnounce.ACK): NetFeature.GUEST_ANNOUNCE,
    (CtrlClass.MQ, CtrlMq.VQ_PAIRS_SET): NetFeature.MQ,
}

FEATURE_NEEDS = {  # §5.1.3.1: a feature the driver may accept only with another
    NetFeature.CTRL_RX: NetFeature.CTRL_VQ,
    NetFeature.CTRL_VLAN: NetFeature.CTRL_VQ,
    NetFeature.GUEST_ANNOUNCE: NetFeature.CTRL_VQ,
    NetFeature.MQ: NetFeature.CTRL_VQ,
    NetFeature.CTRL_MAC_ADDR: NetFeature.CTRL_VQ,
    NetFeature.CTRL_RX_EXTRA: NetFeature.CTRL_RX,
}


def without_orphans(features: int) -> int:
    """``features`` less every bit whose prerequisite (:data:`FEATURE_NEEDS`) is missing, in
    dependency order (CTRL_RX_EXTRA goes with CTRL_RX, which goes with CTRL_VQ)."""
    changed = True
    while changed:
        changed = False
        for bit, needs in FEATURE_NEEDS.items():
            if features >> bit & 1 and not features >> needs & 1:
                features &= ~(1 << bit)
                changed = True
    return features


def queue_pairs(features: int, max_virtqueue_pairs: int) -> int:
    """N, the receiveq/transmitq pairs that exist: ``max_virtqueue_pairs`` with MQ, else 1."""
    return max_virtqueue_pairs if features >> NetFeature.MQ & 1 else 1


def ctrl_queue(features: int, max_virtqueue_pairs: int) -> int | None:
    """The controlq's index (2N), or None without CTRL_VQ (§5.1.2)."""
    if not features >> NetFeature.CTRL_VQ & 1:
        return None
    return 2 * queue_pairs(features, max_virtqueue_pairs)


def ctrl_command(cls: int, command: int) -> bytes:
    return CTRL_HEADER.pack(cls, command)


def mac_table_data(macs: list[bytes] | tuple[bytes, ...]) -> bytes:
    """One ``virtio_net_ctrl_mac`` table: le32 entries, then the MACs."""
    return MAC_ENTRIES.pack(len(macs)) + b"".join(bytes(mac) for mac in macs)


def parse_mac_table(data: bytes) -> tuple[list[bytes] | None, list[bytes] | None]:
    """A MAC_TABLE_SET's data, as QEMU's ``virtio_net_handle_mac`` reads it: the unicast table,
    then the multicast table, which must end the data exactly. A table of more than
    :data:`MAC_TABLE_ENTRIES` comes back as None (accept every address of its kind).
    ValueError, with the reason, for data that does not hold two such tables."""
    tables: list[list[bytes] | None] = []
    at = 0
    for kind in ("unicast", "multicast"):
        if len(data) - at < MAC_ENTRIES.size:
            raise ValueError(f"the {kind} table has no entries count")
        (entries,) = MAC_ENTRIES.unpack_from(data, at)
        at += MAC_ENTRIES.size
        size = entries * 6
        rest = len(data) - at
        if size > rest or (kind == "multicast" and size != rest):
            raise ValueError(
                f"the {kind} table says {entries} entries ({size} bytes) but {rest} bytes follow"
            )
        kept = sum(len(t) for t in tables if t is not None)
        if entries <= MAC_TABLE_ENTRIES - kept:
            tables.append([bytes(data[at + 6 * i : at + 6 * i + 6]) for i in range(entries)])
        else:
            tables.append(None)
        at += size
    return tables[0], tables[1]


IMPLEMENTED = (
    1 << NetFeature.MAC
    | 1 << NetFeature.STATUS
    | 1 << NetFeature.MTU
    | 1 << NetFeature.MRG_RXBUF
    | 1 << NetFeature.CTRL_VQ
    | 1 << NetFeature.CTRL_RX
    | 1 << NetFeature.CTRL_RX_EXTRA
    | 1 << NetFeature.CTRL_MAC_ADDR
    | 1 << NetFeature.MQ
    | 1 << NetFeature.GUEST_ANNOUNCE
)
"""The virtio-net feature bits viowire implements, on both sides: the driver accepts them all
where offered; the device offers them all, MQ only when it has more than one queue pair."""


def header_size(features: int) -> int:
    """Bytes of ``virtio_net_hdr`` before every frame, given the negotiated feature bits
    (§5.1.6.1): 12 with VERSION_1 or MRG_RXBUF (``num_buffers`` present), else 10."""
    if features >> Feature.VERSION_1 & 1 or features >> NetFeature.MRG_RXBUF & 1:
        return HEADER_SIZE_MRG
    return HEADER_SIZE_LEGACY


def receive_header(size: int, num_buffers: int = 1) -> bytes:
    """The header the device puts before a received frame: no offloads, and ``num_buffers``
    where the header has the field (1 without MRG_RXBUF, §5.1.6.3.2; with it, the buffers the
    frame and its header are spread over)."""
    if size == HEADER_SIZE_MRG:
        return bytes(HEADER.size) + NUM_BUFFERS.pack(num_buffers)
    return bytes(size)


def num_buffers(header: bytes) -> int:
    """A received 12-byte header's ``num_buffers``."""
    return NUM_BUFFERS.unpack_from(header, HEADER.size)[0]


_GSO_FEATURE = {
    GsoType.TCPV4: NetFeature.HOST_TSO4,
    GsoType.TCPV6: NetFeature.HOST_TSO6,
    GsoType.UDP: NetFeature.HOST_UFO,
    GsoType.UDP_L4: 56,  # VIRTIO_NET_F_HOST_USO
}


def transmit_header_problem(header: bytes, features: int) -> str | None:
    """Why a transmitted ``virtio_net_hdr`` asks for an offload that was not negotiated (None if
    it asks for none): NEEDS_CSUM needs CSUM, a ``gso_type`` its HOST_* feature (§5.1.6.2).
    Other flag bits are ignored, as the device MUST (§5.1.6.2.2)."""
    flags, gso_type = header[0], header[1]
    if flags & HdrFlags.NEEDS_CSUM and not features >> NetFeature.CSUM & 1:
        return "NEEDS_CSUM is set but VIRTIO_NET_F_CSUM was not negotiated"
    if gso_type & GsoType.ECN and not features >> NetFeature.HOST_ECN & 1:
        return "gso_type has ECN but VIRTIO_NET_F_HOST_ECN was not negotiated"
    kind = gso_type & ~GsoType.ECN
    if kind == GsoType.NONE:
        return None
    needs = _GSO_FEATURE.get(kind)
    if needs is None:
        return f"gso_type {gso_type:#x} is not a GSO type"
    if not features >> needs & 1:
        return f"gso_type {GsoType(kind).name} needs feature bit {int(needs)}, not negotiated"
    return None


def transmit_header(size: int) -> bytes:
    """The header a driver puts before a frame it sends: no offloads, num_buffers 0 (§5.1.6.2)."""
    return bytes(size)


ETHERTYPE_RARP = b"\x80\x35"


def announce_frame(mac: bytes) -> bytes:
    """The gratuitous frame that tells switches where ``mac`` is now, as QEMU's self-announce
    sends it: a broadcast RARP request (RFC 903) for ``mac``, padded to 60 bytes."""
    rarp = struct.pack(">HHBBH", 1, 0x0800, 6, 4, 3) + mac + bytes(4) + mac + bytes(4)
    return (BROADCAST + mac + ETHERTYPE_RARP + rarp).ljust(60, b"\x00")


def is_multicast(mac: bytes) -> bool:
    """The group bit (I/G, bit 0 of the first octet): broadcast and multicast destinations."""
    return bool(mac[0] & 1)


def format_mac(mac: bytes) -> str:
    return ":".join(f"{b:02x}" for b in mac)


def parse_mac(text: str) -> bytes:
    """``02:00:00:00:00:01`` (or with ``-``) into 6 bytes; ValueError with the reason."""
    parts = str(text).replace("-", ":").split(":")
    if len(parts) != 6 or not all(1 <= len(p) <= 2 for p in parts):
        raise ValueError(f"{text!r} is not a MAC address: give six hex octets, 02:00:00:00:00:01")
    try:
        mac = bytes(int(p, 16) for p in parts)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC address: octets are hex, 00 to ff") from None
    if is_multicast(mac):
        raise ValueError(f"{text!r} is a multicast address: a device's MAC must be unicast")
    return mac
