"""Register access rules (§4.2.2, §4.2.2.2): reserved offsets, writes to read-only and reads of
write-only registers change nothing; absent shared memory regions read as such."""

from __future__ import annotations

from viowire.conform.checks.common import (
    REJECT,
    check,
    fail,
    live_device,
    still_works,
    try_read,
    try_write,
)
from viowire.conform.dut import Dut, reg_name
from viowire.conform.model import Outcome, passed, rejected, skipped
from viowire.virtio.constants import CONFIG_OFFSET, DeviceId, Reg, device_name

WITHOUT_SHM = (DeviceId.NET, DeviceId.BLOCK, DeviceId.CONSOLE, DeviceId.ENTROPY)
"""Device types of the spec with no shared memory regions (§2.10). A type declared with
:class:`viowire.device.Device` has none either: the device API has no way to offer one."""


def reserved_offsets(version: int) -> list[int]:
    """Offsets below 0x100 the register map of ``version`` leaves undefined (§4.2.2, §4.2.4)."""
    if version == 2:
        defined = {r.value for r in Reg if r < CONFIG_OFFSET} - {
            Reg.GUEST_PAGE_SIZE,
            Reg.QUEUE_ALIGN,
            Reg.QUEUE_PFN,
        }
    else:
        defined = {r.value for r in Reg if r <= Reg.STATUS} - {Reg.QUEUE_READY}
    return [off for off in range(0, CONFIG_OFFSET, 4) if off not in defined]


async def fingerprint(dut: Dut) -> dict[str, int]:
    """The driver-visible state a stray write could change."""
    state = {
        "Status": await dut.status(),
        "InterruptStatus": await dut.interrupt_status(),
        "DeviceFeatures[0]": await dut.feature_word(0),
        "DeviceFeatures[1]": await dut.feature_word(1),
    }
    await dut.write(Reg.DEVICE_FEATURES_SEL, 0)
    if dut.queue_max:
        state["in use[0]"] = await dut.queue_in_use(0)
        state["QueueNumMax[0]"] = await dut.read(Reg.QUEUE_NUM_MAX)
    if dut.version == 2:
        state["ConfigGeneration"] = await dut.read(Reg.CONFIG_GENERATION)
    state["config[0:8]"] = int.from_bytes(await dut.config_bytes(0, 8), "little")
    return state


def _diff(before: dict[str, int], after: dict[str, int]) -> str:
    return ", ".join(f"{k} {before[k]:#x} → {after[k]:#x}" for k in before if before[k] != after[k])


@check(
    "mmio.undefined-offsets",
    "4.2.2.2",
    "reserved offsets read 0; writes to them change nothing",
    expect=(REJECT,),
    violation=True,
)
async def undefined_offsets(dut: Dut) -> Outcome:
    offsets = reserved_offsets(dut.version)
    for offset in offsets:
        value = await try_read(dut, offset, 4)
        if value:
            raise fail(f"{reg_name(offset)} reads {value:#x}, expected 0")
    rings = await live_device(dut)
    before = await fingerprint(dut)
    for offset in offsets:
        await try_write(dut, offset, 0xFFFF_FFFF, 4)
    after = await fingerprint(dut)
    if before != after:
        raise fail(f"writes of 0xffffffff to reserved offsets changed {_diff(before, after)}")
    works = await still_works(dut, rings)
    return rejected(f"{len(offsets)} reserved offsets read 0; writing them changed nothing{works}")


@check(
    "mmio.read-only-writes",
    "4.2.2.2",
    "writes to read-only registers are ignored (writing InterruptStatus is no ACK)",
    expect=(REJECT,),
    violation=True,
)
async def read_only_writes(dut: Dut) -> Outcome:
    rings = await live_device(dut)
    before = await fingerprint(dut)
    ids = {
        reg: await dut.read(reg)
        for reg in (Reg.MAGIC_VALUE, Reg.VERSION, Reg.DEVICE_ID, Reg.VENDOR_ID)
    }
    regs = [*ids, Reg.DEVICE_FEATURES, Reg.QUEUE_NUM_MAX, Reg.INTERRUPT_STATUS]
    if dut.version == 2:
        regs += [
            Reg.CONFIG_GENERATION,
            Reg.SHM_LEN_LOW,
            Reg.SHM_LEN_HIGH,
            Reg.SHM_BASE_LOW,
            Reg.SHM_BASE_HIGH,
        ]
    for reg in regs:
        await dut.write(reg, 0)
        await dut.write(reg, 0x5A5A_5A5A)
    changed = [reg_name(r) for r, v in ids.items() if await dut.read(r) != v]
    after = await fingerprint(dut)
    if before != after:
        changed.append(_diff(before, after))
    if changed:
        raise fail(f"writes to read-only registers changed {', '.join(changed)}")
    works = await still_works(dut, rings)
    pending = " (InterruptStatus kept its pending bit)" if before["InterruptStatus"] else ""
    return rejected(f"{len(regs)} read-only registers ignored writes{pending}{works}")


