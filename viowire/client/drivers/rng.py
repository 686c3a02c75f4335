"""virtio-rng (SPEC §5.4): entropy from device-writable buffers.

The device may fill fewer bytes than a buffer holds; the driver MUST use used.len, so a read
keeps posting buffers until it has what was asked for.
"""

from __future__ import annotations

import asyncio

from viowire.client.drivers.base import VirtioDriver
from viowire.client.errors import DeviceBrokenError
from viowire.virtio.constants import DeviceId

MAX_CHUNK = 64 * 1024  # bytes per buffer posted
MAX_EMPTY = 16  # consecutive empty completions before the device is declared broken


class EntropyDriver(VirtioDriver):
    """A virtio-rng device: ``await rng.read(n)`` returns n random bytes."""

    device_id = DeviceId.ENTROPY

    async def setup(self) -> None:
        (self.vq,) = await self.dev.find_vqs(["input"])

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes of entropy, in as many requests as the device needs."""
        if n < 0:
            raise ValueError(f"cannot read {n} bytes")
        out = bytearray()
        empty = 0
        while len(out) < n:
            got = await self._request(min(n - len(out), MAX_CHUNK))
            empty = 0 if got else empty + 1
            if empty >= MAX_EMPTY:
                raise DeviceBrokenError(
                    self.dev.name,
                    self.vq.index,
                    f"{MAX_EMPTY} buffers in a row came back with used.len 0 (at least 1 is due)",
                )
            out += got
        return bytes(out)

    async def _request(self, size: int) -> bytes:
        allocator = self.dev.allocator
        gpa = allocator.alloc(size, 16)
        try:
            used = await self.vq.submit([], [(gpa, size)], release=lambda: allocator.free(gpa))
        except asyncio.CancelledError:
            raise  # submit() frees the buffer once the device gives it back
        except BaseException:
            allocator.free(gpa)
            raise
        try:
            return await self.dev.memory.read(gpa, used)
        finally:
            allocator.free(gpa)
