"""Reset (§2.4, §4.2.2.1): what a reset clears, ring indices from 0, nothing written after it,
and a storm of resets at every stage of setup."""

from __future__ import annotations

import random
from collections.abc import Awaitable, Callable

from viowire.conform.checks.common import ACK_DRIVER, check, fail, live_device
from viowire.conform.dut import Dut
from viowire.conform.model import CheckFailed, Outcome, passed
from viowire.conform.recovery import verify_reset
from viowire.conform.requests import io_round, per_request, request
from viowire.conform.ring import Ring
from viowire.virtio.constants import USED_ELEM_SIZE, Reg, Status


@check(
    "reset.clears-state",
    "4.2.2.1",
    "a reset clears Status, InterruptStatus and QueueReady/QueuePFN, and drops the line",
)
async def reset_clears_state(dut: Dut) -> Outcome:
    await live_device(dut)
    pending = await dut.interrupt_status()
    asserted = dut.irq_level
    await verify_reset(dut)
    if asserted and not await dut.wait_irq_level(False):
        raise fail("the interrupt line stays asserted after the reset cleared InterruptStatus")
    what = f"InterruptStatus {pending:#x} → 0" + (", line dropped" if asserted else "")
    return passed(f"Status → 0, {what}, {dut.num_queues} queue(s) out of use")


@check(
    "reset.ring-indices",
    "2.4.1",
    "after a reset the device starts the rings from index 0 again",
    io=True,
    window=False,
)
async def reset_ring_indices(dut: Dut) -> Outcome:
    ring = await dut.up()
    await io_round(dut, ring, 2)
    await dut.begin()
    await ring.rezero()
    await ring.program()
    await dut.driver_ok()
    try:
        await io_round(dut, ring)
    except CheckFailed as exc:
        raise fail(
            f"the same ring, zeroed, after a reset: {exc} (indices kept across reset?)"
        ) from None
    return passed("a zeroed ring at the same addresses starts from index 0")


@check(
    "reset.in-flight",
    "2.4.1",
    "after the reset completes the device writes no guest memory and raises no interrupt",
    io=True,
    window=False,
)
async def reset_in_flight(dut: Dut) -> Outcome:
    ring = await dut.up()
    per = per_request(dut)
    reqs = [await request(dut, ring, k * per) for k in range(ring.num // per)]
    await ring.publish(*(r.head for r in reqs))
    await ring.notify()
    await dut.write(Reg.STATUS, 0)
    await dut.reset()
    events = len(dut.irq_events)
    regions = [(ring.used, 6 + USED_ELEM_SIZE * ring.num)] + [w for r in reqs for w in r.writable]
    if ring.receiver is not None:
        regions += ring.receiver.regions
    snapshot = [await dut.memory.read(g, n) for g, n in regions]
    await dut.quiet()
    await dut.quiet()
    for (gpa, length), before in zip(regions, snapshot, strict=True):
        if await dut.memory.read(gpa, length) != before:
            raise fail(
                f"guest memory at {gpa:#x} changed after the reset completed (2.4.1: no "
                "interaction with the queues after reset)"
            )
    if True in dut.irq_events[events:]:
        raise fail("the interrupt line was asserted after the reset completed (2.4.1)")
    return passed(f"{len(reqs)} requests in flight at the reset; nothing written after it")


@check(
    "reset.storm",
    "2.4",
    "40 resets interleaved with every stage of setup; then the correct flow still works",
    window=False,
)
async def reset_storm(dut: Dut) -> Outcome:
    rand = random.Random(dut.options.seed + dut.index)
    ring = await dut.io_ring() if dut.io else await dut.ring() if dut.queue_max else None
    stages = _storm_stages(dut, ring)
    depths = []
    for i in range(40):
        depth = rand.randint(1, len(stages))
        depths.append(depth)
        if ring is not None:
            await ring.rezero()
        for stage in stages[:depth]:
            await stage()
        await dut.write(Reg.STATUS, 0)
        try:
            await dut.reset()
        except CheckFailed as exc:
            raise fail(f"reset {i + 1} (after {depth} setup stages): {exc}") from None
    if dut.io:
        ring = await dut.up()
        await io_round(dut, ring)
    return passed(
        f"40 resets after 1..{len(stages)} setup stages (mean "
        f"{sum(depths) / len(depths):.1f}); the correct flow works after them"
    )


def _storm_stages(dut: Dut, ring: Ring | None) -> list[Callable[[], Awaitable[None]]]:
    async def ack() -> None:
        await dut.set_status(Status.ACKNOWLEDGE)

    async def driver() -> None:
        await dut.set_status(ACK_DRIVER)
        if dut.version == 1:
            await dut.write(Reg.GUEST_PAGE_SIZE, 4096)

    async def features() -> None:
        await dut.write_features(dut.features_for())
        if dut.version == 2:
            await dut.set_status(ACK_DRIVER | Status.FEATURES_OK)

    async def queue() -> None:
        if ring is not None:
            await ring.program()

    async def live() -> None:
        await dut.add_status(Status.DRIVER_OK)

    async def kick() -> None:
        if ring is not None and dut.io:
            req = await request(dut, ring, (ring.avail_idx * per_request(dut)) % ring.num)
            await ring.publish(req.head)
            await ring.notify()

    return [ack, driver, features, queue, live, kick]
