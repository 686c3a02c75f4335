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

A RAM disk serves a request inline, without a thread or a task: it is the hot path. A file image
does its pread, pwrite and fsync on the process's I/O threads (:mod:`.blocking`), so a disk
that waits stalls neither the requests behind it nor other sessions; its requests run at once
and complete in any order. A read the page cache holds in full is the exception: it is read
inline, with ``preadv2(RWF_NOWAIT)``, which returns at once rather than wait for the disk (as
QEMU's io_uring and Samba try first), since a thread per cached 4 KiB read costs more than the
read, and 32 threads taking turns at the GIL delay the event loop itself. The data requests
hold in memory at once (payloads read from the guest, data read from the file) is bounded per
disk by :data:`FILE_BYTES_IN_FLIGHT`.

``latency=`` delays every request's completion, as Linux null_blk's ``completion_nsec`` does,
for load tests: the requests wait at once, so QD32 with 10 ms completes 3,200 per second.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import mmap
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future

from viowire import blocking
from viowire.device import Device, Option, SampleRequest
from viowire.server.virtqueue import ChainError, DescriptorChain, scatter, slice_segments
from viowire.units import format_size, parse_duration
from viowire.virtio.blk import (
    BLK_CONFIG,
    BLK_ID_BYTES,
    BLK_REQ_HEADER_SIZE,
    BLK_SECTOR_SIZE,
    CONFIG_PREFIX,
    REQUEST_HEADER,
    BlkFeature,
    BlkStatus,
    BlkType,
)
from viowire.virtio.constants import (
    DeviceId,
)
from viowire.virtio.memory import GuestMemory

log = logging.getLogger("viowire.device")

_HEADER = REQUEST_HEADER
_CONFIG = CONFIG_PREFIX
_BARRIER = 0x8000_0000  # legacy flag OR-ed into the type; never offered, so ignored
# plain ints on the per-request path (IntEnum comparisons and conversions cost more)
_IN, _OUT = int(BlkType.IN), int(BlkType.OUT)
_OK, _IOERR = int(BlkStatus.OK), int(BlkStatus.IOERR)
_STATUS_BYTES = [bytes([status]) for status in range(256)]

SIZE_MAX = 256 * 1024
"""Bytes per data segment offered in ``size_max`` (§5.2.4): the most Linux's virtio_blk puts in
one segment when its DMA goes through swiotlb (virtio_max_dma_size: 128 slots of 2 KiB). With
the ``seg_max`` of a 256-entry queue (254) one request carries at most 63.5 MiB."""

INLINE_READ_MAX = 128 * 1024
"""Reads up to this size that the page cache holds are copied on the event loop (about as
long as a RAM disk's copy); larger ones go to a thread, cached or not."""

_NOWAIT = getattr(os, "RWF_NOWAIT", 0)  # Linux 4.14 and later
_NO_NOWAIT = {errno.EOPNOTSUPP, errno.EINVAL, errno.ENOSYS}  # the file cannot say: threads

FILE_BYTES_IN_FLIGHT = 64 << 20
"""Request data a file-backed disk holds at once, at most (a request as large as
:attr:`BlockBackend.max_data_bytes` always fits); the requests past it wait their turn. Without
it a queue of 256 requests of 63.5 MiB each would make the server hold 16 GiB."""


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
    """A disk image file; ``size`` given and larger than the file extends it.

    Its I/O runs on the process's I/O threads and is awaited (:meth:`pread`, :meth:`pwrite`,
    :meth:`flush` return futures), but for :meth:`pread_cached`, which reads on the event loop
    only what it can read without waiting. Each call on a thread holds the file descriptor open
    while it runs: :meth:`close` (the session ended, maybe with calls still in the threads)
    closes it once the last call is done, so a thread never reads or writes through a number
    that the process has meanwhile given to another file. A call cancelled before it started
    releases its hold too, so a reset never leaves the descriptor open."""

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
        self._lock = threading.Lock()  # _users and _closing: the threads release their holds
        self._users = 0
        self._closing = False
        self._nowait = bool(_NOWAIT)

    def pread_cached(self, offset: int, length: int) -> bytearray | None:
        """The ``length`` bytes at ``offset`` if the page cache holds them all, read without
        waiting; None if that would wait for the disk (or the file system cannot tell), and
        the caller reads them on a thread."""
        if not self._nowait or length > INLINE_READ_MAX or self._closing:
            return None
        data = bytearray(length)
        try:
            got = os.preadv(self._fd, [data], offset, _NOWAIT)
        except BlockingIOError:
            return None
        except OSError as exc:
            if exc.errno in _NO_NOWAIT:
                self._nowait = False
            return None  # any other error: the thread's pread reports it
        return data if got == length else None  # partly cached, or past the end: a thread

    def pread(self, offset: int, length: int) -> asyncio.Future[bytes]:
        return self._run(_pread, offset, length)

    def pwrite(self, offset: int, data: bytes | memoryview) -> asyncio.Future[None]:
        """``data`` must not change until the write is done: bytes, or a view of bytes."""
        return self._run(_pwrite, offset, data)

    def flush(self) -> asyncio.Future[None]:
        """Writes completed before this call are on the disk when it completes."""
        return self._run(os.fsync)

    def _run(self, call: Callable[..., object], *args: object) -> asyncio.Future:
        with self._lock:
            if self._closing:
                raise OSError(errno.EBADF, "the disk image is closed")
            self._users += 1
        try:
            future = blocking.submit(call, self._fd, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(self._release)  # done, failed or cancelled: exactly once
        return asyncio.wrap_future(future)

    def _release(self, _future: Future | None = None) -> None:
        with self._lock:
            self._users -= 1
            last = self._closing and not self._users
        if last:
            os.close(self._fd)

    def resize(self, size: int) -> None:
        if self._closing:
            raise OSError(errno.EBADF, "the disk image is closed")
        if size > os.fstat(self._fd).st_size:
            os.ftruncate(self._fd, size)
        self.size = size

    def close(self) -> None:
        with self._lock:
            if self._closing:
                return
            self._closing = True
            last = not self._users
        if last:
            os.close(self._fd)


def _pread(fd: int, offset: int, length: int) -> bytes:
    data = os.pread(fd, length, offset)
    return data.ljust(length, b"\0")  # the file was truncated behind our back: holes read 0


def _pwrite(fd: int, offset: int, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        done = os.pwrite(fd, view, offset)
        view = view[done:]
        offset += done


class _DataBudget:
    """Bytes of request data a disk may hold at once; takers wait in order for their share."""

    __slots__ = ("_waiters", "free")

    def __init__(self, limit: int) -> None:
        self.free = limit
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    async def take(self, size: int) -> None:
        if not size or (size <= self.free and not self._waiters):
            self.free -= size
            return
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await entry[1]
        except BaseException:  # cancelled, or the coroutine closed (GeneratorExit)
            if entry[1].done() and not entry[1].cancelled():
                self.give(size)  # granted just as the request was cancelled
            elif entry in self._waiters:
                self._waiters.remove(entry)
                self._grant()  # a smaller request behind it may fit now
            raise

    def give(self, size: int) -> None:
        self.free += size
        self._grant()

    def _grant(self) -> None:
        while self._waiters and self._waiters[0][0] <= self.free:
            size, waiter = self._waiters.popleft()
            if not waiter.done():  # else cancelled, and its task drops out of take()
                self.free -= size
                waiter.set_result(None)


class BlockBackend(Device):
    """A virtio-blk disk: IN, OUT, FLUSH (and legacy FLUSH_OUT), GET_ID."""

    device_id = DeviceId.BLOCK
    type_name = "blk"
    handle_inline = True  # no current task needed before its first await
    num_queues = 1
    config_layout = BLK_CONFIG
    feature_bits = BlkFeature
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
        "latency": Option.duration(
            0.0, "complete every request this long after it arrives (null_blk completion_nsec)"
        ),
    }
    size_max: int = SIZE_MAX
    """Offered in the config space; with :attr:`seg_max` it bounds one request's data."""

    def __init__(
        self,
        size: int | None = None,
        path: str | None = None,
        readonly: bool = False,
        serial: str = "viowire-blk",
        latency: float | str = 0.0,
    ) -> None:
        """``latency``: seconds (or a duration such as ``10ms``) by which every request's
        completion is delayed; 0 serves RAM disk requests inline, as fast as they come."""
        super().__init__()
        self._file: _FileImage | None = None
        _check_whole_sectors(size)
        if path is None:
            if size is None or size < 0:
                raise ValueError("a RAM disk needs size=<bytes>")
            self._image: _RamImage | _FileImage = _RamImage(size)
        else:
            if size is not None and size < 0:
                raise ValueError(f"size {size} is negative")
            self._image = self._file = _FileImage(path, size, readonly)
            self._budget = _DataBudget(max(FILE_BYTES_IN_FLIGHT, self.max_data_bytes))
        self.latency = latency
        self.readonly = readonly
        self.serial = serial.encode()[:BLK_ID_BYTES]

    @property
    def latency(self) -> float:
        """Seconds by which every request's completion is delayed (null_blk's
        completion_nsec); it may be changed at any time, for the requests that come next."""
        return self._latency

    @latency.setter
    def latency(self, value: float | str) -> None:
        self._latency = parse_duration(value)
        self._waits = bool(self._latency) or self._file is not None

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
        if self._waits:  # latency, or a file image; a plain RAM disk goes straight on
            if self.latency:
                # Before any work: a request holds no data while it waits, and one that a
                # reset cancels meanwhile has done nothing.
                await asyncio.sleep(self.latency)
            if self._file is not None:
                return await self._handle_file(chain, memory, payload_len)
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
        # What _reply() does, inline: a call is a measurable part of a RAM disk's request.
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

    async def _handle_file(
        self, chain: DescriptorChain, memory: GuestMemory, payload_len: int
    ) -> int:
        """:meth:`handle` for a file image: the header first; then, for a valid request, its
        share of :data:`FILE_BYTES_IN_FLIGHT`, its payload, and the I/O on a thread."""
        out = chain.readable_data
        if out is None:
            out = await self._read_out(chain, memory, whole=False)
        type_, _ioprio, sector = _HEADER.unpack_from(out)
        type_ &= ~_BARRIER
        data_len = chain.writable_len - 1
        cached = None
        if type_ == _IN:
            valid = self._readable(sector, data_len)
            if valid:  # what the page cache holds is read now, and held only until replied
                cached = self._file.pread_cached(sector * BLK_SECTOR_SIZE, data_len)
            held = data_len if cached is None else 0
        elif type_ == _OUT:
            valid, held = self._writable_by(sector, payload_len), payload_len
        else:
            valid, held = True, 0  # FLUSH, GET_ID (20 bytes at most), unsupported types
        held = held if valid else 0
        if held:
            await self._budget.take(held)
        try:
            if not valid:
                status, data = _IOERR, b""
            elif cached is not None:
                status, data = _OK, cached
            elif type_ == _IN:
                status, data = await self._file_read(sector, data_len)
            elif type_ == _OUT:
                if len(out) < chain.readable_len:
                    out = await self._read_out(chain, memory, whole=True)
                status, data = await self._file_write(sector, out)
            else:
                status, data = await self._execute(type_, data_len)
            await memory.writev(self._reply(chain, status, data))
        finally:
            if held:
                self._budget.give(held)
        return len(data) + 1 if len(data) == data_len else len(data)

    @staticmethod
    def _reply(chain: DescriptorChain, status: int, data: bytes) -> list[tuple[int, bytes]]:
        """The writes of a reply: ``data`` from the start of the writable part, and the status
        in its last byte."""
        writable = chain.writable
        last_gpa, last_len = writable[-1]
        if len(writable) == 2 and last_len == 1 and writable[0][1] == len(data):
            # the usual layout, data then status: no slicing needed
            return [(writable[0][0], data), (last_gpa, _STATUS_BYTES[status])]
        segments = scatter(slice_segments(writable, 0, chain.writable_len - 1), data)
        segments.append((last_gpa + last_len - 1, _STATUS_BYTES[status]))
        return segments

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

    def _readable(self, sector: int, length: int) -> bool:
        return not self._oversized("read", sector, length) and self._in_range(sector, length)

    def _writable_by(self, sector: int, length: int) -> bool:
        """Whether a write of ``length`` payload bytes at ``sector`` may be done (the size check
        first: a payload past it is never read)."""
        return (
            not self._oversized("write", sector, length)
            and not self.readonly
            and self._in_range(sector, length)
        )

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

    async def _file_read(self, sector: int, length: int) -> tuple[int, bytes]:
        try:
            return _OK, await self._file.pread(sector * BLK_SECTOR_SIZE, length)
        except OSError as exc:
            log.error("%s: read of sector %d failed: %s", self.name, sector, exc)
            return _IOERR, b""

    async def _file_write(self, sector: int, out: bytes) -> tuple[int, bytes]:
        """Write the payload of ``out`` (the request's readable bytes, header first)."""
        payload = memoryview(out)[BLK_REQ_HEADER_SIZE:]
        try:
            await self._file.pwrite(sector * BLK_SECTOR_SIZE, payload)
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


def _check_whole_sectors(size: int | None) -> None:
    """A size the driver cannot see whole (capacity counts 512-byte sectors) is a mistake."""
    if size is None or size < 0 or size % BLK_SECTOR_SIZE == 0:
        return
    below = size - size % BLK_SECTOR_SIZE
    nearest = [value for value in (below, below + BLK_SECTOR_SIZE) if value > 0]
    raise ValueError(
        f"size={size} is not a whole number of {BLK_SECTOR_SIZE}-byte sectors: use "
        + " or ".join(f"size={format_size(value)}" for value in nearest)
    )
