"""The built-in device types; :mod:`viowire.registry` names them (``blk``, ``rng``)."""

from __future__ import annotations

from viowire.server.devices.blk import BlockBackend
from viowire.server.devices.rng import RngBackend

__all__ = ["BlockBackend", "RngBackend"]
