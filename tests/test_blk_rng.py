"""virtio-blk and virtio-rng backends, driven through real rings and the MMIO device."""

from __future__ import annotations

import asyncio
import os
import struct
import time

import pytest
from ringbuilder import GuestRam, MmioDriver, RecordingMemory, RingBuilder, make_device

from viowire.server.devices import BlockBackend, RngBackend
from viowire.server.devices.rng import MAX_FILL
from viowire.virtio.blk import BlkFeature, BlkStatus, BlkType
from viowire.virtio.constants import Status

TIMEOUT = 2.0
SECTOR = 512


def header(type_: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", type_, 0, sector)


class Disk:
    """A block device brought up by the test driver, with a one-call request helper."""

    def __init__(self, backend, version: int = 2, snapshots: bool = False) -> None:
        self.backend = backend
        self.ram = GuestRam(1 << 21)
        self.device = make_device(backend, version, self.ram)
        if snapshots:  # the general path, as in proxied mode: request bytes read ahead
            self.device.memory = RecordingMemory(self.ram)
        self.driver = MmioDriver(self.device)
        self.ring = RingBuilder.legacy(self.ram, 16) if version == 1 else RingBuilder(self.ram, 16)
        self.driver.bring_up([self.ring])

    async def request(self, readable, writable, **kw) -> tuple[int, int, bytes]:
        """Submit one chain; returns (status, used.len, bytes of the writable part before it)."""
        before = self.ring.used_idx
        chain = self.ring.add_chain(readable, writable, **kw)
        await self.driver.kick()
        assert self.ring.used_idx == (before + 1) & 0xFFFF
        head, used_len = self.ring.used_elem(before)
        assert head == chain.head
        data = b"".join(self.ram.read(gpa, n) for gpa, n in chain.writable)
        return data[-1], used_len, data[:-1]

    async def write(self, sector: int, data: bytes, **kw) -> int:
        status, used_len, _ = await self.request([header(BlkType.OUT, sector), data], [1], **kw)
        assert used_len == 1
        return status

    async def read(self, sector: int, length: int) -> tuple[int, bytes]:
        status, used_len, data = await self.request([header(BlkType.IN, sector)], [length, 1])
        # A failed read writes only the status byte, after the data buffer: used.len counts
        # bytes from the start of the writable area (2.7.8.2), so nothing.
        assert used_len == (length + 1 if status == BlkStatus.OK else 0)
        return status, data


@pytest.fixture(
    params=[(1, False), (2, False), (2, True)], ids=["legacy", "modern", "modern-snapshots"]
)
def disk(request):
    backend = BlockBackend(size=64 * SECTOR)
    version, snapshots = request.param
    yield Disk(backend, version, snapshots)
    backend.close()


# -- virtio-blk ---------------------------------------------------------------------------------
@pytest.mark.asyncio
async def test_write_then_read(disk):
    data = os.urandom(3 * SECTOR)
    assert await disk.write(5, data) == BlkStatus.OK
    assert await disk.read(5, 3 * SECTOR) == (BlkStatus.OK, data)
    assert await disk.read(0, SECTOR) == (BlkStatus.OK, b"\0" * SECTOR)
    assert not disk.device.broken


@pytest.mark.asyncio
async def test_any_layout_header_and_status_split_anywhere(disk):
    data = os.urandom(SECTOR)
    raw = header(BlkType.OUT, 2) + data
    status, used_len, _ = await disk.request([raw[:10], raw[10:300], raw[300:]], [1])
    assert (status, used_len) == (BlkStatus.OK, 1)
    # read: header in one descriptor, data and status together in one 513-byte descriptor
    status, used_len, got = await disk.request([header(BlkType.IN, 2)], [SECTOR + 1])
    assert (status, used_len, got) == (BlkStatus.OK, SECTOR + 1, data)


@pytest.mark.asyncio
@pytest.mark.parametrize("indirect_from", [0, 1])
async def test_requests_through_indirect_tables(disk, indirect_from):
    data = os.urandom(2 * SECTOR)
    assert await disk.write(7, data, indirect_from=indirect_from) == BlkStatus.OK
    status, _, got = await disk.request(
        [header(BlkType.IN, 7)], [SECTOR, SECTOR, 1], indirect_from=indirect_from
    )
    assert (status, got) == (BlkStatus.OK, data)


@pytest.mark.asyncio
@pytest.mark.parametrize("type_", [BlkType.FLUSH, BlkType.FLUSH_OUT])
async def test_flush(disk, type_):
    assert await disk.request([header(type_)], [1]) == (BlkStatus.OK, 1, b"")


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "serial, length, expected",
    [
        ("viowire-blk", 20, b"viowire-blk".ljust(20, b"\0")),
        ("viowire-blk", 4, b"viow"),
        ("x" * 20, 20, b"x" * 20),  # exactly 20: no terminator
        ("y" * 30, 24, b"y" * 20 + b"\xee" * 4),  # truncated to 20; the rest untouched
    ],
)
async def test_get_id(serial, length, expected):
    backend = BlockBackend(size=SECTOR, serial=serial)
    disk = Disk(backend)
    status, used_len, got = await disk.request([header(BlkType.GET_ID)], [length, 1])
    # Longer than 20 bytes: the status byte is not next to the id, so it is not counted.
    assert (status, used_len, got) == (BlkStatus.OK, min(length, 20) + (length <= 20), expected)


