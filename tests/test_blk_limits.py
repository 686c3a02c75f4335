"""virtio-blk request limits: VIRTIO_BLK_F_SIZE_MAX and VIRTIO_BLK_F_SEG_MAX (virtio 1.2 §5.2).

The device offers both and bounds the data of one read or write by ``seg_max * size_max``: a
request past it gets VIRTIO_BLK_S_IOERR before the device allocates anything for it or touches
the disk, with the ``used.len`` of any other failed request, and the device stays healthy. The
client driver reads both fields (Linux's max_segments and max_segment_size) and splits larger
I/O into requests inside them.

A real server on real sockets; hostile chains are built by hand in the client's guest RAM, every
wait is bounded, and memory is judged by what was allocated (tracemalloc, peak RSS), not by time.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import re
import struct
import tracemalloc
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass

import pytest
from ringbuilder import RingBuilder
from servers import running_server, url_of
from test_bad_input import HandDriver, SharedRam, until

from viowire.client.connection import Connection, connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.errors import VirtioError
from viowire.server.app import Server
from viowire.server.devices.blk import SIZE_MAX, BlockBackend
from viowire.server.platform import DeviceSpec, PlatformSpec
from viowire.virtio.blk import BlkFeature, BlkStatus, BlkType
from viowire.virtio.constants import (
    VIRTQ_DESC_F_INDIRECT,
    Feature,
    Reg,
    Status,
)

pytestmark = pytest.mark.timeout(60)

TIMEOUT = 10.0  # the bound of every wait
SECTOR = 512
MiB = 1 << 20
DISK = 128 * MiB  # larger than seg_max * size_max, so only the new bound can refuse
BLK, BLK_V1, RNG = 0x1000_1000, 0x1000_2000, 0x1000_3000  # slots of limits_platform()
V1 = 1 << Feature.VERSION_1
INDIRECT = 1 << Feature.RING_INDIRECT_DESC
RUNNING = Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK | Status.DRIVER_OK
SEGMENT = MiB  # each hostile descriptor: the same MiB of guest RAM, listed again and again
CLAIMS = {"3GiB": 3 * 1024, "96MiB": 96}  # data segments of one hostile request
SMALL_SIZE_MAX = 4096  # for the tests that need the bound to be small (about 1 MiB)
ALLOC_CEILING = 16 * MiB  # far below every claim, and below the default bound


def limits_platform() -> PlatformSpec:
    return PlatformSpec(
        [
            DeviceSpec.parse(f"blk,size={DISK}"),
            DeviceSpec.parse(f"blk,size={DISK},version=1"),
            DeviceSpec.parse("rng"),
        ]
    )


@pytest.fixture
async def server(tmp_path) -> AsyncIterator[Server]:
    async with running_server(tmp_path, limits_platform()) as srv:
        yield srv


@pytest.fixture
async def open_conn(server):
    conns: list[Connection] = []

    async def open_(memory: str = "shared", ram_size: int = 4 * MiB) -> Connection:
        url = url_of(server, "unix")
        conn = await asyncio.wait_for(connect(url, memory=memory, ram_size=ram_size), TIMEOUT)
        conns.append(conn)
        return conn

    yield open_
    for conn in conns:
        await conn.close()


@pytest.fixture(autouse=True)
def _no_server_bugs(caplog):
    """Oversized requests are the driver's error: an ERROR record means the server broke."""
    yield
    bugs = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= 40 and r.name.split(".")[0] in ("viowire", "asyncio")
    ]
    assert not bugs, "\n".join(bugs)


def backend_of(server: Server, conn: Connection, base: int) -> BlockBackend:
    """The server's backend behind ``conn``'s window at ``base`` (white box: same process)."""
    session = next(s for s in server.sessions if s.session_id == conn.session_id)
    return session.platform.lookup(base)[0].device.backend


class DiskSpy:
    """Records every access to a backend's image: (op, offset, length)."""

    def __init__(self, backend: BlockBackend, monkeypatch) -> None:
        self.calls: list[tuple[str, int, int]] = []
        image = backend._image
        pread, pwrite = image.pread, image.pwrite

        def spy_pread(offset: int, length: int) -> bytes:
            self.calls.append(("pread", offset, length))
            return pread(offset, length)

        def spy_pwrite(offset: int, data) -> None:
            self.calls.append(("pwrite", offset, len(data)))
            pwrite(offset, data)

        monkeypatch.setattr(image, "pread", spy_pread)
        monkeypatch.setattr(image, "pwrite", spy_pwrite)


# -- memory, measured ------------------------------------------------------------------------
@dataclass
class MemoryUse:
    peak_alloc: int = 0  # bytes Python allocated at most at once inside the block
    peak_rss_growth: int | None = None  # peak RSS minus RSS before; None where not measurable


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        return int(re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.M)[1]) * 1024


