"""The virtio-mmio transport and the blk/rng drivers against an in-process fake register file.

:class:`FakeMmio` is the RegisterBus: a small virtio-mmio device (v1 or v2) that logs every access,
can be told to misbehave (bad magic, refused features, sticky QueueReady, stuck reset, churning
config), and serves its queues with a device model on the same guest memory.
"""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Callable

import pytest
from test_client_vring import DeviceRing, FakeRAM, settle, wait

from viowire.client.drivers.base import VirtioDriver
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.client.errors import (
    BadQueueSizeError,
    ConfigUnstableError,
    DeviceNeedsResetError,
    FeaturesRefusedError,
    MissingVersion1Error,
    NoDeviceError,
    PfnTooLargeError,
    QueueInUseError,
    QueueMemoryError,
    QueueUnavailableError,
    ReadOnlyError,
    RequestError,
    ResetTimeoutError,
    UnsupportedVersionError,
    WrongDeviceTypeError,
    WrongMagicError,
)
from viowire.client.mmio import VirtioMmioDevice
from viowire.virtio.blk import BlkFeature, BlkStatus, BlkType
from viowire.virtio.constants import (
    MAGIC_VALUE,
    DeviceId,
    Feature,
    Interrupt,
    Reg,
    Status,
)
from viowire.virtio.ring import RingLayout

BASE = 0x1000_1000
IRQ = 7
NAME = "virtio-mmio@0x10001000"
V1 = 1 << Feature.VERSION_1
RING = 1 << Feature.RING_INDIRECT_DESC | 1 << Feature.RING_EVENT_IDX


class FakeQueue:
    def __init__(self, num_max: int) -> None:
        self.num_max = num_max
        self.reset()

    def reset(self) -> None:
        self.num = self.ready = self.pfn = self.align = 0
        self.addr = {Reg.QUEUE_DESC_LOW: 0, Reg.QUEUE_AVAIL_LOW: 0, Reg.QUEUE_USED_LOW: 0}
        self.ring: DeviceRing | None = None


