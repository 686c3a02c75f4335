"""Tests for mutants of the core modules that the rest of the suite let survive.

``scripts/mutation-test`` (docs/mutation.md) plants small bugs one at a time; each test here is
named after what it holds, and its comment names the mutants it catches. Survivors that no test
can catch (equivalent mutants) are listed, with the reason, in docs/mutation.md.
"""

from __future__ import annotations

import errno
import logging

import pytest
from ringbuilder import GuestRam, MmioDriver, RingBuilder, make_device
from test_blk_rng import SECTOR, Disk
from test_client_vring import FakeRAM, make_vq
from test_framing import wire

from viowire.protocol import messages as m
from viowire.protocol.codec import HEADER
from viowire.protocol.framing import Frame, FrameError, FrameReader
from viowire.server.devices import BlockBackend, RngBackend
from viowire.virtio.blk import BlkStatus
from viowire.virtio.constants import VIRTQ_AVAIL_F_NO_INTERRUPT, Reg, Status


# -- protocol/framing.py -----------------------------------------------------------------------
def refused(reader: FrameReader, data: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        reader.feed(data)
    return info.value


def test_framing_errors_say_what_was_wrong():
    """The message goes to the peer in its ERROR frame (FrameError __init__, _check_length's
    messages, the whole frame's size in it)."""
    short = refused(FrameReader(), (3).to_bytes(4, "little"))
    assert str(short) == "frame length 3 is less than the 8 header bytes it counts"
    large = refused(FrameReader(max_frame=64), (61).to_bytes(4, "little"))
    assert str(large) == "frame of 65 bytes exceeds max_frame 64"


def test_a_reserved_field_error_names_its_value():
    """(_cut: the message of a non-zero reserved byte)"""
    error = refused(FrameReader(), HEADER.pack(8, 4, 0, 7, 5))
    assert (error.code, str(error)) == (m.ErrorCode.MALFORMED_FRAME, "reserved header field is 7")


def test_a_broken_reader_repeats_its_first_error():
    """(feed: the error raised again after the first keeps its code and message)"""
    reader = FrameReader(max_frame=64)
    first = refused(reader, (61).to_bytes(4, "little"))
    again = refused(reader, wire(Frame(1, 0, 1, b"")))
    expected = (m.ErrorCode.FRAME_TOO_LARGE, "frame of 65 bytes exceeds max_frame 64")
    assert (again.code, str(again)) == (first.code, str(first)) == expected


def test_a_frame_of_exactly_max_frame_is_accepted_whatever_the_reads():
    """A length field that arrives alone is checked at once (_check_length): max_frame is the
    largest frame allowed, not the first refused."""
    frame = wire(Frame(1, 0, 1, b"z" * 52))  # 4 + 8 + 52 = 64
    for cut in range(len(frame) + 1):
        reader = FrameReader(max_frame=64)
        assert reader.feed(frame[:cut]) + reader.feed(frame[cut:]) == [Frame(1, 0, 1, b"z" * 52)]


@pytest.mark.parametrize("kind", [bytes, bytearray, memoryview])
def test_any_buffer_type_gives_frames_with_bytes_bodies(kind):
    """bytes are sliced, other buffers viewed and copied (feed's branch on the type): the same
    frames either way, bodies that are bytes, and nothing kept that the caller may reuse."""
    frames = [Frame(2, 0, n, bytes([n]) * n) for n in range(1, 6)]
    stream = b"".join(wire(f) for f in frames)
    whole = FrameReader().feed(kind(bytearray(stream)))  # complete frames, nothing buffered
    assert whole == frames and all(type(frame.body) is bytes for frame in whole)
    reader = FrameReader()
    got = []
    for start in range(0, len(stream), 7):
        buffer = bytearray(stream[start : start + 7])
        got += reader.feed(kind(buffer))
        buffer[:] = b"\xff" * len(buffer)  # the caller reuses its buffer
    assert got == frames
    assert all(type(frame.body) is bytes for frame in got)


# -- server/mmio.py -----------------------------------------------------------------------------
@pytest.mark.parametrize("version", [1, 2])
def test_driver_ok_without_features_ok_is_reported_once(version, caplog):
    """(_write_status) A modern driver that skips FEATURES_OK gets a warning when DRIVER_OK
    rises, not on every later status write; a legacy device has no FEATURES_OK to skip."""
    caplog.set_level(logging.WARNING, logger="viowire")
    driver = MmioDriver(make_device(RngBackend(), version))
    expected = "test-dev: DRIVER_OK without FEATURES_OK: queues will not be processed"
    driver.add_status(Status.ACKNOWLEDGE | Status.DRIVER)
    driver.add_status(Status.DRIVER_OK)
    assert [r.getMessage() for r in caplog.records] == ([expected] if version == 2 else [])
    caplog.clear()
    driver.add_status(Status.DRIVER_OK)  # again: nothing new
    assert not caplog.records


@pytest.mark.parametrize("which", ["one", "queue_num_max"])
async def test_any_power_of_two_queue_size_up_to_queue_num_max_works(which, caplog):
    """(_write_queue_num's bounds) 1 and QueueNumMax itself are sizes a driver may choose: taken
    without a word, and the ring works."""
    caplog.set_level(logging.WARNING, logger="viowire")
    ram = GuestRam(1 << 21)
    device = make_device(RngBackend(), 2, ram)
    driver = MmioDriver(device)
    driver.write(Reg.QUEUE_SEL, 0)
    num = 1 if which == "one" else driver.read(Reg.QUEUE_NUM_MAX)
    ring = RingBuilder(ram, num)
    driver.bring_up([ring])
    for i in range(3):  # round the ring, whatever its size
        chain = ring.add_chain([], [16])
        await driver.kick()
        assert ring.used_elem(i) == (chain.head, 16)
    assert not device.read(Reg.STATUS, 4) & Status.DEVICE_NEEDS_RESET
    assert not caplog.records


# -- server/devices/blk.py ---------------------------------------------------------------------
def failing(*args: object) -> None:
    raise OSError(errno.EIO, "Input/output error")


async def test_a_disk_that_fails_is_ioerr_with_one_line_that_says_where(
    tmp_path, monkeypatch, caplog
):
    """(_read and _write on an OSError: the status, nothing written into the driver's buffer,
    and the log line's every part)"""
    backend = BlockBackend(path=str(tmp_path / "disk.img"), size=64 * SECTOR)
    disk = Disk(backend)
    try:
        monkeypatch.setattr(backend._image, "pread_cached", lambda *args: None)  # not cached
        monkeypatch.setattr(backend._image, "pread", failing)
        monkeypatch.setattr(backend._image, "pwrite", failing)
        caplog.set_level(logging.ERROR, logger="viowire")
        assert await disk.read(3, SECTOR) == (BlkStatus.IOERR, b"\xee" * SECTOR)  # untouched
        assert await disk.write(5, b"w" * SECTOR) == BlkStatus.IOERR  # used.len 1
        assert [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR] == [
            f"{backend.name}: read of sector 3 failed: [Errno 5] Input/output error",
            f"{backend.name}: write of sector 5 failed: [Errno 5] Input/output error",
        ]
    finally:
        backend.close()


async def test_an_oversized_request_is_ioerr_with_a_line_that_says_what(caplog):
    """(_oversized's log line, and the direction _read and the write path give it)"""
    backend = BlockBackend(size=1 << 20)
    backend.size_max = SECTOR  # seg_max * size_max: a little under 128 KiB
    disk = Disk(backend)
    too_big = backend.max_data_bytes + SECTOR
    caplog.set_level(logging.WARNING, logger="viowire")
    try:
        assert (await disk.read(2, too_big))[0] == BlkStatus.IOERR
        assert await disk.write(4, b"w" * too_big) == BlkStatus.IOERR
    finally:
        backend.close()
    limit = f"exceeds seg_max * size_max = {backend.max_data_bytes} bytes: IOERR"
    assert [r.getMessage() for r in caplog.records] == [
        f"{backend.name}: {too_big}-byte read at sector 2 {limit}",
        f"{backend.name}: {too_big}-byte write at sector 4 {limit}",
    ]


async def test_a_disk_of_a_partial_sector_ends_before_it(tmp_path):
    """(_in_range: the size is rounded down to whole sectors) 1000 bytes hold one sector."""
    image = tmp_path / "odd.img"
    image.write_bytes(b"d" * 1000)
    backend = BlockBackend(path=str(image))
    disk = Disk(backend)
    try:
        assert await disk.read(0, SECTOR) == (BlkStatus.OK, b"d" * SECTOR)
        assert (await disk.read(1, SECTOR))[0] == BlkStatus.IOERR
        assert await disk.write(1, b"w" * SECTOR) == BlkStatus.IOERR
    finally:
        backend.close()


# -- server/devices/rng.py ---------------------------------------------------------------------
async def test_rng_fills_every_byte_of_its_buffers():
    """(handle: the random bytes start at the buffer's first byte) A random byte equals the
    poison once in 256: over eight requests none should keep it in every one."""
    disk = Disk(RngBackend())
    kept = None
    for _ in range(8):
        chain = disk.ring.add_chain([], [48, 16])
        for gpa, n in chain.writable:
            disk.ram.write(gpa, b"\xee" * n)
        await disk.driver.kick()
        data = b"".join(disk.ram.read(gpa, n) for gpa, n in chain.writable)
        poisoned = {i for i, byte in enumerate(data) if byte == 0xEE}
        kept = poisoned if kept is None else kept & poisoned
    assert not kept, f"bytes {sorted(kept)} were never written"


# -- client/virtqueue.py: the notifications of a polling driver ----------------------------------
@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "flags"])
async def test_a_window_that_ends_looks_at_what_came_meanwhile(event_idx):
    """(allow_interrupts' answer) A chain used while notifications were off may have had its
    notification skipped: ending the window says so, and the driver collects it."""
    ram = FakeRAM()
    vq, dev, _ = await make_vq(ram, event_idx=event_idx)
    vq.suppress_interrupts()
    await vq.add([(0x4008_0000, 4)], [], "x")
    head, _ = dev.pop()
    dev.push(head, 0)  # used while the driver was not to be told
    assert vq.allow_interrupts() is True
    assert (dev.used_event() if event_idx else dev.avail_flags()) == 0  # notifications on
    assert await vq.get_buf() == ("x", 0)
    vq.suppress_interrupts()
    assert vq.allow_interrupts() is False  # nothing new this time


@pytest.mark.parametrize("event_idx", [True, False], ids=["event-idx", "flags"])
async def test_a_window_that_ends_leaves_callbacks_the_driver_disabled_off(event_idx):
    """(allow_interrupts' early return) disable_cb is the driver's choice; polling must not
    turn notifications back on behind it."""
    ram = FakeRAM()
    vq, dev, _ = await make_vq(ram, event_idx=event_idx)
    await vq.disable_cb()
    off = dev.used_event() if event_idx else dev.avail_flags()
    vq.suppress_interrupts()
    assert vq.allow_interrupts() is False
    assert (dev.used_event() if event_idx else dev.avail_flags()) == off
    assert event_idx or off == VIRTQ_AVAIL_F_NO_INTERRUPT
