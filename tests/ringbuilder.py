"""Test pieces around viowire.virtio.mock (guest RAM and a driver's split ring, in-process):
a tiny driver (:class:`MmioDriver`) that brings an :class:`MmioDevice` up through its registers
the way Linux does, and a guest memory that records every access (:class:`RecordingMemory`).

The ring builder itself is :mod:`viowire.virtio.mock`'s; it is imported from here too.
"""

from __future__ import annotations

import asyncio

from viowire.server.mmio import MmioDevice
from viowire.virtio.constants import PAGE_SIZE, Feature, Reg, Status
from viowire.virtio.memory import MappedGuestMemory
from viowire.virtio.mock import RAM_GPA, Chain, GuestRam, RingBuilder

__all__ = [
    "NO_RING_FEATURES",
    "RAM_GPA",
    "Chain",
    "GuestRam",
    "MmioDriver",
    "RecordingMemory",
    "RingBuilder",
    "make_device",
]


class MmioDriver:
    """Register-level driver steps, in Linux's order (reference §2.2, §7.2, §7.3)."""

    def __init__(self, device: MmioDevice) -> None:
        self.device = device

    def read(self, reg: int) -> int:
        return self.device.read(reg, 4)

    def write(self, reg: int, value: int) -> None:
        self.device.write(reg, 4, value)

    def add_status(self, bits: int) -> int:
        self.write(Reg.STATUS, self.read(Reg.STATUS) | bits)
        return self.read(Reg.STATUS)

    def device_features(self) -> int:
        self.write(Reg.DEVICE_FEATURES_SEL, 1)
        high = self.read(Reg.DEVICE_FEATURES)
        self.write(Reg.DEVICE_FEATURES_SEL, 0)
        return high << 32 | self.read(Reg.DEVICE_FEATURES)

    def write_features(self, features: int) -> None:
        self.write(Reg.DRIVER_FEATURES_SEL, 1)
        self.write(Reg.DRIVER_FEATURES, features >> 32)
        self.write(Reg.DRIVER_FEATURES_SEL, 0)
        self.write(Reg.DRIVER_FEATURES, features & 0xFFFF_FFFF)

    def negotiate(self, features: int | None = None, drop: int = 0) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features (all offered unless given), FEATURES_OK (v2)."""
        self.write(Reg.STATUS, 0)
        self.add_status(Status.ACKNOWLEDGE)
        self.add_status(Status.DRIVER)
        if self.device.version == 1:
            self.write(Reg.GUEST_PAGE_SIZE, PAGE_SIZE)
        offered = self.device_features()
        accepted = (offered if features is None else features) & ~drop
        self.write_features(accepted)
        if self.device.version == 2:
            self.add_status(Status.FEATURES_OK)
        return accepted

    def setup_queue(self, index: int, ring: RingBuilder) -> None:
        self.write(Reg.QUEUE_SEL, index)
        self.write(Reg.QUEUE_NUM, ring.num)
        if self.device.version == 1:
            self.write(Reg.QUEUE_ALIGN, PAGE_SIZE)
            self.write(Reg.QUEUE_PFN, ring.pfn)
            return
        for reg, addr in (
            (Reg.QUEUE_DESC_LOW, ring.desc),
            (Reg.QUEUE_AVAIL_LOW, ring.avail),
            (Reg.QUEUE_USED_LOW, ring.used),
        ):
            self.write(reg, addr & 0xFFFF_FFFF)
            self.write(reg + 4, addr >> 32)
        self.write(Reg.QUEUE_READY, 1)

    def bring_up(self, rings: list[RingBuilder], features: int | None = None, drop: int = 0) -> int:
        """The whole init sequence; returns the accepted features."""
        accepted = self.negotiate(features, drop)
        for index, ring in enumerate(rings):
            self.setup_queue(index, ring)
        self.add_status(Status.DRIVER_OK)
        return accepted

    def notify(self, queue: int = 0) -> None:
        self.write(Reg.QUEUE_NOTIFY, queue)

    async def kick(self, queue: int = 0, timeout: float = 2.0) -> None:
        """Notify and wait, bounded, until the device has processed everything."""
        self.notify(queue)
        await asyncio.wait_for(self.device.drain(), timeout)


NO_RING_FEATURES = (1 << Feature.RING_EVENT_IDX) | (1 << Feature.RING_INDIRECT_DESC)
"""Pass as ``drop=`` to negotiate without EVENT_IDX and INDIRECT_DESC."""


def make_device(backend, version: int = 2, ram: GuestRam | None = None) -> MmioDevice:
    """An MmioDevice with test RAM attached and its interrupt levels recorded in ``irqs``."""
    device = MmioDevice(backend, version, name="test-dev")
    device.memory = (ram or GuestRam()).memory
    device.irqs = []  # type: ignore[attr-defined]
    device.on_irq = device.irqs.append  # type: ignore[attr-defined]
    return device


class RecordingMemory(MappedGuestMemory):
    """Test RAM that logs every access as ``(op, gpa...)`` in ``ops``: one entry per call, so a
    test can count round trips (proxied mode) and check the order of writes."""

    def __init__(self, ram: GuestRam, ops: list | None = None) -> None:
        super().__init__()
        self.add_region(ram.gpa, ram.buffer)
        self.ops: list[tuple] = [] if ops is None else ops

    async def readv(self, ranges):
        self.ops.append(("readv", *[gpa for gpa, _ in ranges]))
        return await super().readv(ranges)

    async def writev(self, segments):
        self.ops.append(("writev", *[gpa for gpa, _ in segments]))
        await super().writev(segments)

    async def read_u16(self, gpa):
        self.ops.append(("read_u16", gpa))
        return self.load_u16(gpa)

    async def write_u16(self, gpa, value):
        self.ops.append(("write_u16", gpa))
        self.store_u16(gpa, value)

    @property
    def round_trips(self) -> int:
        """Calls that need an answer from a remote memory (writes are posted)."""
        return sum(op[0] in ("readv", "read_u16") for op in self.ops)
