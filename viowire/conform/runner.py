"""Running the conformance suite: the device under test, hand-built rings, verdicts.

A check drives one device window through a :class:`Dut`: register accesses on a ``RegisterBus``
(every one bounded by a timeout), split rings laid out by hand in guest memory (:class:`Ring`),
and one correct request per device type (:func:`request`, :func:`finish`). Nothing here knows
that the bus is a viowire connection: a qtest transport with the same bus and memory interfaces
runs the same suite.

Around each check :func:`run_suite` resets the device, and afterwards resets it again, verifies
that the reset took (§2.4.1, §4.2.2.1), audits guest memory for writes the device had no right
to make (§2.7.5.1), and, after a deliberate violation, runs a correct I/O round: a device that
only works until the first mistake fails. The check's own outcome is then held against the
verdicts it allows; anything else is FAIL.
"""

from __future__ import annotations

import asyncio
import enum
import fnmatch
import logging
import struct
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from viowire.client.connection import DeviceInfo
from viowire.client.errors import register_name
from viowire.client.mmio import RegisterBus
from viowire.client.virtqueue import Allocator, align_up
from viowire.virtio.constants import (
    BLK_REQ_HEADER_SIZE,
    BLK_SECTOR_SIZE,
    CONFIG_OFFSET,
    DESC_SIZE,
    MAGIC_VALUE,
    PAGE_SIZE,
    USED_ELEM_SIZE,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    BlkStatus,
    BlkType,
    DeviceId,
    Feature,
    Reg,
    Status,
    device_name,
)
from viowire.virtio.memory import GuestMemory, Region

log = logging.getLogger("viowire.conform")

DESC = struct.Struct("<QIHH")  # addr, len, flags, next
USED_ELEM = struct.Struct("<II")  # id, len
BLK_HEADER = struct.Struct("<IIQ")  # type, ioprio, sector
IO_DEVICES = (DeviceId.BLOCK, DeviceId.ENTROPY)
"""Device types the suite can make do I/O: blk and rng. Others get the register checks."""
MAX_QUEUES = 64
DEFAULT_NUM = 16  # ring size for the checks: small, so wrap-around happens quickly
CANARY = b"\xca\xfe\xf0\x0d" * 4
POISON = 0xEE  # what device-writable buffers hold before the device writes them
BASE_FEATURES = 1 << Feature.VERSION_1 | 1 << Feature.ACCESS_PLATFORM | 1 << Feature.ORDER_PLATFORM
"""Accepted whenever offered: VERSION_1 is mandatory, and a device may refuse FEATURES_OK when
ACCESS_PLATFORM is offered but not accepted; the hand-built rings honour all three."""


class Verdict(enum.StrEnum):
    PASS = "PASS"  # the correct flow works / the value is right
    REJECT = "REJECT"  # the violation was refused and the device stayed healthy
    WEDGED = "WEDGED"  # the device set DEVICE_NEEDS_RESET
    FAIL = "FAIL"  # wrong value, crash, hang, corruption, broken ring used, link lost
    SKIP = "SKIP"  # the check does not apply to this device


@dataclass(frozen=True)
class Outcome:
    """What a check observed; the runner decides whether that is acceptable."""

    verdict: Verdict
    detail: str


def passed(detail: str) -> Outcome:
    return Outcome(Verdict.PASS, detail)


def rejected(detail: str) -> Outcome:
    return Outcome(Verdict.REJECT, detail)


def wedged(detail: str) -> Outcome:
    return Outcome(Verdict.WEDGED, detail)


def skipped(detail: str) -> Outcome:
    return Outcome(Verdict.SKIP, detail)


class CheckFailed(Exception):
    """The device did something the spec (or the check's contract) does not allow: FAIL."""


class Unresponsive(Exception):
    """A register access got no answer in time: the device hangs (FAIL, and after two in a row
    the device's remaining checks are not run)."""


