"""Correct I/O on any device whose type declares a sample request (§2.7): requests that wrap the
ring, and indirect tables (§2.7.5.3)."""

from __future__ import annotations

from viowire.conform.checks.chains import indirect_table
from viowire.conform.checks.common import INDIRECT, N, W, check, fail
from viowire.conform.dut import Dut
from viowire.conform.model import CheckFailed, Outcome, passed
from viowire.conform.requests import Segment, as_request, finish, io_round, per_request, segments
from viowire.virtio.constants import VIRTQ_DESC_F_INDIRECT, Feature


@check(
    "io.requests",
    "2.7.13",
    "correct requests complete: each head once, used.len within the writable bytes; a full "
    "ring twice, so the indices wrap",
    io=True,
    window=False,
)
async def io_requests(dut: Dut) -> Outcome:
    ring = await dut.up()
    await io_round(dut, ring)
    batch = ring.num // per_request(dut)
    await io_round(dut, ring, batch)
    await io_round(dut, ring, batch)
    return passed(
        f"1 + 2 x {batch} requests on a ring of {ring.num} (last round {dut.latency * 1000:.2f} ms)"
    )


@check(
    "io.indirect",
    "2.7.5.3.2",
    "a lone indirect table, and normal descriptors followed by one indirect table, are served",
    io=True,
    feature=Feature.RING_INDIRECT_DESC,
    window=False,
)
async def io_indirect(dut: Dut) -> Outcome:
    ring = await dut.up(extra=INDIRECT)
    forms = (
        (0, "a chain that is one indirect descriptor"),
        (1, "a normal descriptor followed by an indirect one, which the device MUST handle"),
    )
    for split, form in forms:
        segs = _two_at_least(await segments(dut))
        if len(segs) <= split:
            continue  # a request of one byte: nothing to leave for the table
        table, length = await indirect_table(dut, segs[split:])
        head = (ring.avail_idx * 4) % ring.num
        for i, (gpa, n, writable) in enumerate(segs[:split]):
            await ring.set_desc(head + i, gpa, n, (W if writable else 0) | N, head + i + 1)
        await ring.set_desc(head + split, table, length, VIRTQ_DESC_F_INDIRECT)
        req = as_request(dut, head, (head,), segs)
        await ring.publish(req.head)
        await ring.notify()
        try:
            await finish(dut, ring, [req])
        except CheckFailed as exc:
            raise fail(f"{form}: {exc}") from None
    return passed("a lone indirect table and a direct descriptor + indirect table both served")


def _two_at_least(segs: list[Segment]) -> list[Segment]:
    """A request of one buffer as two descriptors (its halves), so that one can go before the
    indirect table and something is left for the table."""
    if len(segs) != 1 or segs[0][1] < 2:
        return segs
    gpa, length, writable = segs[0]
    half = length // 2
    return [(gpa, half, writable), (gpa + half, length - half, writable)]
