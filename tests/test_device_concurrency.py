"""Requests that wait run at once and complete in any order, and nothing blocks the event loop:
simulated latency (``latency=``) and file-backed disks, through the real server and client.

A slow disk is made with :class:`DiskGate`: the real pread of one image file, held in its I/O
thread until the test opens the gate, as a disk that stalls. What the device is doing is seen
from its side by :class:`WatchedBlock`. Every wait is bounded; nothing is timed.
"""

from __future__ import annotations

import asyncio
import errno
import fcntl
import os
import struct
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from servers import running_server, url_of

from viowire.blocking import MAX_THREADS
from viowire.client.connection import Connection, connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.client.errors import RequestError
from viowire.server.devices import blk as blk_module
from viowire.server.devices.blk import BlockBackend
from viowire.server.devices.rng import RngBackend
from viowire.server.mmio import MmioDevice
from viowire.server.platform import DeviceSpec, PlatformSpec
from viowire.virtio.blk import BlkStatus, BlkType
from viowire.virtio.constants import Reg

pytestmark = pytest.mark.timeout(60)
WAIT = 10.0  # seconds: the bound of every wait for something that must happen
FOREVER = 3600.0  # a latency no test outlives: requests that only a reset ends
SECTOR = 512
POISON = 0xEE


class Watch:
    """The requests a :class:`WatchedBlock` is serving now, and the most it served at once."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.peak = 0
        self.finished = 0
        self.closed = 0

    def enter(self) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)

    def leave(self, finished: bool) -> None:
        self.in_flight -= 1
        self.finished += finished


class Watched:
    """A device that counts the requests in its ``handle`` (the device side's view) in the
    class's :class:`Watch`, and its closes."""

    watch = Watch()

    async def handle(self, queue, chain, memory) -> int:
        self.watch.enter()
        finished = False
        try:
            written = await super().handle(queue, chain, memory)
            finished = True
            return written
        finally:
            self.watch.leave(finished)

    def close(self) -> None:
        super().close()
        self.watch.closed += 1


class WatchedBlock(Watched, BlockBackend):
    pass


class WatchedRng(Watched, RngBackend):
    pass


# the device types, as --device names a user's class (this module is on the tests' sys.path)
WATCHED_BLK = f"{__name__}:WatchedBlock"
WATCHED_RNG = f"{__name__}:WatchedRng"


@pytest.fixture
def watch(monkeypatch) -> Watch:
    fresh = Watch()
    monkeypatch.setattr(Watched, "watch", fresh)
    return fresh


class DiskGate:
    """A disk that stalls at the offsets ``holds`` picks: the page cache does not have them
    (a read that must not wait is refused, EAGAIN), and their preads wait in their I/O threads
    until :meth:`open`. The reads themselves are real; ``preads`` counts every pread of the
    image (the reads done on a thread)."""

    def __init__(self, image: Path, holds: Callable[[int], bool] = lambda offset: True) -> None:
        self.inode = os.stat(image).st_ino
        self.holds = holds
        self.preads = 0
        self.entered = 0  # preads held (or passing through) now or before
        self.left = 0  # of those, returned
        self._opened = threading.Event()
        self._lock = threading.Lock()

    def install(self, monkeypatch) -> None:
        real_pread, real_preadv = os.pread, os.preadv

        def preadv(fd: int, buffers, offset: int, flags: int = 0) -> int:
            if flags & os.RWF_NOWAIT and self._ours(fd) and self.holds(offset):
                raise BlockingIOError(errno.EAGAIN, "not in the page cache")
            return real_preadv(fd, buffers, offset, flags)

        def pread(fd: int, length: int, offset: int) -> bytes:
            if not self._ours(fd):
                return real_pread(fd, length, offset)
            with self._lock:
                self.preads += 1
            if not self.holds(offset):
                return real_pread(fd, length, offset)
            with self._lock:
                self.entered += 1
            try:
                self._opened.wait(WAIT)
                return real_pread(fd, length, offset)
            finally:
                with self._lock:
                    self.left += 1

        monkeypatch.setattr(os, "preadv", preadv)
        monkeypatch.setattr(os, "pread", pread)

    def _ours(self, fd: int) -> bool:
        return os.fstat(fd).st_ino == self.inode

    def open(self) -> None:
        self._opened.set()


async def until(condition: Callable[[], bool], what: str) -> None:
    """Wait (bounded) until ``condition()`` holds; the loop keeps serving meanwhile."""
    try:
        async with asyncio.timeout(WAIT):
            while not condition():
                await asyncio.sleep(0.002)
    except TimeoutError:
        raise AssertionError(f"not within {WAIT} s: {what}") from None


def server_device(server, index: int = 0) -> MmioDevice:
    """The device at slot ``index`` of the server's only session."""
    (session,) = server.sessions
    return session.platform.slots[index].device


async def open_disk(
    url: str, index: int = 0, memory: str = "shared"
) -> tuple[Connection, BlockDriver]:
    conn = await connect(url, memory=memory)
    blk = await BlockDriver.attach(await conn.attach((await conn.platform())[index]))
    return conn, blk


def fill(image: Path, sectors: int) -> list[bytes]:
    """Write a distinct pattern into every sector of ``image``; the sectors' contents."""
    contents = [bytes([i % 251]) * SECTOR for i in range(sectors)]
    image.write_bytes(b"".join(contents))
    return contents


class RawRead:
    """One read request with buffers of the test's own, poisoned, so that every byte the
    device writes into them shows."""

    def __init__(self, blk: BlockDriver, sector: int, length: int = SECTOR) -> None:
        self.blk = blk
        allocator = blk.dev.allocator
        self.header = allocator.alloc(16, 16)
        self.data = allocator.alloc(length, 16)
        self.status = allocator.alloc(1, 1)
        self.length = length
        self.sector = sector
        self.task: asyncio.Task | None = None

    async def submit(self) -> RawRead:
        memory = self.blk.dev.memory
        await memory.writev(
            [
                (self.header, struct.pack("<IIQ", BlkType.IN, 0, self.sector)),
                (self.data, bytes([POISON]) * self.length),
                (self.status, bytes([POISON])),
            ]
        )
        self.task = asyncio.create_task(
            self.blk.vq.submit([(self.header, 16)], [(self.data, self.length), (self.status, 1)])
        )
        return self

    async def untouched(self) -> bool:
        memory = self.blk.dev.memory
        data, status = await memory.readv([(self.data, self.length), (self.status, 1)])
        return data == bytes([POISON]) * self.length and status == bytes([POISON])


async def used_idx(blk: BlockDriver) -> int:
    return await blk.dev.memory.read_u16(blk.vq.addresses.used + 2)


def image_fds(image: Path) -> list[int]:
    """This process's descriptors open on ``image``."""
    found = []
    for name in os.listdir("/proc/self/fd"):
        try:
            if os.readlink(f"/proc/self/fd/{name}") == str(image):
                found.append(int(name))
        except OSError:
            pass
    return found


# -- simulated latency --------------------------------------------------------------------------
async def test_latency_requests_are_in_flight_together_and_all_complete(tmp_path, watch):
    """QD32 on one queue of a disk with latency: the device holds all 32 at once (a device that
    served them one after another would never hold more than one), then each completes with
    its own data."""
    spec = PlatformSpec([DeviceSpec(WATCHED_BLK, 2, {"size": 1 << 20, "latency": 0.5})])
    async with running_server(tmp_path, spec) as server:
        conn, blk = await open_disk(url_of(server, "unix"))
        async with conn:
            sectors = range(0, 256, 8)
            reads = [asyncio.create_task(blk.read(s * SECTOR, 4096)) for s in sectors]
            await until(lambda: watch.in_flight == 32, "32 requests in the device at once")
            assert not any(read.done() for read in reads)
            async with asyncio.timeout(WAIT):
                assert await asyncio.gather(*reads) == [bytes(4096)] * 32
            assert (watch.peak, watch.finished) == (32, 32)


async def test_rng_latency_requests_are_in_flight_together(tmp_path, watch):
    spec = PlatformSpec([DeviceSpec(WATCHED_RNG, 2, {"latency": 0.5})])
    async with (
        running_server(tmp_path, spec) as server,
        await connect(url_of(server, "unix")) as conn,
    ):
        rng = await EntropyDriver.attach(await conn.attach((await conn.platform())[0]))
        reads = [asyncio.create_task(rng.read(16)) for _ in range(8)]
        await until(lambda: watch.in_flight == 8, "8 rng requests waiting at once")
        async with asyncio.timeout(WAIT):
            results = await asyncio.gather(*reads)
        assert all(len(r) == 16 for r in results) and len(set(results)) == 8
        assert watch.finished == 8


def test_latency_option_is_a_duration():
    assert BlockBackend(size=SECTOR, latency="10ms").latency == pytest.approx(0.01)
    assert BlockBackend.options["latency"].parse("250us") == pytest.approx(250e-6)
    assert RngBackend(latency=0.5).latency == 0.5
    assert RngBackend().latency == 0.0
    with pytest.raises(ValueError, match="duration"):
        BlockBackend(size=SECTOR, latency="10 parsecs")
    with pytest.raises(ValueError, match=">= 0"):
        RngBackend(latency=-1)
    # the platform passes the option on as text
    platform = PlatformSpec([DeviceSpec.parse("blk,size=1M,latency=10ms")]).build()
    assert platform.slots[0].device.backend.latency == pytest.approx(0.01)
    platform.close_nowait()


# -- file-backed disks: nothing blocks the loop ---------------------------------------------------
async def test_a_slow_request_does_not_hold_back_a_fast_one(tmp_path, monkeypatch):
    """One queue: a read stalled in its thread, then a read of another sector; the second
    completes first (out of order), the first when the disk answers."""
    image = tmp_path / "disk.img"
    contents = fill(image, 64)
    gate = DiskGate(image, holds=lambda offset: offset == 7 * SECTOR)
    gate.install(monkeypatch)
    spec = PlatformSpec([DeviceSpec("blk", 2, {"path": str(image)})])
    async with running_server(tmp_path, spec) as server:
        conn, blk = await open_disk(url_of(server, "unix"))
        async with conn:
            slow = asyncio.create_task(blk.read(7 * SECTOR, SECTOR))
            await until(lambda: gate.entered == 1, "the slow read waits in its thread")
            async with asyncio.timeout(WAIT):
                assert await blk.read(9 * SECTOR, SECTOR) == contents[9]
                assert await blk.get_id() == "viowire-blk"
            assert not slow.done()
            gate.open()
            async with asyncio.timeout(WAIT):
                assert await slow == contents[7]


async def test_a_stalled_disk_does_not_stall_other_sessions(tmp_path, monkeypatch):
    """Session A's disk stalls with a queue full of reads; session B's registers and its own
    file-backed disk answer meanwhile."""
    stalled, other = tmp_path / "stalled.img", tmp_path / "other.img"
    fill(stalled, 64)
    contents = fill(other, 64)
    gate = DiskGate(stalled)
    gate.install(monkeypatch)
    spec = PlatformSpec(
        [DeviceSpec("blk", 2, {"path": str(stalled)}), DeviceSpec("blk", 2, {"path": str(other)})]
    )
    async with running_server(tmp_path, spec) as server:
        url = url_of(server, "unix")
        conn_a, blk_a = await open_disk(url, 0)
        conn_b, blk_b = await open_disk(url, 1)
        async with conn_a, conn_b:
            stuck = [asyncio.create_task(blk_a.read(i * SECTOR, SECTOR)) for i in range(8)]
            await until(lambda: gate.entered == 8, "session A's reads wait in their threads")
            async with asyncio.timeout(WAIT):
                assert await conn_b.mmio_read(blk_b.dev.base + Reg.MAGIC_VALUE, 4) == 0x74726976
                assert await blk_b.read(5 * SECTOR, 2 * SECTOR) == contents[5] + contents[6]
                await blk_b.write(0, b"\x42" * SECTOR)
                await blk_b.flush()
            assert not any(read.done() for read in stuck)
            gate.open()
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*stuck)


