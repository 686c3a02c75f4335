"""Device-specific I/O: virtio-blk reads, writes, FLUSH and status codes (§5.2.6), and
virtio-rng's random bytes (§5.4.6.2)."""

from __future__ import annotations

import os
from typing import Any

from viowire.conform.checks.common import BLK, RNG, check, fail
from viowire.conform.dut import Dut
from viowire.conform.model import Outcome, passed, skipped
from viowire.conform.requests import Request, chain, finish, request
from viowire.conform.ring import Ring
from viowire.virtio.blk import (
    BLK_REQ_HEADER_SIZE,
    BLK_SECTOR_SIZE,
    BlkFeature,
    BlkStatus,
    BlkType,
    request_header,
)


async def blk_request(
    dut: Dut,
    ring: Ring,
    head: int = 0,
    *,
    kind: int = BlkType.IN,
    sector: int = 0,
    data: bytes = b"",
    in_len: int = BLK_SECTOR_SIZE,
    want: int = BlkStatus.OK,
) -> Request:
    """A virtio-blk request in descriptors from ``head`` (not published): header (readable)
    [+ data] + status (writable), the classic three-descriptor layout, which even a legacy
    device without ANY_LAYOUT accepts."""
    header = await dut.buffer(data=request_header(kind, sector))
    segments = [(header, BLK_REQ_HEADER_SIZE, False)]
    writable = []
    landing = None
    if kind == BlkType.OUT:
        segments.append((await dut.buffer(data=data), len(data), False))
    elif kind != BlkType.FLUSH and in_len:
        gpa = await dut.buffer(in_len)
        segments.append((gpa, in_len, True))
        writable.append((gpa, in_len))
        landing = (gpa, in_len)
    status = await dut.buffer(1, fill=0xFF)
    segments.append((status, 1, True))
    writable.append((status, 1))
    descs = await chain(ring, head, segments)
    return Request(head, descs, writable, status, want, data=landing)


async def capacity(dut: Dut) -> int:
    """The disk's size in 512-byte sectors (§5.2.4)."""
    return int.from_bytes(await dut.config_bytes(0, 8), "little")


async def blk(dut: Dut, ring: Ring, **kw: Any) -> Request:
    """One virtio-blk request, published, notified and checked; returned for its data."""
    req = await blk_request(dut, ring, (ring.avail_idx * 3) % ring.num, **kw)
    await ring.publish(req.head)
    await ring.notify()
    await finish(dut, ring, [req])
    return req


async def _read_sector(dut: Dut, ring: Ring, sector: int) -> bytes:
    req = await blk(dut, ring, sector=sector)
    assert req.data is not None
    return await dut.memory.read(*req.data)


@check(
    "io.blk-read-write",
    "5.2.6",
    "virtio-blk: a written sector reads back (then is restored); FLUSH completes",
    devices=BLK,
    io=True,
    window=False,
)
async def io_blk_read_write(dut: Dut) -> Outcome:
    if not (sectors := await capacity(dut)):
        return skipped("capacity 0: no sector to write")
    ring = await dut.up(extra=1 << BlkFeature.FLUSH)
    sector = sectors - 1
    original = await _read_sector(dut, ring, sector)
    pattern = os.urandom(BLK_SECTOR_SIZE)
    if dut.offered >> BlkFeature.RO & 1:
        await blk(dut, ring, kind=BlkType.OUT, sector=sector, data=pattern, want=BlkStatus.IOERR)
        if await _read_sector(dut, ring, sector) != original:
            raise fail("a read-only disk changed after a refused write (5.2.6.2)")
        return passed("read-only disk: the write got IOERR and changed nothing")
    await blk(dut, ring, kind=BlkType.OUT, sector=sector, data=pattern)
    if await _read_sector(dut, ring, sector) != pattern:
        raise fail(f"sector {sector} does not read back what was written")
    flushed = ""
    if dut.negotiated >> BlkFeature.FLUSH & 1:
        await blk(dut, ring, kind=BlkType.FLUSH, in_len=0)
        flushed = ", FLUSH OK"
    await blk(dut, ring, kind=BlkType.OUT, sector=sector, data=original)
    return passed(f"sector {sector} written, read back and restored{flushed}")


@check(
    "io.blk-status",
    "5.2.6",
    "virtio-blk: an unknown request type gets UNSUPP, a read past the end IOERR",
    devices=BLK,
    io=True,
    window=False,
)
async def io_blk_status(dut: Dut) -> Outcome:
    sectors = await capacity(dut)
    ring = await dut.up()
    await blk(dut, ring, kind=0xFF, in_len=0, want=BlkStatus.UNSUPP)
    await blk(dut, ring, sector=sectors, want=BlkStatus.IOERR)
    return passed(f"type 0xff → UNSUPP, sector {sectors} (the end) → IOERR")


@check(
    "io.rng",
    "5.4.6.2",
    "virtio-rng: each buffer gets at least one byte, used.len of them, and they differ",
    devices=RNG,
    io=True,
    window=False,
)
async def io_rng(dut: Dut) -> Outcome:
    ring = await dut.up()
    reqs = [await request(dut, ring, k) for k in range(4)]
    await ring.publish(*(r.head for r in reqs))
    await ring.notify()
    lengths = await finish(dut, ring, reqs)
    got = [await dut.memory.read(r.writable[0][0], lengths[r.head]) for r in reqs]
    if len(set(got)) < len(got) and all(len(g) >= 4 for g in got):
        raise fail("two buffers came back with the same bytes: not random")
    return passed(f"used.len {sorted(lengths.values())} of 64-byte buffers")
