"""One correct request per device type (virtio-blk, virtio-rng), built on a hand-laid ring, and
the checks every used element must pass when it comes back (§2.7.8, §5.2.6, §5.4.6.2)."""

from __future__ import annotations

import asyncio
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from viowire.conform.dut import Dut
from viowire.conform.model import CheckFailed
from viowire.conform.ring import Ring
from viowire.virtio.constants import (
    BLK_REQ_HEADER_SIZE,
    BLK_SECTOR_SIZE,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    BlkStatus,
    BlkType,
    DeviceId,
)

BLK_HEADER = struct.Struct("<IIQ")  # type, ioprio, sector


@dataclass
class Request:
    """A chain the driver built: its head, its descriptors, what the device may write."""

    head: int
    descs: tuple[int, ...]
    writable: list[tuple[int, int]]
    status: int | None = None  # virtio-blk: the status byte's address
    want_status: int | None = None
    data: tuple[int, int] | None = None  # virtio-blk IN: where the data lands

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


async def chain(
    ring: Ring, head: int, segments: Sequence[tuple[int, int, bool]]
) -> tuple[int, ...]:
    """Descriptors head, head+1, … (mod num) for ``(gpa, len, writable)`` segments."""
    descs = tuple((head + i) % ring.num for i in range(len(segments)))
    for i, (gpa, length, writable) in enumerate(segments):
        flags = VIRTQ_DESC_F_WRITE if writable else 0
        last = i + 1 == len(segments)
        await ring.set_desc(
            descs[i],
            gpa,
            length,
            flags | (0 if last else VIRTQ_DESC_F_NEXT),
            0 if last else descs[i + 1],
        )
    return descs


async def request(dut: Dut, ring: Ring, head: int = 0, **blk: Any) -> Request:
    """A correct request for the device type in descriptors from ``head`` (not published):
    virtio-rng, a 64-byte buffer; virtio-blk, see :func:`blk_request` (default: read sector 0)."""
    if dut.device_id == DeviceId.BLOCK:
        return await blk_request(dut, ring, head, **blk)
    gpa = await dut.buffer(64)
    return Request(head, await chain(ring, head, [(gpa, 64, True)]), [(gpa, 64)])


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
    """header (readable) [+ data] + status (writable): the classic three-descriptor layout,
    which even a legacy device without ANY_LAYOUT accepts."""
    header = await dut.buffer(data=BLK_HEADER.pack(kind, 0, sector))
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
    return Request(head, descs, writable, status, want, landing)


async def finish(dut: Dut, ring: Ring, requests: Sequence[Request]) -> dict[int, int]:
    """Wait for ``requests`` (published, notified) to come back and check each used element
    (§2.7.8): every head exactly once, used.len no larger than the writable bytes, blk status
    as wanted, rng at least one byte (§5.4.6.2). Returns ``{head: used len}``."""
    state = await ring.wait_used(len(requests))
    if state == "needs-reset":
        raise CheckFailed(
            f"DEVICE_NEEDS_RESET set on a correct request (status {await dut.status():#x})"
        )
    if state == "timeout":
        raise CheckFailed(
            f"{len(requests)} correct request(s) not completed within "
            f"{dut.options.io_timeout:g} s (used.idx {await ring.used_idx()}, "
            f"status {await dut.status():#x})"
        )
    dut.note_latency(asyncio.get_running_loop().time() - ring.notified_at)
    if (more := await ring.pending_used()) > len(requests):
        raise CheckFailed(f"used.idx moved by {more} for {len(requests)} request(s)")
    outstanding = {r.head: r for r in requests}
    lengths = {}
    for k in range(len(requests)):
        head, length = await ring.used_elem(ring.last_used + k)
        req = outstanding.pop(head, None)
        if req is None:
            raise CheckFailed(f"used element id {head} is not an outstanding head (2.7.8)")
        if length > req.writable_len:
            raise CheckFailed(
                f"used.len {length} for head {head} exceeds its {req.writable_len} "
                "device-writable bytes (2.7.8.2)"
            )
        await _check_payload(dut, req, length)
        lengths[head] = length
    ring.last_used = (ring.last_used + len(requests)) & 0xFFFF
    return lengths


async def _check_payload(dut: Dut, req: Request, length: int) -> None:
    if req.status is not None:
        status = (await dut.memory.read(req.status, 1))[0]
        if status != req.want_status:
            raise CheckFailed(
                f"virtio-blk status byte {status:#x}, expected {req.want_status} "
                f"({BlkStatus(req.want_status).name}) (5.2.6)"
            )
    elif dut.version == 2 and length == 0:
        raise CheckFailed(
            "virtio-rng used.len 0: the device MUST place at least one byte (5.4.6.2)"
        )


async def io_round(dut: Dut, ring: Ring, count: int = 1, **blk: Any) -> dict[int, int]:
    """``count`` correct requests on a live ring, published together, one notify."""
    per = 1 if dut.device_id == DeviceId.ENTROPY else 3
    first = ring.avail_idx * per
    reqs = [await request(dut, ring, (first + k * per) % ring.num, **blk) for k in range(count)]
    await ring.publish(*(r.head for r in reqs))
    await ring.notify()
    return await finish(dut, ring, reqs)
