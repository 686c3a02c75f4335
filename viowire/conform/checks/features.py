"""Feature negotiation (§2.2, §6): what the device offers, and that it refuses features it did
not offer or that come after FEATURES_OK."""

from __future__ import annotations

from viowire.conform.checks.chains import indirect_table
from viowire.conform.checks.common import ACK_DRIVER, INDIRECT, REJECT, check, fail, silence
from viowire.conform.dut import Dut
from viowire.conform.model import Outcome, passed, rejected, skipped
from viowire.conform.requests import segments
from viowire.conform.ring import Ring
from viowire.conform.scratch import POISON
from viowire.virtio.constants import VIRTQ_DESC_F_INDIRECT, DeviceId, Feature, Reg, Status

LOW_FEATURES_ONLY = (DeviceId.BLOCK, DeviceId.ENTROPY, DeviceId.CONSOLE)
"""Device types whose feature bits all lie below 64 (virtio 1.3 §5.2.3, §5.3.3, §5.4.3): for
them feature words 2 and 3 must read 0 too. Other types may define bits 64 to 127 (§2.2)."""


@check(
    "features.version-1",
    "6.2",
    "a version 2 device offers VIRTIO_F_VERSION_1",
    versions=(2,),
    window=False,
)
async def features_version_1(dut: Dut) -> Outcome:
    word = await dut.feature_word(1)
    if not word & 1:
        raise fail(f"feature word 1 reads {word:#x}: VIRTIO_F_VERSION_1 (bit 32) missing")
    return passed(f"feature word 1 = {word:#x} (VERSION_1)")


@check(
    "features.legacy-word1",
    "4.2.4",
    "a legacy device's HostFeatures word 1 reads 0 (no VERSION_1)",
    versions=(1,),
)
async def features_legacy_word1(dut: Dut) -> Outcome:
    word = await dut.feature_word(1)
    if word:
        raise fail(
            f"HostFeaturesSel 1 reads {word:#x}: legacy devices have one word "
            "(a set bit 32 would claim VERSION_1)"
        )
    return passed("HostFeatures word 1 = 0")


@check(
    "features.sel-above-1",
    "4.2.2",
    "DeviceFeaturesSel past the defined words selects bits the device lacks: reads 0",
)
async def features_sel_above_1(dut: Dut) -> Outcome:
    sels = [2, 3, 4, 0x8000_0000, 0xFFFF_FFFF]
    if dut.device_id not in LOW_FEATURES_ONLY:
        sels = [4, 0x8000_0000, 0xFFFF_FFFF]  # bits 128 and up are reserved for every type
    for sel in sels:
        if value := await dut.feature_word(sel):
            raise fail(
                f"DeviceFeaturesSel {sel:#x} reads {value:#x}: feature bits from "
                f"{sel * 32} are not offered, the word must read 0 (a selector clamped "
                "to 1 shows up as word 1 again)"
            )
    await dut.write(Reg.DEVICE_FEATURES_SEL, 0)
    return passed(f"selectors {', '.join(f'{s:#x}' for s in sels)} read 0")


@check(
    "features.mmio-transport-bits",
    "4.2.5",
    "no PCI-only or MMIO-reserved transport bit is offered (SR_IOV, NOTIF_CONFIG_DATA, ADMIN_VQ)",
    versions=(2,),
)
async def features_mmio_transport_bits(dut: Dut) -> Outcome:
    bad = {
        37: "SR_IOV (PCI only)",
        39: "NOTIF_CONFIG_DATA (PCI only)",
        41: "ADMIN_VQ (reserved on MMIO)",
    }
    offered = [name for bit, name in bad.items() if dut.offered >> bit & 1]
    if offered:
        raise fail(f"offers {', '.join(offered)} on virtio-mmio (6, 4.2.5)")
    return passed(f"offer {dut.offered:#x} has none of bits 37, 39, 41")


@check(
    "features.unoffered-refused",
    "2.2.2",
    "accepting a feature the device did not offer: FEATURES_OK stays clear",
    versions=(2,),
    expect=(REJECT,),
    violation=True,
)
async def features_unoffered_refused(dut: Dut) -> Outcome:
    low = next((b for b in range(24) if not dut.offered >> b & 1), None)
    bits = [b for b in (low, 63) if b is not None and not dut.offered >> b & 1]
    for bit in bits:
        await dut.reset()
        await dut.set_status(Status.ACKNOWLEDGE)
        await dut.set_status(ACK_DRIVER)
        await dut.write_features(dut.features_for() | 1 << bit)
        status = await dut.add_status(Status.FEATURES_OK)
        if status & Status.FEATURES_OK:
            raise fail(
                f"FEATURES_OK accepted with bit {bit}, which was not offered "
                "(2.2.2: MUST fail to set FEATURES_OK)"
            )
    return rejected(f"FEATURES_OK refused with unoffered bit(s) {', '.join(map(str, bits))}")


@check(
    "features.after-features-ok",
    "3.1.1",
    "a feature written after FEATURES_OK does not take effect (INDIRECT_DESC used after it)",
    versions=(2,),
    io=True,
    feature=Feature.RING_INDIRECT_DESC,
    expect=(REJECT,),
    violation=True,
)
async def features_after_features_ok(dut: Dut) -> Outcome:
    features = await dut.begin()
    await dut.write_features(features | INDIRECT)
    await dut.set_status(await dut.status())  # where a device latches features (QEMU)
    ring = await dut.io_ring()
    await ring.program()
    await dut.driver_ok()
    segs = await segments(dut)
    state = await _send_indirect(dut, ring, segs)
    if state == "used":
        _, used_len = await ring.used_elem(0)
        if used_len or await _written(dut, segs):
            if await _serves_unnegotiated_indirect(dut):
                return skipped(
                    "inconclusive: the device serves indirect tables even when "
                    "VIRTIO_F_INDIRECT_DESC was never negotiated (see "
                    "ring.indirect-not-negotiated), so a late feature write cannot be seen"
                )
            raise fail(
                "the device served an indirect table: it took VIRTIO_F_INDIRECT_DESC "
                "written after FEATURES_OK (3.1.1: no new features after it)"
            )
        return rejected("the late INDIRECT_DESC did not take effect: the table came back unused")
    if state == "needs-reset":
        return rejected(
            "the late INDIRECT_DESC did not take effect: the device refused the "
            "indirect descriptor as not negotiated (DEVICE_NEEDS_RESET)"
        )
    return rejected("the late INDIRECT_DESC did not take effect: the indirect chain was not served")


async def _serves_unnegotiated_indirect(dut: Dut) -> bool:
    """The control: does the device serve an indirect table it never negotiated?"""
    ring = await dut.up()
    return await _send_indirect(dut, ring, await segments(dut)) == "used"


async def _send_indirect(dut: Dut, ring: Ring, segs: list[tuple[int, int, bool]]) -> str:
    """``segs`` as a lone indirect table at head 0, published and notified; what
    :meth:`~viowire.conform.ring.Ring.wait_used` then says, within the silence window."""
    table, length = await indirect_table(dut, segs)
    await ring.set_desc(0, table, length, VIRTQ_DESC_F_INDIRECT)
    await ring.publish(0)
    await ring.notify()
    return await ring.wait_used(1, silence(dut))


async def _written(dut: Dut, segs: list[tuple[int, int, bool]]) -> bool:
    """Whether the device wrote any of the writable buffers (they start as all POISON)."""
    for gpa, length, writable in segs:
        data = await dut.memory.read(gpa, length)
        if writable and data != bytes([POISON]) * length:
            return True
    return False