@dataclass(frozen=True)
class Check:
    """One conformance check: where it comes from, what it does, what outcomes are good."""

    id: str
    section: str  # virtio 1.2/1.3 numbering
    title: str
    run: Callable[[Dut], Awaitable[Outcome]]
    expect: tuple[Verdict, ...] | Mapping[int, tuple[Verdict, ...]]  # also per version
    versions: tuple[int, ...] = (1, 2)
    devices: tuple[int, ...] | None = None  # device IDs, None = any
    feature: int | None = None  # a feature bit the device must offer
    violation: bool = False  # a correct I/O round must work after it (after a reset)
    identification: bool = False  # runs even on a slot that is not a usable device

    def expected(self, version: int) -> tuple[Verdict, ...]:
        if isinstance(self.expect, Mapping):
            return tuple(self.expect.get(version, ()))
        return self.expect

    def skip_reason(self, dut: Dut) -> str | None:
        if dut.unusable and not self.identification:
            return f"not run: {dut.unusable}"
        if self.identification:
            return None
        if dut.version not in self.versions:
            return f"applies to version {' and '.join(map(str, self.versions))} devices"
        if self.devices is not None and dut.device_id not in self.devices:
            return f"applies to {', '.join(device_name(d) for d in self.devices)} only"
        if self.feature is not None and not dut.offered >> self.feature & 1:
            return f"needs feature bit {self.feature}, which the device does not offer"
        if self.devices is not None and not dut.queue_max:
            return "the device has no queues"
        return None


@dataclass(frozen=True)
class Result:
    """One check on one device."""

    id: str
    section: str
    title: str
    device: str
    verdict: Verdict
    detail: str
    expected: tuple[Verdict, ...] = ()
    duration: float = 0.0

    def as_dict(self) -> dict[str, str]:
        return {
            "id": self.id,
            "section": self.section,
            "title": self.title,
            "device": self.device,
            "verdict": str(self.verdict),
            "detail": self.detail,
        }


@dataclass
class Target:
    """What the suite needs: a bus, guest memory with an allocator, and the platform's devices."""

    bus: RegisterBus
    memory: GuestMemory
    allocator: Allocator
    devices: Sequence[DeviceInfo]


@dataclass(frozen=True)
class Options:
    access_timeout: float = 2.0  # one register access
    io_timeout: float = 2.0  # a correct request, a reset, an expected interrupt
    check_timeout: float = 20.0  # one whole check, recovery included
    only: Sequence[str] = ()  # fnmatch patterns on check ids
    seed: int = 2024  # reset storm


def selected(checks: Sequence[Check], patterns: Sequence[str]) -> list[Check]:
    """The checks whose id matches one of ``patterns`` (all when there are none)."""
    if not patterns:
        return list(checks)
    return [c for c in checks if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]


# -- the bus, with every access bounded ----------------------------------------------------------


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


def reg_name(offset: int) -> str:
    """``Status (0x070)``, or ``reserved 0x048`` for an offset the spec does not name."""
    if offset >= CONFIG_OFFSET:
        return f"config+{offset - CONFIG_OFFSET:#x}"
    if offset in Reg._value2member_map_:
        return register_name(offset)
    return f"reserved {offset:#05x}"


@dataclass
class _Guard:
    """Guest memory the device must not write: what it must still hold, and what it is."""

    gpa: int
    expected: bytearray
    what: str


# -- the device under test -----------------------------------------------------------------------


