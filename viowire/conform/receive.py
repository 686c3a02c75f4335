"""Buffers kept posted on the receive queue a sample request needs (its ``receive_queue``).

A device whose request queue is served only when it has somewhere to put the result (a loopback,
a console port wired to itself, a net device's transmit path tested through its receive path)
takes those buffers from a receive queue, and holds them until then. The suite's ring for the
request queue carries a :class:`ReceiveBuffers` for that queue: programmed with it, every buffer
posted at once, and before each notification of the request queue every buffer the device has
given back is posted again, so the requests of a round never wait for one.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from viowire.device import SampleRequest
from viowire.virtio.constants import VIRTQ_DESC_F_WRITE
from viowire.virtio.ring import USED_ELEM_SIZE

if TYPE_CHECKING:
    from viowire.conform.ring import Ring

RECEIVE_SIZE = SampleRequest.receive_size  # bytes per buffer


class ReceiveBuffers:
    """``ring.num`` device-writable buffers of :data:`RECEIVE_SIZE` bytes, one descriptor each,
    kept posted on ``ring`` (the receive queue's ring)."""

    def __init__(self, ring: Ring) -> None:
        self.ring = ring
        self.gpa = 0  # one block for all of them, allocated on the first program()
        self._unnotified = False  # buffers posted since the last notification

    @property
    def regions(self) -> list[tuple[int, int]]:
        """Guest memory the device writes for this queue: its used ring and the buffers."""
        ring = self.ring
        return [(ring.used, 6 + USED_ELEM_SIZE * ring.num), (self.gpa, ring.num * RECEIVE_SIZE)]

    async def program(self) -> None:
        """Set the receive queue up from scratch (a device starts it from index 0 after a reset)
        and post every buffer; no notification until the request queue gets one."""
        ring = self.ring
        await ring.rezero()
        await ring.program()
        if not self.gpa:
            self.gpa = await ring.dut.buffer(ring.num * RECEIVE_SIZE)
        for head in range(ring.num):
            await ring.set_desc(
                head, self.gpa + head * RECEIVE_SIZE, RECEIVE_SIZE, VIRTQ_DESC_F_WRITE
            )
        await ring.publish(*range(ring.num))
        self._unnotified = True

    async def kick(self) -> None:
        """Post again every buffer the device has given back, and notify the receive queue if
        anything was posted since its last notification."""
        ring = self.ring
        returned = await ring.pending_used()
        count = min(returned, ring.num)
        heads = [(await ring.used_elem(ring.last_used + k))[0] for k in range(count)]
        ring.last_used = (ring.last_used + returned) & 0xFFFF
        heads = [head for head in heads if head < ring.num]  # a bogus id is the device's bug
        if heads:
            await ring.publish(*heads)
            self._unnotified = True
        if self._unnotified:
            await ring.notify()
            self._unnotified = False
