"""A virtio-blk that never completes one write: the request stays in flight for as long as the
process lives. tests/test_vhost_user_inflight.py kills the process then, so that a request is
certainly in flight when the back-end dies (``--device stalling_blk:StallingBlk,...`` with this
directory on PYTHONPATH)."""

from __future__ import annotations

import asyncio
import struct

from viowire.device import DescriptorChain, GuestMemory, Option
from viowire.server.devices import BlockBackend

_OUT = 1
_HEADER = struct.Struct("<IIQ")


class StallingBlk(BlockBackend):
    """blk; a write to ``stall_sector`` is done (the data reaches the image) but never
    completed."""

    type_name = "stalling-blk"
    options = {
        **BlockBackend.options,
        "stall_sector": Option.integer(-1, "the sector whose write is never completed"),
    }

    def __init__(self, stall_sector: int = -1, **options) -> None:
        super().__init__(**options)
        self.stall_sector = stall_sector

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        written = await super().handle(queue, chain, memory)
        kind, _, sector = _HEADER.unpack(await chain.read(0, _HEADER.size))
        if kind == _OUT and sector == self.stall_sector:
            await asyncio.Event().wait()  # in flight until the process ends
        return written