@pytest.mark.asyncio
@pytest.mark.parametrize("type_", [BlkType.DISCARD, BlkType.WRITE_ZEROES, 2, 99, 0x7FFF_FFFF])
async def test_unknown_types_are_unsupported_not_fatal(disk, type_):
    status, used_len, _ = await disk.request([header(type_)], [SECTOR, 1])
    assert (status, used_len) == (BlkStatus.UNSUPP, 0)
    assert not disk.device.broken


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "sector, length", [(64, SECTOR), (63, 2 * SECTOR), ((1 << 64) - 1, SECTOR), (0, 100)]
)
async def test_out_of_range_or_partial_sectors_are_ioerr(disk, sector, length):
    assert (await disk.read(sector, length))[0] == BlkStatus.IOERR
    assert await disk.write(sector, b"\x55" * length) == BlkStatus.IOERR
    assert await disk.read(63, SECTOR) == (BlkStatus.OK, b"\0" * SECTOR)
    assert not disk.device.broken


@pytest.mark.asyncio
@pytest.mark.parametrize("snapshots", [False, True], ids=["in-place", "snapshots"])
async def test_a_write_longer_than_the_disk_reads_only_its_header(snapshots):
    """Its payload is never copied (a hostile chain could name gigabytes), it writes nothing and
    it fails (IOERR: it runs past the end), whether the request bytes were read ahead or not."""
    backend = BlockBackend(size=2 * SECTOR)
    disk = Disk(backend, snapshots=snapshots)
    try:
        assert await disk.write(0, b"\x55" * 4 * SECTOR) == BlkStatus.IOERR
        assert await disk.read(0, 2 * SECTOR) == (BlkStatus.OK, b"\0" * 2 * SECTOR)
    finally:
        backend.close()


@pytest.mark.asyncio
async def test_read_only_disk_refuses_writes(tmp_path):
    image = tmp_path / "ro.img"
    content = os.urandom(8 * SECTOR)
    image.write_bytes(content)
    backend = BlockBackend(path=str(image), readonly=True)
    disk = Disk(backend)
    try:
        assert disk.device.negotiated_features >> BlkFeature.RO & 1
        assert await disk.write(0, b"\0" * SECTOR) == BlkStatus.IOERR
        assert await disk.read(0, 8 * SECTOR) == (BlkStatus.OK, content)
        assert image.read_bytes() == content
    finally:
        backend.close()


@pytest.mark.asyncio
@pytest.mark.parametrize(
    "readable, writable, message",
    [
        ([], [SECTOR, 1], "missing headers"),
        ([header(BlkType.IN)], [], "missing headers"),
        ([header(BlkType.IN)[:8]], [1], "outhdr too short"),
    ],
)
async def test_malformed_requests_need_reset(disk, readable, writable, message, caplog):
    disk.ring.add_chain(readable, writable)
    await disk.driver.kick()
    assert disk.device.status & Status.DEVICE_NEEDS_RESET
    assert message in caplog.text
    assert disk.ring.used_idx == 0


