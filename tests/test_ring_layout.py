"""The split-ring layout (viowire/virtio/ring.py) against the spec's own numbers.

Every side takes its offsets and sizes from that one module, so they can no longer disagree with
each other; these tests are what keeps them agreeing with virtio 1.2 §2.7 and Linux's
``vring_size`` (the worked values are the reference's §4.1-§4.3 tables).
"""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viowire.client.virtqueue import Virtqueue
from viowire.server.virtqueue import SplitVirtqueue
from viowire.virtio.mock import GuestRam, RingBuilder
from viowire.virtio.ring import (
    AVAIL_FLAGS,
    AVAIL_IDX,
    AVAIL_RING,
    DESC,
    DESC_SIZE,
    USED_ELEM,
    USED_ELEM_SIZE,
    USED_FLAGS,
    USED_IDX,
    USED_RING,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    RingLayout,
    area_sizes,
    avail_event_offset,
    avail_ring_size,
    chain_descriptors,
    desc_table_size,
    indirect_descriptor,
    legacy_used_offset,
    pack_descriptors,
    ring_areas,
    used_event_offset,
    used_ring_size,
    valid_queue_size,
    vring_need_event,
    vring_size,
)


# -- the structures (§2.7.5, §2.7.8) ------------------------------------------------------------
def test_descriptor_is_16_bytes_addr_len_flags_next_little_endian():
    raw = DESC.pack(0x1122_3344_5566_7788, 0x99AA_BBCC, 0x0102, 0x0304)
    assert DESC.size == DESC_SIZE == 16
    assert raw == bytes.fromhex("8877665544332211ccbbaa9902010403")


def test_used_element_is_8_bytes_id_then_len():
    assert USED_ELEM.size == USED_ELEM_SIZE == 8
    assert USED_ELEM.pack(5, 0x200) == bytes.fromhex("0500000000020000")


def test_flag_values():
    assert (VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_INDIRECT) == (1, 2, 4)


def test_field_offsets_inside_the_rings():
    assert (AVAIL_FLAGS, AVAIL_IDX, AVAIL_RING) == (0, 2, 4)
    assert (USED_FLAGS, USED_IDX, USED_RING) == (0, 2, 4)


# -- modern: three areas (§2.7 table) -----------------------------------------------------------
def test_queue_of_256_area_sizes_and_event_fields():
    assert desc_table_size(256) == 4096
    assert avail_ring_size(256) == 6 + 2 * 256 == 518
    assert used_ring_size(256) == 6 + 8 * 256 == 2054
    assert used_event_offset(256) == 4 + 2 * 256 == 516  # the avail ring's last u16
    assert avail_event_offset(256) == 4 + 8 * 256 == 2052  # the used ring's last u16
    assert area_sizes(256) == ((4096, 16), (518, 2), (2054, 4))


@pytest.mark.parametrize("num", [1 << k for k in range(16)])
def test_ring_areas_sizes_are_the_size_functions(num):
    """ring_areas writes the sizes out (it runs on every pass); they must stay the same."""
    sizes = (desc_table_size(num), avail_ring_size(num), used_ring_size(num))
    assert tuple(size for _, _, size, _ in ring_areas(num, 0, 0, 0)) == sizes


def test_layout_places_every_field():
    ring = RingLayout(256, desc=0x1000, avail=0x3000, used=0x4000)
    assert (ring.avail_flags, ring.avail_idx, ring.avail_ring) == (0x3000, 0x3002, 0x3004)
    assert ring.used_event == 0x3000 + 516
    assert (ring.used_flags, ring.used_idx, ring.used_ring) == (0x4000, 0x4002, 0x4004)
    assert ring.avail_event == 0x4000 + 2052
    assert ring.desc_addr(3) == 0x1030
    assert ring.areas() == (
        ("desc", 0x1000, 4096, 16),
        ("avail", 0x3000, 518, 2),
        ("used", 0x4000, 2054, 4),
    )


def test_ring_slots_wrap_at_the_queue_size():
    """Entry ``idx`` (a free-running u16) sits in ring[idx % num] (§2.7.6, §2.7.8)."""
    ring = RingLayout(256, desc=0x1000, avail=0x3000, used=0x4000)
    assert ring.avail_slot_addr(0) == 0x3004
    assert ring.avail_slot_addr(255) == 0x3004 + 2 * 255
    assert ring.avail_slot_addr(256 + 1) == 0x3004 + 2
    assert ring.avail_slot_addr(0xFFFF) == 0x3004 + 2 * 255
    assert ring.used_elem_addr(256 + 5) == 0x4004 + 8 * 5


