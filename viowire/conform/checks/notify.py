"""Notifications (§2.1.2, §4.2.3.3): none is acted on before DRIVER_OK, and one for a queue
that does not exist is ignored."""

from __future__ import annotations

from viowire.conform.checks.common import (
    PASS,
    REJECT,
    WEDGED,
    after_stray_notify,
    check,
    fail,
    kick_and_watch,
)
from viowire.conform.dut import Dut
from viowire.conform.model import Outcome, rejected, wedged
from viowire.conform.requests import finish
from viowire.virtio.constants import Interrupt, Reg, Status


@check(
    "notify.before-driver-ok",
    "2.1.2",
    "buffers notified before DRIVER_OK are not consumed; once live they are",
    versions=(2,),
    io=True,
    expect=(REJECT, WEDGED),
    violation=True,
)
async def notify_before_driver_ok(dut: Dut) -> Outcome:
    await dut.begin()
    ring = await dut.io_ring()
    await ring.program()
    req, used = await kick_and_watch(dut, ring)
    if used:
        raise fail("a buffer was consumed before DRIVER_OK (2.1.2: the device MUST NOT)")
    if await dut.interrupt_status() & Interrupt.VRING:
        raise fail("a used buffer notification before DRIVER_OK (2.1.2: MUST NOT)")
    if await dut.status() & Status.DEVICE_NEEDS_RESET:
        return wedged("DEVICE_NEEDS_RESET for a notify before DRIVER_OK")
    await dut.driver_ok()
    await ring.notify()
    await finish(dut, ring, [req])
    return rejected(f"not consumed in {dut.settle:.2f} s before DRIVER_OK; served once live")


@check(
    "notify.nonexistent-queue",
    "4.2.3.3",
    "a notification for a queue that does not exist is ignored (or taken as spurious)",
    io=True,
    expect=(REJECT, PASS),
    violation=True,
)
async def notify_nonexistent_queue(dut: Dut) -> Outcome:
    async def stray() -> None:
        for index in (dut.num_queues, 0xFFFF):
            await dut.write(Reg.QUEUE_NOTIFY, index)

    return await after_stray_notify(
        dut,
        stray,
        wedge="DEVICE_NEEDS_RESET for a notification of a non-existent queue",
        early=f"served queue {dut.io_queue} on it: a spurious notification is allowed (2.7.10)",
        ignored=f"notifications for queues {dut.num_queues} and 0xffff ignored",
    )
