"""The virtio-mmio register file, both versions (reference §1.3, §2.4, §2.5, §8)."""

from __future__ import annotations

import logging

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from ringbuilder import GuestRam, MmioDriver, RingBuilder, make_device

from viowire.device import Device
from viowire.server.devices import BlockBackend, RngBackend
from viowire.server.mmio import MmioDevice
from viowire.virtio.blk import BlkFeature
from viowire.virtio.constants import (
    MAGIC_VALUE,
    VENDOR_ID_VIOWIRE,
    DeviceId,
    Feature,
    Interrupt,
    Reg,
    Status,
)

VERSION_1 = 1 << Feature.VERSION_1
EVENT_IDX = 1 << Feature.RING_EVENT_IDX
INDIRECT = 1 << Feature.RING_INDIRECT_DESC
RING_RESET = 1 << Feature.RING_RESET
ANY_LAYOUT = 1 << Feature.ANY_LAYOUT


class TwoQueues(Device):
    device_id = 42
    num_queues = 2
    queue_num_max = 64

    def device_features(self, version: int) -> int:
        return 1 << 3

    async def handle(self, queue, chain, memory) -> int:
        return 0


def device(version: int = 2, backend: Device | None = None) -> tuple[MmioDevice, MmioDriver]:
    dev = make_device(backend or TwoQueues(), version)
    return dev, MmioDriver(dev)


