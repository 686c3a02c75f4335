"""Descriptor chains built by hand: chained descriptors and indirect tables (§2.7.5), for the
checks that lay out their own chains from the buffers of a correct request
(:func:`viowire.conform.requests.segments`)."""

from __future__ import annotations

from viowire.conform.checks.common import N, W
from viowire.conform.dut import Dut
from viowire.conform.requests import Segment
from viowire.conform.ring import DESC
from viowire.virtio.constants import DESC_SIZE

Desc = tuple[int, int, int, int]  # addr, len, flags, next


def chained(segs: list[Segment]) -> list[Desc]:
    """Descriptors 0 → 1 → … for ``(gpa, len, writable)`` segments."""
    out = []
    for i, (gpa, n, writable) in enumerate(segs):
        last = i + 1 == len(segs)
        out.append((gpa, n, (W if writable else 0) | (0 if last else N), 0 if last else i + 1))
    return out


async def raw_table(dut: Dut, entries: list[Desc]) -> tuple[int, int]:
    """An indirect table holding ``entries``; guarded (only the driver writes it)."""
    table = await dut.alloc(DESC_SIZE * len(entries))
    for i, entry in enumerate(entries):
        await dut.poke(table + DESC_SIZE * i, DESC.pack(*entry))
    await dut.guard(table, DESC_SIZE * len(entries), "an indirect descriptor table")
    return table, DESC_SIZE * len(entries)


async def indirect_table(dut: Dut, segs: list[Segment]) -> tuple[int, int]:
    return await raw_table(dut, chained(segs))