def _reset_peak_rss() -> bool:
    """Writing 5 to clear_refs resets VmHWM (Linux 4.0+)."""
    try:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")
        return True
    except OSError:
        return False


@contextlib.contextmanager
def memory_watch() -> Iterator[MemoryUse]:
    """What the process (server and client: one process) allocated inside the block."""
    use = MemoryUse()
    gc.collect()
    rss_known = _reset_peak_rss()
    rss_before = _status_bytes("VmRSS") if rss_known else 0
    tracemalloc.start()
    try:
        yield use
        use.peak_alloc = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    if rss_known:
        use.peak_rss_growth = _status_bytes("VmHWM") - rss_before


# -- requests built by hand ------------------------------------------------------------------
def blk_header(type_: int, sector: int) -> bytes:
    return struct.pack("<IIQ", type_, 0, sector)


@dataclass
class Done:
    status: int
    used_len: int


async def submit(driver: HandDriver, ring: RingBuilder, head: int) -> int:
    """Publish ``head``, notify, wait (bounded) for its used element; returns its used.len."""
    before = ring.used_idx
    ring.publish(head)
    await driver.notify()
    await until(lambda: ring.used_idx == (before + 1) & 0xFFFF, "the used ring", TIMEOUT)
    used_head, used_len = ring.used_elem(before)
    assert used_head == head
    return used_len


async def request(
    driver: HandDriver,
    ring: RingBuilder,
    type_: int,
    sector: int,
    *,
    data_segments: int,
    segment: int,
    buf: int,
) -> Done:
    """One request whose data part is ``data_segments`` descriptors of ``segment`` bytes, all at
    ``buf`` (device-writable for IN and GET_ID, readable otherwise), through an indirect table:
    a chain that claims far more data than the guest RAM behind it."""
    ram = ring.ram
    header, status = ram.alloc(16), ram.alloc(1)
    ram.write(header, blk_header(type_, sector))
    ram.write(status, b"\xee")
    into_guest = type_ in (BlkType.IN, BlkType.GET_ID)
    table = ring.indirect_table(
        [(header, 16, False), *[(buf, segment, into_guest)] * data_segments, (status, 1, True)]
    )
    head = ring._take_desc()  # the builder's next free descriptor, as add_chain takes them
    ring.set_desc(head, table, 16 * (data_segments + 2), VIRTQ_DESC_F_INDIRECT)
    used_len = await submit(driver, ring, head)
    return Done(ram.read(status, 1)[0], used_len)


async def plain_request(
    driver: HandDriver, ring: RingBuilder, readable: list[bytes], writable: list[int]
) -> tuple[Done, bytes]:
    """A well-formed request of fresh buffers: its outcome and the data before the status."""
    chain = ring.add_chain(readable, writable, publish=False)
    used_len = await submit(driver, ring, chain.head)
    data = b"".join(ring.ram.read(gpa, n) for gpa, n in chain.writable)
    return Done(data[-1], used_len), data[:-1]


async def brought_up(
    conn: Connection, base: int = BLK, num: int = 8
) -> tuple[HandDriver, RingBuilder]:
    version = 1 if base == BLK_V1 else 2
    driver = HandDriver(conn, base, version)
    ram = SharedRam(conn.ram)
    ring = RingBuilder.legacy(ram, num) if version == 1 else RingBuilder(ram, num)
    await driver.bring_up(ring, V1 | INDIRECT)
    assert await driver.status() == (RUNNING if version == 2 else RUNNING & ~Status.FEATURES_OK)
    return driver, ring


async def round_trip(driver: HandDriver, ring: RingBuilder, sector: int) -> None:
    """A well-behaved write and read on the same ring: the device still serves."""
    payload = os.urandom(2 * SECTOR)
    done, _ = await plain_request(driver, ring, [blk_header(BlkType.OUT, sector), payload], [1])
    assert (done.status, done.used_len) == (BlkStatus.OK, 1)
    done, data = await plain_request(
        driver, ring, [blk_header(BlkType.IN, sector)], [len(payload), 1]
    )
    assert (done.status, done.used_len, data) == (BlkStatus.OK, len(payload) + 1, payload)


async def bystander(conn: Connection) -> BlockDriver:
    """Another session's disk, attached through the real driver."""
    info = next(d for d in await conn.platform() if d.base == BLK)
    return await asyncio.wait_for(BlockDriver.attach(await conn.attach(info)), TIMEOUT)


async def bystander_works(disk: BlockDriver, sector: int) -> None:
    payload = os.urandom(4 * SECTOR)
    await asyncio.wait_for(disk.write(sector * SECTOR, payload), TIMEOUT)
    assert await asyncio.wait_for(disk.read(sector * SECTOR, len(payload)), TIMEOUT) == payload