class FakeMmio:
    """A virtio-mmio device window and the bus to it; ``serve(queue, chain) -> used len``."""

    def __init__(
        self,
        ram: FakeRAM,
        *,
        version: int = 2,
        device_id: int = DeviceId.ENTROPY,
        features: int | None = None,
        queues: tuple[int, ...] = (8,),
        config: bytes = b"",
        magic: int = MAGIC_VALUE,
    ) -> None:
        self.ram, self.version, self.device_id, self.magic = ram, version, device_id, magic
        self.features = (V1 if version == 2 else 0) if features is None else features
        self.queues = [FakeQueue(n) for n in queues]
        self.config = bytearray(config.ljust(0x40, b"\0"))
        self.generation = self.status = self.isr = self.page_size = 0
        self.queue_sel = self.dev_sel = self.drv_sel = 0
        self.driver_features = [0, 0]
        self.log: list[tuple[str, int, int]] = []
        self.posted: dict[int, list[bool]] = {}
        self.handler: Callable[[bool], None] | None = None
        self.level = False
        self.serve: Callable[[int, list], int] | None = None
        self.refuse_features = False
        self.sticky_ready = False
        self.stuck_status: list[int] = []  # Status values read after a reset before it reads 0
        self.config_churn = 0  # config reads during which the config changes
        self.on_ack: Callable[[int], None] | None = None

    # -- the RegisterBus --
    async def mmio_read(self, addr: int, width: int) -> int:
        off = addr - BASE
        value = self.read_config(off - 0x100, width) if off >= 0x100 else self.read_reg(off)
        self.log.append(("r", off, value))
        return value

    async def mmio_write(self, addr: int, width: int, value: int, *, posted: bool = True) -> None:
        off = addr - BASE
        self.log.append(("w", off, value))
        self.posted.setdefault(off, []).append(posted)
        if off >= 0x100:
            self.config[off - 0x100 : off - 0x100 + width] = value.to_bytes(width, "little")
        else:
            self.write_reg(off, value)

    def set_irq_handler(self, irq: int, handler: Callable[[bool], None] | None) -> None:
        assert irq == IRQ
        self.handler = handler

    # -- registers --
    @property
    def q(self) -> FakeQueue | None:
        return self.queues[self.queue_sel] if self.queue_sel < len(self.queues) else None

    def read_reg(self, off: int) -> int:
        q = self.q
        values = {
            Reg.MAGIC_VALUE: self.magic,
            Reg.VERSION: self.version,
            Reg.DEVICE_ID: self.device_id,
            Reg.VENDOR_ID: 0x554D4551,
            Reg.DEVICE_FEATURES: self.features >> 32 * self.dev_sel & 0xFFFF_FFFF,
            Reg.QUEUE_NUM_MAX: q.num_max if q else 0,
            Reg.QUEUE_READY: q.ready if q else 0,
            Reg.QUEUE_PFN: q.pfn if q else 0,
            Reg.INTERRUPT_STATUS: self.isr,
            Reg.STATUS: self.stuck_status.pop(0) if self.stuck_status else self.status,
            Reg.CONFIG_GENERATION: self.generation,
        }
        return values.get(off, 0)

    def write_reg(self, off: int, value: int) -> None:
        q = self.q
        if off == Reg.STATUS:
            self.write_status(value)
        elif off == Reg.DEVICE_FEATURES_SEL:
            self.dev_sel = value
        elif off == Reg.DRIVER_FEATURES_SEL:
            self.drv_sel = value
        elif off == Reg.DRIVER_FEATURES and self.drv_sel < 2:
            self.driver_features[self.drv_sel] = value
        elif off == Reg.GUEST_PAGE_SIZE:
            self.page_size = value
        elif off == Reg.QUEUE_SEL:
            self.queue_sel = value
        elif off == Reg.QUEUE_NOTIFY:
            asyncio.get_running_loop().call_soon(self.run_queue, value)
        elif off == Reg.INTERRUPT_ACK:
            self.isr &= ~value
            if self.on_ack:
                self.on_ack(value)
            self.update_line()
        elif q is not None:
            self.write_queue(q, off, value)

    def write_queue(self, q: FakeQueue, off: int, value: int) -> None:
        if off == Reg.QUEUE_NUM:
            q.num = value
        elif off == Reg.QUEUE_ALIGN:
            q.align = value
        elif off == Reg.QUEUE_PFN:
            q.pfn = value
            a = RingLayout.legacy(value * self.page_size, q.num, q.align)
            q.ring = DeviceRing(self.ram.memory, q.num, a.desc, a.avail, a.used) if value else None
        elif off == Reg.QUEUE_READY:
            q.ready = 1 if self.sticky_ready else value
            a = [q.addr[r] for r in q.addr]
            q.ring = DeviceRing(self.ram.memory, q.num, *a) if value else None
        elif off in q.addr:
            q.addr[off] = q.addr[off] & ~0xFFFF_FFFF | value
        elif off - 4 in q.addr:
            q.addr[off - 4] = q.addr[off - 4] & 0xFFFF_FFFF | value << 32

    def write_status(self, value: int) -> None:
        if value == 0:
            self.status = self.isr = 0
            for q in self.queues:
                q.reset()
            self.update_line()
            return
        if self.refuse_features and value & Status.FEATURES_OK:
            value &= ~Status.FEATURES_OK
        self.status = value

    def read_config(self, off: int, width: int) -> int:
        if self.config_churn:
            self.config_churn -= 1
            self.generation += 1
            self.config[0] = (self.config[0] + 1) & 0xFF
        return int.from_bytes(self.config[off : off + width], "little")

    # -- the device side --
    def accesses(self, kind: str = "") -> list[tuple[str, int, int]]:
        return [e for e in self.log if not kind or e[0] == kind]

    def regs(self) -> list[tuple[str, str]]:
        return [(op, Reg(off).name) for op, off, _ in self.log if off < 0x100]

    def raise_interrupt(self, bits: int) -> None:
        self.isr |= bits
        self.update_line()

    def update_line(self) -> None:
        level = self.isr != 0
        if level != self.level:
            self.level = level
            if self.handler is not None:
                asyncio.get_running_loop().call_soon(self.handler, level)

    def run_queue(self, index: int) -> None:
        ring = self.queues[index].ring if index < len(self.queues) else None
        if ring is None or self.serve is None:
            return
        served = 0
        while (item := ring.pop()) is not None:
            head, chain = item
            ring.push(head, self.serve(index, chain))
            served += 1
        ring.set_avail_event(ring.last_avail)  # "kick me for the next one", as QEMU does
        if served:
            self.raise_interrupt(Interrupt.VRING)


