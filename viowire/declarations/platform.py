"""The static platform table: the devices a board file lists, as a viowire server reports them."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from viowire.declarations.model import Declaration

if TYPE_CHECKING:
    from viowire.client.connection import DeviceInfo


def declarations_from_platform(devices: Iterable[DeviceInfo]) -> list[Declaration]:
    """The server's platform table as declarations: what a board file's static table says."""
    return [
        Declaration(d.base, d.size, d.irq, source=f"platform table entry {i} ({d.name})")
        for i, d in enumerate(devices)
    ]
