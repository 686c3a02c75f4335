"""What a device type is, apart from its transport: features, config space, request handling.

A backend knows nothing of MMIO registers, sockets or ring layouts. :class:`MmioDevice` adds the
transport feature bits, walks the rings and hands each available chain to :meth:`handle`.
"""

from __future__ import annotations

import abc
import logging
from collections.abc import Callable

from viowire.server.virtqueue import DescriptorChain
from viowire.virtio.constants import device_name
from viowire.virtio.memory import GuestMemory

log = logging.getLogger("viowire.device")


def _no_config_change() -> None:
    pass


class VirtioBackend(abc.ABC):
    """One virtio device type (§5).

    Subclasses set ``device_id`` and ``num_queues``, override :meth:`config_space` (the config
    structure as little-endian bytes) and :meth:`handle`, and call ``super().__init__()``.
    """

    device_id: int
    num_queues: int
    queue_num_max: int = 256  # a power of 2: Linux split rings need one (reference §8.6)

    def __init__(self) -> None:
        self.on_config_change: Callable[[], None] = _no_config_change
        """Set by the transport; call it after every change of the config space."""
        self.name = device_name(self.device_id)
        """For log lines; the transport replaces it with the device's own name."""

    @abc.abstractmethod
    def device_features(self, version: int) -> int:
        """Device-specific feature bits offered to a Version ``version`` driver."""

    def config_space(self) -> bytes:
        """The device configuration structure as it is now (little-endian)."""
        return b""

    def config_read(self, offset: int, width: int) -> int:
        """Read ``width`` bytes at ``offset``, little-endian, at any alignment; bytes past the
        end of the structure read as 0xFF, as QEMU's do."""
        space = self.config_space()
        raw = bytes(
            space[i] if 0 <= i < len(space) else 0xFF for i in range(offset, offset + width)
        )
        return int.from_bytes(raw, "little")

    def config_write(self, offset: int, data_value: int, width: int) -> None:
        """Drivers may write only fields the device type declares writable; none by default."""
        log.warning(
            "%s: %d-byte config write of %#x at offset %#x ignored: field is read-only",
            self.name,
            width,
            data_value,
            offset,
        )

    @abc.abstractmethod
    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        """Execute one request; return the number of bytes written into the writable part.

        Raise :class:`~viowire.server.virtqueue.ChainError` for a request so malformed that the
        device must stop (reference §4.8); report ordinary request errors in the request's own
        status field.
        """

    def reset(self) -> None:  # noqa: B027 - most device types keep no state across resets
        """Device reset (Status = 0): forget driver-visible device state; storage persists."""