class Dut:
    """One device window as the checks drive it: registers, guest memory, flows, waiting."""

    def __init__(self, target: Target, info: DeviceInfo, index: int, options: Options) -> None:
        self.target = target
        self.info = info
        self.index = index
        self.options = options
        self.bus = TimedBus(target.bus, options.access_timeout)
        self.memory = TimedMemory(target.memory, options.access_timeout)
        self.allocator = target.allocator
        self.base = info.base
        self.version = info.version
        self.device_id = info.device_id
        self.vendor_id = info.vendor_id
        self.unusable = ""  # why the slot cannot be driven (bad magic, placeholder)
        self.queue_max: list[int] = []
        self.offered = 0  # 64 feature bits (legacy: word 0 only)
        self.negotiated = 0
        self.capacity = 0  # virtio-blk, in sectors
        self.settle = 0.05  # how long "nothing happens" is watched; calibrated by I/O
        self.latency = 0.0  # of the last correct request
        self.irq_level = False
        self.irq_events: list[bool] = []
        self._blocks: list[int] = []
        self._guards: list[_Guard] = []

    @property
    def label(self) -> str:
        return f"{device_name(self.info.device_id)}@{self.info.base:#x} v{self.info.version}"

    @property
    def io(self) -> bool:
        """Whether the suite can make this device do I/O (blk, rng)."""
        return self.device_id in IO_DEVICES and bool(self.queue_max)

    @property
    def num_queues(self) -> int:
        return len(self.queue_max)

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
        nothing else unless they are valid; then queues, features and (blk) capacity."""
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
        if self.device_id == DeviceId.BLOCK:
            self.capacity = int.from_bytes(await self.config_bytes(0, 8), "little")

    async def feature_word(self, sel: int) -> int:
        await self.write(Reg.DEVICE_FEATURES_SEL, sel)
        return await self.read(Reg.DEVICE_FEATURES)

    # -- guest memory -----------------------------------------------------------------------------
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

    async def up(self, extra: int = 0, **ring_options: Any) -> Ring:
        """The whole correct flow for queue 0, ending at DRIVER_OK."""
        await self.begin(extra)
        ring = await self.ring(**ring_options)
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


# -- hand-built split rings ----------------------------------------------------------------------


def legacy_ring_size(num: int, align: int) -> int:
    """Bytes of the legacy contiguous ring (§2.7.2, Linux ``vring_size``)."""
    return align_up(DESC_SIZE * num + 2 * (3 + num), align) + 6 + USED_ELEM_SIZE * num


class Ring:
    """A split ring laid out by hand: v2 as three areas, v1 as one QueuePFN block.

    ``capacity`` (v2) sizes the areas for more entries than ``num``, so that a device which
    takes another queue size than the driver's still stays inside the allocation. The
    descriptor table and the available ring are guarded: only the driver writes them.
    """

    def __init__(
        self,
        dut: Dut,
        num: int,
        *,
        index: int = 0,
        capacity: int | None = None,
        page_size: int = PAGE_SIZE,
        align: int = PAGE_SIZE,
    ) -> None:
        self.dut = dut
        self.num = num
        self.index = index
        self.capacity = max(num, capacity or 0)
        self.legacy = dut.version == 1
        self.page_size = page_size
        self.align = align
        self.desc = self.avail = self.used = self.pfn = 0
        self.avail_idx = 0  # what the driver has published
        self.last_used = 0  # what the driver has consumed
        self.notified_at = 0.0

    async def allocate(self) -> None:
        dut, cap = self.dut, self.capacity
        if self.legacy:
            base = await dut.alloc(legacy_ring_size(cap, self.align), self.page_size)
            self.desc, self.avail = base, base + DESC_SIZE * self.num
            self.used = align_up(self.avail + 6 + 2 * self.num, self.align)
            self.pfn = base // self.page_size
        else:
            self.desc = await dut.alloc(DESC_SIZE * cap, 16)
            self.avail = await dut.alloc(6 + 2 * cap, 2)
            self.used = await dut.alloc(6 + USED_ELEM_SIZE * cap, 4)
        guarded = self.num if self.legacy else cap  # legacy: the used ring follows at once
        await dut.guard(self.desc, DESC_SIZE * guarded, "the descriptor table")
        await dut.guard(self.avail, 6 + 2 * guarded, "the available ring")

    async def rezero(self) -> None:
        """Zero all three parts again and forget the indices, as for a fresh ring."""
        cap = self.capacity
        if self.legacy:
            size = legacy_ring_size(cap, self.align)
            await self.dut.poke(self.desc, bytes(size))
        else:
            await self.dut.poke(self.desc, bytes(DESC_SIZE * cap))
            await self.dut.poke(self.avail, bytes(6 + 2 * cap))
            await self.dut.poke(self.used, bytes(6 + USED_ELEM_SIZE * cap))
        self.avail_idx = self.last_used = 0

    async def program(self, *, ready: bool = True) -> None:
        """The queue registers, in the order §4.2.3.2 (v2) or §4.2.4 (legacy) gives."""
        dut = self.dut
        await dut.select(self.index)
        await dut.write(Reg.QUEUE_NUM, self.num)
        if self.legacy:
            await dut.write(Reg.QUEUE_ALIGN, self.align)
            await dut.write(Reg.QUEUE_PFN, self.pfn)
            return
        await self.write_addresses(self.desc, self.avail, self.used)
        if ready:
            await dut.write(Reg.QUEUE_READY, 1)

    async def write_addresses(self, desc: int, avail: int, used: int) -> None:
        for low, gpa in (
            (Reg.QUEUE_DESC_LOW, desc),
            (Reg.QUEUE_AVAIL_LOW, avail),
            (Reg.QUEUE_USED_LOW, used),
        ):
            await self.dut.write(low, gpa & 0xFFFF_FFFF)
            await self.dut.write(low + 4, gpa >> 32)

    async def set_desc(
        self, index: int, addr: int, length: int, flags: int = 0, next_index: int = 0
    ) -> None:
        await self.dut.poke(
            self.desc + DESC_SIZE * index, DESC.pack(addr, length & 0xFFFF_FFFF, flags, next_index)
        )

    async def put(self, slot: int, head: int) -> None:
        """avail.ring[slot] = head, without publishing it."""
        await self.dut.poke_u16(self.avail + 4 + 2 * slot, head)

    async def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        await self.dut.poke_u16(self.avail + 2, self.avail_idx)

    async def publish(self, *heads: int) -> None:
        """Ring slots first, then avail.idx (§2.7.13)."""
        idx = self.avail_idx
        for head in heads:
            await self.put(idx % self.num, head)
            idx = (idx + 1) & 0xFFFF
        await self.set_avail_idx(idx)

    async def set_used_event(self, value: int) -> None:
        await self.dut.poke_u16(self.avail + 4 + 2 * self.num, value)

    async def notify(self) -> None:
        self.notified_at = asyncio.get_running_loop().time()
        await self.dut.write(Reg.QUEUE_NOTIFY, self.index)

    async def used_idx(self) -> int:
        return await self.dut.memory.read_u16(self.used + 2)

    async def used_elem(self, position: int) -> tuple[int, int]:
        """(id, len) of the used element at free-running index ``position``."""
        gpa = self.used + 4 + USED_ELEM_SIZE * (position % self.num)
        return USED_ELEM.unpack(await self.dut.memory.read(gpa, USED_ELEM_SIZE))

    async def used_slot(self, slot: int) -> tuple[int, int]:
        """(id, len) in used ring slot ``slot``, whatever the queue size."""
        gpa = self.used + 4 + USED_ELEM_SIZE * slot
        return USED_ELEM.unpack(await self.dut.memory.read(gpa, USED_ELEM_SIZE))

    async def pending_used(self) -> int:
        return (await self.used_idx() - self.last_used) & 0xFFFF

    async def wait_used(self, count: int, timeout: float | None = None) -> str:
        """Wait until ``count`` new used elements are published: ``"used"``, or
        ``"needs-reset"`` as soon as the device sets DEVICE_NEEDS_RESET, or ``"timeout"``."""

        async def probe() -> str | None:
            if await self.pending_used() >= count:
                return "used"
            if await self.dut.status() & Status.DEVICE_NEEDS_RESET:
                return "needs-reset"
            return None

        return await self.dut.until(probe, timeout) or "timeout"


# -- one correct request per device type ---------------------------------------------------------


@dataclass
class Request:
    """A chain the driver built: its head, its descriptors, what the device may write."""

    head: int
    descs: tuple[int, ...]
    writable: list[tuple[int, int]]
    status: int | None = None  # virtio-blk: the status byte's address
    want_status: int | None = None
    data: tuple[int, int] | None = None  # virtio-blk IN: where the data lands

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


async def chain(
    ring: Ring, head: int, segments: Sequence[tuple[int, int, bool]]
) -> tuple[int, ...]:
    """Descriptors head, head+1, … (mod num) for ``(gpa, len, writable)`` segments."""
    descs = tuple((head + i) % ring.num for i in range(len(segments)))
    for i, (gpa, length, writable) in enumerate(segments):
        flags = VIRTQ_DESC_F_WRITE if writable else 0
        last = i + 1 == len(segments)
        await ring.set_desc(
            descs[i],
            gpa,
            length,
            flags | (0 if last else VIRTQ_DESC_F_NEXT),
            0 if last else descs[i + 1],
        )
    return descs


async def request(dut: Dut, ring: Ring, head: int = 0, **blk: Any) -> Request:
    """A correct request for the device type in descriptors from ``head`` (not published):
    virtio-rng, a 64-byte buffer; virtio-blk, see :func:`blk_request` (default: read sector 0)."""
    if dut.device_id == DeviceId.BLOCK:
        return await blk_request(dut, ring, head, **blk)
    gpa = await dut.buffer(64)
    return Request(head, await chain(ring, head, [(gpa, 64, True)]), [(gpa, 64)])


async def blk_request(
    dut: Dut,
    ring: Ring,
    head: int = 0,
    *,
    kind: int = BlkType.IN,
    sector: int = 0,
    data: bytes = b"",
    in_len: int = BLK_SECTOR_SIZE,
    want: int = BlkStatus.OK,
) -> Request:
    """header (readable) [+ data] + status (writable): the classic three-descriptor layout,
    which even a legacy device without ANY_LAYOUT accepts."""
    header = await dut.buffer(data=BLK_HEADER.pack(kind, 0, sector))
    segments = [(header, BLK_REQ_HEADER_SIZE, False)]
    writable = []
    landing = None
    if kind == BlkType.OUT:
        segments.append((await dut.buffer(data=data), len(data), False))
    elif kind != BlkType.FLUSH and in_len:
        gpa = await dut.buffer(in_len)
        segments.append((gpa, in_len, True))
        writable.append((gpa, in_len))
        landing = (gpa, in_len)
    status = await dut.buffer(1, fill=0xFF)
    segments.append((status, 1, True))
    writable.append((status, 1))
    descs = await chain(ring, head, segments)
    return Request(head, descs, writable, status, want, landing)


async def finish(dut: Dut, ring: Ring, requests: Sequence[Request]) -> dict[int, int]:
    """Wait for ``requests`` (published, notified) to come back and check each used element
    (§2.7.8): every head exactly once, used.len no larger than the writable bytes, blk status
    as wanted, rng at least one byte (§5.4.6.2). Returns ``{head: used len}``."""
    state = await ring.wait_used(len(requests))
    if state == "needs-reset":
        raise CheckFailed(
            f"DEVICE_NEEDS_RESET set on a correct request (status {await dut.status():#x})"
        )
    if state == "timeout":
        raise CheckFailed(
            f"{len(requests)} correct request(s) not completed within "
            f"{dut.options.io_timeout:g} s (used.idx {await ring.used_idx()}, "
            f"status {await dut.status():#x})"
        )
    dut.note_latency(asyncio.get_running_loop().time() - ring.notified_at)
    if (more := await ring.pending_used()) > len(requests):
        raise CheckFailed(f"used.idx moved by {more} for {len(requests)} request(s)")
    outstanding = {r.head: r for r in requests}
    lengths = {}
    for k in range(len(requests)):
        head, length = await ring.used_elem(ring.last_used + k)
        req = outstanding.pop(head, None)
        if req is None:
            raise CheckFailed(f"used element id {head} is not an outstanding head (2.7.8)")
        if length > req.writable_len:
            raise CheckFailed(
                f"used.len {length} for head {head} exceeds its {req.writable_len} "
                "device-writable bytes (2.7.8.2)"
            )
        await _check_payload(dut, req, length)
        lengths[head] = length
    ring.last_used = (ring.last_used + len(requests)) & 0xFFFF
    return lengths


async def _check_payload(dut: Dut, req: Request, length: int) -> None:
    if req.status is not None:
        status = (await dut.memory.read(req.status, 1))[0]
        if status != req.want_status:
            raise CheckFailed(
                f"virtio-blk status byte {status:#x}, expected {req.want_status} "
                f"({BlkStatus(req.want_status).name}) (5.2.6)"
            )
    elif dut.version == 2 and length == 0:
        raise CheckFailed(
            "virtio-rng used.len 0: the device MUST place at least one byte (5.4.6.2)"
        )


async def io_round(dut: Dut, ring: Ring, count: int = 1, **blk: Any) -> dict[int, int]:
    """``count`` correct requests on a live ring, published together, one notify."""
    per = 1 if dut.device_id == DeviceId.ENTROPY else 3
    first = ring.avail_idx * per
    reqs = [await request(dut, ring, (first + k * per) % ring.num, **blk) for k in range(count)]
    await ring.publish(*(r.head for r in reqs))
    await ring.notify()
    return await finish(dut, ring, reqs)


async def health_round(dut: Dut) -> None:
    """The correct flow from reset; for blk/rng also one request. Then reset again."""
    if dut.io:
        ring = await dut.up()
        await io_round(dut, ring)
    else:
        await dut.begin()
        for queue in range(dut.num_queues):
            await (await dut.ring(queue)).program()
        await dut.driver_ok()
    await dut.reset()
    damage = await dut.audit()
    if damage:
        raise CheckFailed(f"the device wrote {', '.join(damage)}")


async def verify_reset(dut: Dut) -> None:
    """After a reset: Status 0, InterruptStatus 0, every queue out of use (§4.2.2.1, §4.2.4)."""
    await dut.reset()
    if isr := await dut.interrupt_status():
        raise CheckFailed(f"InterruptStatus reads {isr:#x} after a reset (4.2.2.1: MUST clear)")
    for queue in range(dut.num_queues):
        if value := await dut.queue_in_use(queue):
            reg = "QueueReady" if dut.version == 2 else "QueuePFN"
            raise CheckFailed(
                f"{reg} of queue {queue} reads {value:#x} after a reset "
                "(4.2.2.1 / 4.2.4: the device MUST clear it)"
            )
    if dut.num_queues:
        await dut.select(0)


# -- the suite -----------------------------------------------------------------------------------

Reopen = Callable[[], Awaitable[Target]]


class _Link:
    """Whether the connection is alive, and how to get a new one."""

    def __init__(self, target: Target, reopen: Reopen | None) -> None:
        self.target = target
        self.reopen = reopen
        self.lost_in = ""  # the check during which the link died, if it could not be reopened

    async def replace(self, during: str) -> bool:
        if self.reopen is not None:
            try:
                self.target = await self.reopen()
                return True
            except (OSError, ConnectionError) as exc:
                log.error("could not reconnect after the link died in %s: %s", during, exc)
        self.lost_in = during
        return False


async def run_suite(
    target: Target,
    *,
    checks: Sequence[Check] | None = None,
    devices: Sequence[int] | None = None,
    options: Options | None = None,
    reopen: Reopen | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run ``checks`` (default: all) on each device of ``target`` (or the ``devices`` indices).

    ``reopen`` makes a fresh target when the connection dies (the death is a FAIL of the check
    that caused it); without it the remaining checks FAIL as not run.
    """
    options = options or Options()
    if checks is None:
        from viowire.conform.checks import CHECKS

        checks = CHECKS
    chosen = selected(checks, options.only)
    link = _Link(target, reopen)
    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    for index in range(len(target.devices)):
        if devices is None or index in devices:
            await _run_device(link, index, chosen, options, emit)
    return results


