"""Register access widths and alignment (§4.2.2.2): 1-, 2- and 8-byte and misaligned accesses
the driver MUST NOT make are refused, and change nothing."""

from __future__ import annotations

from viowire.conform.checks.common import (
    ACK_DRIVER,
    PASS,
    REJECT,
    after_stray_notify,
    check,
    fail,
    try_read,
    try_write,
)
from viowire.conform.dut import Dut, reg_name
from viowire.conform.model import Outcome, rejected, skipped
from viowire.virtio.constants import Reg, Status

SPLIT = "an 8-byte write acted as a 32-bit write of its low half: split by the bus (tolerated)"
"""A bus may cut a 64-bit access into two aligned 32-bit ones (QEMU's memory core does); the
device then sees only legal accesses. Any other effect of a 1-, 2- or 8-byte write is a FAIL."""


@check(
    "mmio.width.status-byte",
    "4.2.2.2",
    "1- and 2-byte writes to Status are ignored; an 8-byte one too, or split into 32-bit halves",
    expect=(REJECT,),
    violation=True,
)
async def width_status(dut: Dut) -> Outcome:
    notes = []
    for width in (1, 2, 8):
        await try_write(dut, Reg.STATUS, Status.ACKNOWLEDGE, width)
        if status := await dut.status():
            if width != 8 or status != Status.ACKNOWLEDGE:
                raise fail(f"a {width}-byte write of 0x1 to Status took effect (reads {status:#x})")
            notes.append(SPLIT)
            await dut.reset()
    await dut.set_status(ACK_DRIVER)
    for width in (1, 2, 8):
        await try_write(dut, Reg.STATUS, 0, width)
        if (status := await dut.status()) != ACK_DRIVER:
            if width != 8 or status != 0:
                raise fail(f"a {width}-byte write of 0 to Status took effect (reads {status:#x})")
            notes.append(SPLIT)
    note = f"; {notes[0]}" if notes else ""
    return rejected(f"1- and 2-byte Status writes ignored (0x1 not set, 0 did not reset){note}")


@check(
    "mmio.width.queue-sel",
    "4.2.2.2",
    "1- and 2-byte writes to QueueSel do not select; an 8-byte one neither, or as two halves",
    expect=(REJECT,),
    violation=True,
)
async def width_queue_sel(dut: Dut) -> Outcome:
    if not dut.queue_max:
        return skipped("the device has no queues to select")
    note = ""
    for width in (1, 2, 8):
        await dut.select(0)
        await try_write(dut, Reg.QUEUE_SEL, dut.num_queues, width)
        if (num_max := await dut.read(Reg.QUEUE_NUM_MAX)) != dut.queue_max[0]:
            if width != 8 or num_max != 0:
                raise fail(
                    f"a {width}-byte QueueSel write selected queue {dut.num_queues} "
                    f"(QueueNumMax reads {num_max}, queue 0 has {dut.queue_max[0]})"
                )
            note = f"; {SPLIT}"
    await dut.select(0)
    return rejected(f"queue 0 stayed selected through 1- and 2-byte QueueSel writes{note}")


@check(
    "mmio.width.features-sel",
    "4.2.2.2",
    "1- and 2-byte writes to DeviceFeaturesSel do not select; an 8-byte one neither, or as halves",
    expect=(REJECT,),
    violation=True,
)
async def width_features_sel(dut: Dut) -> Outcome:
    word0, word1 = await dut.feature_word(0), await dut.feature_word(1)
    if word0 == word1:
        return skipped(f"feature words 0 and 1 both read {word0:#x}: a change is invisible")
    note = ""
    for width in (1, 2, 8):
        await dut.write(Reg.DEVICE_FEATURES_SEL, 0)
        await try_write(dut, Reg.DEVICE_FEATURES_SEL, 1, width)
        if (value := await dut.read(Reg.DEVICE_FEATURES)) != word0:
            if width != 8 or value != word1:
                raise fail(
                    f"a {width}-byte DeviceFeaturesSel write of 1 took effect "
                    f"(DeviceFeatures reads {value:#x}, word 0 is {word0:#x})"
                )
            note = f"; {SPLIT}"
    await dut.write(Reg.DEVICE_FEATURES_SEL, 0)
    return rejected(f"word 0 stayed selected through 1- and 2-byte selector writes{note}")


