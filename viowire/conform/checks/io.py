"""Correct I/O on any blk or rng device (§2.7): requests that wrap the ring, and indirect
tables (§2.7.5.3)."""

from __future__ import annotations

from viowire.conform.checks.chains import indirect_table, segments
from viowire.conform.checks.common import INDIRECT, N, W, check, fail
from viowire.conform.dut import IO_DEVICES, Dut
from viowire.conform.model import CheckFailed, Outcome, passed
from viowire.conform.requests import Request, finish, io_round
from viowire.virtio.constants import VIRTQ_DESC_F_INDIRECT, BlkStatus, DeviceId, Feature


@check(
    "io.requests",
    "2.7.13",
    "correct requests complete: each head once, used.len within the writable bytes; a full "
    "ring twice, so the indices wrap",
    devices=IO_DEVICES,
)
async def io_requests(dut: Dut) -> Outcome:
    ring = await dut.up()
    await io_round(dut, ring)
    batch = ring.num if dut.device_id == DeviceId.ENTROPY else ring.num // 3
    await io_round(dut, ring, batch)
    await io_round(dut, ring, batch)
    return passed(
        f"1 + 2 x {batch} requests on a ring of {ring.num} (last round {dut.latency * 1000:.2f} ms)"
    )


@check(
    "io.indirect",
    "2.7.5.3.2",
    "a lone indirect table, and normal descriptors followed by one indirect table, are served",
    devices=IO_DEVICES,
    feature=Feature.RING_INDIRECT_DESC,
)
async def io_indirect(dut: Dut) -> Outcome:
    ring = await dut.up(extra=INDIRECT)
    forms = (
        (0, "a chain that is one indirect descriptor"),
        (1, "a normal descriptor followed by an indirect one, which the device MUST handle"),
    )
    for split, form in forms:
        segs = await segments(dut)
        if dut.device_id == DeviceId.ENTROPY:
            segs.append((await dut.buffer(64), 64, True))  # something left for the table
        table, length = await indirect_table(dut, segs[split:])
        head = (ring.avail_idx * 4) % ring.num
        for i, (gpa, n, writable) in enumerate(segs[:split]):
            await ring.set_desc(head + i, gpa, n, (W if writable else 0) | N, head + i + 1)
        await ring.set_desc(head + split, table, length, VIRTQ_DESC_F_INDIRECT)
        req = _as_request(dut, head, segs)
        await ring.publish(req.head)
        await ring.notify()
        try:
            await finish(dut, ring, [req])
        except CheckFailed as exc:
            raise fail(f"{form}: {exc}") from None
    return passed("a lone indirect table and a direct descriptor + indirect table both served")


def _as_request(dut: Dut, head: int, segs: list[tuple[int, int, bool]]) -> Request:
    writable = [(g, n) for g, n, w in segs if w]
    if dut.device_id == DeviceId.BLOCK:
        return Request(head, (head,), writable, writable[-1][0], BlkStatus.OK)
    return Request(head, (head,), writable)
