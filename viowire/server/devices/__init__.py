"""Device backends by name, for platform descriptions (``blk,size=64M``, ``rng``)."""

from __future__ import annotations

from typing import Any

from viowire.server.devices.base import VirtioBackend
from viowire.server.devices.blk import BlockBackend
from viowire.server.devices.rng import RngBackend

BACKENDS: dict[str, type[VirtioBackend]] = {"blk": BlockBackend, "rng": RngBackend}


def make_backend(kind: str, **options: Any) -> VirtioBackend:
    """Build the backend ``kind`` with its options; ValueError names the known kinds."""
    try:
        cls = BACKENDS[kind]
    except KeyError:
        raise ValueError(f"unknown device type {kind!r} (known: {', '.join(BACKENDS)})") from None
    return cls(**options)


__all__ = ["BACKENDS", "BlockBackend", "RngBackend", "VirtioBackend", "make_backend"]