def _slice(value: int, shift: int, width: int) -> int:
    return value >> 8 * shift & (1 << 8 * width) - 1


@check(
    "mmio.width.reads",
    "4.2.2.2",
    "1-, 2- and 8-byte reads of control registers return 0 (or the register's own bytes) "
    "and change nothing",
    expect=(REJECT,),
)
async def width_reads(dut: Dut) -> Outcome:
    await dut.set_status(ACK_DRIVER)
    regs = [
        Reg.MAGIC_VALUE,
        Reg.VERSION,
        Reg.DEVICE_ID,
        Reg.VENDOR_ID,
        Reg.STATUS,
        Reg.INTERRUPT_STATUS,
    ] + ([Reg.QUEUE_NUM_MAX] if dut.queue_max else [])
    truth = {reg: await dut.read(reg) for reg in regs}
    sliced = 0
    for reg in regs:
        probes = [(reg + k, 1, k) for k in range(4)] + [(reg, 2, 0), (reg + 2, 2, 2)]
        for offset, width, shift in probes:
            value = await try_read(dut, offset, width)
            if value in (None, 0):
                continue
            if value != _slice(truth[reg], shift, width):
                raise fail(
                    f"a {width}-byte read at {offset:#05x} ({reg_name(reg)}) gives "
                    f"{value:#x}: neither 0 nor the register's bytes"
                )
            sliced += 1
    for reg in (Reg.MAGIC_VALUE, Reg.DEVICE_ID):
        value = await try_read(dut, reg, 8)
        if value and value & 0xFFFF_FFFF != truth[reg]:
            raise fail(f"an 8-byte read at {reg_name(reg)} gives {value:#x}")
        sliced += bool(value)
    if (status := await dut.status()) != ACK_DRIVER:
        raise fail(f"Status changed to {status:#x} during the reads")
    how = f"{sliced} returned the register's bytes (tolerated)" if sliced else "all read 0"
    return rejected(f"wrong-width reads of {len(regs)} registers: {how}; nothing changed")


@check(
    "mmio.width.notify",
    "4.2.2.2",
    "1-, 2- and 8-byte QueueNotify writes are ignored or taken as a spurious notification",
    io=True,
    expect=(REJECT, PASS),
    violation=True,
)
async def width_notify(dut: Dut) -> Outcome:
    async def stray() -> None:
        for width in (1, 2, 8):
            await try_write(dut, Reg.QUEUE_NOTIFY, dut.io_queue, width)

    return await after_stray_notify(
        dut,
        stray,
        wedge="DEVICE_NEEDS_RESET after wrong-width QueueNotify writes",
        early="the request was served on a wrong-width notify (a spurious notification "
        "is allowed, 2.7.10)",
        ignored="wrong-width notifies ignored; the 4-byte notify then served the request",
    )


@check(
    "mmio.unaligned",
    "4.2.2.2",
    "misaligned 32-bit accesses to control registers read 0 or the bytes there, writes are ignored",
    expect=(REJECT,),
    violation=True,
)
async def unaligned(dut: Dut) -> Outcome:
    await dut.set_status(ACK_DRIVER)
    for offset in (Reg.STATUS + 1, Reg.STATUS + 2):
        await try_write(dut, offset, 0, 4)
        if (status := await dut.status()) != ACK_DRIVER:
            raise fail(f"a 4-byte write of 0 at {offset:#05x} changed Status to {status:#x}")
    magic, version = await dut.read(Reg.MAGIC_VALUE), await dut.read(Reg.VERSION)
    combined = magic | version << 32
    for offset in (1, 2, 3):
        value = await try_read(dut, offset, 4)
        if value not in (None, 0, _slice(combined, offset, 4)):
            raise fail(f"a 4-byte read at {offset:#05x} gives {value:#x}")
    return rejected("misaligned writes ignored, misaligned reads harmless")
