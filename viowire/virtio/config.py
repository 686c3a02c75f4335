"""Device configuration space layouts, decoded field by field (each device type declares its own:
``Device.config_layout``; virtio-blk's is in :mod:`viowire.virtio.blk`).

Only fields whose guarding feature is offered are decoded: the spec lets a device expose just the
prefix its feature set needs.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class ConfigField:
    name: str
    offset: int
    size: int
    feature: int | None  # the feature bit that makes the field valid; None: always present


async def decode_config(
    device_id: int,
    features: int,
    read: Callable[[int, int], Awaitable[int]],
    layout: Sequence[ConfigField] | None = None,
) -> dict[str, int]:
    """Read and decode every offered config field; ``read(offset, size)`` returns an int.

    ``layout``: the device type's fields (a Device class's ``config_layout``); by default the
    layout of the type the registry knows for ``device_id`` (none: nothing decoded)."""
    if layout is None:
        from viowire import registry  # the registry imports the device API, which imports us

        device_type = registry.by_device_id(device_id)
        layout = device_type.config_layout if device_type is not None else ()
    out: dict[str, int] = {}
    for field in layout:
        if field.feature is None or features >> field.feature & 1:
            out[field.name] = await read(field.offset, field.size)
    return out