# -- legacy: one block (§2.7.2, Linux vring_size; reference §4.3) ------------------------------
@pytest.mark.parametrize(
    ("num", "avail_off", "used_off", "size"),
    [
        (1, 16, 4096, 4110),
        (128, 2048, 4096, 5126),
        (256, 4096, 8192, 10246),
        (512, 8192, 12288, 16390),
        (1024, 16384, 20480, 28678),
    ],
)
def test_legacy_layout_matches_reference_table(num, avail_off, used_off, size):
    ring = RingLayout.legacy(0x10000, num)
    assert (ring.avail - ring.desc, ring.used - ring.desc) == (avail_off, used_off)
    assert vring_size(num) == size


def test_legacy_used_ring_leaves_room_for_used_event():
    """QueueAlign 4, 4 entries: the used ring goes after used_event (64 + 4 + 8 + 2 → 80), not
    where QEMU's formula, which forgets the slot, puts it (76)."""
    assert legacy_used_offset(4, 4) == 80
    assert RingLayout.legacy(4096, 4, 4).used == 4096 + 80


@given(
    num_log=st.integers(0, 15),
    align_log=st.integers(2, 16),
    base_pages=st.integers(0, 1 << 20),
)
def test_legacy_layout_rules(num_log, align_log, base_pages):
    """For any size, QueueAlign and page: avail right after the table, used at the first
    address aligned to QueueAlign past the whole avail ring (an aligned address, as Linux's
    vring_init makes it, even where the base is not aligned), and vring_size just large enough
    for a base that is."""
    num, align = 1 << num_log, 1 << align_log
    base = base_pages * 4096
    ring = RingLayout.legacy(base, num, align)
    avail_end = ring.avail + avail_ring_size(num)
    assert ring.avail == base + 16 * num
    assert ring.used % align == 0 and avail_end <= ring.used < avail_end + align
    aligned = RingLayout.legacy(base_pages * align, num, align)
    assert vring_size(num, align) == aligned.used + used_ring_size(num) - aligned.desc


# -- sizes and the event test -------------------------------------------------------------------
@pytest.mark.parametrize(
    ("num", "num_max", "ok"),
    [(1, 256, True), (256, 256, True), (32768, 32768, True), (0, 256, False), (3, 256, False),
     (512, 256, False), (65536, 65536, False), (6, 8, False)],
)  # fmt: skip
def test_valid_queue_size(num, num_max, ok):
    assert valid_queue_size(num, num_max) is ok


def test_vring_need_event_examples():
    assert vring_need_event(0, 1, 0)  # the first entry after used_event 0
    assert not vring_need_event(1, 1, 0)
    assert vring_need_event(0xFFFF, 1, 0xFFFE)  # across the wrap


# -- a chain written the way a driver writes it -------------------------------------------------
def test_chain_descriptors_link_in_the_given_order():
    segments = [(0x100, 16, False), (0x200, 512, True), (0x300, 1, True)]
    assert chain_descriptors(segments, [5, 2, 7]) == [
        (0x100, 16, VIRTQ_DESC_F_NEXT, 2),
        (0x200, 512, VIRTQ_DESC_F_WRITE | VIRTQ_DESC_F_NEXT, 7),
        (0x300, 1, VIRTQ_DESC_F_WRITE, 0),
    ]


def test_indirect_table_and_its_descriptor():
    descs = chain_descriptors([(0x100, 16, False), (0x200, 1, True)], [0, 1])
    assert pack_descriptors(descs) == DESC.pack(0x100, 16, 1, 1) + DESC.pack(0x200, 1, 2, 0)
    assert indirect_descriptor(0x5000, 2) == DESC.pack(0x5000, 32, VIRTQ_DESC_F_INDIRECT, 0)


# -- every side lays the same ring --------------------------------------------------------------
@pytest.mark.parametrize("num", [1, 16, 256])
async def test_the_driver_device_and_mock_agree_on_the_legacy_block(num):
    ram = GuestRam(1 << 20)
    vq = await Virtqueue.create(0, num, ram.memory, ram, "legacy")
    device = SplitVirtqueue(0, num)
    device.set_legacy_pfn(vq.addresses.desc // 4096, 4096, 4096)
    assert (device.desc_addr, device.avail_addr, device.used_addr) == (
        vq.addresses.desc,
        vq.addresses.avail,
        vq.addresses.used,
    )
    mock = RingBuilder.legacy(ram, num)
    assert (mock.avail - mock.desc, mock.used - mock.desc) == (
        vq.addresses.avail - vq.addresses.desc,
        vq.addresses.used - vq.addresses.desc,
    )


async def test_a_ring_the_mock_builds_is_popped_by_the_device_side():
    ram = GuestRam()
    ring = RingBuilder(ram, 8)
    queue = ring.device_queue()
    queue.check_layout(ram.memory)
    sent = ring.add_chain([b"head"], [4, 1], indirect_from=1)
    chain = await queue.pop(ram.memory)
    assert (chain.head, chain.readable, chain.writable) == (sent.head, sent.readable, sent.writable)
    await queue.push(ram.memory, chain.head, 5)
    assert ring.used_idx == 1 and ring.used_elem(0) == (sent.head, 5)
