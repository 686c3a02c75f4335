"""virtio-blk (§5.2; reference §5.2): a RAM disk or a file image behind one requestq.

A request is one chain: a 16-byte header (type, ioprio, sector) at the start of the readable part,
data, and a status byte as the last byte of the writable part. The framing is free (ANY_LAYOUT):
the header, data and status may be split over descriptors anywhere.

The device holds the data of a read or write in memory while it serves it, so it offers
VIRTIO_BLK_F_SIZE_MAX and VIRTIO_BLK_F_SEG_MAX and answers a request whose data exceed
``seg_max * size_max`` (:attr:`BlockBackend.max_data_bytes`; the spec uses the same product as
the limit of a request, bounding max_append_sectors by it) with VIRTIO_BLK_S_IOERR, "device or
driver error" (§5.2.6), before it allocates anything for it or touches the disk. Otherwise a
chain listing the same guest buffer thousands of times could make it copy up to the whole disk
for one request.
"""

from __future__ import annotations

import asyncio
import logging
import mmap
import os
import struct

from viowire.device import Device, Option, SampleRequest
from viowire.server.virtqueue import ChainError, DescriptorChain, scatter, slice_segments
from viowire.virtio.config import BLK_CONFIG
from viowire.virtio.constants import (
    BLK_ID_BYTES,
    BLK_REQ_HEADER_SIZE,
    BLK_SECTOR_SIZE,
    BlkFeature,
    BlkStatus,
    BlkType,
    DeviceId,
)
from viowire.virtio.memory import GuestMemory

log = logging.getLogger("viowire.device")

_HEADER = struct.Struct("<IIQ")  # type, reserved (ioprio), sector
# capacity, size_max, seg_max, geometry (cylinders u16, heads u8, sectors u8), blk_size
_CONFIG = struct.Struct("<QIIHBBI")
_BARRIER = 0x8000_0000  # legacy flag OR-ed into the type; never offered, so ignored
# plain ints on the per-request path (IntEnum comparisons and conversions cost more)
_IN, _OUT = int(BlkType.IN), int(BlkType.OUT)
_OK, _IOERR = int(BlkStatus.OK), int(BlkStatus.IOERR)
_STATUS_BYTES = [bytes([status]) for status in range(256)]

SIZE_MAX = 256 * 1024
"""Bytes per data segment offered in ``size_max`` (§5.2.4): the most Linux's virtio_blk puts in
one segment when its DMA goes through swiotlb (virtio_max_dma_size: 128 slots of 2 KiB). With
the ``seg_max`` of a 256-entry queue (254) one request carries at most 63.5 MiB."""


def _fsync_and_close(fd: int) -> None:
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class _RamImage:
    """Anonymous memory: pages stay unallocated (zero) until written, and the mapping itself is
    made on the first write, so an idle disk holds no kernel mapping (a process may have only
    vm.max_map_count of them, about 65,000, and load tests run 100,000 idle devices)."""

    def __init__(self, size: int) -> None:
        self.size = size
        self._map: mmap.mmap | None = None

    def pread(self, offset: int, length: int) -> bytes:
        if self._map is None:
            return bytes(length)  # never written: all zeroes
        return self._map[offset : offset + length]

    def pwrite(self, offset: int, data: bytes) -> None:
        if self._map is None:
            self._map = mmap.mmap(-1, max(self.size, 1))
        self._map[offset : offset + len(data)] = data

    async def flush(self) -> None:
        pass

    def resize(self, size: int) -> None:
        if self._map is not None:
            grown = mmap.mmap(-1, max(size, 1))
            keep = min(self.size, size)
            grown[:keep] = self._map[:keep]
            self._map.close()
            self._map = grown
        self.size = size

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None