# == the limits, as the device reports them ======================================================
@pytest.mark.parametrize("base", [BLK, BLK_V1], ids=["modern", "legacy"])
async def test_config_space_reports_size_max_and_seg_max(server, open_conn, base):
    conn = await open_conn()
    backend = backend_of(server, conn, base)
    assert backend.size_max == SIZE_MAX
    assert backend.seg_max == backend.queue_num_max - 2  # header and status, as QEMU
    assert backend.max_data_bytes == backend.seg_max * backend.size_max
    driver = HandDriver(conn, base, 1 if base == BLK_V1 else 2)
    await driver.write(Reg.DEVICE_FEATURES_SEL, 0)
    offered = await driver.read(Reg.DEVICE_FEATURES)
    assert offered >> BlkFeature.SIZE_MAX & 1 and offered >> BlkFeature.SEG_MAX & 1
    assert await driver.read(Reg.CONFIG + 0x08) == SIZE_MAX  # size_max (§5.2.4)
    assert await driver.read(Reg.CONFIG + 0x0C) == backend.seg_max  # seg_max
    info = next(d for d in await conn.platform() if d.base == base)
    disk = await asyncio.wait_for(BlockDriver.attach(await conn.attach(info)), TIMEOUT)
    try:
        assert (disk.size_max, disk.seg_max) == (SIZE_MAX, backend.seg_max)
        assert disk.request_bytes <= backend.max_data_bytes
    finally:
        await disk.detach()


# == a hostile driver ==============================================================================
@pytest.mark.parametrize("memory", ["shared", "proxied"])
@pytest.mark.parametrize("claim", list(CLAIMS))
@pytest.mark.parametrize("kind", [BlkType.IN, BlkType.OUT], ids=["read", "write"])
async def test_oversized_request_gets_ioerr_before_any_allocation(
    server, open_conn, monkeypatch, memory, claim, kind
):
    neighbour = await bystander(await open_conn())
    await bystander_works(neighbour, 8)
    conn = await open_conn(memory)
    driver, ring = await brought_up(conn)
    backend = backend_of(server, conn, BLK)
    await round_trip(driver, ring, 40)  # the RAM disk now has a mapping to copy from
    claimed = CLAIMS[claim] * SEGMENT
    assert backend.max_data_bytes < claimed
    buf = ring.ram.alloc(SEGMENT, 4096)
    ring.ram.write(buf, b"\x5a" * SEGMENT)
    # the answer to an ordinary failed request of the same direction: past the end of the disk
    past_end = await request(
        driver, ring, kind, DISK // SECTOR, data_segments=1, segment=SECTOR, buf=buf
    )
    assert past_end.status == BlkStatus.IOERR
    spy = DiskSpy(backend, monkeypatch)
    with memory_watch() as use:
        done = await request(
            driver, ring, kind, 0, data_segments=CLAIMS[claim], segment=SEGMENT, buf=buf
        )
    assert done.status == BlkStatus.IOERR
    assert done.used_len == past_end.used_len == (0 if kind == BlkType.IN else 1)
    assert spy.calls == []  # the disk was not touched
    assert use.peak_alloc < ALLOC_CEILING, f"{use.peak_alloc} bytes allocated"
    if use.peak_rss_growth is not None:
        assert use.peak_rss_growth < 2 * ALLOC_CEILING, f"RSS grew by {use.peak_rss_growth}"
    assert ring.ram.read(buf, 64) == b"\x5a" * 64  # a refused read writes no data
    assert await driver.status() == RUNNING  # IOERR is an answer, not a broken device
    await round_trip(driver, ring, 0)
    await bystander_works(neighbour, 16)


@pytest.mark.parametrize("base", [BLK, BLK_V1], ids=["modern", "legacy"])
async def test_the_bound_is_exact(server, open_conn, monkeypatch, base):
    """seg_max * size_max bytes are served; one sector more is refused (a small size_max keeps
    the request in guest RAM)."""
    monkeypatch.setattr(BlockBackend, "size_max", SMALL_SIZE_MAX)
    conn = await open_conn(ram_size=8 * MiB)
    driver, ring = await brought_up(conn, base)
    bound = backend_of(server, conn, base).max_data_bytes
    assert bound == (BlockBackend.queue_num_max - 2) * SMALL_SIZE_MAX
    assert await driver.read(Reg.CONFIG + 0x08) == SMALL_SIZE_MAX
    payload = os.urandom(bound)
    done, _ = await plain_request(driver, ring, [blk_header(BlkType.OUT, 8), payload], [1])
    assert (done.status, done.used_len) == (BlkStatus.OK, 1)
    done, data = await plain_request(driver, ring, [blk_header(BlkType.IN, 8)], [bound, 1])
    assert (done.status, done.used_len, data == payload) == (BlkStatus.OK, bound + 1, True)
    spy = DiskSpy(backend_of(server, conn, base), monkeypatch)
    over = bound + SECTOR
    done, _ = await plain_request(driver, ring, [blk_header(BlkType.OUT, 8), bytes(over)], [1])
    assert (done.status, done.used_len) == (BlkStatus.IOERR, 1)
    done, data = await plain_request(driver, ring, [blk_header(BlkType.IN, 8)], [over, 1])
    assert (done.status, done.used_len) == (BlkStatus.IOERR, 0)
    assert data == b"\xee" * over  # untouched: the builder's poison
    assert spy.calls == []
    done, data = await plain_request(driver, ring, [blk_header(BlkType.IN, 8)], [bound, 1])
    assert (done.status, data == payload) == (BlkStatus.OK, True)  # the refused write wrote nothing


