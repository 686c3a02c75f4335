"""Queue setup (§4.2.3.2, §4.2.4, §2.7): QueueReady and QueuePFN, the legacy layout, queues
that do not exist, setup out of order and address writes to a live queue."""

from __future__ import annotations

from viowire.conform.checks.common import (
    ACK_DRIVER,
    PASS,
    REJECT,
    WEDGED,
    check,
    fail,
    kick_and_watch,
    live_device,
    still_works,
)
from viowire.conform.dut import Dut, reg_name
from viowire.conform.model import Outcome, passed, rejected, wedged
from viowire.conform.requests import finish, io_round, request
from viowire.conform.ring import Ring
from viowire.virtio.constants import USED_ELEM_SIZE, Reg, Status


@check(
    "queue.ready-readback",
    "4.2.2.1",
    "QueueReady reads 0, then 1 after writing 1, then 0 at once after writing 0; a stopped "
    "queue is not used",
    versions=(2,),
    io=True,
)
async def queue_ready_readback(dut: Dut) -> Outcome:
    await dut.begin()
    await dut.select(dut.io_queue)
    if value := await dut.read(Reg.QUEUE_READY):
        raise fail(f"QueueReady reads {value:#x} before setup")
    ring = await dut.io_ring()
    await ring.program(ready=False)
    await dut.write(Reg.QUEUE_READY, 1)
    if (value := await dut.read(Reg.QUEUE_READY)) != 1:
        raise fail(f"QueueReady reads {value:#x} after writing 1")
    await dut.driver_ok()
    await io_round(dut, ring)
    await dut.write(Reg.QUEUE_READY, 0)
    if value := await dut.read(Reg.QUEUE_READY):
        raise fail(
            f"QueueReady reads {value:#x} right after writing 0 (the driver reads it back "
            "to synchronise, 4.2.2.2)"
        )
    _, used = await kick_and_watch(dut, ring, 4)
    if used:
        raise fail(
            "the device used the queue after QueueReady was set to 0 (4.2.2.1: it MUST "
            "NOT access virtual queue contents)"
        )
    return passed("0 → 1 → 0 read back; a request on the stopped queue was left alone")


@check(
    "queue.legacy-pfn",
    "4.2.4",
    "QueuePFN reads back the page number; writing 0 stops the queue",
    versions=(1,),
    io=True,
)
async def queue_legacy_pfn(dut: Dut) -> Outcome:
    await dut.begin()
    await dut.select(dut.io_queue)
    if value := await dut.read(Reg.QUEUE_PFN):
        raise fail(f"QueuePFN reads {value:#x} before setup")
    ring = await dut.io_ring()
    await ring.program()
    if (value := await dut.read(Reg.QUEUE_PFN)) != ring.pfn:
        raise fail(f"QueuePFN reads {value:#x}, {ring.pfn:#x} was written")
    await dut.driver_ok()
    await io_round(dut, ring)
    await dut.select(dut.io_queue)
    await dut.write(Reg.QUEUE_PFN, 0)
    if value := await dut.read(Reg.QUEUE_PFN):
        raise fail(f"QueuePFN reads {value:#x} after writing 0")
    _, used = await kick_and_watch(dut, ring, 4)
    if used:
        raise fail("the device used the queue after QueuePFN was set to 0 (4.2.4)")
    return passed(f"QueuePFN {ring.pfn:#x} read back; after 0 the queue was left alone")


@check(
    "queue.legacy-layout",
    "2.7.2",
    "legacy rings are found at QueuePFN * GuestPageSize with the used ring aligned to "
    "QueueAlign after used_event",
    versions=(1,),
    io=True,
)
async def queue_legacy_layout(dut: Dut) -> Outcome:
    done = []
    for page, align in ((4096, 4096), (65536, 65536), (4096, 4)):
        await dut.begin()
        await dut.write(Reg.GUEST_PAGE_SIZE, page)
        ring = await dut.io_ring(page_size=page, align=align)
        await ring.program()
        await dut.driver_ok()
        req = await request(dut, ring)
        await ring.publish(req.head)
        await ring.notify()
        if await ring.wait_used(1) != "used":
            raise fail(await _layout_miss(dut, ring, page, align))
        await finish(dut, ring, [req])
        done.append(f"{page}/{align}: used at +{ring.used - ring.desc:#x}")
    return passed("GuestPageSize/QueueAlign " + ", ".join(done))


async def _layout_miss(dut: Dut, ring: Ring, page: int, align: int) -> str:
    no_event = (ring.avail + 4 + 2 * ring.num + align - 1) & ~(align - 1)
    where = f"GuestPageSize {page}, QueueAlign {align}, {ring.num} entries"
    if no_event != ring.used and await dut.memory.read_u16(no_event + 2) == 1:
        return (
            f"{where}: the device put the used ring at +{no_event - ring.desc:#x}, not "
            f"+{ring.used - ring.desc:#x}: it leaves out the avail ring's used_event slot "
            "(2.7.2: the whole struct virtq_avail, used_event included, precedes the padding)"
        )
    return f"{where}: the request was not served (status {await dut.status():#x})"


