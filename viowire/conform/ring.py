"""Split rings laid out by hand in guest memory (§2.7): v2 as three areas, v1 (legacy) as one
QueuePFN block, programmed through the queue registers and driven index by index.

The layout is :class:`~viowire.virtio.ring.RingLayout`'s, as everywhere. The writing is this
module's own: every access goes through the :class:`Dut` (remote memory, each access bounded in
time, driver-only areas guarded), where :mod:`viowire.virtio.mock`'s ``RingBuilder`` writes an
in-process memory synchronously for unit tests.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from viowire.virtio.constants import PAGE_SIZE, Reg, Status
from viowire.virtio.ring import (
    DESC,
    USED_ELEM,
    USED_ELEM_SIZE,
    RingLayout,
    area_sizes,
    avail_ring_size,
    desc_table_size,
    ring_areas,
    vring_size,
)

if TYPE_CHECKING:
    from viowire.conform.dut import Dut
    from viowire.conform.receive import ReceiveBuffers

__all__ = ["DESC", "Ring"]  # DESC: checks/chains.py packs its tables with it


class Ring:
    """A split ring laid out by hand: v2 as three areas, v1 as one QueuePFN block.

    ``capacity`` (v2) sizes the areas for more entries than ``num``, so that a device which
    takes another queue size than the driver's still stays inside the allocation. The
    descriptor table and the available ring are guarded: only the driver writes them.

    ``receiver``: the buffers of the receive queue this ring's requests need (a sample request's
    ``receive_queue``), set up by :meth:`program` before this ring and posted again by
    :meth:`notify` before each notification.
    """

    def __init__(
        self,
        dut: Dut,
        num: int,
        *,
        index: int = 0,
        capacity: int | None = None,
        page_size: int = PAGE_SIZE,
        align: int = PAGE_SIZE,
    ) -> None:
        self.dut = dut
        self.num = num
        self.index = index
        self.capacity = max(num, capacity or 0)
        self.legacy = dut.version == 1
        self.page_size = page_size
        self.align = align
        self.layout = RingLayout(num, 0, 0, 0)
        """Where the ring is, once :meth:`allocate` has placed it."""
        self.pfn = 0
        self.avail_idx = 0  # what the driver has published
        self.last_used = 0  # what the driver has consumed
        self.notified_at = 0.0
        self.receiver: ReceiveBuffers | None = None

    @property
    def desc(self) -> int:
        return self.layout.desc

    @property
    def avail(self) -> int:
        return self.layout.avail

    @property
    def used(self) -> int:
        return self.layout.used

    async def allocate(self) -> None:
        dut, cap = self.dut, self.capacity
        if self.legacy:
            base = await dut.alloc(vring_size(cap, self.align), self.page_size)
            self.layout = RingLayout.legacy(base, self.num, self.align)
            self.pfn = base // self.page_size
        else:
            desc, avail, used = [await dut.alloc(size, align) for size, align in area_sizes(cap)]
            self.layout = RingLayout(self.num, desc, avail, used)
        guarded = self.num if self.legacy else cap  # legacy: the used ring follows at once
        await dut.guard(self.desc, desc_table_size(guarded), "the descriptor table")
        await dut.guard(self.avail, avail_ring_size(guarded), "the available ring")

    async def rezero(self) -> None:
        """Zero all three parts again and forget the indices, as for a fresh ring."""
        cap = self.capacity
        if self.legacy:
            await self.dut.poke(self.desc, bytes(vring_size(cap, self.align)))
        else:
            for _, addr, size, _ in ring_areas(cap, self.desc, self.avail, self.used):
                await self.dut.poke(addr, bytes(size))
        self.avail_idx = self.last_used = 0

    async def program(self, *, ready: bool = True) -> None:
        """The queue registers, in the order §4.2.3.2 (v2) or §4.2.4 (legacy) gives; the
        receive queue's first, so that this queue is the one selected afterwards."""
        dut = self.dut
        if self.receiver is not None:
            await self.receiver.program()
        await dut.select(self.index)
        await dut.write(Reg.QUEUE_NUM, self.num)
        if self.legacy:
            await dut.write(Reg.QUEUE_ALIGN, self.align)
            await dut.write(Reg.QUEUE_PFN, self.pfn)
            return
        await self.write_addresses(self.desc, self.avail, self.used)
        if ready:
            await dut.write(Reg.QUEUE_READY, 1)

    async def write_addresses(self, desc: int, avail: int, used: int) -> None:
        for low, gpa in (
            (Reg.QUEUE_DESC_LOW, desc),
            (Reg.QUEUE_AVAIL_LOW, avail),
            (Reg.QUEUE_USED_LOW, used),
        ):
            await self.dut.write(low, gpa & 0xFFFF_FFFF)
            await self.dut.write(low + 4, gpa >> 32)

    async def set_desc(
        self, index: int, addr: int, length: int, flags: int = 0, next_index: int = 0
    ) -> None:
        desc = DESC.pack(addr, length & 0xFFFF_FFFF, flags, next_index)
        await self.dut.poke(self.layout.desc_addr(index), desc)

    async def put(self, slot: int, head: int) -> None:
        """avail.ring[slot] = head, without publishing it; ``slot`` may lie past ``num`` (in
        the ``capacity``), for a device that takes another queue size."""
        await self.dut.poke_u16(self.layout.avail_ring + 2 * slot, head)

    async def set_avail_idx(self, value: int) -> None:
        self.avail_idx = value & 0xFFFF
        await self.dut.poke_u16(self.layout.avail_idx, self.avail_idx)

    async def publish(self, *heads: int) -> None:
        """Ring slots first, then avail.idx (§2.7.13)."""
        idx = self.avail_idx
        for head in heads:
            await self.put(idx % self.num, head)
            idx = (idx + 1) & 0xFFFF
        await self.set_avail_idx(idx)

    async def set_used_event(self, value: int) -> None:
        await self.dut.poke_u16(self.layout.used_event, value)

    async def notify(self) -> None:
        if self.receiver is not None:
            await self.receiver.kick()
        self.notified_at = asyncio.get_running_loop().time()
        await self.dut.write(Reg.QUEUE_NOTIFY, self.index)

    async def used_idx(self) -> int:
        return await self.dut.memory.read_u16(self.layout.used_idx)

    async def used_elem(self, position: int) -> tuple[int, int]:
        """(id, len) of the used element at free-running index ``position``."""
        gpa = self.layout.used_elem_addr(position)
        return USED_ELEM.unpack(await self.dut.memory.read(gpa, USED_ELEM_SIZE))

    async def used_slot(self, slot: int) -> tuple[int, int]:
        """(id, len) in used ring slot ``slot``, whatever the queue size."""
        gpa = self.layout.used_ring + USED_ELEM_SIZE * slot
        return USED_ELEM.unpack(await self.dut.memory.read(gpa, USED_ELEM_SIZE))

    async def pending_used(self) -> int:
        return (await self.used_idx() - self.last_used) & 0xFFFF

    async def wait_used(self, count: int, timeout: float | None = None) -> str:
        """Wait until ``count`` new used elements are published: ``"used"``, or
        ``"needs-reset"`` as soon as the device sets DEVICE_NEEDS_RESET, or ``"timeout"``."""

        async def probe() -> str | None:
            if await self.pending_used() >= count:
                return "used"
            if await self.dut.status() & Status.DEVICE_NEEDS_RESET:
                return "needs-reset"
            return None

        return await self.dut.until(probe, timeout) or "timeout"