async def test_get_id_and_flush_are_not_data_requests(server, open_conn, monkeypatch):
    """The bound is on IN and OUT data; GET_ID and FLUSH keep working, even with buffers far
    larger than it (which the device never copies)."""
    conn = await open_conn()
    driver, ring = await brought_up(conn)
    done, data = await plain_request(driver, ring, [blk_header(BlkType.GET_ID, 0)], [20, 1])
    assert (done.status, done.used_len, data) == (BlkStatus.OK, 21, b"viowire-blk".ljust(20, b"\0"))
    done, _ = await plain_request(driver, ring, [blk_header(BlkType.FLUSH, 0)], [1])
    assert (done.status, done.used_len) == (BlkStatus.OK, 1)
    buf = ring.ram.alloc(SEGMENT, 4096)
    spy = DiskSpy(backend_of(server, conn, BLK), monkeypatch)
    with memory_watch() as use:
        get_id = await request(
            driver, ring, BlkType.GET_ID, 0, data_segments=96, segment=SEGMENT, buf=buf
        )
        flush = await request(
            driver, ring, BlkType.FLUSH, 0, data_segments=96, segment=SEGMENT, buf=buf
        )
    assert (get_id.status, get_id.used_len) == (BlkStatus.OK, 20)  # the id, not the status
    assert ring.ram.read(buf, 20) == b"viowire-blk".ljust(20, b"\0")
    assert (flush.status, flush.used_len) == (BlkStatus.OK, 1)
    assert spy.calls == []
    assert use.peak_alloc < ALLOC_CEILING
    assert await driver.status() == RUNNING


# == the client driver ============================================================================
@pytest.mark.parametrize("memory", ["shared", "proxied"])
async def test_client_splits_io_larger_than_the_bound(server, open_conn, monkeypatch, memory):
    monkeypatch.setattr(BlockBackend, "size_max", SMALL_SIZE_MAX)
    conn = await open_conn(memory, ram_size=16 * MiB)
    info = next(d for d in await conn.platform() if d.base == BLK)
    disk = await asyncio.wait_for(
        BlockDriver.attach(await conn.attach(info), max_request=8 * MiB), TIMEOUT
    )
    backend = backend_of(server, conn, BLK)
    spy = DiskSpy(backend, monkeypatch)
    try:
        assert (disk.size_max, disk.seg_max) == (SMALL_SIZE_MAX, backend.seg_max)
        assert disk.request_bytes == backend.max_data_bytes  # the device's bound, not 8 MiB
        payload = os.urandom(3 * MiB)
        await asyncio.wait_for(disk.write(MiB, payload), TIMEOUT)
        assert await asyncio.wait_for(disk.read(MiB, len(payload)), TIMEOUT) == payload
    finally:
        await disk.detach()
    writes = [n for op, _, n in spy.calls if op == "pwrite"]
    reads = [n for op, _, n in spy.calls if op == "pread"]
    for sizes in (writes, reads):
        assert sum(sizes) == len(payload) and len(sizes) > 1
        assert max(sizes) <= backend.max_data_bytes


async def test_client_refuses_limits_that_leave_no_sector(server, open_conn, monkeypatch):
    monkeypatch.setattr(BlockBackend, "size_max", 1)  # 254 segments of one byte
    conn = await open_conn()
    info = next(d for d in await conn.platform() if d.base == BLK)
    dev = await conn.attach(info)
    with pytest.raises(VirtioError, match=r"size_max 1 .* less than one 512-byte sector") as error:
        await asyncio.wait_for(BlockDriver.attach(dev), TIMEOUT)
    assert "device" in str(error.value)
    assert await conn.mmio_read(BLK + Reg.STATUS, 4) & Status.FAILED  # probe unwound


def test_client_refuses_a_max_request_below_one_sector():
    with pytest.raises(ValueError, match=r"max_request 100 .* at least 512"):
        BlockDriver(None, max_request=100)  # type: ignore[arg-type]