@check(
    "mmio.write-only-reads",
    "4.2.2.2",
    "reads of write-only registers return 0 (or the value written) and have no effect",
    expect=(REJECT,),
    violation=True,
)
async def write_only_reads(dut: Dut) -> Outcome:
    rings = await live_device(dut)
    written: dict[int, set[int]] = {
        Reg.DEVICE_FEATURES_SEL: {0, 1},
        Reg.DRIVER_FEATURES: {dut.negotiated & 0xFFFF_FFFF},
        Reg.DRIVER_FEATURES_SEL: {0},
        Reg.QUEUE_SEL: {r.index for r in rings},
        Reg.QUEUE_NOTIFY: {r.index for r in rings},
        Reg.INTERRUPT_ACK: set(),
        Reg.QUEUE_NUM: {r.num for r in rings},
    }
    if dut.version == 1:
        written |= {Reg.GUEST_PAGE_SIZE: {4096}, Reg.QUEUE_ALIGN: {4096}}
    else:
        written[Reg.SHM_SEL] = set()
        for low, attr in (
            (Reg.QUEUE_DESC_LOW, "desc"),
            (Reg.QUEUE_AVAIL_LOW, "avail"),
            (Reg.QUEUE_USED_LOW, "used"),
        ):
            written[low] = {getattr(r, attr) & 0xFFFF_FFFF for r in rings}
            written[low + 4] = {getattr(r, attr) >> 32 for r in rings}
    before = await fingerprint(dut)
    stored = 0
    for reg, values in written.items():
        value = await try_read(dut, reg, 4)
        if value in (None, 0):
            continue
        if value not in values:
            raise fail(
                f"{reg_name(reg)} (write-only) reads {value:#x}: neither 0 nor a "
                "value written to it"
            )
        stored += 1
    after = await fingerprint(dut)
    if before != after:
        raise fail(f"reading write-only registers changed {_diff(before, after)}")
    how = f"{stored} returned the value written" if stored else "all read 0"
    return rejected(f"{len(written)} write-only registers: {how}; no side effect")


@check(
    "mmio.shm-absent",
    "4.2.2",
    "SHMLen/SHMBase of a non-existent region read -1 (or 0 on a pre-1.2 device)",
    versions=(2,),
)
async def shm_absent(dut: Dut) -> Outcome:
    if dut.device_id not in WITHOUT_SHM and dut.device_type is None:
        names = ", ".join(device_name(d) for d in WITHOUT_SHM)
        return skipped(
            f"applies to types known to have no shared memory region ({names}, and types "
            "declared with viowire.device.Device)"
        )
    for sel in (0, 0xFF):
        await dut.write(Reg.SHM_SEL, sel)
        length = await dut.read(Reg.SHM_LEN_LOW) | await dut.read(Reg.SHM_LEN_HIGH) << 32
        base = await dut.read(Reg.SHM_BASE_LOW) | await dut.read(Reg.SHM_BASE_HIGH) << 32
        ones = (1 << 64) - 1
        if (length, base) == (0, 0):
            continue
        if (length, base) != (ones, ones):
            raise fail(
                f"region {sel}: SHMLen {length:#x}, SHMBase {base:#x}; a non-existent "
                "region reads length -1 and base 0xffffffffffffffff"
            )
    if (length, base) == (0, 0):
        return passed("SHM registers read 0: a device older than virtio 1.2")
    return passed("regions 0 and 0xff: length and base read -1 (no such region)")
