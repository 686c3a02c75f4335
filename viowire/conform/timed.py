"""The bus and guest memory with every access bounded: a device that stops answering raises
:class:`~viowire.conform.model.Unresponsive` instead of hanging the suite."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from viowire.client.mmio import RegisterBus
from viowire.conform.model import Unresponsive
from viowire.virtio.memory import GuestMemory, Region


class TimedBus:
    """Forwards to a RegisterBus; an access that takes longer than ``timeout`` raises
    :class:`Unresponsive` instead of hanging the suite."""

    def __init__(self, bus: RegisterBus, timeout: float) -> None:
        self.bus = bus
        self.timeout = timeout

    async def mmio_read(self, addr: int, width: int) -> int:
        try:
            async with asyncio.timeout(self.timeout):
                return await self.bus.mmio_read(addr, width)
        except TimeoutError:
            raise Unresponsive(
                f"no answer to a {width}-byte read at {addr:#x} within {self.timeout:g} s"
            ) from None

    async def mmio_write(self, addr: int, width: int, value: int, *, posted: bool = True) -> None:
        try:
            async with asyncio.timeout(self.timeout):
                await self.bus.mmio_write(addr, width, value, posted=posted)
        except TimeoutError:
            raise Unresponsive(
                f"a {width}-byte write at {addr:#x} was not accepted within {self.timeout:g} s"
            ) from None

    def set_irq_handler(self, irq: int, handler: Callable[[bool], None] | None) -> None:
        self.bus.set_irq_handler(irq, handler)


class TimedMemory(GuestMemory):
    """Forwards to a GuestMemory, every access bounded like a register access: where guest RAM
    is remote (qtest), a device stuck in a request can stall it too."""

    def __init__(self, memory: GuestMemory, timeout: float) -> None:
        self.inner = memory
        self.timeout = timeout

    @property
    def regions(self) -> Sequence[Region]:
        return self.inner.regions

    async def _bounded(self, what: str, work: Awaitable[Any]) -> Any:
        try:
            async with asyncio.timeout(self.timeout):
                return await work
        except TimeoutError:
            raise Unresponsive(f"guest memory {what} took longer than {self.timeout:g} s") from None

    async def readv(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        return await self._bounded("read", self.inner.readv(ranges))

    async def writev(self, segments: Sequence[tuple[int, bytes]]) -> None:
        await self._bounded("write", self.inner.writev(segments))

    async def read_u16(self, gpa: int) -> int:
        return await self._bounded("read", self.inner.read_u16(gpa))

    async def write_u16(self, gpa: int, value: int) -> None:
        await self._bounded("write", self.inner.write_u16(gpa, value))
