"""Malformed rings (§2.7.4 - §2.7.6): loops, out-of-range indices, bad or nested indirect
tables, buffers outside RAM, chains of more than 2^32 bytes."""

from __future__ import annotations

from viowire.conform.checks.broken import ring_check
from viowire.conform.checks.chains import Desc, chained, indirect_table, raw_table
from viowire.conform.checks.common import INDIRECT, TOLERANT_EXPECT, N, W
from viowire.conform.dut import Dut
from viowire.conform.requests import Segment, segments
from viowire.conform.ring import Ring
from viowire.virtio.constants import VIRTQ_DESC_F_INDIRECT, Feature


class Parts:
    """The buffers of one correct request (the device type's sample request), around the one a
    malformed chain replaces: its ``data`` buffer, the first writable one (the last buffer when
    none is writable). ``extra`` is 16 writable bytes, for chains that need one more buffer."""

    def __init__(self, dut: Dut) -> None:
        self.dut = dut
        self.segments: list[Segment] = []
        self.at = 0  # the index of the data buffer in segments
        self.extra = 0

    async def make(self) -> Parts:
        self.segments = await segments(self.dut)
        writable = [i for i, (_, _, w) in enumerate(self.segments) if w]
        self.at = writable[0] if writable else len(self.segments) - 1
        self.extra = await self.dut.buffer(16)
        return self

    @property
    def data(self) -> int:
        return self.segments[self.at][0]

    @property
    def size(self) -> int:
        return self.segments[self.at][1]

    @property
    def flags(self) -> int:
        """The data buffer's descriptor flags: W if it is device-writable."""
        return W if self.segments[self.at][2] else 0

    @property
    def writable(self) -> int:
        """Device-writable bytes of the correct request: all a served chain may report."""
        return sum(n for _, n, w in self.segments if w)

    def around(self, body: list[Desc]) -> list[Desc]:
        """The request's buffers with ``body`` in place of the data buffer. In ``body`` a next
        of -1 means "the descriptor after me"; its last descriptor is chained on to the
        request's buffers after it, if any."""
        before, after = self.segments[: self.at], self.segments[self.at + 1 :]
        out = [(a, n, (W if w else 0) | N, i + 1) for i, (a, n, w) in enumerate(before)]
        for a, n, f, nx in body:
            out.append((a, n, f, len(out) + 1 if nx == -1 else nx))
        if after:
            a, n, f, _ = out[-1]
            if not f & N:
                out[-1] = (a, n, f | N, len(out))
            for a, n, w in after:
                out.append((a, n, (W if w else 0) | N, len(out) + 1))
            a, n, f, _ = out[-1]
            out[-1] = (a, n, f & ~N, 0)
        return out

    def with_extra(self) -> list[Segment]:
        """The request's buffers, and ``extra`` after them when the request has but one."""
        if len(self.segments) > 1:
            return list(self.segments)
        return [*self.segments, (self.extra, 16, True)]


async def _lay(ring: Ring, descs: list[Desc]) -> None:
    """Descriptors 0, 1, … then publish head 0."""
    for i, desc in enumerate(descs):
        await ring.set_desc(i, *desc)
    await ring.publish(0)


@ring_check("ring.desc-loop", "2.7.5.2", "descriptors whose next fields form a loop")
async def ring_desc_loop(dut: Dut, ring: Ring) -> tuple[str, int]:
    descs = chained((await Parts(dut).make()).with_extra())
    back = len(descs) - 2
    a, n, f, _ = descs[-1]
    descs[-1] = (a, n, f | N, back)
    await _lay(ring, descs)
    return f"descriptors {back} → {back + 1} → {back}", 0


