"""A queue whose driver keeps refilling it must not hold the event loop for long: the other
sessions of the process wait for the pass in progress (issue 9's idle.read_rtt figure).

Found while measuring benchmarks/device_sdk.py: with shared memory, the driver of a streaming
session refills its ring while the server's pass runs, and the pass sees the new chains without
a kick, so it serves ``queue.num`` (256) chains before the loop reads another session's frame:
3-8 ms under load, where an idle session's register read otherwise takes 22 µs.
"""

from __future__ import annotations

import asyncio

from ringbuilder import GuestRam, MmioDriver, RingBuilder, make_device

from viowire.device import Device

BATCH = 32  # what one look at avail.idx may expose from a driver at depth 32


class Refilled(Device):
    """Each request: one byte written, and the driver (on another CPU, as it were) makes one
    more chain available meanwhile, until ``limit``."""

    device_id = 0x7F10
    handle_inline = True  # served inside the pass, as blk and rng are

    def __init__(self, ring: RingBuilder, limit: int) -> None:
        super().__init__()
        self.ring, self.limit, self.served = ring, limit, 0

    async def handle(self, queue, chain, memory) -> int:
        self.served += 1
        if self.served + BATCH <= self.limit:
            self.ring.add_chain([], [1])
        return await chain.write(b"\x01")


async def test_a_refilled_queue_lets_other_sessions_in_between_batches():
    ram = GuestRam(1 << 21)
    ring = RingBuilder(ram, 256)
    backend = Refilled(ring, limit=1024)
    device = make_device(backend, 2, ram)
    driver = MmioDriver(device)
    driver.bring_up([ring])
    for _ in range(BATCH):
        ring.add_chain([], [1])
    seen = []
    driver.notify()
    asyncio.get_running_loop().call_soon(lambda: seen.append(backend.served))  # another session
    await asyncio.wait_for(device.drain(), 10)
    assert backend.served == 1024
    assert seen and seen[0] <= 2 * BATCH, f"another session waited for {seen[0]} requests"