def make(version: int = 2, **kwargs: object) -> tuple[FakeMmio, VirtioMmioDevice, FakeRAM]:
    ram = kwargs.pop("ram", None) or FakeRAM()
    fake = FakeMmio(ram, version=version, **kwargs)
    return fake, VirtioMmioDevice(fake, BASE, IRQ, ram.memory, ram), ram


def names(error: BaseException, register: str) -> None:
    """Every error names the device and the register."""
    assert NAME in str(error) and register in str(error), str(error)


# -- probe --------------------------------------------------------------------------------------


async def test_probe_modern_identifies_the_device():
    fake, dev, _ = make(device_id=DeviceId.BLOCK)
    await dev.probe()
    assert (dev.version, dev.device_id, dev.vendor_id) == (2, 2, 0x554D4551)
    assert fake.regs() == [
        ("r", "MAGIC_VALUE"),
        ("r", "VERSION"),
        ("r", "DEVICE_ID"),
        ("r", "VENDOR_ID"),
    ]


async def test_probe_legacy_writes_guest_page_size():
    fake, dev, _ = make(1)
    await dev.probe()
    assert dev.legacy and fake.page_size == 4096


async def test_wrong_magic():
    _, dev, _ = make(magic=0x12345678)
    with pytest.raises(WrongMagicError) as info:
        await dev.probe()
    names(info.value, "MagicValue (0x000)")
    assert "0x12345678" in str(info.value) and info.value.value == 0x12345678


async def test_unsupported_version():
    _, dev, _ = make(3)
    with pytest.raises(UnsupportedVersionError) as info:
        await dev.probe()
    names(info.value, "Version (0x004)")
    assert "is 3" in str(info.value)


async def test_device_id_0_is_skipped_touching_nothing_else():
    fake, dev, _ = make(device_id=0)
    with pytest.raises(NoDeviceError) as info:
        await EntropyDriver.attach(dev)
    names(info.value, "DeviceID (0x008)")
    assert fake.regs() == [("r", "MAGIC_VALUE"), ("r", "VERSION"), ("r", "DEVICE_ID")]


async def test_wrong_device_type():
    fake, dev, _ = make(device_id=DeviceId.BLOCK)
    with pytest.raises(WrongDeviceTypeError, match=r"is 2 \(virtio-blk\).*drives 4") as info:
        await EntropyDriver.attach(dev)
    names(info.value, "DeviceID (0x008)")
    assert fake.status == 0


# -- status -------------------------------------------------------------------------------------


async def test_reset_polls_status_until_it_reads_zero():
    fake, dev, _ = make()
    fake.status = Status.DRIVER_OK
    fake.stuck_status = [1, 1]
    await wait(dev.reset())
    assert fake.regs() == [("w", "STATUS")] + [("r", "STATUS")] * 3


async def test_reset_gives_up_after_its_timeout():
    fake, dev, _ = make()
    fake.stuck_status = [3] * 10_000
    dev.reset_timeout = 0.05
    with pytest.raises(ResetTimeoutError) as info:
        await wait(dev.reset())
    names(info.value, "Status (0x070)")


async def test_add_status_reads_before_it_writes():
    fake, dev, _ = make()
    await dev.add_status(Status.ACKNOWLEDGE)
    await dev.add_status(Status.DRIVER)
    assert fake.status == 3 and fake.regs() == [("r", "STATUS"), ("w", "STATUS")] * 2
    with pytest.raises(ValueError, match="reset"):
        await dev.set_status(0)


# -- features -----------------------------------------------------------------------------------


