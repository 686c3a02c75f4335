"""A device's handle() unit-tested on viowire.virtio.mock, with no server, socket or client: the
way a device author tests a Device subclass (virtio-blk here, and a tiny device of our own)."""

from __future__ import annotations

import struct

import pytest

from viowire.device import ChainError, Device
from viowire.server.devices.blk import BlockBackend
from viowire.virtio.blk import BLK_ID_BYTES, BlkStatus, BlkType
from viowire.virtio.mock import POISON, GuestRam, RingBuilder, serve

SECTOR = 512


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)  # type, ioprio, sector (§5.2.6)


@pytest.fixture
def disk():
    device = BlockBackend(size=1 << 20)
    yield device
    device.close()


@pytest.fixture
def ring() -> RingBuilder:
    return RingBuilder(GuestRam(), 16)


async def test_blk_write_then_read_back(disk, ring):
    data = bytes(range(256)) * 2
    write = ring.add_chain([header(BlkType.OUT, 3), data], [1])
    assert await serve(disk, ring) == [(write.head, 1)]
    assert ring.ram.read(*write.writable[0]) == bytes([BlkStatus.OK])

    read = ring.add_chain([header(BlkType.IN, 3)], [SECTOR, 1])
    assert await serve(disk, ring) == [(read.head, SECTOR + 1)]
    assert ring.ram.read(*read.writable[0]) == data
    assert ring.ram.read(*read.writable[1]) == bytes([BlkStatus.OK])
    assert ring.used_idx == 2 and ring.used_elem(1) == (read.head, SECTOR + 1)


async def test_blk_requests_of_one_batch_complete_together(disk, ring):
    """Three chains published at once, one of them through an indirect table: served in ring
    order, their used elements published with one used.idx store."""
    chains = [
        ring.add_chain([header(BlkType.IN, 0)], [SECTOR, 1]),
        ring.add_chain([header(BlkType.GET_ID)], [BLK_ID_BYTES, 1], indirect_from=0),
        ring.add_chain([header(BlkType.FLUSH)], [1]),
    ]
    used = await serve(disk, ring)
    assert used == [(chains[0].head, SECTOR + 1), (chains[1].head, BLK_ID_BYTES + 1),
                    (chains[2].head, 1)]  # fmt: skip
    assert ring.used_idx == 3
    assert ring.ram.read(*chains[1].writable[0]) == b"viowire-blk".ljust(BLK_ID_BYTES, b"\0")


async def test_blk_read_past_the_end_is_an_io_error(disk, ring):
    sent = ring.add_chain([header(BlkType.IN, disk.capacity)], [SECTOR, 1])
    assert await serve(disk, ring) == [(sent.head, 0)]  # nothing of the data was written
    assert ring.ram.read(*sent.writable[0]) == bytes([POISON]) * SECTOR
    assert ring.ram.read(*sent.writable[1]) == bytes([BlkStatus.IOERR])


async def test_blk_chain_without_a_status_byte_stops_the_device(disk, ring):
    ring.add_chain([header(BlkType.IN)], [])
    with pytest.raises(ChainError, match="missing headers"):
        await serve(disk, ring)


async def test_a_legacy_ring_serves_the_same(disk):
    ring = RingBuilder.legacy(GuestRam(), 8)
    sent = ring.add_chain([header(BlkType.GET_ID)], [BLK_ID_BYTES, 1])
    assert await serve(disk, ring) == [(sent.head, BLK_ID_BYTES + 1)]


class Reverse(Device):
    """The device API's own example: readable bytes in, the same bytes reversed out."""

    device_id = 0x7F00
    type_name = "reverse"

    async def handle(self, queue, chain, memory):
        data = await chain.read()
        return await chain.write(data[::-1])


async def test_a_device_using_chain_read_and_write(ring):
    sent = ring.add_chain([b"hello, ", b"world"], [4, 9])
    assert await serve(Reverse(), ring) == [(sent.head, 12)]
    written = b"".join(ring.ram.read(gpa, length) for gpa, length in sent.writable)
    assert written == b"dlrow ,olleh" + bytes([POISON])


class Boastful(Device):
    device_id = 0x7F01

    async def handle(self, queue, chain, memory):
        return chain.writable_len + 1


async def test_serve_refuses_a_used_len_past_the_writable_part(ring):
    ring.add_chain([], [4])
    with pytest.raises(ValueError, match=r"Boastful.handle\(\) returned 5 .* 4 writable bytes"):
        await serve(Boastful(), ring)


async def test_event_idx_queue_asks_for_the_next_kick(disk, ring):
    """A queue made with EVENT_IDX before serving: after the batch avail_event names the next
    entry, so the driver kicks for it (§2.7.10)."""
    ring.device_queue(event_idx=True)
    ring.add_chain([header(BlkType.FLUSH)], [1])
    await serve(disk, ring)
    assert ring.avail_event == 1