async def test_cached_reads_are_inline_and_the_others_go_to_a_thread(tmp_path, monkeypatch):
    """Sectors the page cache holds are read at once on the loop; sectors it does not (dropped
    with POSIX_FADV_DONTNEED) are read on a thread, with the same result."""
    image = tmp_path / "disk.img"
    contents = fill(image, 8192)  # 4 MiB: sector 6000 is far past any readahead from 0
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        try:
            # (a refused read may start readahead: this probe looks far from sector 6000)
            os.preadv(fd, [bytearray(SECTOR)], 3000 * SECTOR, os.RWF_NOWAIT)
            pytest.skip(f"the file system of {tmp_path} keeps every page cached")
        except BlockingIOError:
            pass
        os.pread(fd, 4 * SECTOR, 0)  # these are cached again
    finally:
        os.close(fd)
    gate = DiskGate(image, holds=lambda offset: False)  # it only counts
    gate.install(monkeypatch)
    spec = PlatformSpec([DeviceSpec("blk", 2, {"path": str(image)})])
    async with running_server(tmp_path, spec) as server:
        conn, blk = await open_disk(url_of(server, "unix"))
        async with conn, asyncio.timeout(WAIT):
            assert await blk.read(SECTOR, 2 * SECTOR) == contents[1] + contents[2]
            assert gate.preads == 0
            assert await blk.read(6000 * SECTOR, SECTOR) == contents[6000]
            assert gate.preads == 1