async def test_modern_features_are_64_bits_high_word_first():
    fake, dev, _ = make(features=V1 | 0x5)
    await dev.probe()
    fake.log.clear()
    assert await dev.get_features() == V1 | 0x5
    await dev.finalize_features(V1 | 0x1)
    assert fake.log == [
        ("w", Reg.DEVICE_FEATURES_SEL, 1),
        ("r", Reg.DEVICE_FEATURES, 1),
        ("w", Reg.DEVICE_FEATURES_SEL, 0),
        ("r", Reg.DEVICE_FEATURES, 5),
        ("w", Reg.DRIVER_FEATURES_SEL, 1),
        ("w", Reg.DRIVER_FEATURES, 1),
        ("w", Reg.DRIVER_FEATURES_SEL, 0),
        ("w", Reg.DRIVER_FEATURES, 1),
    ]
    assert fake.driver_features == [1, 1]


async def test_legacy_features_are_word_0_only():
    fake, dev, _ = make(1, features=0x1 | 1 << 40)
    await dev.probe()
    fake.log.clear()
    assert await dev.get_features() == 0x1
    await dev.finalize_features(0x1)
    await dev.features_ok()  # no FEATURES_OK for legacy
    assert all(value == 0 for op, off, value in fake.log if off in (0x14, 0x24))
    assert fake.status == 0


async def test_version_2_without_version_1_is_refused():
    fake, dev, _ = make(features=0)
    with pytest.raises(MissingVersion1Error) as info:
        await EntropyDriver.attach(dev)
    names(info.value, "DeviceFeatures (0x010)")
    assert fake.status & Status.FAILED


async def test_features_ok_refused():
    fake, dev, _ = make()
    fake.refuse_features = True
    with pytest.raises(FeaturesRefusedError, match="FEATURES_OK reads back clear") as info:
        await EntropyDriver.attach(dev)
    names(info.value, "Status (0x070)")
    assert fake.status == Status.ACKNOWLEDGE | Status.DRIVER | Status.FAILED


async def test_negotiation_keeps_only_known_bits():
    fake, dev, _ = make(
        device_id=DeviceId.BLOCK, features=V1 | RING | 1 << 38 | 0xFFFF, config=struct.pack("<Q", 8)
    )
    disk = await BlockDriver.attach(dev)
    expected = V1 | RING | BlockDriver.feature_table
    assert disk.negotiated_features == expected
    assert fake.driver_features == [expected & 0xFFFF_FFFF, expected >> 32]


# -- configuration space ------------------------------------------------------------------------


async def test_modern_config_widths_and_generation():
    fake, dev, _ = make(config=bytes(range(1, 0x21)))
    await dev.probe()
    fake.log.clear()
    assert await dev.config_read(0, 8) == bytes(range(1, 9))
    assert [(off, v) for _, off, v in fake.log] == [
        (0xFC, 0),
        (0x100, 0x04030201),
        (0x104, 0x08070605),
        (0xFC, 0),
    ]
    fake.log.clear()
    assert await dev.config_read_int(0x10, 2) == 0x1211
    assert await dev.config_read_int(0x13, 1) == 0x14
    assert await dev.config_read(0x1, 3) == bytes([2, 3, 4])
    config_reads = [off for _, off, _ in fake.log if off >= 0x100]
    assert config_reads == [0x110, 0x113, 0x101, 0x102, 0x103]


async def test_config_write_widths():
    fake, dev, _ = make()
    await dev.probe()
    await dev.config_write(0x8, (0x1122334455667788).to_bytes(8, "little"))
    assert [(off, v) for _, off, v in fake.accesses("w")] == [
        (0x108, 0x55667788),
        (0x10C, 0x11223344),
    ]
    with pytest.raises(ValueError, match="outside"):
        await dev.config_write(0xFF, b"ab")


async def test_config_read_retries_on_generation_change():
    fake, dev, _ = make(config=b"\x01")
    await dev.probe()
    fake.config_churn = 3
    assert await dev.config_read(0, 1) == b"\x04"  # read 4 times: 3 changes, then stable
    fake.config_churn = 1000
    with pytest.raises(ConfigUnstableError) as info:
        await dev.config_read(0, 4)
    names(info.value, "ConfigGeneration (0x0fc)")


async def test_legacy_config_bytewise_until_two_reads_agree():
    fake, dev, _ = make(1, config=b"\x01\x02")
    await dev.probe()
    fake.log.clear()
    assert await dev.config_read(0, 2) == b"\x01\x02"
    assert [(off, v) for _, off, v in fake.log] == [(0x100, 1), (0x101, 2)] * 2
    fake.config_churn = 1000
    with pytest.raises(ConfigUnstableError) as info:
        await dev.config_read(0, 2)
    names(info.value, "Config (0x100)")


