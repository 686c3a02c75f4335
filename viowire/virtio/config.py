"""Device configuration space layouts (§5.2.4 blk; rng has none), decoded field by field.

Only fields whose guarding feature is offered are decoded: the spec lets a device expose just the
prefix its feature set needs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

from viowire.virtio.constants import BlkFeature, DeviceId


@dataclass(frozen=True)
class ConfigField:
    name: str
    offset: int
    size: int
    feature: int | None  # the feature bit that makes the field valid; None: always present


BLK_CONFIG = (
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

LAYOUTS: dict[int, tuple[ConfigField, ...]] = {DeviceId.BLOCK: BLK_CONFIG, DeviceId.ENTROPY: ()}


async def decode_config(
    device_id: int,
    features: int,
    read: Callable[[int, int], Awaitable[int]],
    layout: Sequence[ConfigField] | None = None,
) -> dict[str, int]:
    """Read and decode every offered config field; ``read(offset, size)`` returns an int.

    ``layout``: the device type's fields (a Device class's ``config_layout``); by default the
    layout viowire knows for ``device_id``."""
    out: dict[str, int] = {}
    for field in LAYOUTS.get(device_id, ()) if layout is None else layout:
        if field.feature is None or features >> field.feature & 1:
            out[field.name] = await read(field.offset, field.size)
    return out