@pytest.mark.asyncio
async def test_file_image_data_reaches_the_file_after_flush(tmp_path, monkeypatch):
    path = tmp_path / "disk.img"
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, "fsync", lambda fd: (synced.append(fd), real_fsync(fd)))
    backend = BlockBackend(size=16 * SECTOR, path=str(path))
    disk = Disk(backend)
    try:
        assert path.stat().st_size == 16 * SECTOR  # created at the requested size
        data = os.urandom(2 * SECTOR)
        assert await disk.write(3, data) == BlkStatus.OK
        assert synced == []
        assert (await disk.request([header(BlkType.FLUSH)], [1]))[0] == BlkStatus.OK
        assert len(synced) == 1
        with open(path, "rb") as f:
            f.seek(3 * SECTOR)
            assert f.read(2 * SECTOR) == data
    finally:
        backend.close()


def test_file_image_size_from_file_and_extension(tmp_path):
    path = tmp_path / "disk.img"
    path.write_bytes(b"\1" * (4 * SECTOR + 10))
    backend = BlockBackend(path=str(path))
    assert backend.capacity == 4
    backend.close()
    backend = BlockBackend(path=str(path), size=8 * SECTOR)
    assert backend.capacity == 8 and path.stat().st_size == 8 * SECTOR
    backend.close()
    with pytest.raises(ValueError):
        BlockBackend(path=str(path), size=16 * SECTOR, readonly=True)
    with pytest.raises(FileNotFoundError):
        BlockBackend(path=str(tmp_path / "missing.img"), readonly=True)


@pytest.mark.asyncio
async def test_reset_during_flush_writes_no_status(tmp_path, monkeypatch):
    """The fsync runs in an executor; a reset meanwhile must keep the device off guest RAM."""
    monkeypatch.setattr(os, "fsync", lambda fd: time.sleep(0.1))
    backend = BlockBackend(size=SECTOR, path=str(tmp_path / "d.img"))
    disk = Disk(backend)
    try:
        chain = disk.ring.add_chain([header(BlkType.FLUSH)], [1])
        disk.driver.notify()
        await asyncio.sleep(0.02)
        disk.driver.write(0x070, 0)
        await asyncio.wait_for(disk.device.drain(), TIMEOUT)
        assert disk.ring.used_idx == 0
        assert disk.ram.read(chain.writable[0][0], 1) == b"\xee"
    finally:
        backend.close()


def test_ram_disk_resize_keeps_data():
    backend = BlockBackend(size=4 * SECTOR)
    backend._image.pwrite(0, b"abc")
    backend.resize(8 * SECTOR)
    assert backend.capacity == 8 and backend._image.pread(0, 3) == b"abc"
    backend.close()


# -- virtio-rng ---------------------------------------------------------------------------------
@pytest.mark.asyncio
@pytest.mark.parametrize("version", [1, 2])
async def test_rng_fills_writable_buffers(version):
    disk = Disk(RngBackend(), version)
    chain = disk.ring.add_chain([], [64, 32])
    await disk.driver.kick()
    assert disk.ring.used_elem(0) == (chain.head, 96)
    data = b"".join(disk.ram.read(gpa, n) for gpa, n in chain.writable)
    assert data.count(0xEE) < 16  # overwritten with random bytes, not left as poison
    assert disk.device.interrupt_status


@pytest.mark.asyncio
async def test_rng_caps_one_request():
    disk = Disk(RngBackend())
    disk.ring.add_chain([], [MAX_FILL + 1000])
    await disk.driver.kick()
    assert disk.ring.used_elem(0)[1] == MAX_FILL


@pytest.mark.asyncio
async def test_rng_readable_buffer_needs_reset(caplog):
    disk = Disk(RngBackend())
    disk.ring.add_chain([b"seed"], [16])
    await disk.driver.kick()
    assert disk.device.status & Status.DEVICE_NEEDS_RESET
    assert "device-readable" in caplog.text


def test_rng_offers_no_features_and_no_config():
    backend = RngBackend()
    assert backend.device_features(2) == 0
    assert backend.config_read(0, 4) == 0xFFFF_FFFF
