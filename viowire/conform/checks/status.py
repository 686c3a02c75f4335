"""Initialisation and status (§3.1, §2.1): the driver's flow from reset to DRIVER_OK, modern
and legacy, with Status reading back each step."""

from __future__ import annotations

from viowire.conform.checks.common import ACK_DRIVER, check, fail
from viowire.conform.dut import Dut, reg_name
from viowire.conform.model import Outcome, passed
from viowire.virtio.constants import Reg, Status


async def _expect_status(dut: Dut, value: int, step: str) -> None:
    await dut.set_status(value)
    got = await dut.status()
    if got != value:
        raise fail(f"Status reads {got:#x} after writing {value:#x} ({step})")


@check(
    "init.flow",
    "3.1.1",
    "reset, ACKNOWLEDGE, DRIVER, features, FEATURES_OK, queues, DRIVER_OK; Status reads back "
    "each step",
    versions=(2,),
    window=False,
)
async def init_flow(dut: Dut) -> Outcome:
    await _expect_status(dut, Status.ACKNOWLEDGE, "ACKNOWLEDGE")
    await _expect_status(dut, ACK_DRIVER, "DRIVER")
    if not await dut.feature_word(1) & 1:
        raise fail("VIRTIO_F_VERSION_1 (bit 32) is not offered (6.2: a device MUST offer it)")
    features = dut.features_for()
    await dut.write_features(features)
    await dut.set_status(ACK_DRIVER | Status.FEATURES_OK)
    if await dut.status() != ACK_DRIVER | Status.FEATURES_OK:
        raise fail(
            f"FEATURES_OK refused for {features:#x}, a valid subset of the offer "
            "(2.2.2: SHOULD accept)"
        )
    await _set_up_queues(dut, Reg.QUEUE_READY)
    await _expect_status(dut, ACK_DRIVER | Status.FEATURES_OK | Status.DRIVER_OK, "DRIVER_OK")
    return passed(f"reached DRIVER_OK with features {features:#x} and {dut.num_queues} queue(s)")


async def _set_up_queues(dut: Dut, in_use: Reg) -> None:
    """Every queue as §4.2.3.2 (or §4.2.4) describes, checking what the device reads back."""
    for queue in range(dut.num_queues):
        await dut.select(queue)
        if value := await dut.read(in_use):
            raise fail(f"queue {queue}: {reg_name(in_use)} reads {value:#x} before setup")
        ring = await dut.ring(queue)
        await ring.program()
        got = await dut.read(in_use)
        want = 1 if in_use == Reg.QUEUE_READY else ring.pfn
        if got != want:
            raise fail(
                f"queue {queue}: {reg_name(in_use)} reads {got:#x} after setup, expected {want:#x}"
            )


@check(
    "init.flow-legacy",
    "3.1.2",
    "legacy: ACKNOWLEDGE, DRIVER, GuestPageSize, features, QueuePFN per queue, DRIVER_OK",
    versions=(1,),
)
async def init_flow_legacy(dut: Dut) -> Outcome:
    await _expect_status(dut, Status.ACKNOWLEDGE, "ACKNOWLEDGE")
    await _expect_status(dut, ACK_DRIVER, "DRIVER")
    await dut.write(Reg.GUEST_PAGE_SIZE, 4096)
    await dut.feature_word(0)
    await dut.write_features(0)  # word 1 first, as current Linux: must be ignored silently
    await _set_up_queues(dut, Reg.QUEUE_PFN)
    await _expect_status(dut, ACK_DRIVER | Status.DRIVER_OK, "DRIVER_OK")
    return passed(f"reached DRIVER_OK with {dut.num_queues} queue(s) at their QueuePFN")


@check(
    "status.state-machine",
    "2.1",
    "Status holds exactly what the driver wrote at each step, FAILED included; reset clears it",
)
async def status_state_machine(dut: Dut) -> Outcome:
    steps = [Status.ACKNOWLEDGE, ACK_DRIVER]
    await _expect_status(dut, steps[0], "ACKNOWLEDGE")
    await _expect_status(dut, steps[1], "DRIVER")
    await dut.write_features(dut.features_for())
    value = ACK_DRIVER
    if dut.version == 2:
        value |= Status.FEATURES_OK
        await _expect_status(dut, value, "FEATURES_OK")
        steps.append(value)
    for bit, name in ((Status.DRIVER_OK, "DRIVER_OK"), (Status.FAILED, "FAILED")):
        value |= bit
        await _expect_status(dut, value, name)
        steps.append(value)
    await dut.reset()
    return passed(" → ".join(f"{s:#x}" for s in steps) + " → reset → 0")