async def _run_device(
    link: _Link,
    index: int,
    checks: Sequence[Check],
    options: Options,
    emit: Callable[[Result], None],
) -> None:
    dut = Dut(link.target, link.target.devices[index], index, options)
    not_run = await _identify(dut)
    dut.install_irq()
    strikes = 0
    try:
        for check in checks:
            if link.lost_in:
                not_run = f"not run: the connection died during {link.lost_in}"
            if not_run:
                emit(_result(check, dut, Outcome(Verdict.FAIL, not_run)))
                continue
            result, fate = await _run_check(dut, check)
            emit(result)
            if fate == "link":
                if not await link.replace(f"{check.id} on {dut.label}"):
                    continue
                dut = Dut(link.target, link.target.devices[index], index, options)
                not_run = await _identify(dut)
                dut.install_irq()
            strikes = strikes + 1 if fate == "hang" else 0
            if strikes >= 2:
                not_run = f"not run: the device stopped answering during {check.id}"
    finally:
        if not link.lost_in:
            dut.remove_irq()


async def _identify(dut: Dut) -> str:
    """Identify the device; a message if that already fails (every check then FAILs)."""
    try:
        async with asyncio.timeout(dut.options.check_timeout):
            await dut.identify()
    except (CheckFailed, Unresponsive, TimeoutError, ConnectionError) as exc:
        return f"not run: identifying the device failed: {exc or type(exc).__name__}"
    return ""