class _FileImage:
    """A disk image file; ``size`` given and larger than the file extends it."""

    def __init__(self, path: str, size: int | None, readonly: bool) -> None:
        flags = os.O_RDONLY if readonly else os.O_RDWR | os.O_CREAT
        self._fd = os.open(path, flags | os.O_CLOEXEC, 0o644)
        try:
            on_disk = os.fstat(self._fd).st_size
            if size is not None and size > on_disk:
                if readonly:
                    raise ValueError(f"{path}: read-only image is {on_disk} bytes, not {size}")
                os.ftruncate(self._fd, size)
            self.size = on_disk if size is None else size
        except BaseException:
            os.close(self._fd)
            raise

    def pread(self, offset: int, length: int) -> bytes:
        data = os.pread(self._fd, length, offset)
        return data.ljust(length, b"\0")  # the file was truncated behind our back: holes read 0

    def pwrite(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        while view:
            done = os.pwrite(self._fd, view, offset)
            view = view[done:]
            offset += done

    async def flush(self) -> None:
        # The thread fsyncs and closes its own duplicate: it runs on if this is cancelled, and the
        # session's teardown may close self._fd (and the number be reused) meanwhile.
        fd = os.dup(self._fd)
        await asyncio.get_running_loop().run_in_executor(None, _fsync_and_close, fd)

    def resize(self, size: int) -> None:
        if size > os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, size)
        self.size = size

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class BlockBackend(Device):
    """A virtio-blk disk: IN, OUT, FLUSH (and legacy FLUSH_OUT), GET_ID."""

    device_id = DeviceId.BLOCK
    type_name = "blk"
    num_queues = 1
    config_layout = BLK_CONFIG
    driver = "viowire.client.drivers.blk:BlockDriver"
    # a read of sector 0 in the classic layout (header, data, status), which even a legacy device
    # without ANY_LAYOUT takes
    sample_request = SampleRequest(
        readable=_HEADER.pack(_IN, 0, 0), writable=(BLK_SECTOR_SIZE, 1), status=_OK
    )
    options = {
        "size": Option.size(None, "disk size (64M, 1G); a RAM disk needs it, a file grows to it"),
        "path": Option.string(None, "a disk image file, shared by every session"),
        "readonly": Option.flag(False, "offer VIRTIO_BLK_F_RO and refuse writes"),
        "serial": Option.string("viowire-blk", "the GET_ID string (20 bytes at most)"),
    }
    size_max: int = SIZE_MAX
    """Offered in the config space; with :attr:`seg_max` it bounds one request's data."""

    def __init__(
        self,
        size: int | None = None,
        path: str | None = None,
        readonly: bool = False,
        serial: str = "viowire-blk",
    ) -> None:
        super().__init__()
        if path is None:
            if size is None or size < 0:
                raise ValueError("a RAM disk needs size=<bytes>")
            self._image: _RamImage | _FileImage = _RamImage(size)
        else:
            if size is not None and size < 0:
                raise ValueError(f"size {size} is negative")
            self._image = _FileImage(path, size, readonly)
        self.readonly = readonly
        self.serial = serial.encode()[:BLK_ID_BYTES]

    @property
    def capacity(self) -> int:
        """Size in 512-byte sectors; a partial last sector is not addressable."""
        return self._image.size // BLK_SECTOR_SIZE

    @property
    def seg_max(self) -> int:
        """Data segments per request offered in ``seg_max``: a chain as long as the largest
        queue (§2.7.5.3.1) less the header and the status descriptors, as QEMU."""
        return self.queue_num_max - 2

    @property
    def max_data_bytes(self) -> int:
        """The most data one IN or OUT request may carry: ``seg_max * size_max``. The device
        enforces the total (what it must hold), not each segment's size."""
        return self.seg_max * self.size_max

    def device_features(self, version: int) -> int:
        bits = (BlkFeature.SIZE_MAX, BlkFeature.SEG_MAX, BlkFeature.BLK_SIZE, BlkFeature.FLUSH)
        if self.readonly:
            bits += (BlkFeature.RO,)
        return sum(1 << bit for bit in bits)

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.capacity, self.size_max, self.seg_max, 0, 0, 0, BLK_SECTOR_SIZE)

    def resize(self, new_size_bytes: int) -> None:
        """Change the disk size; the driver learns of it through a config interrupt."""
        self._image.resize(new_size_bytes)
        self.on_config_change()

    def close(self) -> None:
        self._image.close()

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        readable, writable = chain.readable, chain.writable
        if not readable or not writable:
            raise ChainError("virtio-blk missing headers")
        if chain.readable_len < BLK_REQ_HEADER_SIZE:
            raise ChainError("virtio-blk request outhdr too short")
        payload_len = chain.readable_len - BLK_REQ_HEADER_SIZE
        # a payload that no valid write could carry is never read: the header says what to do
        whole = payload_len <= min(self.max_data_bytes, self._image.size)
        out = chain.readable_data  # proxied mode reads it ahead, for the whole batch
        if out is None:
            out = await self._read_out(chain, memory, whole)
        elif not whole:
            out = out[:BLK_REQ_HEADER_SIZE]  # what _read_out would have read
        type_, _ioprio, sector = _HEADER.unpack_from(out)
        type_ &= ~_BARRIER
        data_len = chain.writable_len - 1
        if type_ == _IN:
            status, data = self._read(sector, data_len)
        elif type_ == _OUT:
            if self._oversized("write", sector, payload_len) or not whole:
                status, data = _IOERR, b""  # past any disk end: nothing of it can be written
            else:
                status, data = self._write(sector, memoryview(out)[BLK_REQ_HEADER_SIZE:])
        else:
            status, data = await self._execute(type_, data_len)
        last_gpa, last_len = writable[-1]
        if len(writable) == 2 and last_len == 1 and writable[0][1] == len(data):
            # the usual layout, data then status: no slicing needed
            segments = [(writable[0][0], data), (last_gpa, _STATUS_BYTES[status])]
        else:
            segments = scatter(slice_segments(writable, 0, data_len), data)
            segments.append((last_gpa + last_len - 1, _STATUS_BYTES[status]))
        await memory.writev(segments)
        # used.len promises bytes written from the start of the writable area (2.7.8.2): the
        # status byte counts only when the data before it was written in full.
        return len(data) + 1 if len(data) == data_len else len(data)

    async def _read_out(self, chain: DescriptorChain, memory: GuestMemory, whole: bool) -> bytes:
        """The readable part in one read; only the header unless the rest could be a valid
        write (``whole``: within :attr:`max_data_bytes` and the disk), so that a hostile chain
        cannot make us copy gigabytes."""
        segments = chain.readable
        if not whole:
            segments = slice_segments(segments, 0, BLK_REQ_HEADER_SIZE)
        parts = await memory.readv(segments)
        return parts[0] if len(parts) == 1 else b"".join(parts)

    async def _execute(self, type_: int, data_len: int) -> tuple[int, bytes]:
        """The request types other than IN and OUT."""
        if type_ in (BlkType.FLUSH, BlkType.FLUSH_OUT):
            return await self._flush()
        if type_ == BlkType.GET_ID:
            serial = self.serial.ljust(BLK_ID_BYTES, b"\0")  # NUL-padded, unterminated at 20
            return _OK, serial[: min(data_len, BLK_ID_BYTES)]
        return BlkStatus.UNSUPP, b""

    def _in_range(self, sector: int, length: int) -> bool:
        size = self._image.size
        return length % BLK_SECTOR_SIZE == 0 and sector * BLK_SECTOR_SIZE + length <= (
            size - size % BLK_SECTOR_SIZE
        )

    def _oversized(self, what: str, sector: int, length: int) -> bool:
        """True, with one log line, when ``length`` data bytes exceed :attr:`max_data_bytes`."""
        if length <= self.max_data_bytes:
            return False
        log.warning(
            "%s: %d-byte %s at sector %d exceeds seg_max * size_max = %d bytes: IOERR",
            self.name,
            length,
            what,
            sector,
            self.max_data_bytes,
        )
        return True

    def _read(self, sector: int, length: int) -> tuple[int, bytes]:
        if self._oversized("read", sector, length) or not self._in_range(sector, length):
            return _IOERR, b""
        try:
            return _OK, self._image.pread(sector * BLK_SECTOR_SIZE, length)
        except OSError as exc:
            log.error("%s: read of sector %d failed: %s", self.name, sector, exc)
            return BlkStatus.IOERR, b""

    def _write(self, sector: int, payload: bytes | memoryview) -> tuple[int, bytes]:
        if self.readonly or not self._in_range(sector, len(payload)):
            return _IOERR, b""
        try:
            self._image.pwrite(sector * BLK_SECTOR_SIZE, payload)
        except OSError as exc:
            log.error("%s: write of sector %d failed: %s", self.name, sector, exc)
            return _IOERR, b""
        return _OK, b""

    async def _flush(self) -> tuple[int, bytes]:
        try:
            await self._image.flush()
        except OSError as exc:
            log.error("%s: flush failed: %s", self.name, exc)
            return BlkStatus.IOERR, b""
        return BlkStatus.OK, b""
