"""Configuration space (§2.5, §4.2.2): access widths, ConfigGeneration, read-only fields."""

from __future__ import annotations

from viowire.conform.checks.common import ACK_DRIVER, BLK, REJECT, check, fail
from viowire.conform.dut import Dut
from viowire.conform.model import Outcome, passed, rejected, skipped
from viowire.virtio.constants import CONFIG_OFFSET, Reg, Status


def _config_size(dut: Dut) -> int:
    """The bytes of config space the type declares (its ``config_layout``, fields present with
    the features offered); 8 for a type not known here."""
    fields = dut.device_type.config_layout if dut.device_type is not None else ()
    ends = [f.offset + f.size for f in fields if f.feature is None or dut.offered >> f.feature & 1]
    return max(ends, default=8)


async def _config_mismatch(dut: Dut, size: int) -> str | None:
    raw = await dut.config_bytes(0, size)
    for width in (2, 4):
        for off in range(0, size - width + 1, width):
            value = await dut.read(CONFIG_OFFSET + off, width)
            expected = int.from_bytes(raw[off : off + width], "little")
            if value != expected:
                return (
                    f"{width}-byte read at config+{off:#x} gives {value:#x}, the bytes "
                    f"give {expected:#x}"
                )
    return None


@check(
    "config.widths",
    "4.2.2.2",
    "config space: 1-, 2- and 4-byte reads agree, and work before FEATURES_OK (2.5.2)",
    window=False,
)
async def config_widths(dut: Dut) -> Outcome:
    if dut.device_type is not None and not dut.device_type.config_layout:
        return skipped(f"{dut.type_name} declares no configuration space (config_layout)")
    await dut.set_status(Status.ACKNOWLEDGE)
    await dut.set_status(ACK_DRIVER)
    size = _config_size(dut)
    problem = await _config_mismatch(dut, size)
    if problem and (problem := await _config_mismatch(dut, size)):  # a field may have changed
        raise fail(problem)
    return passed(f"{size} config bytes agree read 1, 2 and 4 bytes at a time")


@check(
    "config.generation",
    "4.2.2",
    "ConfigGeneration does not change while the configuration does not",
    versions=(2,),
)
async def config_generation(dut: Dut) -> Outcome:
    size = _config_size(dut)
    for _ in range(3):
        before = await dut.read(Reg.CONFIG_GENERATION)
        await dut.config_bytes(0, size)
        middle = await dut.read(Reg.CONFIG_GENERATION)
        await dut.config_bytes(0, size)
        if before == middle == await dut.read(Reg.CONFIG_GENERATION):
            return passed(f"ConfigGeneration stays {before:#x} across config reads")
    raise fail(
        "ConfigGeneration changes on every read although nothing changed: a driver "
        "would retry its config reads forever (2.5.1)"
    )


@check(
    "config.read-only",
    "5.2.4",
    "virtio-blk: writes to the read-only capacity field are ignored",
    devices=BLK,
    expect=(REJECT,),
    violation=True,
)
async def config_read_only(dut: Dut) -> Outcome:
    before = await dut.config_bytes(0, 8)
    await dut.write(CONFIG_OFFSET, 0, 4)
    await dut.write(CONFIG_OFFSET + 4, 0x7F, 1)
    after = await dut.config_bytes(0, 8)
    if after != before:
        raise fail(f"capacity changed from {before.hex()} to {after.hex()} by a driver write")
    return rejected("capacity unchanged by 4- and 1-byte writes")