def _result(check: Check, dut: Dut, outcome: Outcome, duration: float = 0.0) -> Result:
    return Result(
        check.id,
        check.section,
        check.title,
        dut.label,
        outcome.verdict,
        outcome.detail,
        check.expected(dut.version),
        duration,
    )


async def _run_check(dut: Dut, check: Check) -> tuple[Result, str]:
    """Run one check with its preparation and recovery; the result and what happened to the
    device: ``"ok"``, ``"hang"`` (stopped answering) or ``"link"`` (connection died)."""
    reason = check.skip_reason(dut)
    if reason is not None:
        return _result(check, dut, skipped(reason)), "ok"
    loop = asyncio.get_running_loop()
    start = loop.time()
    outcome, fate = await _guarded(dut, check, _prepared_run(dut, check))
    if fate == "ok" and not dut.unusable:  # a placeholder slot is never touched (4.2.3.1.1)
        outcome, fate = await _recover(dut, check, outcome)
    if outcome.verdict not in (Verdict.FAIL, Verdict.SKIP):
        expected = check.expected(dut.version)
        if outcome.verdict not in expected:
            wanted = " or ".join(expected)
            outcome = Outcome(
                Verdict.FAIL, f"observed {outcome.verdict}, expected {wanted}: {outcome.detail}"
            )
    return _result(check, dut, outcome, loop.time() - start), fate