async def test_file_backed_data_is_on_the_disk_after_flush(tmp_path):
    """Writes completed before a FLUSH are in the file when it completes: another reader of
    the file sees them, and so does a new session after the old one is gone."""
    image = tmp_path / "disk.img"
    spec = PlatformSpec([DeviceSpec("blk", 2, {"path": str(image), "size": 1 << 20})])
    chunks = {i * 8192: os.urandom(8192) for i in range(32)}
    async with running_server(tmp_path, spec) as server:
        conn, blk = await open_disk(url_of(server, "unix"))
        async with conn:
            async with asyncio.timeout(WAIT):
                await asyncio.gather(*(blk.write(at, data) for at, data in chunks.items()))
                await blk.flush()
            with open(image, "rb") as f:
                for at, data in chunks.items():
                    f.seek(at)
                    assert f.read(len(data)) == data
        conn, blk = await open_disk(url_of(server, "unix"))
        async with conn:
            async with asyncio.timeout(WAIT):
                got = await asyncio.gather(*(blk.read(at, len(d)) for at, d in chunks.items()))
            assert got == list(chunks.values())


async def test_file_io_errors_are_ioerr(tmp_path):
    """A read that the file refuses (a directory) and a write that it refuses (a memfd sealed
    against writes): IOERR, and the device goes on."""
    folder = tmp_path / "folder"
    folder.mkdir()
    for i in range(64):  # a directory's size grows with its entries (tmpfs starts near 0)
        if os.stat(folder).st_size >= 2 * SECTOR:
            break
        (folder / f"entry-{i:02}").touch()
    sealed = os.memfd_create("sealed", os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(sealed, 8 * SECTOR)
        fcntl.fcntl(sealed, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
        spec = PlatformSpec(
            [
                DeviceSpec("blk", 2, {"path": str(folder), "readonly": True}),
                DeviceSpec("blk", 2, {"path": f"/proc/self/fd/{sealed}"}),
            ]
        )
        async with running_server(tmp_path, spec) as server:
            url = url_of(server, "unix")
            conn_dir, blk_dir = await open_disk(url, 0)
            conn_mem, blk_mem = await open_disk(url, 1)
            async with conn_dir, conn_mem, asyncio.timeout(WAIT):
                with pytest.raises(RequestError) as read_error:
                    await blk_dir.read(0, SECTOR)
                with pytest.raises(RequestError) as write_error:
                    await blk_mem.write(0, b"\x42" * SECTOR)
                assert read_error.value.status == write_error.value.status == BlkStatus.IOERR
                assert await blk_mem.read(0, SECTOR) == bytes(SECTOR)  # reads still work
                assert await blk_dir.get_id() == "viowire-blk"
    finally:
        os.close(sealed)


# -- reset with requests in flight ----------------------------------------------------------------
@pytest.mark.parametrize("memory", ["shared", "proxied"])
async def test_reset_during_latency_requests_writes_nothing(tmp_path, watch, memory):
    spec = PlatformSpec([DeviceSpec(WATCHED_BLK, 2, {"size": 1 << 20, "latency": FOREVER})])
    async with running_server(tmp_path, spec) as server:
        conn, blk = await open_disk(url_of(server, "unix"), memory=memory)
        async with conn:
            reads = [await RawRead(blk, 8 * i).submit() for i in range(16)]
            await until(lambda: watch.in_flight == 16, "16 requests waiting in the device")
            await conn.mmio_write(blk.dev.base + Reg.STATUS, 4, 0, posted=False)
            assert watch.in_flight == 0 and watch.finished == 0  # cancelled by the reset
            async with asyncio.timeout(WAIT):
                await server_device(server).drain()
                await conn.mmio_read(blk.dev.base + Reg.STATUS, 4)
            assert await used_idx(blk) == 0
            assert all([await read.untouched() for read in reads])
            for read in reads:
                read.task.cancel()


@pytest.mark.parametrize("memory", ["shared", "proxied"])
async def test_reset_during_file_requests_writes_nothing_and_frees_the_threads(
    tmp_path, monkeypatch, watch, memory
):
    """More reads than the pool has threads, stalled on the disk: some in threads, the rest
    queued. A reset ends them all; when the disk answers nothing reaches guest memory, the
    pool serves the next requests, and the session's end closes the image once its last
    thread is done with it."""
    image = tmp_path / "disk.img"
    contents = fill(image, 128)
    gate = DiskGate(image)
    gate.install(monkeypatch)
    spec = PlatformSpec([DeviceSpec(WATCHED_BLK, 2, {"path": str(image)})])
    count = MAX_THREADS + 8
    async with running_server(tmp_path, spec) as server:
        url = url_of(server, "unix")
        conn, blk = await open_disk(url, memory=memory)
        async with conn:
            reads = [await RawRead(blk, i).submit() for i in range(count)]
            await until(lambda: watch.in_flight == count, f"{count} requests in the device")
            await until(lambda: gate.entered == MAX_THREADS, "every I/O thread busy")
            await conn.mmio_write(blk.dev.base + Reg.STATUS, 4, 0, posted=False)
            assert watch.in_flight == 0 and watch.finished == 0
            gate.open()
            await until(lambda: gate.left == gate.entered, "the stalled preads returned")
            async with asyncio.timeout(WAIT):
                await server_device(server).drain()
                await conn.mmio_read(blk.dev.base + Reg.STATUS, 4)
            assert gate.entered == MAX_THREADS  # the queued ones never ran
            assert await used_idx(blk) == 0
            assert all([await read.untouched() for read in reads])
            for read in reads:
                read.task.cancel()
        # the pool is not wedged: a new session's disk reads at once
        conn, blk = await open_disk(url)
        async with conn, asyncio.timeout(WAIT):
            assert await blk.read(3 * SECTOR, SECTOR) == contents[3]
    await until(lambda: not image_fds(image), "the image closed once the sessions ended")


async def test_closing_a_session_waits_for_its_threads_before_closing_the_image(
    tmp_path, monkeypatch, watch
):
    """The descriptor a stalled thread reads through stays open after the session ends, so
    the thread never reads a file that reused its number; it is closed when the thread is done."""
    image = tmp_path / "disk.img"
    fill(image, 8)
    gate = DiskGate(image)
    gate.install(monkeypatch)
    spec = PlatformSpec([DeviceSpec(WATCHED_BLK, 2, {"path": str(image)})])
    async with running_server(tmp_path, spec) as server:
        conn, blk = await open_disk(url_of(server, "unix"))
        read = asyncio.create_task(blk.read(0, SECTOR))
        await until(lambda: gate.entered == 1, "the read waits in its thread")
        await conn.close()
        await until(lambda: watch.closed == 1, "the session closed its disk")
        assert len(image_fds(image)) == 1  # still open: its thread is in a pread
        gate.open()
        await until(lambda: not image_fds(image), "closed once the thread is done")
        read.cancel()
        await asyncio.gather(read, return_exceptions=True)


# -- the data a file-backed disk holds ------------------------------------------------------------
async def test_a_file_disk_holds_a_bounded_amount_of_request_data(tmp_path, monkeypatch, watch):
    """Requests past the disk's budget of data in flight wait for it before they read from the
    file (or the guest): with room for three 32 KiB reads, three are in threads, five wait."""
    monkeypatch.setattr(BlockBackend, "size_max", SECTOR)  # a request: 254 sectors at most
    monkeypatch.setattr(blk_module, "FILE_BYTES_IN_FLIGHT", 0)  # the budget: one such request
    image = tmp_path / "disk.img"
    contents = fill(image, 512)
    gate = DiskGate(image)
    gate.install(monkeypatch)
    spec = PlatformSpec([DeviceSpec(WATCHED_BLK, 2, {"path": str(image)})])
    async with running_server(tmp_path, spec) as server:
        conn, blk = await open_disk(url_of(server, "unix"))
        async with conn:
            size = 64 * SECTOR
            reads = [asyncio.create_task(blk.read(i * size, size)) for i in range(8)]
            await until(lambda: watch.in_flight == 8 and gate.entered == 3, "3 reads in threads")
            for _ in range(3):
                await conn.mmio_read(blk.dev.base + Reg.STATUS, 4)
            assert gate.entered == 3
            gate.open()
            async with asyncio.timeout(WAIT):
                got = await asyncio.gather(*reads)
            assert got == [b"".join(contents[i * 64 : (i + 1) * 64]) for i in range(8)]


async def test_data_budget_is_given_back_by_cancelled_takers():
    budget = blk_module._DataBudget(100)
    await budget.take(60)
    big = asyncio.create_task(budget.take(50))
    small = asyncio.create_task(budget.take(10))
    await asyncio.sleep(0)
    assert not big.done() and not small.done()  # in order: the small one waits behind
    big.cancel()
    await asyncio.gather(big, return_exceptions=True)
    await asyncio.wait_for(small, WAIT)  # the head is gone: it fits now
    assert budget.free == 30
    budget.give(60)
    budget.give(10)
    assert budget.free == 100
    await budget.take(100)
    granted = asyncio.create_task(budget.take(100))
    await asyncio.sleep(0)
    budget.give(100)  # granted to the waiter...
    granted.cancel()  # ...cancelled before it ran on
    await asyncio.gather(granted, return_exceptions=True)
    assert budget.free == 100
    await budget.take(0)  # nothing to hold: never waits