# -- queues -------------------------------------------------------------------------------------


async def ready_device(version: int = 2, **kwargs) -> tuple[FakeMmio, VirtioMmioDevice, FakeRAM]:
    fake, dev, ram = make(version, **kwargs)
    await dev.probe()
    await dev.finalize_features(V1 if version == 2 else 0)
    fake.log.clear()
    return fake, dev, ram


async def test_setup_vq_modern_programs_three_addresses_then_ready():
    fake, dev, _ = await ready_device(queues=(256,))
    vq = await dev.setup_vq(0)
    a = vq.addresses
    q = fake.queues[0]
    assert (q.num, q.ready) == (256, 1)
    assert list(q.addr.values()) == [a.desc, a.avail, a.used]
    assert fake.regs() == [
        ("w", "QUEUE_SEL"),
        ("r", "QUEUE_READY"),
        ("r", "QUEUE_NUM_MAX"),
        ("w", "QUEUE_NUM"),
        ("w", "QUEUE_DESC_LOW"),
        ("w", "QUEUE_DESC_HIGH"),
        ("w", "QUEUE_AVAIL_LOW"),
        ("w", "QUEUE_AVAIL_HIGH"),
        ("w", "QUEUE_USED_LOW"),
        ("w", "QUEUE_USED_HIGH"),
        ("w", "QUEUE_READY"),
    ]


async def test_setup_vq_legacy_writes_align_and_pfn():
    fake, dev, _ = await ready_device(1, queues=(64,))
    vq = await dev.setup_vq(0, 16)
    q = fake.queues[0]
    assert vq.layout == "legacy" and (q.num, q.align) == (16, 4096)
    assert q.pfn == vq.addresses.desc >> 12 and vq.addresses.used - vq.addresses.desc == 4096


@pytest.mark.parametrize(
    ("version", "register"), [(1, "QueuePFN (0x040)"), (2, "QueueReady (0x044)")]
)
async def test_queue_already_in_use(version, register):
    fake, dev, _ = await ready_device(version)
    fake.queues[0].ready = fake.queues[0].pfn = 1
    with pytest.raises(QueueInUseError) as info:
        await dev.setup_vq(0)
    names(info.value, register)
    assert "virtqueue 0" in str(info.value)


async def test_queue_num_max_0_is_unavailable():
    _, dev, ram = await ready_device(queues=(0,))
    with pytest.raises(QueueUnavailableError) as info:
        await dev.setup_vq(0)
    names(info.value, "QueueNumMax (0x034)")
    assert not ram.blocks


async def test_queue_size_not_a_power_of_two():
    fake, dev, _ = await ready_device(queues=(100,))
    with pytest.raises(BadQueueSizeError) as info:
        await dev.setup_vq(0)
    names(info.value, "QueueNumMax (0x034)")
    with pytest.raises(BadQueueSizeError):
        fake.queues[0].num_max = 128
        await dev.setup_vq(0, 6)


async def test_ring_shrinks_until_it_fits():
    fake, dev, ram = await ready_device(queues=(1024,))
    ram.limit = 16 * 128  # a 128-entry descriptor table is the largest block that fits
    vq = await dev.setup_vq(0)
    assert vq.num == 128 and fake.queues[0].num == 128


async def test_no_ring_fits_at_all():
    fake, dev, ram = await ready_device(1, queues=(8,))
    ram.limit = 100
    with pytest.raises(QueueMemoryError, match="even after shrinking from 8") as info:
        await dev.setup_vq(0)
    names(info.value, "virtqueue 0")
    assert isinstance(info.value, MemoryError) and fake.queues[0].pfn == 0


async def test_legacy_ring_above_16_tib_is_refused_and_undone():
    ram = FakeRAM(base=1 << 45)
    fake, dev, _ = await ready_device(1, ram=ram)
    with pytest.raises(PfnTooLargeError) as info:
        await dev.setup_vq(0)
    names(info.value, "QueuePFN (0x040)")
    assert ("w", "QUEUE_PFN") in fake.regs() and fake.queues[0].pfn == 0
    assert not ram.blocks


