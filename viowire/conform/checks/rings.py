"""Malformed rings (§2.7.4 - §2.7.6): loops, out-of-range indices, bad or nested indirect
tables, buffers outside RAM, chains of more than 2^32 bytes."""

from __future__ import annotations

from viowire.conform.checks.broken import ring_check
from viowire.conform.checks.chains import Desc, chained, indirect_table, raw_table
from viowire.conform.checks.common import INDIRECT, TOLERANT_EXPECT, N, W
from viowire.conform.dut import Dut
from viowire.conform.requests import BLK_HEADER
from viowire.conform.ring import Ring
from viowire.virtio.constants import VIRTQ_DESC_F_INDIRECT, BlkType, DeviceId, Feature


class Parts:
    """The buffers of one request: rng ``data`` (64 writable bytes); blk ``header`` (a read of
    sector 0), ``data`` (512 writable) and ``status`` (1 writable). ``extra`` is 16 writable
    bytes, for chains that need one more buffer."""

    def __init__(self, dut: Dut) -> None:
        self.dut = dut
        self.rng = dut.device_id == DeviceId.ENTROPY
        self.header = self.data = self.status = self.extra = 0

    async def make(self) -> Parts:
        dut = self.dut
        if not self.rng:
            self.header = await dut.buffer(data=BLK_HEADER.pack(BlkType.IN, 0, 0))
            self.status = await dut.buffer(1, fill=0xFF)
            self.data = await dut.buffer(512)
        else:
            self.data = await dut.buffer(64)
        self.extra = await dut.buffer(16)
        return self

    def around(self, body: list[Desc]) -> list[Desc]:
        """blk: header, then ``body`` (indices from 1), then status; rng: ``body`` alone.
        In ``body`` a next of -1 means "the descriptor after me"."""
        if self.rng:
            return [(a, n, f, i + 1 if nx == -1 else nx) for i, (a, n, f, nx) in enumerate(body)]
        out = [(self.header, 16, N, 1)]
        for i, (a, n, f, nx) in enumerate(body, start=1):
            out.append((a, n, f, i + 1 if nx == -1 else nx))
        out.append((self.status, 1, W, 0))
        last = len(out) - 2
        a, n, f, nx = out[last]
        out[last] = (a, n, f | N, last + 1) if not f & N else (a, n, f, nx)
        return out

    @property
    def size(self) -> int:
        return 64 if self.rng else 512


async def _lay(ring: Ring, descs: list[Desc]) -> None:
    """Descriptors 0, 1, … then publish head 0."""
    for i, desc in enumerate(descs):
        await ring.set_desc(i, *desc)
    await ring.publish(0)


@ring_check("ring.desc-loop", "2.7.5.2", "descriptors whose next fields form a loop")
async def ring_desc_loop(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    if p.rng:
        await _lay(ring, [(p.data, 64, W | N, 1), (p.extra, 16, W | N, 0)])
        return "descriptors 0 → 1 → 0", 0
    await _lay(ring, [(p.header, 16, N, 1), (p.data, 512, W | N, 2), (p.status, 1, W | N, 1)])
    return "descriptors 1 → 2 → 1", 0


@ring_check(
    "ring.next-out-of-range",
    "2.7.5",
    "a descriptor whose next is beyond the table (next = queue size)",
)
async def ring_next_out_of_range(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    descs = chained(_segments_of(p))
    a, n, f, _ = descs[-1]
    descs[-1] = (a, n, f | N, ring.num)
    await _lay(ring, descs)
    return f"next = {ring.num} in a table of {ring.num}", 0


def _segments_of(p: Parts) -> list[tuple[int, int, bool]]:
    if p.rng:
        return [(p.data, 64, True)]
    return [(p.header, 16, False), (p.data, 512, True), (p.status, 1, True)]


@ring_check(
    "ring.head-out-of-range", "2.7.6", "an available ring entry naming a head beyond the table"
)
async def ring_head_out_of_range(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    for i, desc in enumerate(chained(_segments_of(p))):
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
    await _lay(ring, p.around([(outside, p.size, W, -1)]))
    return f"a {p.size}-byte buffer at {outside:#x}, outside guest RAM", p.size + (not p.rng)


@ring_check(
    "ring.zero-length",
    "2.7.5",
    "a zero-length descriptor is refused, or served without harm (QEMU refuses it)",
    allow_use=True,
    expect=TOLERANT_EXPECT,
)
async def ring_zero_length(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    await _lay(ring, p.around([(p.extra, 0, W | N, -1), (p.data, p.size, W, -1)]))
    return "a writable descriptor of length 0 in the chain", p.size + (0 if p.rng else 1)


@ring_check(
    "ring.readable-after-writable",
    "2.7.4.2",
    "a device-readable descriptor after a device-writable one",
)
async def ring_readable_after_writable(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    readable = await dut.buffer(data=bytes(16))
    descs = chained(_segments_of(p))
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
    inner, inner_len = await indirect_table(dut, _segments_of(await Parts(dut).make()))
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
    table, length = await indirect_table(dut, _segments_of(await Parts(dut).make()))
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
    table, length = await indirect_table(dut, _segments_of(p))
    await _lay(ring, [(table, length, VIRTQ_DESC_F_INDIRECT | N, 1), (p.extra, 16, W, 0)])
    return "INDIRECT | NEXT on one descriptor", p.size + (not p.rng)


@ring_check(
    "ring.indirect-not-negotiated",
    "2.7.5.3.1",
    "an indirect descriptor without VIRTIO_F_INDIRECT_DESC negotiated is refused, or served",
    allow_use=True,
    expect=TOLERANT_EXPECT,
)
async def ring_indirect_not_negotiated(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    table, length = await indirect_table(dut, _segments_of(p))
    await _lay(ring, [(table, length, VIRTQ_DESC_F_INDIRECT, 0)])
    return "INDIRECT without the feature", p.size + (not p.rng)


@ring_check("ring.avail-idx-jump", "2.7.13", "avail.idx moved ahead by more than the queue size")
async def ring_avail_idx_jump(dut: Dut, ring: Ring) -> tuple[str, int]:
    for i, desc in enumerate(chained(_segments_of(await Parts(dut).make()))):
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
