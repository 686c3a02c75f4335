"""Finding the devices behind declared windows, as Linux's virtio_mmio_probe does.

A declaration (a static table entry, a device-tree node, a ``virtio_mmio.device=`` parameter) says
only where a window is and which IRQ it raises; what is there comes from its registers.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Protocol

from viowire.client.connection import DeviceInfo, ProtocolError
from viowire.virtio.constants import MAGIC_VALUE, Reg

log = logging.getLogger("viowire.client")


class Window(Protocol):
    """A declared device window (``viowire.declarations.Declaration`` has this shape)."""

    base: int
    size: int
    irq: int


async def discover(bus, windows: Iterable[Window], where: str = "") -> list[DeviceInfo]:
    """The declared windows that hold a device, identified by reading their registers.

    A window whose MagicValue is not "virt" or whose Version is not 1 or 2 is reported in the
    log and left out (Linux: -ENODEV / -ENXIO); DeviceID 0, an empty slot, is left out silently.
    """
    devices = []
    for window in windows:
        base = window.base
        try:
            magic = await bus.mmio_read(base + Reg.MAGIC_VALUE, 4)
        except ProtocolError as exc:  # nothing decodes that address: a bus error
            log.warning("%s: no device at %#x (%s); check the declaration", where, base, exc)
            continue
        if magic != MAGIC_VALUE:
            log.warning(
                "%s: no virtio-mmio device at %#x: MagicValue (0x000) reads %#010x, not "
                "0x74726976; check the declaration", where, base, magic,
            )  # fmt: skip
            continue
        version = await bus.mmio_read(base + Reg.VERSION, 4)
        if version not in (1, 2):
            log.warning(
                "%s: device at %#x: Version (0x004) %d is not 1 or 2; skipped", where, base, version
            )
            continue
        device_id = await bus.mmio_read(base + Reg.DEVICE_ID, 4)
        if device_id == 0:
            continue
        vendor_id = await bus.mmio_read(base + Reg.VENDOR_ID, 4)
        devices.append(DeviceInfo(base, window.size, window.irq, version, device_id, vendor_id))
    return devices