@check(
    "queue.nonexistent-sel",
    "4.2.3.2",
    "a QueueSel past the last queue reads QueueNumMax 0; writes to that queue change nothing",
    expect=(REJECT,),
    violation=True,
)
async def queue_nonexistent_sel(dut: Dut) -> Outcome:
    rings = await live_device(dut)
    decoy = await dut.ring(0) if dut.queue_max else None
    if decoy is not None:
        await dut.guard(decoy.used, 6 + USED_ELEM_SIZE * decoy.num, "a used ring never enabled")
    in_use = Reg.QUEUE_READY if dut.version == 2 else Reg.QUEUE_PFN
    tolerated = []
    for sel in (0xFFFF, dut.num_queues):
        await dut.select(0)  # from a queue that exists, so a dropped selection shows
        await dut.select(sel)
        if num_max := await dut.read(Reg.QUEUE_NUM_MAX):
            raise fail(
                f"QueueSel {sel:#x} (no such queue) reads QueueNumMax {num_max}, expected 0 (4.2.2)"
            )
        if value := await dut.read(in_use):
            raise fail(f"QueueSel {sel:#x}: {reg_name(in_use)} reads {value:#x} before any write")
        if decoy is not None:
            decoy.index = sel
            await decoy.program()
            if await dut.read(in_use):
                tolerated.append(f"{reg_name(in_use)} of queue {sel:#x} reads back the write")
            await dut.write(in_use, 0)
    if dut.queue_max:
        await dut.select(0)
        if not await dut.read(in_use):
            raise fail(f"writes to non-existent queues cleared queue 0's {reg_name(in_use)}")
    works = await still_works(dut, rings)
    note = f" ({'; '.join(tolerated)}: tolerated)" if tolerated else ""
    return rejected(
        f"queues 0xffff and {dut.num_queues:#x} read QueueNumMax 0; programming "
        f"them changed nothing{works}{note}"
    )


@check(
    "queue.before-features-ok",
    "3.1.1",
    "a queue set up before FEATURES_OK is never served before DRIVER_OK; it is refused, "
    "wedged, or served once live",
    versions=(2,),
    io=True,
    expect=(PASS, REJECT, WEDGED),
    violation=True,
)
async def queue_before_features_ok(dut: Dut) -> Outcome:
    await dut.set_status(Status.ACKNOWLEDGE)
    await dut.set_status(ACK_DRIVER)
    ring = await dut.io_ring()
    await ring.program()
    ready = await dut.read(Reg.QUEUE_READY)
    req, used = await kick_and_watch(dut, ring)
    if used:
        raise fail("a buffer was consumed before FEATURES_OK and DRIVER_OK (2.1.2 MUST NOT)")
    if await dut.status() & Status.DEVICE_NEEDS_RESET:
        return wedged("DEVICE_NEEDS_RESET for a queue set up before FEATURES_OK")
    await dut.write_features(dut.features_for())
    status = await dut.add_status(Status.FEATURES_OK)
    if not status & Status.FEATURES_OK:
        raise fail("FEATURES_OK refused for a valid feature set (after the early queue setup)")
    status = await dut.add_status(Status.DRIVER_OK)
    if status & Status.DEVICE_NEEDS_RESET:
        return wedged("DEVICE_NEEDS_RESET at DRIVER_OK after the early queue setup")
    await ring.notify()
    if not ready:
        await dut.quiet()
        if await ring.pending_used():
            raise fail("QueueReady read 0 but the queue was served")
        return rejected("queue writes before FEATURES_OK were refused (QueueReady read 0)")
    state = await ring.wait_used(1)
    if state == "needs-reset":
        return wedged("DEVICE_NEEDS_RESET when the early-configured queue was notified")
    if state == "timeout":
        raise fail(
            "QueueReady read 1, yet once live the request was neither served nor "
            "refused with DEVICE_NEEDS_RESET"
        )
    await finish(dut, ring, [req])
    return passed("tolerated: the early setup was kept and served only after DRIVER_OK")


@check(
    "queue.write-while-ready",
    "4.2.2.2",
    "queue addresses written while QueueReady is 1 are not taken",
    versions=(2,),
    io=True,
    expect=(REJECT, WEDGED),
    violation=True,
)
async def queue_write_while_ready(dut: Dut) -> Outcome:
    ring = await dut.up()
    other = await dut.ring(dut.io_queue)
    req_b = await request(dut, other)
    await other.publish(req_b.head)
    await dut.select(dut.io_queue)
    await ring.write_addresses(other.desc, other.avail, other.used)
    req = await request(dut, ring)
    await ring.publish(req.head)
    await ring.notify()

    async def probe() -> str | None:
        if await other.pending_used():
            return "other"
        if await ring.pending_used():
            return "used"
        return "needs-reset" if await dut.status() & Status.DEVICE_NEEDS_RESET else None

    state = await dut.until(probe)
    if state == "other":
        raise fail(
            "the device took queue addresses written while QueueReady was 1 "
            "(4.2.2.2: the driver MUST NOT write them; the device must not act on them)"
        )
    if state == "needs-reset":
        return wedged("DEVICE_NEEDS_RESET after address writes to a live queue")
    if state is None:
        raise fail(
            "after address writes to the live queue nothing was served and no DEVICE_NEEDS_RESET"
        )
    await finish(dut, ring, [req])
    return rejected("address writes while QueueReady was 1 were ignored; the ring kept working")
