"""virtio-net's facts from the spec (§5.1), in one place for every side that needs them: the
device (viowire/server/devices/net.py), the driver (viowire/client/drivers/net.py) and the tests.

Queues: receiveq0 (0) and transmitq0 (1); more pairs and a controlq only with MQ/CTRL_VQ, which
viowire does not offer yet. Every frame on either queue starts with a ``virtio_net_hdr``
(§5.1.6), whose size depends on the features negotiated: 10 bytes for a legacy device without
MRG_RXBUF, 12 (with ``num_buffers``) with VERSION_1 or MRG_RXBUF. Getting this wrong shifts every
frame by two bytes, so both sides ask :func:`header_size`.
"""

from __future__ import annotations

import enum
import struct

from viowire.virtio.config import ConfigField
from viowire.virtio.constants import DeviceId, Feature

DEVICE_ID = DeviceId.NET

RECEIVEQ, TRANSMITQ = 0, 1
QUEUE_NAMES = ("receiveq0", "transmitq0")


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


def header_size(features: int) -> int:
    """Bytes of ``virtio_net_hdr`` before every frame, given the negotiated feature bits
    (§5.1.6.1): 12 with VERSION_1 or MRG_RXBUF (``num_buffers`` present), else 10."""
    if features >> Feature.VERSION_1 & 1 or features >> NetFeature.MRG_RXBUF & 1:
        return HEADER_SIZE_MRG
    return HEADER_SIZE_LEGACY


def receive_header(size: int) -> bytes:
    """The header the device puts before a received frame: no offloads, and num_buffers = 1
    where the header has the field (one buffer per frame without MRG_RXBUF, §5.1.6.3)."""
    if size == HEADER_SIZE_MRG:
        return bytes(HEADER.size) + NUM_BUFFERS.pack(1)
    return bytes(size)


def transmit_header(size: int) -> bytes:
    """The header a driver puts before a frame it sends: no offloads, num_buffers 0 (§5.1.6.2)."""
    return bytes(size)


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
