"""Guest memory for one check: allocations freed once the device is reset, buffers between
canaries, and the regions only the driver may write, audited for device writes (§2.7.5.1)."""

from __future__ import annotations

from dataclasses import dataclass

from viowire.client.virtqueue import Allocator
from viowire.virtio.memory import GuestMemory
from viowire.virtio.ring import align_up

CANARY = b"\xca\xfe\xf0\x0d" * 4
POISON = 0xEE  # what device-writable buffers hold before the device writes them


@dataclass
class _Guard:
    """Guest memory the device must not write: what it must still hold, and what it is."""

    gpa: int
    expected: bytearray
    what: str


class GuestScratch:
    """Guest RAM a check allocates and guards; :class:`~viowire.conform.dut.Dut` is one."""

    def __init__(self, memory: GuestMemory, allocator: Allocator) -> None:
        self.memory = memory
        self.allocator = allocator
        self._blocks: list[int] = []
        self._guards: list[_Guard] = []

    async def alloc(self, size: int, align: int = 16) -> int:
        """Zeroed guest RAM, freed after the check (once the device has been reset)."""
        gpa = self.allocator.alloc(size, align)
        self._blocks.append(gpa)
        await self.memory.write(gpa, bytes(size))
        return gpa

    async def buffer(
        self, length: int = 0, *, data: bytes | None = None, fill: int = POISON
    ) -> int:
        """A device-readable buffer holding ``data``, or a device-writable one of ``length``
        bytes of ``fill`` between two canaries. Both are guarded against device writes."""
        if data is not None:
            gpa = await self.alloc(max(len(data), 1))
            await self.memory.write(gpa, data)
            await self.guard(gpa, len(data), "a device-readable buffer")
            return gpa
        block = await self.alloc(length + 2 * len(CANARY))
        gpa = block + len(CANARY)
        await self.memory.writev(
            [(block, CANARY), (gpa, bytes([fill]) * length), (gpa + length, CANARY)]
        )
        await self.guard(block, len(CANARY), "the bytes before a device-writable buffer")
        await self.guard(gpa + length, len(CANARY), "the bytes after a device-writable buffer")
        return gpa

    async def guard(self, gpa: int, length: int, what: str) -> None:
        if length > 0:
            self._guards.append(_Guard(gpa, bytearray(await self.memory.read(gpa, length)), what))

    async def poke(self, gpa: int, data: bytes) -> None:
        """Write guest memory as the driver, keeping guarded copies in step."""
        await self.memory.write(gpa, data)
        self._track(gpa, data)

    async def poke_u16(self, gpa: int, value: int) -> None:
        """A ring index: one 16-bit store (the device may read it concurrently)."""
        await self.memory.write_u16(gpa, value)
        self._track(gpa, (value & 0xFFFF).to_bytes(2, "little"))

    def _track(self, gpa: int, data: bytes) -> None:
        end = gpa + len(data)
        for g in self._guards:
            lo, hi = max(gpa, g.gpa), min(end, g.gpa + len(g.expected))
            if lo < hi:
                g.expected[lo - g.gpa : hi - g.gpa] = data[lo - gpa : hi - gpa]

    async def audit(self) -> list[str]:
        """Guarded memory the device changed, as ``what at gpa`` strings."""
        damage = []
        for g in self._guards:
            now = await self.memory.read(g.gpa, len(g.expected))
            if now != g.expected:
                at = next(i for i, (a, b) in enumerate(zip(now, g.expected, strict=True)) if a != b)
                damage.append(f"{g.what} at {g.gpa + at:#x}")
        return damage

    def forget_guards(self) -> None:
        self._guards.clear()

    def free_all(self) -> None:
        while self._blocks:
            self.allocator.free(self._blocks.pop())

    def outside_ram(self) -> int:
        """A guest-physical address far from any RAM: 1 TiB past the registered regions (which
        may be only the part of a machine's RAM the driver allocates from, as with qtest)."""
        end = max((r.end for r in self.memory.regions), default=0)
        return align_up(end, 1 << 30) + (1 << 40)