async def _prepared_run(dut: Dut, check: Check) -> Outcome:
    dut.forget_guards()
    dut.irq_events.clear()
    if not dut.unusable:
        try:
            await dut.reset()
        except CheckFailed as exc:
            raise CheckFailed(f"before the check: {exc}") from None
    return await check.run(dut)


async def _guarded(dut: Dut, check: Check, work: Awaitable[Outcome]) -> tuple[Outcome, str]:
    """Await ``work`` bounded by the check timeout; map every way it can go wrong to FAIL."""
    try:
        async with asyncio.timeout(dut.options.check_timeout):
            return await work, "ok"
    except Unresponsive as exc:
        return Outcome(Verdict.FAIL, f"device hangs: {exc}"), "hang"
    except CheckFailed as exc:
        return Outcome(Verdict.FAIL, str(exc)), "ok"
    except TimeoutError:
        return Outcome(
            Verdict.FAIL,
            f"did not finish within {dut.options.check_timeout:g} s "
            "(the device stopped making progress)",
        ), "hang"
    except ConnectionError as exc:
        return Outcome(Verdict.FAIL, f"the connection died: {exc}"), "link"
    except Exception as exc:  # the suite's own bug must not hide the other results
        log.exception("%s on %s: check error", check.id, dut.label)
        return Outcome(Verdict.FAIL, f"check error {type(exc).__name__}: {exc}"), "ok"


