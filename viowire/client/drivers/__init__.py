"""Device drivers, written only against the transport's operations (``VirtioMmioDevice``).

:class:`GenericDriver` drives any device type; the blk and rng drivers are built on it.
"""

from __future__ import annotations

from viowire.client.drivers.base import VirtioDriver
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.generic import ConfigSnapshot, DmaBuffer, GenericDriver, Used
from viowire.client.drivers.rng import EntropyDriver
from viowire.virtio.constants import DeviceId

DRIVERS: dict[int, type[VirtioDriver]] = {
    DeviceId.BLOCK: BlockDriver,
    DeviceId.ENTROPY: EntropyDriver,
}

__all__ = [
    "DRIVERS",
    "BlockDriver",
    "ConfigSnapshot",
    "DmaBuffer",
    "EntropyDriver",
    "GenericDriver",
    "Used",
    "VirtioDriver",
]