def guest_errors(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


# -- identification and features ----------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_identification_registers(version):
    _dev, drv = device(version, RngBackend())
    assert drv.read(Reg.MAGIC_VALUE) == MAGIC_VALUE == int.from_bytes(b"virt", "little")
    assert drv.read(Reg.VERSION) == version
    assert drv.read(Reg.DEVICE_ID) == DeviceId.ENTROPY
    assert drv.read(Reg.VENDOR_ID) == VENDOR_ID_VIOWIRE


def test_modern_feature_words():
    _dev, drv = device(2)
    assert drv.device_features() == (1 << 3) | INDIRECT | EVENT_IDX | VERSION_1 | RING_RESET
    for sel in (2, 3, 0xFFFF_FFFF):
        drv.write(Reg.DEVICE_FEATURES_SEL, sel)
        assert drv.read(Reg.DEVICE_FEATURES) == 0


def test_legacy_feature_words():
    _dev, drv = device(1)
    drv.write(Reg.DEVICE_FEATURES_SEL, 0)
    assert drv.read(Reg.DEVICE_FEATURES) == (1 << 3) | INDIRECT | EVENT_IDX | ANY_LAYOUT
    drv.write(Reg.DEVICE_FEATURES_SEL, 1)
    assert drv.read(Reg.DEVICE_FEATURES) == 0  # never VERSION_1 on a legacy device


def test_features_ok_accepted_and_frozen(caplog):
    dev, drv = device(2)
    accepted = drv.negotiate(drop=EVENT_IDX)
    assert dev.status == Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK
    assert dev.negotiated_features == accepted
    drv.write(Reg.DRIVER_FEATURES_SEL, 0)
    drv.write(Reg.DRIVER_FEATURES, 0xFFFF_FFFF)
    assert dev.driver_features == accepted
    assert "after FEATURES_OK" in caplog.text


@pytest.mark.parametrize(
    "features, reason",
    [(VERSION_1 | (1 << 7), "not offered"), (INDIRECT, "VERSION_1"), (1 << 41, "not offered")],
)
def test_features_ok_refused(features, reason, caplog):
    dev, drv = device(2)
    drv.write(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
    drv.write_features(features)
    status = drv.add_status(Status.FEATURES_OK)
    assert status == Status.ACKNOWLEDGE | Status.DRIVER  # the rest of the write still applied
    assert dev.negotiated_features == 0
    assert reason in caplog.text
    # the driver may try again with a valid subset
    drv.write_features(VERSION_1)
    assert drv.add_status(Status.FEATURES_OK) & Status.FEATURES_OK


def test_driver_features_above_word_1_ignored():
    dev, drv = device(2)
    drv.write(Reg.DRIVER_FEATURES_SEL, 2)
    drv.write(Reg.DRIVER_FEATURES, 0xFFFF_FFFF)
    assert dev.driver_features == 0


def test_legacy_features_without_features_ok(caplog):
    dev, drv = device(1)
    drv.write(Reg.DRIVER_FEATURES_SEL, 1)
    drv.write(Reg.DRIVER_FEATURES, 0x1234)  # word 1 of a legacy device: silently ignored
    assert guest_errors(caplog) == []
    drv.write(Reg.DRIVER_FEATURES_SEL, 0)
    drv.write(Reg.DRIVER_FEATURES, INDIRECT | (1 << 7))
    assert dev.driver_features == INDIRECT == dev.negotiated_features  # unoffered bit dropped
    drv.add_status(Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
    assert dev.status & Status.FEATURES_OK  # legacy: no check, stored verbatim


# -- access rules -------------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
@pytest.mark.parametrize(
    "offset, width", [(0x000, 1), (0x000, 2), (0x000, 8), (0x002, 4), (0x071, 4)]
)
def test_control_registers_need_aligned_32_bit_access(version, offset, width, caplog):
    dev, _drv = device(version)
    assert dev.read(offset, width) == 0
    dev.write(Reg.STATUS + offset % 4, width, 0x3)
    assert dev.status == 0
    assert len(guest_errors(caplog)) == 2 and "test-dev" in caplog.text


V2_RO = [
    Reg.MAGIC_VALUE,
    Reg.VERSION,
    Reg.DEVICE_ID,
    Reg.VENDOR_ID,
    Reg.DEVICE_FEATURES,
    Reg.QUEUE_NUM_MAX,
    Reg.INTERRUPT_STATUS,
    Reg.SHM_LEN_LOW,
    Reg.SHM_LEN_HIGH,
    Reg.SHM_BASE_LOW,
    Reg.SHM_BASE_HIGH,
    Reg.CONFIG_GENERATION,
]
V2_WO = [
    Reg.DEVICE_FEATURES_SEL,
    Reg.DRIVER_FEATURES,
    Reg.DRIVER_FEATURES_SEL,
    Reg.QUEUE_SEL,
    Reg.QUEUE_NUM,
    Reg.QUEUE_NOTIFY,
    Reg.INTERRUPT_ACK,
    Reg.QUEUE_DESC_LOW,
    Reg.QUEUE_DESC_HIGH,
    Reg.QUEUE_AVAIL_LOW,
    Reg.QUEUE_AVAIL_HIGH,
    Reg.QUEUE_USED_LOW,
    Reg.QUEUE_USED_HIGH,
    Reg.SHM_SEL,
]
V1_RO = [
    Reg.MAGIC_VALUE,
    Reg.VERSION,
    Reg.DEVICE_ID,
    Reg.VENDOR_ID,
    Reg.DEVICE_FEATURES,
    Reg.QUEUE_NUM_MAX,
    Reg.INTERRUPT_STATUS,
]
V1_WO = [
    Reg.DEVICE_FEATURES_SEL,
    Reg.DRIVER_FEATURES,
    Reg.DRIVER_FEATURES_SEL,
    Reg.GUEST_PAGE_SIZE,
    Reg.QUEUE_SEL,
    Reg.QUEUE_NUM,
    Reg.QUEUE_ALIGN,
    Reg.QUEUE_NOTIFY,
    Reg.INTERRUPT_ACK,
]
V1_ABSENT = [
    Reg.QUEUE_READY,
    Reg.QUEUE_DESC_LOW,
    Reg.QUEUE_USED_HIGH,
    Reg.SHM_SEL,
    Reg.SHM_LEN_LOW,
    Reg.QUEUE_RESET,
    Reg.CONFIG_GENERATION,
]
V2_ABSENT = [Reg.GUEST_PAGE_SIZE, Reg.QUEUE_ALIGN, Reg.QUEUE_PFN]
RESERVED = [
    0x018,
    0x01C,
    0x02C,
    0x048,
    0x054,
    0x05C,
    0x068,
    0x074,
    0x07C,
    0x088,
    0x098,
    0x0A8,
    0x0C4,
    0x0F8,
]


@pytest.mark.parametrize("version, reg", [(2, r) for r in V2_RO] + [(1, r) for r in V1_RO])
def test_writes_to_read_only_registers_are_ignored(version, reg, caplog):
    _dev, drv = device(version)
    before = drv.read(reg)
    drv.write(reg, 0x5A5A_5A5A)
    assert drv.read(reg) == before
    [message] = guest_errors(caplog)
    assert message.startswith("test-dev: write to read-only register ")


@pytest.mark.parametrize("version, reg", [(2, r) for r in V2_WO] + [(1, r) for r in V1_WO])
def test_reads_of_write_only_registers_return_0(version, reg, caplog):
    _dev, drv = device(version)
    if reg not in (Reg.QUEUE_NOTIFY, Reg.INTERRUPT_ACK):
        drv.write(reg, 8)  # a valid value for each of them
    assert drv.read(reg) == 0
    assert len(guest_errors(caplog)) == 1 and "write-only register" in caplog.text


@pytest.mark.parametrize(
    "version, offset",
    [(1, r) for r in V1_ABSENT + RESERVED] + [(2, r) for r in V2_ABSENT + RESERVED],
)
def test_reserved_and_other_version_registers(version, offset, caplog):
    dev, drv = device(version)
    assert drv.read(offset) == 0
    drv.write(offset, 1)
    assert dev.status == 0 and all(not q.ready for q in dev.queues)
    assert len(guest_errors(caplog)) == 2


def test_shm_registers_report_no_region():
    _dev, drv = device(2)
    drv.write(Reg.SHM_SEL, 0)
    for reg in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
        assert drv.read(reg) == 0xFFFF_FFFF


def test_queue_reset_ignored_unless_ring_reset_negotiated(caplog):
    _dev, drv = device(2)
    assert drv.device_features() & RING_RESET
    ring = RingBuilder(GuestRam(), 8)
    drv.bring_up([ring], drop=RING_RESET)
    drv.write(Reg.QUEUE_SEL, 0)
    drv.write(Reg.QUEUE_RESET, 1)
    assert drv.read(Reg.QUEUE_RESET) == 0 and drv.read(Reg.QUEUE_READY) == 1
    assert "RING_RESET" in caplog.text


def test_legacy_device_does_not_offer_ring_reset():
    _dev, drv = device(1)
    drv.write(Reg.DEVICE_FEATURES_SEL, 1)
    assert drv.read(Reg.DEVICE_FEATURES) == 0


async def test_queue_reset_resets_that_queue_only():
    """§2.6.1: the queue forgets its state, QueueReset and QueueReady read 0, and the driver may
    re-program it (another size, other addresses) and enable it again."""
    ram = GuestRam()
    dev = make_device(BlockBackend(size=1 << 20), 2, ram)
    drv = MmioDriver(dev)
    ring = RingBuilder(ram, 8)
    drv.bring_up([ring])
    ring.add_chain([bytes(16)], [512, 1])  # a blk IN of sector 0
    await drv.kick()
    assert ring.used_idx == 1
    drv.write(Reg.QUEUE_SEL, 0)
    drv.write(Reg.QUEUE_RESET, 1)
    assert drv.read(Reg.QUEUE_RESET) == 0 and drv.read(Reg.QUEUE_READY) == 0
    queue = dev.queues[0]
    assert (queue.last_avail_idx, queue.used_idx, queue.num) == (0, 0, queue.num_max)
    assert dev.status & Status.DRIVER_OK and not dev.status & Status.DEVICE_NEEDS_RESET
    fresh = RingBuilder(ram, 4)
    drv.setup_queue(0, fresh)
    assert drv.read(Reg.QUEUE_READY) == 1 and drv.read(Reg.QUEUE_RESET) == 0
    fresh.add_chain([bytes(16)], [512, 1])
    await drv.kick()
    assert fresh.used_idx == 1


@settings(max_examples=300, deadline=None)
@given(
    st.sampled_from([1, 2]),
    st.lists(
        st.tuples(
            st.booleans(),
            st.integers(0, 0x1FF),
            st.sampled_from([1, 2, 4, 8]),
            st.integers(0, 0xFFFF_FFFF_FFFF_FFFF),
        ),
        max_size=40,
    ),
)
def test_no_access_sequence_raises(version, accesses):
    """Whatever a guest does to the window, the device answers and stays consistent."""
    ram = GuestRam(1 << 16)
    dev = MmioDevice(BlockBackend(size=1 << 16), version, name="fuzz")
    dev.memory = ram.memory
    logging.getLogger("viowire.device").disabled = True
    try:
        for is_write, offset, width, value in accesses:
            if offset + width > 0x200:
                continue
            value &= (1 << 8 * width) - 1
            if is_write:
                dev.write(offset, width, value)
            else:
                assert 0 <= dev.read(offset, width) < 1 << 8 * width
    finally:
        logging.getLogger("viowire.device").disabled = False
    dev.write(Reg.STATUS, 4, 0)
    assert dev.status == 0 and dev.interrupt_status == 0


# -- queues -------------------------------------------------------------------------------------
def test_queue_num_max_and_ready_of_missing_queue():
    _dev, drv = device(2)
    drv.write(Reg.QUEUE_SEL, 1)
    assert drv.read(Reg.QUEUE_NUM_MAX) == 64
    for sel in (2, 1024, 0xFFFF_FFFF):
        drv.write(Reg.QUEUE_SEL, sel)
        assert drv.read(Reg.QUEUE_NUM_MAX) == 0
        assert drv.read(Reg.QUEUE_READY) == 0


@pytest.mark.parametrize("value", [0, 65, 1 << 20])
def test_queue_num_out_of_range_ignored(value, caplog):
    dev, drv = device(2)
    drv.write(Reg.QUEUE_NUM, 32)
    drv.write(Reg.QUEUE_NUM, value)
    assert dev.queues[0].num == 32
    assert "QUEUE_NUM" in caplog.text


def test_queue_num_not_power_of_2_fails_at_enable(caplog):
    dev, drv = device(2)
    drv.negotiate()
    ring = RingBuilder(GuestRam(), 64)
    dev.memory = ring.ram.memory
    drv.write(Reg.QUEUE_NUM, 48)  # accepted for now
    assert dev.queues[0].num == 48 and not dev.broken
    drv.write(Reg.QUEUE_DESC_LOW, ring.desc)
    drv.write(Reg.QUEUE_AVAIL_LOW, ring.avail)
    drv.write(Reg.QUEUE_USED_LOW, ring.used)
    drv.write(Reg.QUEUE_READY, 1)
    assert dev.status & Status.DEVICE_NEEDS_RESET and dev.broken
    assert "power of 2" in caplog.text


def test_queue_ready_with_rings_outside_memory_needs_reset(caplog):
    dev, drv = device(2)
    drv.negotiate()
    drv.write(Reg.QUEUE_DESC_LOW, 0x1000)  # below the test RAM
    drv.write(Reg.QUEUE_READY, 1)
    assert dev.status & Status.DEVICE_NEEDS_RESET
    assert "Cannot map desc" in caplog.text


def test_queue_fields_frozen_while_ready(caplog):
    dev, drv = device(2)
    ring = RingBuilder(GuestRam(), 16)
    dev.memory = ring.ram.memory
    drv.negotiate()
    drv.setup_queue(0, ring)
    assert drv.read(Reg.QUEUE_READY) == 1
    for reg in (Reg.QUEUE_NUM, Reg.QUEUE_DESC_LOW, Reg.QUEUE_AVAIL_HIGH, Reg.QUEUE_USED_LOW):
        drv.write(reg, 8)
    queue = dev.queues[0]
    assert (queue.num, queue.desc_addr, queue.avail_addr, queue.used_addr) == (
        16,
        ring.desc,
        ring.avail,
        ring.used,
    )
    assert len(guest_errors(caplog)) == 4
    drv.write(Reg.QUEUE_READY, 0)
    assert drv.read(Reg.QUEUE_READY) == 0
    drv.write(Reg.QUEUE_NUM, 8)
    assert queue.num == 8


def test_64_bit_queue_addresses():
    dev, drv = device(2)
    drv.write(Reg.QUEUE_DESC_LOW, 0x8765_4320)
    drv.write(Reg.QUEUE_DESC_HIGH, 0x1)
    drv.write(Reg.QUEUE_USED_HIGH, 0x2)
    drv.write(Reg.QUEUE_USED_LOW, 0x1000)
    assert dev.queues[0].desc_addr == 0x1_8765_4320
    assert dev.queues[0].used_addr == 0x2_0000_1000


# -- legacy queues ------------------------------------------------------------------------------
def test_legacy_pfn_layout_and_readback():
    dev, drv = device(1)
    ram = GuestRam()
    dev.memory = ram.memory
    ring = RingBuilder.legacy(ram, 64)
    drv.negotiate()
    drv.setup_queue(0, ring)
    queue = dev.queues[0]
    assert (queue.desc_addr, queue.avail_addr, queue.used_addr) == (
        ring.desc,
        ring.avail,
        ring.used,
    )
    assert ring.used - ring.desc == 4096
    assert drv.read(Reg.QUEUE_PFN) == ring.pfn and queue.ready
    assert not dev.broken


def test_legacy_pfn_0_stops_only_that_queue():
    dev, drv = device(1)
    ram = GuestRam()
    dev.memory = ram.memory
    rings = [RingBuilder.legacy(ram, 16), RingBuilder.legacy(ram, 16)]
    drv.bring_up(rings)
    drv.write(Reg.QUEUE_SEL, 0)
    drv.write(Reg.QUEUE_PFN, 0)
    assert drv.read(Reg.QUEUE_PFN) == 0 and not dev.queues[0].ready
    drv.write(Reg.QUEUE_SEL, 1)
    assert drv.read(Reg.QUEUE_PFN) == rings[1].pfn
    assert dev.status & Status.DRIVER_OK


@pytest.mark.parametrize("value", [0, 3, 4097])
def test_legacy_guest_page_size_must_be_power_of_2(value, caplog):
    dev, drv = device(1)
    drv.write(Reg.GUEST_PAGE_SIZE, 4096)
    drv.write(Reg.GUEST_PAGE_SIZE, value)
    assert dev._guest_page_size == 4096
    assert "GUEST_PAGE_SIZE" in caplog.text


def test_legacy_queue_align_and_page_size_shape_the_layout():
    dev, drv = device(1)
    ram = GuestRam()
    dev.memory = ram.memory
    base = ram.alloc(8192, 4096)
    drv.write(Reg.GUEST_PAGE_SIZE, 1024)
    drv.write(Reg.QUEUE_NUM, 4)
    drv.write(Reg.QUEUE_ALIGN, 3)  # ignored
    drv.write(Reg.QUEUE_ALIGN, 4)
    drv.write(Reg.QUEUE_PFN, base // 1024)
    queue = dev.queues[0]
    assert queue.desc_addr == base and queue.avail_addr == base + 64
    assert queue.used_addr == base + 80  # align_up(avail + 4 + 2N + 2, 4)


def test_legacy_pfn_before_page_size_needs_reset(caplog):
    dev, drv = device(1)
    drv.write(Reg.QUEUE_PFN, 0x40000)
    assert dev.status & Status.DEVICE_NEEDS_RESET
    assert dev.interrupt_status == 0  # legacy drivers learn nothing from NEEDS_RESET
    assert "GUEST_PAGE_SIZE" in caplog.text


# -- status, interrupts, reset ------------------------------------------------------------------
def test_interrupt_ack_clears_exactly_the_written_bits():
    dev, drv = device(2)
    drv.bring_up([])
    dev._raise_interrupt(Interrupt.VRING | Interrupt.CONFIG)
    assert dev.irqs == [True]
    drv.write(Reg.INTERRUPT_ACK, Interrupt.CONFIG)
    assert drv.read(Reg.INTERRUPT_STATUS) == Interrupt.VRING and dev.irqs == [True]
    drv.write(Reg.INTERRUPT_ACK, Interrupt.VRING)
    assert drv.read(Reg.INTERRUPT_STATUS) == 0 and dev.irqs == [True, False]


def test_status_write_keeps_needs_reset_latched():
    dev, drv = device(2)
    drv.bring_up([])
    dev._fail("test")
    drv.write(Reg.STATUS, Status.ACKNOWLEDGE)  # the driver may not clear bits, but if it does...
    assert dev.status == Status.ACKNOWLEDGE | Status.DEVICE_NEEDS_RESET


@pytest.mark.parametrize("version", [1, 2])
def test_reset_clears_everything(version):
    dev, drv = device(version)
    ram = GuestRam()
    dev.memory = ram.memory
    make = RingBuilder.legacy if version == 1 else RingBuilder
    drv.bring_up([make(ram, 16), make(ram, 16)])
    queue = dev.queues[1]
    queue.last_avail_idx, queue.used_idx, queue.signalled_used_valid = 5, 4, True
    drv.write(Reg.DEVICE_FEATURES_SEL, 1)
    drv.write(Reg.DRIVER_FEATURES_SEL, 1)
    drv.write(Reg.QUEUE_SEL, 1)
    dev._fail("test")
    dev._raise_interrupt(Interrupt.VRING)
    assert dev.irqs == [True]

    drv.write(Reg.STATUS, 0)

    assert drv.read(Reg.STATUS) == 0 and dev.status == 0 and not dev.broken
    assert drv.read(Reg.INTERRUPT_STATUS) == 0 and dev.irqs == [True, False]
    assert dev.driver_features == 0 and dev.negotiated_features == 0
    assert drv.read(Reg.QUEUE_NUM_MAX) == 64  # QueueSel back to 0
    assert drv.read(Reg.DEVICE_FEATURES) & 0xFFFF == (1 << 3)  # DeviceFeaturesSel back to 0
    for queue in dev.queues:
        assert not queue.ready and queue.pfn == 0 and queue.num == 64
        assert (queue.desc_addr, queue.avail_addr, queue.used_addr) == (0, 0, 0)
        assert (queue.last_avail_idx, queue.used_idx, queue.signalled_used_valid) == (0, 0, False)
    assert dev._driver_features_sel == 0
    reg = Reg.QUEUE_PFN if version == 1 else Reg.QUEUE_READY
    assert drv.read(reg) == 0


def test_config_interrupt_on_failure_only_with_version_1_and_driver_ok():
    dev, drv = device(2)
    drv.negotiate()
    dev._fail("before DRIVER_OK")
    assert dev.interrupt_status == 0
    drv.write(Reg.STATUS, 0)
    drv.bring_up([])
    generation = drv.read(Reg.CONFIG_GENERATION)
    dev._fail("after DRIVER_OK")
    assert dev.interrupt_status == Interrupt.CONFIG and dev.irqs == [True]
    assert drv.read(Reg.CONFIG_GENERATION) != generation


# -- config space -------------------------------------------------------------------------------
class Config24(TwoQueues):
    """A 24-byte config structure whose byte i is i + 1."""

    def config_space(self) -> bytes:
        return bytes(range(1, 25))


@pytest.mark.parametrize("version", [1, 2])
def test_config_reads_any_width_little_endian(version):
    dev = MmioDevice(Config24(), version)
    raw = bytes(range(1, 25))
    for width in (1, 2, 4, 8):
        for offset in range(0, 24 - width + 1):
            expected = int.from_bytes(raw[offset : offset + width], "little")
            assert dev.read(0x100 + offset, width) == expected, (offset, width)


def test_config_reads_past_the_end_are_all_ones():
    dev = MmioDevice(Config24(), 2)
    assert dev.read(0x118, 4) == 0xFFFF_FFFF
    assert dev.read(0x1FF, 1) == 0xFF
    assert dev.read(0x116, 4) == 0xFFFF_1817  # half inside


@pytest.fixture
def blk():
    backend = BlockBackend(size=1 << 20)
    yield backend
    backend.close()


def test_blk_config_layout(blk):
    dev = MmioDevice(blk, 2)
    assert dev.read(0x100, 8) == (1 << 20) // 512  # capacity in sectors
    assert dev.read(0x10C, 4) == 254  # seg_max = queue size - 2
    assert dev.read(0x114, 4) == 512  # blk_size
    assert dev.read(0x118, 4) == 0xFFFF_FFFF


def test_config_writes_to_read_only_fields_are_ignored(blk, caplog):
    dev = MmioDevice(blk, 2)
    dev.write(0x100, 4, 0)
    assert dev.read(0x100, 8) == (1 << 20) // 512
    assert "read-only" in caplog.text


def test_config_generation_and_interrupt_on_change(blk):
    dev = make_device(blk, 2)
    drv = MmioDriver(dev)
    generation = drv.read(Reg.CONFIG_GENERATION)
    blk.resize(1 << 20)  # before DRIVER_OK: new generation, no interrupt
    assert drv.read(Reg.CONFIG_GENERATION) == generation + 1 and dev.interrupt_status == 0
    assert dev.read(0x100, 8) == (1 << 20) // 512
    drv.bring_up([])
    blk.resize(2 << 20)
    assert drv.read(Reg.CONFIG_GENERATION) == generation + 2
    assert dev.interrupt_status & Interrupt.CONFIG and dev.irqs == [True]
    assert dev.read(0x100, 8) == (2 << 20) // 512


def test_legacy_has_no_config_generation_register(blk, caplog):
    dev = MmioDevice(blk, 1)
    assert dev.read(Reg.CONFIG_GENERATION, 4) == 0
    assert "version 1" in caplog.text


def test_readonly_blk_offers_ro(tmp_path):
    image = tmp_path / "ro.img"
    image.write_bytes(b"\0" * 4096)
    backend = BlockBackend(path=str(image), readonly=True)
    try:
        dev = MmioDevice(backend, 2)
        assert MmioDriver(dev).device_features() >> BlkFeature.RO & 1
    finally:
        backend.close()


def test_legacy_guest_page_size_survives_status_reset():
    """Linux's virtio_mmio_probe writes GuestPageSize before the core's reset (Status=0)."""
    dev, drv = device(1)
    drv.write(Reg.GUEST_PAGE_SIZE, 4096)
    drv.write(Reg.STATUS, 0)
    assert dev._guest_page_size == 4096


def test_posted_ack_raises_again_for_what_it_clears_unseen():
    """IRQ_STATUS: the driver ACKs the status of the raise frame without reading the register.
    A notification made after that frame, while the bit was still set, would be wiped by the
    ACK, so the device owes a new raise; the ACK's own drop of the line sends no frame."""
    dev, drv = device(2)
    dev.posted_ack = True
    dev._raise_interrupt(Interrupt.VRING)
    assert dev.irqs == [True]
    drv.write(Reg.INTERRUPT_ACK, Interrupt.VRING)  # nothing new since the frame
    assert dev.irqs == [True] and dev.interrupt_status == 0
    dev._raise_interrupt(Interrupt.VRING)
    dev._raise_interrupt(Interrupt.VRING)  # a second completion while the bit is set
    drv.write(Reg.INTERRUPT_ACK, Interrupt.VRING)
    assert dev.irqs == [True, True, True] and dev.interrupt_status == Interrupt.VRING
    drv.write(Reg.INTERRUPT_ACK, Interrupt.VRING)
    assert dev.irqs == [True, True, True] and dev.interrupt_status == 0
    drv.write(Reg.STATUS, 0)  # a reset still reports its drop (after one more raise)
    dev._raise_interrupt(Interrupt.CONFIG)
    drv.write(Reg.STATUS, 0)
    assert dev.irqs[-2:] == [True, False]


def test_posted_ack_announces_a_bit_raised_while_the_line_was_high():
    """VRING raised (frame says 1); then a config change sets bit 1 with no new edge; the
    driver ACKs 1: bit 1 must come in a new frame, or the line stays high for ever."""
    dev, drv = device(2)
    drv.bring_up([])
    dev.posted_ack = True
    sent = []
    dev.on_irq = lambda level: sent.append((level, dev.interrupt_status))
    dev._raise_interrupt(Interrupt.VRING)
    dev.config_changed()
    assert sent == [(True, Interrupt.VRING)]
    drv.write(Reg.INTERRUPT_ACK, Interrupt.VRING)
    assert sent == [(True, Interrupt.VRING), (True, Interrupt.CONFIG)]
    drv.write(Reg.INTERRUPT_ACK, Interrupt.CONFIG)
    assert dev.interrupt_status == 0 and len(sent) == 2
    dev._raise_interrupt(Interrupt.VRING)  # the line works again: a new edge, a new frame
    assert sent[-1] == (True, Interrupt.VRING)


def test_read_ack_keeps_exact_line_semantics():
    dev, drv = device(2)
    dev._raise_interrupt(Interrupt.VRING)
    dev._raise_interrupt(Interrupt.VRING)
    drv.write(Reg.INTERRUPT_ACK, Interrupt.VRING)
    assert dev.irqs == [True, False] and dev.interrupt_status == 0


def test_an_idle_device_stays_small():
    """100,000 idle devices must fit in one process (issue 4): an idle device's attributes must
    stay few enough for CPython's key-sharing instance dicts (30 keys at most in 3.11; past
    that each device's dict is a full table, about 1.3 KB more). Rarely used state belongs in
    class attributes until it is set (see MmioDevice.used_notifier, QueueService._poll_mode)."""
    import sys

    from viowire.server.platform import DeviceSpec, PlatformSpec

    for kind in ("rng", "blk,size=1M"):
        device = PlatformSpec([DeviceSpec.parse(kind)]).build().slots[0].device
        assert len(vars(device)) <= 26, sorted(vars(device))
        assert sys.getsizeof(vars(device)) < 600
