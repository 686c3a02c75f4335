"""virtio-blk's facts from the spec (§5.2), in one place for every side that needs them: the
device (viowire/server/devices/blk.py), the driver (viowire/client/drivers/blk.py), conform, load
and the tests.

A request is one chain: a 16-byte header (type, reserved/ioprio, sector) at the start of the
device-readable part, the data, and a status byte as the last byte of the device-writable part
(§5.2.6). The config space starts with capacity, size_max, seg_max, geometry and blk_size
(§5.2.4), each field valid only when its feature bit is offered.
"""

from __future__ import annotations

import enum
import struct

from viowire.virtio.config import ConfigField
from viowire.virtio.constants import DeviceId

DEVICE_ID = DeviceId.BLOCK


class BlkFeature(enum.IntEnum):
    """virtio-blk feature bits (§5.2.3)."""

    BARRIER = 0
    SIZE_MAX = 1
    SEG_MAX = 2
    GEOMETRY = 4
    RO = 5
    BLK_SIZE = 6
    SCSI = 7
    FLUSH = 9
    TOPOLOGY = 10
    CONFIG_WCE = 11
    MQ = 12
    DISCARD = 13
    WRITE_ZEROES = 14
    LIFETIME = 15
    SECURE_ERASE = 16
    ZONED = 17


class BlkType(enum.IntEnum):
    """virtio-blk request types (§5.2.6)."""

    IN = 0
    OUT = 1
    FLUSH = 4
    FLUSH_OUT = 5  # legacy alias of FLUSH
    GET_ID = 8
    GET_LIFETIME = 10
    DISCARD = 11
    WRITE_ZEROES = 13
    SECURE_ERASE = 14


class BlkStatus(enum.IntEnum):
    """virtio-blk request status byte (§5.2.6)."""

    OK = 0
    IOERR = 1
    UNSUPP = 2


BLK_SECTOR_SIZE = 512
BLK_ID_BYTES = 20
BLK_REQ_HEADER_SIZE = 16  # type u32, reserved (ioprio) u32, sector u64

REQUEST_HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
assert REQUEST_HEADER.size == BLK_REQ_HEADER_SIZE
CONFIG_PREFIX = struct.Struct("<QIIHBBI")
"""capacity, size_max, seg_max, geometry (cylinders u16, heads u8, sectors u8), blk_size: the
prefix of the config space up to the last field viowire's device offers."""


BLK_CONFIG = (  # §5.2.4
    ConfigField("capacity", 0x00, 8, None),
    ConfigField("size_max", 0x08, 4, BlkFeature.SIZE_MAX),
    ConfigField("seg_max", 0x0C, 4, BlkFeature.SEG_MAX),
    ConfigField("geometry.cylinders", 0x10, 2, BlkFeature.GEOMETRY),
    ConfigField("geometry.heads", 0x12, 1, BlkFeature.GEOMETRY),
    ConfigField("geometry.sectors", 0x13, 1, BlkFeature.GEOMETRY),
    ConfigField("blk_size", 0x14, 4, BlkFeature.BLK_SIZE),
    ConfigField("topology.physical_block_exp", 0x18, 1, BlkFeature.TOPOLOGY),
    ConfigField("topology.alignment_offset", 0x19, 1, BlkFeature.TOPOLOGY),
    ConfigField("topology.min_io_size", 0x1A, 2, BlkFeature.TOPOLOGY),
    ConfigField("topology.opt_io_size", 0x1C, 4, BlkFeature.TOPOLOGY),
    ConfigField("writeback", 0x20, 1, BlkFeature.CONFIG_WCE),
    ConfigField("num_queues", 0x22, 2, BlkFeature.MQ),
)


def request_header(type_: int, sector: int = 0) -> bytes:
    """The 16-byte header that starts every request (§5.2.6)."""
    return REQUEST_HEADER.pack(type_, 0, sector)