async def test_del_vq_deactivates_reads_back_and_frees(caplog):
    fake, dev, ram = await ready_device()
    vq = await dev.setup_vq(0)
    fake.log.clear()
    await dev.del_vq(vq)
    assert fake.regs() == [("w", "QUEUE_SEL"), ("w", "QUEUE_READY"), ("r", "QUEUE_READY")]
    assert not ram.blocks and not dev.vqs
    vq = await dev.setup_vq(0)
    fake.sticky_ready = True
    await dev.del_vq(vq)
    assert "QueueReady (0x044) still reads 0x1" in caplog.text and not ram.blocks


async def test_find_vqs_skips_unnamed_without_using_an_index():
    fake, dev, _ = await ready_device(queues=(8, 4))
    vqs = await dev.find_vqs(["rx", None, "tx"])
    assert vqs[1] is None and [vqs[0].index, vqs[2].index] == [0, 1]
    assert vqs[2].num == 4 and vqs[2].name == "tx" and fake.handler is not None
    await dev.del_vqs()
    assert fake.handler is None and all(q.ready == 0 for q in fake.queues)


async def test_find_vqs_undoes_everything_on_failure():
    fake, dev, ram = await ready_device(queues=(8, 0))
    with pytest.raises(QueueUnavailableError, match="virtqueue 1"):
        await dev.find_vqs(["a", "b"])
    assert fake.queues[0].ready == 0 and not ram.blocks and fake.handler is None


# -- interrupts ---------------------------------------------------------------------------------


def rng_serve(fake: FakeMmio, limit: int = 1 << 20) -> None:
    def serve(queue: int, chain: list) -> int:
        [(addr, length, writable)] = chain
        assert writable
        n = min(length, limit)
        fake.ram.memory.write_sync(addr, bytes((addr + i) & 0xFF for i in range(n)))
        return n

    fake.serve = serve


async def test_interrupt_acks_and_waits_before_scanning_rings():
    fake, dev, _ = make()
    rng = await EntropyDriver.attach(dev)
    rng_serve(fake)
    scans = []
    real = rng.vq.interrupt

    async def interrupt() -> bool:
        scans.append(list(fake.log))
        return await real()

    rng.vq.interrupt = interrupt
    fake.log.clear()
    assert len(await wait(rng.read(5))) == 5
    (before,) = scans
    assert [e[:2] for e in before[-2:]] == [("r", Reg.INTERRUPT_STATUS), ("w", Reg.INTERRUPT_ACK)]
    assert fake.posted[Reg.INTERRUPT_ACK] == [False] and fake.posted[Reg.QUEUE_NOTIFY] == [True]


async def test_config_change_reaches_callbacks_and_subscribers():
    fake, dev, _ = make()
    await EntropyDriver.attach(dev)
    seen = []
    dev.on_config_change(lambda d: seen.append(d.config_changes))
    events = dev.interrupts()
    fake.raise_interrupt(Interrupt.CONFIG)
    assert await wait(anext(events)) == Interrupt.CONFIG
    assert seen == [1] and dev.config_changes == 1 and not dev.needs_reset
    events.close()
    with pytest.raises(StopAsyncIteration):
        await wait(anext(events))


async def test_line_still_asserted_after_ack_runs_the_handler_again():
    fake, dev, _ = make()
    await EntropyDriver.attach(dev)
    events = dev.interrupts()

    def config_change_during_ack(bits: int) -> None:
        # The change lands between our InterruptStatus read and the ACK: the line stays up.
        fake.on_ack = None
        fake.isr |= Interrupt.CONFIG

    fake.on_ack = config_change_during_ack
    fake.raise_interrupt(Interrupt.VRING)
    assert [await wait(anext(events)) for _ in range(2)] == [Interrupt.VRING, Interrupt.CONFIG]
    assert dev.config_changes == 1


