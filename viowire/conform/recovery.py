"""What the runner does after every check: verify that a reset took (§2.4.1, §4.2.2.1), and
after a violation prove that the correct flow, with one request if the type declares one, still
works."""

from __future__ import annotations

from viowire.conform.dut import Dut
from viowire.conform.model import CheckFailed
from viowire.conform.requests import io_round


async def health_round(dut: Dut) -> None:
    """The correct flow from reset, with one sample request if the device does I/O. Then reset
    again."""
    if dut.io:
        ring = await dut.up()
        await io_round(dut, ring)
    else:
        await dut.begin()
        for queue in range(dut.num_queues):
            await (await dut.ring(queue)).program()
        await dut.driver_ok()
    await dut.reset()
    damage = await dut.audit()
    if damage:
        raise CheckFailed(f"the device wrote {', '.join(damage)}")


async def verify_reset(dut: Dut) -> None:
    """After a reset: Status 0, InterruptStatus 0, every queue out of use (§4.2.2.1, §4.2.4)."""
    await dut.reset()
    if isr := await dut.interrupt_status():
        raise CheckFailed(f"InterruptStatus reads {isr:#x} after a reset (4.2.2.1: MUST clear)")
    for queue in range(dut.num_queues):
        if value := await dut.queue_in_use(queue):
            reg = "QueueReady" if dut.version == 2 else "QueuePFN"
            raise CheckFailed(
                f"{reg} of queue {queue} reads {value:#x} after a reset "
                "(4.2.2.1 / 4.2.4: the device MUST clear it)"
            )
    if dut.num_queues:
        await dut.select(0)
