"""Queue sizes the device cannot honour (§4.2.2.2, §2.7, §4.2.3.2): QueueNum above
QueueNumMax, not a power of 2, or 0, must be refused and never used."""

from __future__ import annotations

from collections.abc import Callable

from viowire.conform.checks.common import REJECT, WEDGED, check, fail
from viowire.conform.dut import Dut
from viowire.conform.model import Check, Outcome, rejected, skipped, wedged
from viowire.conform.requests import finish, request
from viowire.virtio.constants import USED_ELEM_SIZE, Reg, Status


async def size_probe(dut: Dut, valid: int, bad: int) -> Outcome:
    """Write QueueNum ``valid`` then ``bad``, enable the queue and serve requests one by one
    until slot positions under ``bad`` and ``valid`` differ: the used element's slot tells
    which size the device runs (v2). Legacy: the ring is laid out for ``valid`` only."""
    await dut.begin()
    ring = await dut.io_ring(valid, capacity=max(valid, bad))
    if ring.receiver is not None:
        await ring.receiver.program()
    queue = ring.index
    await dut.select(queue)
    await dut.write(Reg.QUEUE_NUM, valid)
    await dut.write(Reg.QUEUE_NUM, bad)
    if ring.legacy:
        await dut.write(Reg.QUEUE_ALIGN, ring.align)
        await dut.write(Reg.QUEUE_PFN, ring.pfn)
    else:
        await ring.write_addresses(ring.desc, ring.avail, ring.used)
        await dut.write(Reg.QUEUE_READY, 1)
    if await dut.status() & Status.DEVICE_NEEDS_RESET:
        return wedged(f"QueueNum {bad}: DEVICE_NEEDS_RESET when the queue was enabled")
    if not await dut.queue_in_use(queue):
        return rejected(f"QueueNum {bad}: the device would not enable the queue")
    if (await dut.add_status(Status.DRIVER_OK)) & Status.DEVICE_NEEDS_RESET:
        return wedged(f"QueueNum {bad}: DEVICE_NEEDS_RESET at DRIVER_OK")
    steps = (min(valid, bad) if bad else valid) + 1
    for k in range(steps):
        slots = {k % valid} | ({k % bad} if bad and not ring.legacy else set())
        for slot in slots:
            await dut.memory.write(ring.used + 4 + USED_ELEM_SIZE * slot, b"\xff" * 8)
            await ring.put(slot, 0)
        req = await request(dut, ring, 0)
        await ring.set_avail_idx(k + 1)
        await ring.notify()
        state = await ring.wait_used(1)
        if state == "needs-reset":
            return wedged(f"QueueNum {bad}: DEVICE_NEEDS_RESET at request {k + 1}")
        if state == "timeout":
            raise fail(
                f"QueueNum {valid} then {bad}: request {k + 1} was not served and no "
                f"DEVICE_NEEDS_RESET (the device seems to run a queue of {bad})"
            )
        moved = bad and not ring.legacy and k % bad != k % valid
        if moved and (await ring.used_slot(k % bad))[0] == 0:
            why = "" if bad < valid else f" above QueueNumMax {dut.queue_max[queue]}"
            if bad & (bad - 1):
                why = f": 65536 is not a multiple of {bad}, so the ring breaks at the index wrap"
            raise fail(
                f"the device runs the ring with QueueNum {bad} (request {k + 1} came "
                f"back in used slot {k % bad}, not {k % valid}){why}"
            )
        await finish(dut, ring, [req])
    return rejected(
        f"QueueNum {bad} ignored: the device kept {valid} ({steps} requests, slots wrapped at it)"
    )


def _probe_sizes(dut: Dut) -> int | None:
    """The valid size the probes start from; None when the queue is too small for them."""
    return 4 if dut.queue_max[dut.io_queue] >= 4 else None


def size_check(id: str, section: str, title: str, bad: Callable[[Dut], int]) -> Check:
    """A check that QueueNum ``bad(dut)`` is refused, probed from a valid size of 4."""

    async def run(dut: Dut) -> Outcome:
        if (valid := _probe_sizes(dut)) is None:
            return skipped("QueueNumMax below 4")
        return await size_probe(dut, valid, bad(dut))

    expect = (REJECT, WEDGED)
    return check(id, section, title, io=True, expect=expect, violation=True)(run)


queue_num_above_max = size_check(
    "queue.num-above-max",
    "4.2.2.2",
    "QueueNum above QueueNumMax is refused (ignored or DEVICE_NEEDS_RESET), never used",
    lambda dut: 2 * dut.queue_max[dut.io_queue],
)
queue_num_not_pow2 = size_check(
    "queue.num-not-pow2",
    "2.7",
    "a QueueNum that is not a power of 2 is refused (ignored or DEVICE_NEEDS_RESET), never used",
    lambda dut: 3,
)
queue_num_zero = size_check(
    "queue.num-zero",
    "4.2.3.2",
    "QueueNum 0 is refused (ignored or DEVICE_NEEDS_RESET)",
    lambda dut: 0,
)
