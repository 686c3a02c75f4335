"""Identification (§4.2.2, §4.2.3.1.1): MagicValue, Version, DeviceID and VendorID, read
as a driver probes them; these run even on a slot that is not a usable device."""

from __future__ import annotations

from viowire.conform.checks.common import check, fail
from viowire.conform.dut import Dut
from viowire.conform.model import Outcome, passed, skipped
from viowire.virtio.constants import MAGIC_VALUE, Reg


@check("mmio.magic", "4.2.2.1", "MagicValue reads 0x74726976 ('virt')", identification=True)
async def magic(dut: Dut) -> Outcome:
    value = await dut.read(Reg.MAGIC_VALUE)
    if value != MAGIC_VALUE:
        raise fail(f"MagicValue reads {value:#010x}, expected 0x74726976")
    return passed("MagicValue = 0x74726976")


async def _virtio(dut: Dut) -> bool:
    return await dut.read(Reg.MAGIC_VALUE) == MAGIC_VALUE


@check(
    "mmio.version",
    "4.2.2.1",
    "Version reads 2 (legacy: 1) and matches the platform table",
    identification=True,
)
async def version(dut: Dut) -> Outcome:
    if not await _virtio(dut):
        return skipped("not a virtio-mmio device (MagicValue)")
    value = await dut.read(Reg.VERSION)
    if value not in (1, 2):
        raise fail(f"Version reads {value}: 2, or 1 for the legacy interface (4.2.4)")
    if value != dut.info.version:
        raise fail(f"Version reads {value} but the platform table says {dut.info.version}")
    return passed(f"Version = {value}" + (" (legacy interface, 4.2.4)" if value == 1 else ""))


@check(
    "mmio.device-id",
    "4.2.2",
    "DeviceID matches the platform table (0 = placeholder slot)",
    identification=True,
)
async def device_id(dut: Dut) -> Outcome:
    if not await _virtio(dut) or await dut.read(Reg.VERSION) not in (1, 2):
        return skipped("not a usable virtio-mmio window (MagicValue/Version)")
    value = await dut.read(Reg.DEVICE_ID)
    if value != dut.info.device_id:
        raise fail(f"DeviceID reads {value} but the platform table says {dut.info.device_id}")
    if value == 0:
        return passed("DeviceID 0: a placeholder slot; no other register is touched")
    return passed(f"DeviceID = {value} ({dut.type_name})")


@check(
    "mmio.vendor-id",
    "4.2.2",
    "VendorID is stable and matches the platform table",
    identification=True,
)
async def vendor_id(dut: Dut) -> Outcome:
    if dut.unusable:
        return skipped(f"not read: {dut.unusable}")
    first, second = await dut.read(Reg.VENDOR_ID), await dut.read(Reg.VENDOR_ID)
    if first != second:
        raise fail(f"VendorID changes between reads: {first:#x}, then {second:#x}")
    if dut.info.vendor_id and first != dut.info.vendor_id:
        raise fail(f"VendorID reads {first:#x} but the platform table says {dut.info.vendor_id:#x}")
    return passed(f"VendorID = {first:#010x}")
