"""The device under test: one device window as the checks drive it, through registers (every
access bounded), guest memory, the initialisation flows, its interrupt line, and waiting."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any

from viowire import registry
from viowire.client.connection import DeviceInfo
from viowire.client.errors import register_name
from viowire.client.mmio import VirtioMmioDevice
from viowire.conform.model import CheckFailed, Options, Target
from viowire.conform.receive import ReceiveBuffers
from viowire.conform.ring import Ring
from viowire.conform.scratch import GuestScratch
from viowire.conform.timed import TimedBus, TimedMemory
from viowire.device import Device, SampleRequest
from viowire.virtio.constants import (
    CONFIG_OFFSET,
    DEVICE_NAMES,
    MAGIC_VALUE,
    PAGE_SIZE,
    Feature,
    Reg,
    Status,
    device_name,
)

MAX_QUEUES = 64
DEFAULT_NUM = 16  # ring size for the checks: small, so wrap-around happens quickly
BASE_FEATURES = 1 << Feature.VERSION_1 | 1 << Feature.ACCESS_PLATFORM | 1 << Feature.ORDER_PLATFORM
"""Accepted whenever offered: VERSION_1 is mandatory, and a device may refuse FEATURES_OK when
ACCESS_PLATFORM is offered but not accepted; the hand-built rings honour all three."""


def reg_name(offset: int) -> str:
    """``Status (0x070)``, or ``reserved 0x048`` for an offset the spec does not name."""
    if offset >= CONFIG_OFFSET:
        return f"config+{offset - CONFIG_OFFSET:#x}"
    if offset in Reg._value2member_map_:
        return register_name(offset)
    return f"reserved {offset:#05x}"


class Dut(GuestScratch):
    """One device window as the checks drive it: registers, guest memory (allocations and
    guards, from :class:`GuestScratch`), flows, interrupts, waiting.

    Its type is looked up by device ID in :mod:`viowire.registry`: the type's
    :class:`~viowire.device.SampleRequest` is the correct request the I/O checks send (see
    :mod:`viowire.conform.requests`); a type with none, or an ID no class here declares, gets
    the checks that need no I/O.
    """

    def __init__(self, target: Target, info: DeviceInfo, index: int, options: Options) -> None:
        super().__init__(TimedMemory(target.memory, options.access_timeout), target.allocator)
        self.target = target
        self.info = info
        self.index = index
        self.options = options
        self.bus = TimedBus(target.bus, options.access_timeout)
        self.window = getattr(target.bus, "window", True)  # False: vhost-user (no registers)
        self.base = info.base
        self.version = info.version
        self.device_id = info.device_id
        self.vendor_id = info.vendor_id
        self.unusable = ""  # why the slot cannot be driven (bad magic, placeholder)
        self.queue_max: list[int] = []
        self.offered = 0  # 64 feature bits (legacy: word 0 only)
        self.negotiated = 0
        self.device_type: type[Device] | None = None
        self.sample: SampleRequest | None = None
        self._find_type()
        self.settle = 0.05  # how long "nothing happens" is watched; calibrated by I/O
        self.latency = 0.0  # of the last correct request
        self.irq_level = False
        self.irq_events: list[bool] = []

    @property
    def label(self) -> str:
        """``virtio-blk@0x10001000 v2``."""
        return f"{self.type_name}@{self.info.base:#x} v{self.info.version}"

    @property
    def type_name(self) -> str:
        """``virtio-blk``; a type the spec does not name goes by its class's name."""
        cls = self.device_type
        if self.info.device_id not in DEVICE_NAMES and cls is not None:
            return cls.type_name or cls.__qualname__
        return device_name(self.info.device_id)

    def _find_type(self) -> None:
        self.device_type = registry.by_device_id(self.device_id) if self.device_id else None
        self.sample = None if self.device_type is None else self.device_type.sample_request

    @property
    def no_io(self) -> str:
        """Why the suite cannot make this device do I/O, as a check's SKIP detail ("" if it
        can): it needs a correct request, the type's sample request."""
        sample, cls = self.sample, self.device_type
        if not self.queue_max:
            return "the device has no queues"
        if cls is None:
            return (
                f"not applicable: no device type known here has ID {self.device_id:#x}, so no "
                "correct request is known (a viowire.device.Device class declares one as its "
                "sample_request)"
            )
        name = f"{cls.__module__}:{cls.__qualname__}"
        if sample is None:
            return (
                f"not applicable: {name} declares no sample_request, so no correct request is known"
            )
        for queue in (sample.queue, sample.receive_queue):
            if queue is not None and queue >= self.num_queues:
                return (
                    f"not applicable: the sample_request of {name} uses queue {queue}, but the "
                    f"device has {self.num_queues} queue(s)"
                )
        return ""

    @property
    def io(self) -> bool:
        """Whether the suite can make this device do I/O (its type declares a sample request)."""
        return not self.no_io

    @property
    def io_queue(self) -> int:
        """The queue the sample request goes to."""
        return self.sample.queue if self.sample is not None else 0

    @property
    def num_queues(self) -> int:
        return len(self.queue_max)

    def transport(self) -> VirtioMmioDevice:
        """The drivers' transport for this device: virtio-mmio over the bus, or the target's
        own (vhost-user's, which has no registers)."""
        device_for = getattr(self.target.bus, "device_for", None)
        if device_for is not None:
            return device_for(self.info)
        return VirtioMmioDevice(
            self.bus, self.base, self.info.irq, self.memory, self.allocator, size=self.info.size
        )

    # -- registers --------------------------------------------------------------------------------
    async def read(self, offset: int, width: int = 4) -> int:
        return await self.bus.mmio_read(self.base + offset, width)

    async def write(self, offset: int, value: int, width: int = 4, *, posted: bool = True) -> None:
        mask = (1 << 8 * width) - 1
        await self.bus.mmio_write(self.base + offset, width, value & mask, posted=posted)

    async def status(self) -> int:
        return await self.read(Reg.STATUS)

    async def set_status(self, value: int) -> None:
        await self.write(Reg.STATUS, value)

    async def add_status(self, bits: int) -> int:
        """Status |= bits, read-modify-write as Linux does; returns what it reads back."""
        await self.set_status(await self.status() | bits)
        return await self.status()

    async def reset(self) -> None:
        """Write Status = 0 and poll until it reads 0 (§2.4.2), bounded."""
        await self.write(Reg.STATUS, 0)
        status = await self.until(self._status_if_zero, self.options.io_timeout)
        if status is None:
            raise CheckFailed(
                f"Status still reads {await self.status():#x} {self.options.io_timeout:g} s "
                "after writing 0 (2.4.1: a device MUST reinitialize status to 0 on reset)"
            )

    async def _status_if_zero(self) -> bool:
        return await self.status() == 0

    async def select(self, queue: int) -> None:
        await self.write(Reg.QUEUE_SEL, queue)

    async def queue_in_use(self, queue: int) -> int:
        """QueueReady (v2) or QueuePFN (v1) of ``queue``."""
        await self.select(queue)
        return await self.read(Reg.QUEUE_READY if self.version == 2 else Reg.QUEUE_PFN)

    async def interrupt_status(self) -> int:
        return await self.read(Reg.INTERRUPT_STATUS)

    async def ack(self, bits: int) -> None:
        await self.write(Reg.INTERRUPT_ACK, bits, posted=False)

    async def config_bytes(self, offset: int, length: int) -> bytes:
        return bytes([await self.read(CONFIG_OFFSET + offset + i, 1) for i in range(length)])

    # -- identification ---------------------------------------------------------------------------
    async def identify(self) -> None:
        """Probe as a driver does (§4.2.3.1.1): MagicValue, Version, DeviceID first, and
        nothing else unless they are valid; then queues and features."""
        magic = await self.read(Reg.MAGIC_VALUE)
        if magic != MAGIC_VALUE:
            self.unusable = f"MagicValue reads {magic:#010x}, not a virtio-mmio device"
            return
        version = await self.read(Reg.VERSION)
        if version not in (1, 2):
            self.unusable = f"Version reads {version}, neither 1 (legacy) nor 2"
            return
        self.version = version
        self.device_id = await self.read(Reg.DEVICE_ID)
        self._find_type()
        if self.device_id == 0:
            self.unusable = "DeviceID 0: a placeholder slot (touch nothing else, 4.2.3.1.1)"
            return
        self.vendor_id = await self.read(Reg.VENDOR_ID)
        await self.reset()
        self.offered = await self.feature_word(0)
        if version == 2:
            self.offered |= await self.feature_word(1) << 32
        for queue in range(MAX_QUEUES):
            await self.select(queue)
            num_max = await self.read(Reg.QUEUE_NUM_MAX)
            if num_max == 0:
                break
            self.queue_max.append(num_max)
        await self.select(0)

    async def feature_word(self, sel: int) -> int:
        await self.write(Reg.DEVICE_FEATURES_SEL, sel)
        return await self.read(Reg.DEVICE_FEATURES)

    # -- interrupts -------------------------------------------------------------------------------
    def install_irq(self) -> None:
        self.bus.set_irq_handler(self.info.irq, self._on_irq)

    def remove_irq(self) -> None:
        self.bus.set_irq_handler(self.info.irq, None)

    def _on_irq(self, level: bool) -> None:
        self.irq_level = level
        self.irq_events.append(level)

    async def wait_irq_level(self, level: bool) -> bool:
        """Wait, bounded, until the line is at ``level``; events travel behind register replies,
        so the wait is short once InterruptStatus says so."""
        return await self.until(lambda: _ready(self.irq_level == level), self.options.io_timeout)

    # -- initialisation flows (§3.1.1, legacy §3.1.2) -------------------------------------------
    def features_for(self, extra: int = 0) -> int:
        if self.version == 1:
            return self.offered & extra & 0xFFFF_FFFF
        return self.offered & (BASE_FEATURES | extra)

    async def write_features(self, features: int) -> None:
        """DriverFeatures word 1 then word 0, as current Linux (even to a legacy device)."""
        await self.write(Reg.DRIVER_FEATURES_SEL, 1)
        await self.write(Reg.DRIVER_FEATURES, features >> 32)
        await self.write(Reg.DRIVER_FEATURES_SEL, 0)
        await self.write(Reg.DRIVER_FEATURES, features)

    async def begin(self, extra: int = 0) -> int:
        """Reset, ACKNOWLEDGE, DRIVER, features (the base set plus ``extra`` if offered),
        FEATURES_OK (v2, which must stick). Returns the features written."""
        await self.reset()
        await self.set_status(Status.ACKNOWLEDGE)
        await self.set_status(Status.ACKNOWLEDGE | Status.DRIVER)
        if self.version == 1:
            await self.write(Reg.GUEST_PAGE_SIZE, PAGE_SIZE)
        features = self.features_for(extra)
        await self.write_features(features)
        self.negotiated = features
        if self.version == 2:
            status = await self.add_status(Status.FEATURES_OK)
            if not status & Status.FEATURES_OK:
                raise CheckFailed(
                    f"FEATURES_OK refused for features {features:#x}, a valid subset of the "
                    f"offer {self.offered:#x} (2.2.2: the device SHOULD accept it)"
                )
        return features

    async def driver_ok(self) -> None:
        status = await self.add_status(Status.DRIVER_OK)
        if status & Status.DEVICE_NEEDS_RESET:
            raise CheckFailed(f"DEVICE_NEEDS_RESET set during a correct setup (status {status:#x})")

    def default_num(self, queue: int = 0) -> int:
        num = min(self.queue_max[queue], DEFAULT_NUM)
        return 1 << (num.bit_length() - 1)  # a power of two even if the maximum is not

    async def ring(self, queue: int = 0, num: int | None = None, **layout: Any) -> Ring:
        """A zeroed ring for ``queue``, allocated but not yet programmed."""
        ring = Ring(self, num or self.default_num(queue), index=queue, **layout)
        await ring.allocate()
        return ring

    async def io_ring(self, num: int | None = None, **layout: Any) -> Ring:
        """A zeroed ring for the sample request's queue, allocated but not yet programmed; with
        the buffers of its receive queue, if it names one (programmed with it)."""
        assert self.sample is not None, "an I/O check on a device without a sample request"
        receive_queue = self.sample.receive_queue
        receiver = None
        if receive_queue is not None:
            page = {k: v for k, v in layout.items() if k in ("page_size", "align")}
            receiver = ReceiveBuffers(await self.ring(receive_queue, **page))
            # never more requests out than buffers to take their answers
            num = num or min(self.default_num(self.io_queue), receiver.ring.num)
        ring = await self.ring(self.io_queue, num, **layout)
        ring.receiver = receiver
        return ring

    async def up(self, extra: int = 0, **ring_options: Any) -> Ring:
        """The whole correct flow for the sample request's queue (and its receive queue),
        ending at DRIVER_OK."""
        await self.begin(extra)
        ring = await self.io_ring(**ring_options)
        await ring.program()
        await self.driver_ok()
        return ring

    # -- waiting ----------------------------------------------------------------------------------
    async def until(
        self, probe: Callable[[], Awaitable[Any]], timeout: float | None = None
    ) -> Any | None:
        """Poll ``probe`` until it returns something truthy (returned) or ``timeout`` passes
        (None). The sleeps let the device and its replies run."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + (self.options.io_timeout if timeout is None else timeout)
        delay = 0.0002
        while True:
            value = await probe()
            if value:
                return value
            if loop.time() >= deadline:
                return None
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.01)

    async def quiet(self) -> None:
        """Give the device the calibrated time in which it would have acted."""
        await asyncio.sleep(self.settle)

    def note_latency(self, seconds: float) -> None:
        """Calibrate ``settle`` from how fast the device completes a correct request."""
        self.latency = seconds
        self.settle = min(0.5, max(0.03, 10 * seconds))


async def _ready(value: bool) -> bool:
    return value