async def _recover(dut: Dut, check: Check, outcome: Outcome) -> tuple[Outcome, str]:
    """Reset and verify it took, audit guest memory, and after a violation prove that a
    correct I/O round works. Any failure here turns the outcome into FAIL."""

    async def recovery() -> Outcome:
        try:
            await verify_reset(dut)
        except CheckFailed as exc:
            raise CheckFailed(f"{outcome.detail}; then the device did not recover: {exc}") from None
        damage = await dut.audit()
        dut.free_all()  # the device is reset: it no longer owns any of it
        dut.forget_guards()
        if damage:
            raise CheckFailed(
                f"the device wrote guest memory it must not touch: {', '.join(damage)} "
                f"(2.7.5.1; {outcome.verdict}: {outcome.detail})"
            )
        if check.violation and outcome.verdict not in (Verdict.FAIL, Verdict.SKIP):
            try:
                await health_round(dut)
            except CheckFailed as exc:
                raise CheckFailed(
                    f"{outcome.verdict}: {outcome.detail}; but after a reset a correct round "
                    f"failed: {exc}"
                ) from None
            dut.free_all()
        return outcome

    return await _guarded(dut, check, recovery())


def summary(results: Sequence[Result]) -> dict[Verdict, int]:
    counts = dict.fromkeys(Verdict, 0)
    for result in results:
        counts[result.verdict] += 1
    return counts


def failed(results: Sequence[Result]) -> bool:
    return any(r.verdict == Verdict.FAIL for r in results)


__all__ = [
    "Check",
    "CheckFailed",
    "Dut",
    "Options",
    "Outcome",
    "Request",
    "Result",
    "Ring",
    "Target",
    "Unresponsive",
    "Verdict",
]
