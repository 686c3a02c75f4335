"""virtio-rng (SPEC §5.4): entropy from device-writable buffers.

The device may fill fewer bytes than a buffer holds; the driver MUST use used.len, so a read
keeps posting buffers until it has what was asked for.
"""

from __future__ import annotations

import asyncio

from viowire.client.drivers.base import VirtioDriver
from viowire.client.errors import DeviceBrokenError
from viowire.client.virtqueue import Allocator
from viowire.virtio.constants import DeviceId

MAX_CHUNK = 64 * 1024  # bytes per buffer posted
MAX_EMPTY = 16  # consecutive empty completions before the device is declared broken


class EntropyDriver(VirtioDriver):
    """A virtio-rng device: ``await rng.read(n)`` returns n random bytes."""

    device_id = DeviceId.ENTROPY

    async def setup(self) -> None:
        (self.vq,) = await self.dev.find_vqs(["input"])

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes of entropy, in as many requests as the device needs.

        One buffer serves every request of the read; it is freed when the read ends.
        """
        if n < 0:
            raise ValueError(f"cannot read {n} bytes")
        if n == 0:
            return b""
        buffer = _Buffer(self.dev.allocator, min(n, MAX_CHUNK))
        try:
            out = bytearray()
            empty = 0
            while len(out) < n:
                got = await self._fill(buffer, min(n - len(out), MAX_CHUNK))
                empty = 0 if got else empty + 1
                if empty >= MAX_EMPTY:
                    raise DeviceBrokenError(
                        self.dev.name,
                        self.vq.index,
                        f"{MAX_EMPTY} buffers in a row came back with used.len 0 "
                        "(at least 1 is due)",
                    )
                out += got
        finally:
            buffer.free_unless_lent()
        return bytes(out)

    async def _request(self, size: int) -> bytes:
        """One buffer of ``size`` bytes posted once; what the device put in it."""
        buffer = _Buffer(self.dev.allocator, size)
        try:
            return await self._fill(buffer, size)
        finally:
            buffer.free_unless_lent()

    async def _fill(self, buffer: _Buffer, size: int) -> bytes:
        try:
            used = await self.vq.submit([], [(buffer.gpa, size)], release=buffer.free)
        except asyncio.CancelledError:
            buffer.lent = True  # submit() frees it once the device gives it back
            raise
        return await self.dev.memory.read(buffer.gpa, used)


class _Buffer:
    """One DMA buffer, freed exactly once: by its reader, or, if the reader was cancelled while
    the device held it, when the device gives it back."""

    __slots__ = ("_allocator", "_freed", "gpa", "lent")

    def __init__(self, allocator: Allocator, size: int) -> None:
        self._allocator = allocator
        self.gpa = allocator.alloc(size, 16)
        self.lent = False
        self._freed = False

    def free(self) -> None:
        if not self._freed:
            self._freed = True
            self._allocator.free(self.gpa)

    def free_unless_lent(self) -> None:
        if not self.lent:
            self.free()
