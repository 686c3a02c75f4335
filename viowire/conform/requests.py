"""The correct request of a device type (its :class:`~viowire.device.SampleRequest`), built on a
hand-laid ring, and the checks every used element must pass when it comes back (§2.7.8).

The sample request names the queue, the device-readable bytes, the device-writable sizes, and
how to judge the answer (the fewest bytes written, a status byte); virtio-blk's is a read of
sector 0, virtio-rng's a 64-byte buffer. The checks of one device type's own section build
their own requests with :func:`chain` (virtio-blk's in :mod:`viowire.conform.checks.devices`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

from viowire.conform.dut import Dut
from viowire.conform.model import CheckFailed
from viowire.conform.ring import Ring
from viowire.virtio.constants import VIRTQ_DESC_F_NEXT, VIRTQ_DESC_F_WRITE

Segment = tuple[int, int, bool]
"""One buffer of a chain: guest address, length, device-writable."""


@dataclass
class Request:
    """A chain the driver built: its head, its descriptors, what the device may write, and how
    to judge what comes back."""

    head: int
    descs: tuple[int, ...]
    writable: list[tuple[int, int]]
    status: int | None = None  # the address of the status byte, if the request has one
    want_status: int | None = None
    min_written: int = 0  # the fewest bytes used.len may report
    data: tuple[int, int] | None = None  # the first writable buffer (virtio-blk IN: the data)

    @property
    def writable_len(self) -> int:
        return sum(n for _, n in self.writable)


def per_request(dut: Dut) -> int:
    """Descriptors in one sample request, as :func:`request` lays it out."""
    assert dut.sample is not None
    return len(dut.sample.readable_buffers) + len(dut.sample.writable_sizes)


async def segments(dut: Dut) -> list[Segment]:
    """Fresh buffers for one sample request: its readable ones holding their bytes, then its
    writable ones, guarded (see :meth:`~viowire.conform.scratch.GuestScratch.buffer`)."""
    sample = dut.sample
    assert sample is not None, "an I/O check on a device without a sample request"
    out = [(await dut.buffer(data=data), len(data), False) for data in sample.readable_buffers]
    out += [(await dut.buffer(size), size, True) for size in sample.writable_sizes]
    return out


def as_request(dut: Dut, head: int, descs: tuple[int, ...], segs: Sequence[Segment]) -> Request:
    """The sample request in ``segs`` (laid out however a check likes), judged as declared."""
    sample = dut.sample
    assert sample is not None
    writable = [(gpa, n) for gpa, n, w in segs if w]
    status = None
    if sample.status is not None and writable:
        gpa, n = writable[-1]
        status = gpa + n - 1
    first = writable[0] if writable else None
    return Request(head, descs, writable, status, sample.status, sample.min_written, first)


async def chain(ring: Ring, head: int, segs: Sequence[Segment]) -> tuple[int, ...]:
    """Descriptors head, head+1, … (mod num) for ``(gpa, len, writable)`` segments."""
    descs = tuple((head + i) % ring.num for i in range(len(segs)))
    for i, (gpa, length, writable) in enumerate(segs):
        flags = VIRTQ_DESC_F_WRITE if writable else 0
        last = i + 1 == len(segs)
        await ring.set_desc(
            descs[i],
            gpa,
            length,
            flags | (0 if last else VIRTQ_DESC_F_NEXT),
            0 if last else descs[i + 1],
        )
    return descs


async def request(dut: Dut, ring: Ring, head: int = 0) -> Request:
    """The sample request in descriptors from ``head``, one per buffer (not published)."""
    segs = await segments(dut)
    return as_request(dut, head, await chain(ring, head, segs), segs)


async def finish(dut: Dut, ring: Ring, requests: Sequence[Request]) -> dict[int, int]:
    """Wait for ``requests`` (published, notified) to come back and check each used element
    (§2.7.8): every head exactly once, used.len no larger than the writable bytes and no
    smaller than the request's ``min_written``, its status byte as wanted. Returns
    ``{head: used len}``."""
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
    if length < req.min_written:
        raise CheckFailed(
            f"used.len {length} for head {req.head}: a correct {dut.type_name} request gets at "
            f"least {req.min_written} byte(s) written (its type's sample request says so)"
        )
    if req.status is not None:
        status = (await dut.memory.read(req.status, 1))[0]
        if status != req.want_status:
            raise CheckFailed(
                f"status byte {status:#x} for head {req.head}, expected {req.want_status:#x} "
                f"(the last device-writable byte of a correct {dut.type_name} request)"
            )


async def io_round(dut: Dut, ring: Ring, count: int = 1) -> dict[int, int]:
    """``count`` sample requests on a live ring, published together, one notify."""
    per = per_request(dut)
    first = ring.avail_idx * per
    reqs = [await request(dut, ring, (first + k * per) % ring.num) for k in range(count)]
    await ring.publish(*(r.head for r in reqs))
    await ring.notify()
    return await finish(dut, ring, reqs)
