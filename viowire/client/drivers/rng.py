"""virtio-rng (SPEC §5.4): entropy from device-writable buffers.

The device may fill fewer bytes than a buffer holds; the driver MUST use used.len, so a read
keeps posting buffers until it has what was asked for. Each of them is a
:meth:`~viowire.client.drivers.generic.GenericDriver.request` with one writable buffer.
"""

from __future__ import annotations

from viowire.client.drivers.generic import DmaBuffer, GenericDriver
from viowire.client.errors import DeviceBrokenError
from viowire.virtio.constants import DeviceId

MAX_CHUNK = 64 * 1024  # bytes per buffer posted
MAX_EMPTY = 16  # consecutive empty completions before the device is declared broken


class EntropyDriver(GenericDriver):
    """A virtio-rng device: ``await rng.read(n)`` returns n random bytes."""

    device_id = DeviceId.ENTROPY
    queue_names = ("input",)

    async def read(self, n: int) -> bytes:
        """Exactly ``n`` bytes of entropy, in as many requests as the device needs.

        One buffer serves every request of the read; it is freed when the read ends.
        """
        if n < 0:
            raise ValueError(f"cannot read {n} bytes")
        if n == 0:
            return b""
        buffer = self.alloc(min(n, MAX_CHUNK))
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
        return (await self.request(0, in_sizes=size)).valid

    async def _fill(self, buffer: DmaBuffer, size: int) -> bytes:
        return (await self.request(0, in_sizes=size, buffer=buffer)).valid