async def test_device_needs_reset_fails_requests_in_flight():
    fake, dev, _ = make()
    rng = await EntropyDriver.attach(dev)
    task = asyncio.create_task(rng.read(4))  # no serve: it stays in flight
    await settle()
    fake.status |= Status.DEVICE_NEEDS_RESET
    fake.raise_interrupt(Interrupt.CONFIG)
    with pytest.raises(DeviceNeedsResetError) as info:
        await wait(task)
    names(info.value, "Status (0x070)")
    assert dev.needs_reset
    with pytest.raises(DeviceNeedsResetError):
        await wait(rng.read(4))
    await rng.detach()
    assert not dev.needs_reset and fake.status == 0


async def test_a_failing_interrupt_path_fails_requests_instead_of_hanging():
    fake, dev, _ = make()
    rng = await EntropyDriver.attach(dev)
    task = asyncio.create_task(rng.read(4))
    await settle()

    async def dead(addr: int, width: int) -> int:
        raise ConnectionError("connection lost")

    fake.mmio_read = dead
    fake.raise_interrupt(Interrupt.VRING)
    with pytest.raises(ConnectionError):
        await wait(task)


# -- drivers ------------------------------------------------------------------------------------


@pytest.mark.parametrize("version", [1, 2])
async def test_attach_and_detach_walk_the_status_byte(version):
    fake, dev, ram = make(version)
    rng = await EntropyDriver.attach(dev)
    writes = [v for op, off, v in fake.log if (op, off) == ("w", Reg.STATUS)]
    ok = [0x0, 0x1, 0x3, 0xB, 0xF] if version == 2 else [0x0, 0x1, 0x3, 0x7]
    assert writes == ok and rng.status == ok[-1]
    await rng.detach()
    assert fake.status == 0 and fake.handler is None and not ram.blocks


async def test_attach_refuses_a_device_that_needs_reset_before_driver_ok():
    fake, dev, ram = make()
    real = fake.write_reg

    def queue_error(off: int, value: int) -> None:
        real(off, value)
        if off == Reg.QUEUE_READY and value:  # the device rejects the ring: no interrupt yet
            fake.status |= Status.DEVICE_NEEDS_RESET

    fake.write_reg = queue_error
    with pytest.raises(DeviceNeedsResetError) as info:
        await EntropyDriver.attach(dev)
    names(info.value, "Status (0x070)")
    assert not fake.status & Status.DRIVER_OK and fake.status & Status.FAILED
    assert not ram.blocks


async def test_attach_failure_sets_failed_and_deletes_queues():
    fake, dev, ram = make(queues=(0,))
    with pytest.raises(QueueUnavailableError):
        await EntropyDriver.attach(dev)
    assert fake.status & Status.FAILED and not ram.blocks and fake.handler is None


@pytest.mark.parametrize("version", [1, 2])
async def test_rng_reads_exactly_n_bytes_using_used_len(version):
    fake, dev, ram = make(version)
    rng = await EntropyDriver.attach(dev)
    rng_serve(fake, limit=7)
    data = await wait(rng.read(100))
    assert len(data) == 100 and len(ram.blocks) == 3 - 2 * (version == 1)


class FakeDisk:
    """virtio-blk's request handling, enough to check what the driver sends."""

    def __init__(self, fake: FakeMmio, sectors: int, seg_max: int, size_max: int) -> None:
        self.fake, self.seg_max, self.size_max = fake, seg_max, size_max
        self.data = bytearray(sectors * 512)
        self.bad_sectors: set[int] = set()
        self.max_pending = 0
        fake.serve = self.serve
        original = fake.run_queue

        def run_queue(index: int) -> None:
            ring = fake.queues[index].ring
            self.max_pending = max(self.max_pending, ring.pending() if ring else 0)
            original(index)

        fake.run_queue = run_queue

    def serve(self, queue: int, chain: list) -> int:
        mem = self.fake.ram.memory
        (hdr, hlen, w0), *data, (status, slen, w1) = chain
        assert (hlen, w0, slen, w1) == (16, False, 1, True)
        assert len(data) <= self.seg_max and all(n <= self.size_max for _, n, _ in data)
        kind, _, sector = struct.unpack("<IIQ", mem.read_sync(hdr, 16))
        at, result, written = sector * 512, BlkStatus.OK, 1
        for gpa, n, writable in data:
            assert writable == (kind in (BlkType.IN, BlkType.GET_ID))
            if sector in self.bad_sectors:
                result = BlkStatus.IOERR
            elif kind == BlkType.IN:
                mem.write_sync(gpa, bytes(self.data[at : at + n]))
            elif kind == BlkType.OUT:
                self.data[at : at + n] = mem.read_sync(gpa, n)
            elif kind == BlkType.GET_ID:
                mem.write_sync(gpa, b"viowire-disk".ljust(20, b"\0"))
            at += n
            written += n if writable else 0
        if kind not in (BlkType.IN, BlkType.OUT, BlkType.GET_ID, BlkType.FLUSH):
            result = BlkStatus.UNSUPP
        mem.write_sync(status, bytes([result]))
        return written


