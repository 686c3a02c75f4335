"""A RegisterBus wrapper that prints every register access by its spec name.

Used by ``viowire demo`` (and handy when debugging a device): the driver flow becomes readable,
``read  Status = 0x3 (ACKNOWLEDGE|DRIVER)``, without the transport knowing it is watched.
"""

from __future__ import annotations

from collections.abc import Callable

from viowire.client.errors import register_name as spec_name
from viowire.virtio.constants import CONFIG_OFFSET, Interrupt, Reg, Status


def register_name(offset: int) -> str:
    """The spec's name of the register at ``offset`` (config space by offset into it)."""
    if offset >= CONFIG_OFFSET:
        return f"Config+{offset - CONFIG_OFFSET:#x}"
    if offset not in Reg._value2member_map_:
        return f"reserved {offset:#x}"
    return spec_name(offset).split(" (")[0]


def describe_value(offset: int, value: int) -> str:
    if offset == Reg.STATUS:
        flags = "|".join(flag.name for flag in Status if value & flag) or "reset"
        return f"{value:#x} ({flags})"
    if offset in (Reg.INTERRUPT_STATUS, Reg.INTERRUPT_ACK):
        flags = "|".join(flag.name for flag in Interrupt if value & flag) or "none"
        return f"{value:#x} ({flags})"
    if offset == Reg.MAGIC_VALUE:
        return f"{value:#x} ({value.to_bytes(4, 'little').decode('latin-1')!r})"
    return f"{value:#x}"


class TracingBus:
    """Forwards to ``bus``; while ``enabled``, reports each access of the window at ``base``."""

    def __init__(self, bus, base: int, size: int, emit: Callable[[str], None]) -> None:
        self.bus = bus
        self.base = base
        self.size = size
        self.emit = emit
        self.enabled = True

    def _report(self, verb: str, addr: int, value: int) -> None:
        offset = addr - self.base
        if self.enabled and 0 <= offset < self.size:
            self.emit(f"    {verb:5} {register_name(offset):18} {describe_value(offset, value)}")

    async def mmio_read(self, addr: int, width: int) -> int:
        value = await self.bus.mmio_read(addr, width)
        self._report("read", addr, value)
        return value

    async def mmio_write(self, addr: int, width: int, value: int, *, posted: bool = True) -> None:
        self._report("write", addr, value)
        await self.bus.mmio_write(addr, width, value, posted=posted)

    def set_irq_handler(self, irq: int, handler: Callable[[bool], None] | None) -> None:
        self.bus.set_irq_handler(irq, handler)