@ring_check(
    "ring.next-out-of-range",
    "2.7.5",
    "a descriptor whose next is beyond the table (next = queue size)",
)
async def ring_next_out_of_range(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    descs = chained(p.segments)
    a, n, f, _ = descs[-1]
    descs[-1] = (a, n, f | N, ring.num)
    await _lay(ring, descs)
    return f"next = {ring.num} in a table of {ring.num}", 0


@ring_check(
    "ring.head-out-of-range", "2.7.6", "an available ring entry naming a head beyond the table"
)
async def ring_head_out_of_range(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    for i, desc in enumerate(chained(p.segments)):
        await ring.set_desc(i, *desc)
    await ring.publish(ring.num)
    return f"head {ring.num} in a table of {ring.num}", 0


@ring_check(
    "ring.addr-outside-ram",
    "2.7.5",
    "a buffer address outside guest RAM is refused, or served without touching guest RAM",
    allow_use=True,
    expect=TOLERANT_EXPECT,
)
async def ring_addr_outside_ram(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    outside = dut.outside_ram()
    await _lay(ring, p.around([(outside, p.size, p.flags, -1)]))
    return f"a {p.size}-byte buffer at {outside:#x}, outside guest RAM", p.writable


@ring_check(
    "ring.zero-length",
    "2.7.5",
    "a zero-length descriptor is refused, or served without harm (QEMU refuses it)",
    allow_use=True,
    expect=TOLERANT_EXPECT,
)
async def ring_zero_length(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    await _lay(ring, p.around([(p.extra, 0, p.flags | N, -1), (p.data, p.size, p.flags, -1)]))
    kind = "writable" if p.flags else "readable"
    return f"a {kind} descriptor of length 0 in the chain", p.writable


@ring_check(
    "ring.readable-after-writable",
    "2.7.4.2",
    "a device-readable descriptor after a device-writable one",
)
async def ring_readable_after_writable(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    readable = await dut.buffer(data=bytes(16))
    segs = p.segments if p.writable else [*p.segments, (p.extra, 16, True)]
    descs = chained(segs)
    a, n, f, _ = descs[-1]
    descs[-1] = (a, n, f | N, len(descs))
    descs.append((readable, 16, 0, 0))
    await _lay(ring, descs)
    return "a readable descriptor last, after the writable ones", 0


@ring_check(
    "ring.indirect-nested",
    "2.7.5.3.1",
    "an indirect table that points to another indirect table",
    feature=Feature.RING_INDIRECT_DESC,
    extra=INDIRECT,
)
async def ring_indirect_nested(dut: Dut, ring: Ring) -> tuple[str, int]:
    inner, inner_len = await indirect_table(dut, (await Parts(dut).make()).segments)
    outer, outer_len = await raw_table(dut, [(inner, inner_len, VIRTQ_DESC_F_INDIRECT, 0)])
    await _lay(ring, [(outer, outer_len, VIRTQ_DESC_F_INDIRECT, 0)])
    return "an INDIRECT entry inside an indirect table", 0


@ring_check(
    "ring.indirect-bad-len",
    "2.7.5.3",
    "an indirect descriptor whose len is not a multiple of 16",
    feature=Feature.RING_INDIRECT_DESC,
    extra=INDIRECT,
)
async def ring_indirect_bad_len(dut: Dut, ring: Ring) -> tuple[str, int]:
    table, length = await indirect_table(dut, (await Parts(dut).make()).segments)
    await _lay(ring, [(table, length - 8, VIRTQ_DESC_F_INDIRECT, 0)])
    return f"an indirect table of len {length - 8}", 0


@ring_check(
    "ring.indirect-with-next",
    "2.7.5.3.1",
    "a descriptor with both INDIRECT and NEXT is refused, or served from the table alone",
    feature=Feature.RING_INDIRECT_DESC,
    extra=INDIRECT,
    allow_use=True,
    expect=TOLERANT_EXPECT,
)
async def ring_indirect_with_next(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    table, length = await indirect_table(dut, p.segments)
    await _lay(ring, [(table, length, VIRTQ_DESC_F_INDIRECT | N, 1), (p.extra, 16, W, 0)])
    return "INDIRECT | NEXT on one descriptor", p.writable


@ring_check(
    "ring.indirect-not-negotiated",
    "2.7.5.3.1",
    "an indirect descriptor without VIRTIO_F_INDIRECT_DESC negotiated is refused, or served",
    allow_use=True,
    expect=TOLERANT_EXPECT,
)
async def ring_indirect_not_negotiated(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    table, length = await indirect_table(dut, p.segments)
    await _lay(ring, [(table, length, VIRTQ_DESC_F_INDIRECT, 0)])
    return "INDIRECT without the feature", p.writable


@ring_check("ring.avail-idx-jump", "2.7.13", "avail.idx moved ahead by more than the queue size")
async def ring_avail_idx_jump(dut: Dut, ring: Ring) -> tuple[str, int]:
    for i, desc in enumerate(chained((await Parts(dut).make()).segments)):
        await ring.set_desc(i, *desc)
    await ring.put(0, 0)
    await ring.set_avail_idx(ring.num + 1)
    return f"avail.idx {ring.num + 1} with {ring.num} entries", 0


@ring_check(
    "ring.huge-length",
    "2.7.5.2",
    "two buffers of 0xfffff000 bytes: a chain of more than 2^32 bytes",
)
async def ring_huge_length(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    huge = 0xFFFF_F000
    await _lay(ring, p.around([(p.data, huge, W | N, -1), (p.extra, huge, W, -1)]))
    return "two writable buffers of 0xfffff000 bytes (backed by far less)", 0