async def make_disk(version=2, sectors=2048, exclude=0, ro=False, **opts):
    blk_features = 1 << BlkFeature.SEG_MAX | 1 << BlkFeature.SIZE_MAX | 1 << BlkFeature.FLUSH
    blk_features |= (1 << BlkFeature.RO) * ro
    config = struct.pack("<QII", sectors, 8192, 4)
    fake, dev, ram = make(
        version,
        device_id=DeviceId.BLOCK,
        queues=(64,),
        config=config,
        features=(V1 if version == 2 else 0) | RING | blk_features,
    )
    disk_model = FakeDisk(fake, sectors, seg_max=4, size_max=8192)
    disk = await BlockDriver.attach(dev, exclude_features=exclude, **opts)
    return disk, disk_model, ram


@pytest.mark.parametrize("exclude", [0, RING])
@pytest.mark.parametrize("version", [1, 2])
async def test_blk_write_read_round_trip_in_parallel_requests(version, exclude):
    disk, model, ram = await make_disk(version, exclude=exclude)
    limits = (disk.capacity, disk.seg_max, disk.size_max, disk.request_bytes)
    assert limits == (2048, 4, 8192, 32768)
    payload = bytes(i * 7 & 0xFF for i in range(300 * 1024))
    await wait(disk.write(4096, payload))
    assert model.data[4096 : 4096 + len(payload)] == payload
    assert await wait(disk.read(4096, len(payload))) == payload
    assert model.max_pending > 1  # requests were in flight together
    await wait(disk.flush())
    assert await wait(disk.get_id()) == "viowire-disk"
    await disk.detach()
    assert not ram.blocks


async def test_blk_errors_name_the_sector_and_request():
    disk, model, _ = await make_disk()
    model.bad_sectors.add(64)
    with pytest.raises(RequestError, match=r"IN request at sector 64 .* status IOERR") as info:
        await wait(disk.read(64 * 512, 512))
    assert NAME in str(info.value)
    with pytest.raises(ValueError, match="multiples"):
        await disk.read(100, 512)
    with pytest.raises(ValueError, match="beyond the end"):
        await disk.write(2048 * 512, b"\0" * 512)
    with pytest.raises(RequestError, match=r"WRITE_ZEROES .* UNSUPP"):
        await wait(disk._transfer(BlkType.WRITE_ZEROES, 0))


async def test_blk_read_only_refuses_writes():
    disk, _, _ = await make_disk(ro=True)
    with pytest.raises(ReadOnlyError, match="read-only"):
        await disk.write(0, b"\0" * 512)


async def test_blk_capacity_follows_config_changes():
    disk, model, _ = await make_disk()
    fake = model.fake
    fake.config[0:8] = struct.pack("<Q", 4096)
    fake.generation += 1
    events = disk.dev.interrupts()
    fake.raise_interrupt(Interrupt.CONFIG)
    await wait(anext(events))
    assert disk.capacity == 4096


async def test_driver_base_refuses_a_device_it_does_not_drive():
    class NullDriver(VirtioDriver):
        device_id = 99

    _, dev, _ = make()
    with pytest.raises(WrongDeviceTypeError):
        await NullDriver.attach(dev)


async def test_abort_fails_what_is_in_flight_and_what_comes_later():
    _, dev, _ = make()
    rng = await EntropyDriver.attach(dev)
    task = asyncio.create_task(rng.read(4))
    await settle()
    await dev.abort(ConnectionResetError("server went away"))
    with pytest.raises(ConnectionResetError):
        await wait(task)
    with pytest.raises(ConnectionResetError):
        await wait(rng.read(4))
