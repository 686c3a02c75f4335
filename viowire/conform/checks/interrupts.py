"""Interrupts (§4.2.2.1, §2.7.7): InterruptStatus, the line, InterruptACK, and EVENT_IDX
suppression."""

from __future__ import annotations

from viowire.conform.checks.common import EVENT_IDX, check, fail, isr_with
from viowire.conform.dut import Dut
from viowire.conform.model import Outcome, passed
from viowire.conform.requests import io_round
from viowire.virtio.constants import Feature, Interrupt


@check(
    "irq.ack-exact",
    "4.2.2.1",
    "InterruptStatus shows a used-buffer event, asserts the line, and clears exactly the "
    "acknowledged bits",
    io=True,
)
async def irq_ack_exact(dut: Dut) -> Outcome:
    ring = await dut.up()
    if isr := await dut.interrupt_status():
        raise fail(
            f"InterruptStatus reads {isr:#x} before any event (4.2.2.1: bits of events "
            "that did not happen MUST be zero)"
        )
    await io_round(dut, ring)
    isr = await isr_with(dut, Interrupt.VRING)
    if isr is None:
        raise fail(
            "a buffer was used with avail.flags 0 but InterruptStatus bit 0 never set "
            "(2.7.7.2: the device MUST send a notification)"
        )
    if isr != Interrupt.VRING:
        raise fail(f"InterruptStatus reads {isr:#x} after one used buffer: only bit 0 happened")
    if not await dut.wait_irq_level(True):
        raise fail("InterruptStatus is 0x1 but the interrupt line was never asserted (4.2.3.4)")
    for bits in (Interrupt.CONFIG, 0):
        await dut.ack(bits)
        if (isr := await dut.interrupt_status()) != Interrupt.VRING:
            raise fail(f"InterruptACK {bits:#x} left InterruptStatus {isr:#x}, expected 0x1")
    await dut.ack(Interrupt.VRING)
    if isr := await dut.interrupt_status():
        raise fail(f"InterruptACK 0x1 left InterruptStatus {isr:#x}")
    if not await dut.wait_irq_level(False):
        raise fail("the interrupt line stays asserted after InterruptStatus went to 0")
    return passed("bit 0 set, line asserted; ACK 0x2 and 0x0 kept it; ACK 0x1 cleared it")


@check(
    "irq.event-idx",
    "2.7.7.2",
    "with EVENT_IDX, using the buffer at index used_event raises a notification",
    io=True,
    feature=Feature.RING_EVENT_IDX,
    window=False,
)
async def irq_event_idx(dut: Dut) -> Outcome:
    ring = await dut.up(extra=EVENT_IDX)
    await ring.set_used_event(0)
    await io_round(dut, ring)
    if await isr_with(dut, Interrupt.VRING) is None:
        raise fail("used_event 0: the first used buffer raised no notification (2.7.7.2 MUST)")
    await dut.ack(Interrupt.VRING)
    await ring.set_used_event(2)
    await io_round(dut, ring)
    await dut.quiet()
    await dut.ack(Interrupt.VRING)
    await io_round(dut, ring)
    if await isr_with(dut, Interrupt.VRING) is None:
        raise fail("used_event 2: the buffer used at index 2 raised no notification (2.7.7.2)")
    return passed("notified at used_event 0 and again at used_event 2")
