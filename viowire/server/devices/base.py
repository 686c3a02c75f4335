"""The device contract's old name: :class:`VirtioBackend` is :class:`viowire.device.Device`."""

from __future__ import annotations

from viowire.device import Device

VirtioBackend = Device

__all__ = ["VirtioBackend"]
