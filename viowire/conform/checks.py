"""The conformance checks: each drives one device through a correct flow or a deliberate
violation and reports what it saw.

Which outcomes are good is decided per check, from the spec where it speaks and from the
reference (QEMU, Linux) where it does not:

- identification, flows, values: PASS.
- register misuse the driver MUST NOT commit (§4.2.2.2: wrong widths, misaligned accesses,
  reserved offsets, writes to read-only and reads of write-only registers; unoffered or late
  features, §2.2.2, §3.1.1): REJECT, i.e. refused with the device still healthy. DEVICE_NEEDS_RESET
  for a register access is a FAIL (the reference's rule: ignore and log, never fault). An 8-byte
  access may also act as the two aligned 32-bit accesses a bus splits it into (QEMU's does).
- queue configuration the device cannot honour (QueueNum above QueueNumMax, not a power of 2, 0;
  addresses written while QueueReady is 1): REJECT or WEDGED. Running the ring with the bad value
  is a FAIL: the device keeps using a broken ring.
- structurally broken rings (loops, next or head beyond the table, bad or nested indirect tables,
  readable after writable, more than 2^32 bytes, avail.idx ahead by more than the queue size):
  WEDGED. §2.1.2: a device SHOULD set DEVICE_NEEDS_RESET when it needs a reset, and MUST then
  send a configuration change notification; a modern device that goes silent instead leaves its
  driver waiting forever, so there REJECT is a FAIL. A legacy driver cannot see
  DEVICE_NEEDS_RESET, so a legacy device may go silent (REJECT). Using the chain is a FAIL.
- driver errors on a well-formed ring with one sensible reading (a buffer outside RAM, INDIRECT
  without the feature or together with NEXT, a zero-length buffer): as above, but serving the
  chain without harm is tolerated (PASS).

Every check runs from a reset; afterwards the runner resets again, verifies the reset, audits
guest memory, and after a violation runs a correct I/O round (see :mod:`viowire.conform.runner`).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.client.errors import VirtioError
from viowire.client.mmio import VirtioMmioDevice
from viowire.conform.runner import (
    BLK_HEADER,
    DESC,
    IO_DEVICES,
    POISON,
    USED_ELEM_SIZE,
    Check,
    CheckFailed,
    Dut,
    Outcome,
    Request,
    Ring,
    Unresponsive,
    Verdict,
    blk_request,
    finish,
    io_round,
    passed,
    reg_name,
    rejected,
    request,
    skipped,
    verify_reset,
    wedged,
)
from viowire.virtio.config import LAYOUTS
from viowire.virtio.constants import (
    BLK_SECTOR_SIZE,
    CONFIG_OFFSET,
    DESC_SIZE,
    MAGIC_VALUE,
    VIRTQ_DESC_F_INDIRECT,
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    BlkFeature,
    BlkStatus,
    BlkType,
    DeviceId,
    Feature,
    Interrupt,
    Reg,
    Status,
    device_name,
)

PASS, REJECT, WEDGED = Verdict.PASS, Verdict.REJECT, Verdict.WEDGED
RING_EXPECT = {1: (WEDGED, REJECT), 2: (WEDGED,)}
TOLERANT_EXPECT = {1: (WEDGED, REJECT, PASS), 2: (WEDGED, PASS)}  # see the module docstring
INDIRECT = 1 << Feature.RING_INDIRECT_DESC
EVENT_IDX = 1 << Feature.RING_EVENT_IDX
BLK, RNG = (DeviceId.BLOCK,), (DeviceId.ENTROPY,)
W, N = VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT
ACK_DRIVER = Status.ACKNOWLEDGE | Status.DRIVER

CHECKS: list[Check] = []


CheckFn = Callable[[Dut], Awaitable[Outcome]]


def check(
    id: str,
    section: str,
    title: str,
    *,
    expect: tuple[Verdict, ...] | Mapping[int, tuple[Verdict, ...]] = (PASS,),
    **applies: Any,
) -> Callable[[CheckFn], CheckFn]:
    """Register a check; ``applies``: versions, devices, feature, violation, identification
    (see :class:`~viowire.conform.runner.Check`). Definition order is report order."""

    def register(fn: CheckFn) -> CheckFn:
        CHECKS.append(Check(id, section, title, fn, expect, **applies))
        return fn

    return register


def fail(message: str) -> CheckFailed:
    return CheckFailed(message)


# -- identification (§4.2.2, §4.2.3.1.1) ---------------------------------------------------------


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
    return passed(f"DeviceID = {value} ({device_name(value)})")


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


# -- initialisation and status (§3.1, §2.1) ------------------------------------------------------


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


# -- features (§2.2, §6) -------------------------------------------------------------------------


@check("features.version-1", "6.2", "a version 2 device offers VIRTIO_F_VERSION_1", versions=(2,))
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
    # blk/rng/console define no bits above 63 (up to virtio 1.3); other types: bits 128+ only
    sels = [2, 3, 4, 0x8000_0000, 0xFFFF_FFFF]
    if dut.device_id not in (DeviceId.BLOCK, DeviceId.ENTROPY, DeviceId.CONSOLE):
        sels = [4, 0x8000_0000, 0xFFFF_FFFF]
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
    devices=IO_DEVICES,
    feature=Feature.RING_INDIRECT_DESC,
    expect=(REJECT,),
    violation=True,
)
async def features_after_features_ok(dut: Dut) -> Outcome:
    features = await dut.begin()
    await dut.write_features(features | INDIRECT)
    await dut.set_status(await dut.status())  # where a device latches features (QEMU)
    ring = await dut.ring()
    await ring.program()
    await dut.driver_ok()
    segs = await segments(dut)
    table, length = await indirect_table(dut, segs)
    await ring.set_desc(0, table, length, VIRTQ_DESC_F_INDIRECT)
    await ring.publish(0)
    await ring.notify()
    state = await ring.wait_used(1, _silence(dut))
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
    table, length = await indirect_table(dut, await segments(dut))
    await ring.set_desc(0, table, length, VIRTQ_DESC_F_INDIRECT)
    await ring.publish(0)
    await ring.notify()
    return await ring.wait_used(1, _silence(dut)) == "used"


def _silence(dut: Dut) -> float:
    """How long to wait for a device to react to a violation before calling it silent."""
    return max(4 * dut.settle, 0.2)


async def _written(dut: Dut, segs: list[tuple[int, int, bool]]) -> bool:
    """Whether the device wrote any of the writable buffers (they start as all POISON or, for
    the blk status byte, 0xff)."""
    for gpa, length, writable in segs:
        data = await dut.memory.read(gpa, length)
        if writable and data not in (bytes([POISON]) * length, b"\xff" * length):
            return True
    return False


# -- I/O (§2.7, §5.2, §5.4) ----------------------------------------------------------------------


@check(
    "io.requests",
    "2.7.13",
    "correct requests complete: each head once, used.len within the writable bytes; a full "
    "ring twice, so the indices wrap",
    devices=IO_DEVICES,
)
async def io_requests(dut: Dut) -> Outcome:
    ring = await dut.up()
    await io_round(dut, ring)
    batch = ring.num if dut.device_id == DeviceId.ENTROPY else ring.num // 3
    await io_round(dut, ring, batch)
    await io_round(dut, ring, batch)
    return passed(
        f"1 + 2 x {batch} requests on a ring of {ring.num} (last round {dut.latency * 1000:.2f} ms)"
    )


async def blk(dut: Dut, ring: Ring, **kw: Any) -> Request:
    """One virtio-blk request, published, notified and checked; returned for its data."""
    req = await blk_request(dut, ring, (ring.avail_idx * 3) % ring.num, **kw)
    await ring.publish(req.head)
    await ring.notify()
    await finish(dut, ring, [req])
    return req


async def _read_sector(dut: Dut, ring: Ring, sector: int) -> bytes:
    req = await blk(dut, ring, sector=sector)
    assert req.data is not None
    return await dut.memory.read(*req.data)


@check(
    "io.blk-read-write",
    "5.2.6",
    "virtio-blk: a written sector reads back (then is restored); FLUSH completes",
    devices=BLK,
)
async def io_blk_read_write(dut: Dut) -> Outcome:
    if not dut.capacity:
        return skipped("capacity 0: no sector to write")
    ring = await dut.up(extra=1 << BlkFeature.FLUSH)
    sector = dut.capacity - 1
    original = await _read_sector(dut, ring, sector)
    pattern = os.urandom(BLK_SECTOR_SIZE)
    if dut.offered >> BlkFeature.RO & 1:
        await blk(dut, ring, kind=BlkType.OUT, sector=sector, data=pattern, want=BlkStatus.IOERR)
        if await _read_sector(dut, ring, sector) != original:
            raise fail("a read-only disk changed after a refused write (5.2.6.2)")
        return passed("read-only disk: the write got IOERR and changed nothing")
    await blk(dut, ring, kind=BlkType.OUT, sector=sector, data=pattern)
    if await _read_sector(dut, ring, sector) != pattern:
        raise fail(f"sector {sector} does not read back what was written")
    flushed = ""
    if dut.negotiated >> BlkFeature.FLUSH & 1:
        await blk(dut, ring, kind=BlkType.FLUSH, in_len=0)
        flushed = ", FLUSH OK"
    await blk(dut, ring, kind=BlkType.OUT, sector=sector, data=original)
    return passed(f"sector {sector} written, read back and restored{flushed}")


@check(
    "io.blk-status",
    "5.2.6",
    "virtio-blk: an unknown request type gets UNSUPP, a read past the end IOERR",
    devices=BLK,
)
async def io_blk_status(dut: Dut) -> Outcome:
    ring = await dut.up()
    await blk(dut, ring, kind=0xFF, in_len=0, want=BlkStatus.UNSUPP)
    await blk(dut, ring, sector=dut.capacity, want=BlkStatus.IOERR)
    return passed(f"type 0xff → UNSUPP, sector {dut.capacity} (the end) → IOERR")


@check(
    "io.rng",
    "5.4.6.2",
    "virtio-rng: each buffer gets at least one byte, used.len of them, and they differ",
    devices=RNG,
)
async def io_rng(dut: Dut) -> Outcome:
    ring = await dut.up()
    reqs = [await request(dut, ring, k) for k in range(4)]
    await ring.publish(*(r.head for r in reqs))
    await ring.notify()
    lengths = await finish(dut, ring, reqs)
    got = [await dut.memory.read(r.writable[0][0], lengths[r.head]) for r in reqs]
    if len(set(got)) < len(got) and all(len(g) >= 4 for g in got):
        raise fail("two buffers came back with the same bytes: not random")
    return passed(f"used.len {sorted(lengths.values())} of 64-byte buffers")


@check(
    "io.indirect",
    "2.7.5.3.2",
    "a lone indirect table, and normal descriptors followed by one indirect table, are served",
    devices=IO_DEVICES,
    feature=Feature.RING_INDIRECT_DESC,
)
async def io_indirect(dut: Dut) -> Outcome:
    ring = await dut.up(extra=INDIRECT)
    forms = (
        (0, "a chain that is one indirect descriptor"),
        (1, "a normal descriptor followed by an indirect one, which the device MUST handle"),
    )
    for split, form in forms:
        segs = await segments(dut)
        if dut.device_id == DeviceId.ENTROPY:
            segs.append((await dut.buffer(64), 64, True))  # something left for the table
        table, length = await indirect_table(dut, segs[split:])
        head = (ring.avail_idx * 4) % ring.num
        for i, (gpa, n, writable) in enumerate(segs[:split]):
            await ring.set_desc(head + i, gpa, n, (W if writable else 0) | N, head + i + 1)
        await ring.set_desc(head + split, table, length, VIRTQ_DESC_F_INDIRECT)
        req = _as_request(dut, head, segs)
        await ring.publish(req.head)
        await ring.notify()
        try:
            await finish(dut, ring, [req])
        except CheckFailed as exc:
            raise fail(f"{form}: {exc}") from None
    return passed("a lone indirect table and a direct descriptor + indirect table both served")


def _as_request(dut: Dut, head: int, segs: list[tuple[int, int, bool]]) -> Request:
    writable = [(g, n) for g, n, w in segs if w]
    if dut.device_id == DeviceId.BLOCK:
        return Request(head, (head,), writable, writable[-1][0], BlkStatus.OK)
    return Request(head, (head,), writable)


async def segments(dut: Dut) -> list[tuple[int, int, bool]]:
    """The buffers of one correct request: rng one writable; blk header, data, status."""
    if dut.device_id == DeviceId.ENTROPY:
        return [(await dut.buffer(64), 64, True)]
    header = await dut.buffer(data=BLK_HEADER.pack(BlkType.IN, 0, 0))
    return [
        (header, 16, False),
        (await dut.buffer(512), 512, True),
        (await dut.buffer(1, fill=0xFF), 1, True),
    ]


Desc = tuple[int, int, int, int]  # addr, len, flags, next


def chained(segs: list[tuple[int, int, bool]]) -> list[Desc]:
    """Descriptors 0 → 1 → … for ``(gpa, len, writable)`` segments."""
    out = []
    for i, (gpa, n, writable) in enumerate(segs):
        last = i + 1 == len(segs)
        out.append((gpa, n, (W if writable else 0) | (0 if last else N), 0 if last else i + 1))
    return out


async def raw_table(dut: Dut, entries: list[Desc]) -> tuple[int, int]:
    """An indirect table holding ``entries``; guarded (only the driver writes it)."""
    table = await dut.alloc(DESC_SIZE * len(entries))
    for i, entry in enumerate(entries):
        await dut.poke(table + DESC_SIZE * i, DESC.pack(*entry))
    await dut.guard(table, DESC_SIZE * len(entries), "an indirect descriptor table")
    return table, DESC_SIZE * len(entries)


async def indirect_table(dut: Dut, segs: list[tuple[int, int, bool]]) -> tuple[int, int]:
    return await raw_table(dut, chained(segs))


# -- interrupts (§4.2.2.1, §2.7.7) ---------------------------------------------------------------


async def _isr_with(dut: Dut, bits: int) -> int | None:
    async def probe() -> int:
        value = await dut.interrupt_status()
        return value if value & bits else 0

    return await dut.until(probe)


@check(
    "irq.ack-exact",
    "4.2.2.1",
    "InterruptStatus shows a used-buffer event, asserts the line, and clears exactly the "
    "acknowledged bits",
    devices=IO_DEVICES,
)
async def irq_ack_exact(dut: Dut) -> Outcome:
    ring = await dut.up()
    if isr := await dut.interrupt_status():
        raise fail(
            f"InterruptStatus reads {isr:#x} before any event (4.2.2.1: bits of events "
            "that did not happen MUST be zero)"
        )
    await io_round(dut, ring)
    isr = await _isr_with(dut, Interrupt.VRING)
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
    devices=IO_DEVICES,
    feature=Feature.RING_EVENT_IDX,
)
async def irq_event_idx(dut: Dut) -> Outcome:
    ring = await dut.up(extra=EVENT_IDX)
    await ring.set_used_event(0)
    await io_round(dut, ring)
    if await _isr_with(dut, Interrupt.VRING) is None:
        raise fail("used_event 0: the first used buffer raised no notification (2.7.7.2 MUST)")
    await dut.ack(Interrupt.VRING)
    await ring.set_used_event(2)
    await io_round(dut, ring)
    await dut.quiet()
    await dut.ack(Interrupt.VRING)
    await io_round(dut, ring)
    if await _isr_with(dut, Interrupt.VRING) is None:
        raise fail("used_event 2: the buffer used at index 2 raised no notification (2.7.7.2)")
    return passed("notified at used_event 0 and again at used_event 2")


# -- configuration space (§2.5, §4.2.2) ----------------------------------------------------------


def _config_size(dut: Dut) -> int:
    fields = LAYOUTS.get(dut.device_id, ())
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
)
async def config_widths(dut: Dut) -> Outcome:
    if dut.device_id == DeviceId.ENTROPY:
        return skipped("virtio-rng has no configuration space (5.4.4)")
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


# -- register access rules (§4.2.2.2) ------------------------------------------------------------


async def try_read(dut: Dut, offset: int, width: int) -> int | None:
    """A deliberately wrong read; None if the bus itself refused it (a bus error)."""
    try:
        return await dut.read(offset, width)
    except (CheckFailed, Unresponsive, ConnectionError):
        raise
    except Exception:
        return None


async def try_write(dut: Dut, offset: int, value: int, width: int) -> None:
    try:
        await dut.write(offset, value, width)
    except (CheckFailed, Unresponsive, ConnectionError):
        raise
    except Exception:
        return


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
    devices=IO_DEVICES,
    expect=(REJECT, PASS),
    violation=True,
)
async def width_notify(dut: Dut) -> Outcome:
    ring = await dut.up()
    req = await request(dut, ring)
    await ring.publish(req.head)
    for width in (1, 2, 8):
        await try_write(dut, Reg.QUEUE_NOTIFY, 0, width)
    await dut.quiet()
    early = await ring.pending_used()
    if await dut.status() & Status.DEVICE_NEEDS_RESET:
        return wedged("DEVICE_NEEDS_RESET after wrong-width QueueNotify writes")
    await ring.notify()
    await finish(dut, ring, [req])
    if early:
        return passed(
            "the request was served on a wrong-width notify (a spurious notification "
            "is allowed, 2.7.10)"
        )
    return rejected("wrong-width notifies ignored; the 4-byte notify then served the request")


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


async def _live(dut: Dut) -> list[Ring]:
    """The device at DRIVER_OK with every queue live; for blk/rng, queue 0 has served one
    request whose interrupt is left pending."""
    await dut.begin()
    rings = [await dut.ring(queue) for queue in range(dut.num_queues)]
    for ring in rings:
        await ring.program()
    await dut.driver_ok()
    if dut.io:
        await io_round(dut, rings[0])
        await _isr_with(dut, Interrupt.VRING)
    return rings


async def _still_works(dut: Dut, rings: list[Ring]) -> str:
    """One more request on the live queue 0, without a reset in between."""
    if not dut.io:
        return ""
    await io_round(dut, rings[0])
    return "; the live queue still works"


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
    rings = await _live(dut)
    before = await fingerprint(dut)
    for offset in offsets:
        await try_write(dut, offset, 0xFFFF_FFFF, 4)
    after = await fingerprint(dut)
    if before != after:
        raise fail(f"writes of 0xffffffff to reserved offsets changed {_diff(before, after)}")
    works = await _still_works(dut, rings)
    return rejected(f"{len(offsets)} reserved offsets read 0; writing them changed nothing{works}")


@check(
    "mmio.read-only-writes",
    "4.2.2.2",
    "writes to read-only registers are ignored (writing InterruptStatus is no ACK)",
    expect=(REJECT,),
    violation=True,
)
async def read_only_writes(dut: Dut) -> Outcome:
    rings = await _live(dut)
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
    works = await _still_works(dut, rings)
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
    rings = await _live(dut)
    written: dict[int, set[int]] = {
        Reg.DEVICE_FEATURES_SEL: {0, 1},
        Reg.DRIVER_FEATURES: {dut.negotiated & 0xFFFF_FFFF},
        Reg.DRIVER_FEATURES_SEL: {0},
        Reg.QUEUE_SEL: {0},
        Reg.QUEUE_NOTIFY: {0},
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
    devices=(DeviceId.NET, DeviceId.BLOCK, DeviceId.CONSOLE, DeviceId.ENTROPY),
)
async def shm_absent(dut: Dut) -> Outcome:
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


# -- queue configuration (§4.2.3.2, §4.2.4, §2.7) ------------------------------------------------


@check(
    "queue.ready-readback",
    "4.2.2.1",
    "QueueReady reads 0, then 1 after writing 1, then 0 at once after writing 0; a stopped "
    "queue is not used",
    versions=(2,),
    devices=IO_DEVICES,
)
async def queue_ready_readback(dut: Dut) -> Outcome:
    await dut.begin()
    await dut.select(0)
    if value := await dut.read(Reg.QUEUE_READY):
        raise fail(f"QueueReady reads {value:#x} before setup")
    ring = await dut.ring()
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
    req = await request(dut, ring, 4)
    await ring.publish(req.head)
    await ring.notify()
    await dut.quiet()
    if await ring.pending_used():
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
    devices=IO_DEVICES,
)
async def queue_legacy_pfn(dut: Dut) -> Outcome:
    await dut.begin()
    await dut.select(0)
    if value := await dut.read(Reg.QUEUE_PFN):
        raise fail(f"QueuePFN reads {value:#x} before setup")
    ring = await dut.ring()
    await ring.program()
    if (value := await dut.read(Reg.QUEUE_PFN)) != ring.pfn:
        raise fail(f"QueuePFN reads {value:#x}, {ring.pfn:#x} was written")
    await dut.driver_ok()
    await io_round(dut, ring)
    await dut.select(0)
    await dut.write(Reg.QUEUE_PFN, 0)
    if value := await dut.read(Reg.QUEUE_PFN):
        raise fail(f"QueuePFN reads {value:#x} after writing 0")
    req = await request(dut, ring, 4)
    await ring.publish(req.head)
    await ring.notify()
    await dut.quiet()
    if await ring.pending_used():
        raise fail("the device used the queue after QueuePFN was set to 0 (4.2.4)")
    return passed(f"QueuePFN {ring.pfn:#x} read back; after 0 the queue was left alone")


@check(
    "queue.legacy-layout",
    "2.7.2",
    "legacy rings are found at QueuePFN * GuestPageSize with the used ring aligned to "
    "QueueAlign after used_event",
    versions=(1,),
    devices=IO_DEVICES,
)
async def queue_legacy_layout(dut: Dut) -> Outcome:
    done = []
    for page, align in ((4096, 4096), (65536, 65536), (4096, 4)):
        await dut.begin()
        await dut.write(Reg.GUEST_PAGE_SIZE, page)
        ring = await dut.ring(page_size=page, align=align)
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


async def size_probe(dut: Dut, valid: int, bad: int) -> Outcome:
    """Write QueueNum ``valid`` then ``bad``, enable the queue and serve requests one by one
    until slot positions under ``bad`` and ``valid`` differ: the used element's slot tells
    which size the device runs (v2). Legacy: the ring is laid out for ``valid`` only."""
    await dut.begin()
    ring = await dut.ring(num=valid, capacity=max(valid, bad))
    await dut.select(0)
    await dut.write(Reg.QUEUE_NUM, valid)
    await dut.write(Reg.QUEUE_NUM, bad)
    if ring.legacy:
        await dut.write(Reg.QUEUE_ALIGN, ring.align)
        await dut.write(Reg.QUEUE_PFN, ring.pfn)
    else:
        await ring.write_addresses(ring.desc, ring.avail, ring.used)
        await dut.write(Reg.QUEUE_READY, 1)
    if await dut.status() & Status.DEVICE_NEEDS_RESET:
        return wedged(f"QueueNum {bad}: DEVICE_NEEDS_RESET when the queue was enabled")
    if not await dut.queue_in_use(0):
        return rejected(f"QueueNum {bad}: the device would not enable the queue")
    if (await dut.add_status(Status.DRIVER_OK)) & Status.DEVICE_NEEDS_RESET:
        return wedged(f"QueueNum {bad}: DEVICE_NEEDS_RESET at DRIVER_OK")
    steps = (min(valid, bad) if bad else valid) + 1
    for k in range(steps):
        slots = {k % valid} | ({k % bad} if bad and not ring.legacy else set())
        for slot in slots:
            await dut.memory.write(ring.used + 4 + USED_ELEM_SIZE * slot, b"\xff" * 8)
            await ring.put(slot, 0)
        req = await request(dut, ring, 0)
        await ring.set_avail_idx(k + 1)
        await ring.notify()
        state = await ring.wait_used(1)
        if state == "needs-reset":
            return wedged(f"QueueNum {bad}: DEVICE_NEEDS_RESET at request {k + 1}")
        if state == "timeout":
            raise fail(
                f"QueueNum {valid} then {bad}: request {k + 1} was not served and no "
                f"DEVICE_NEEDS_RESET (the device seems to run a queue of {bad})"
            )
        moved = bad and not ring.legacy and k % bad != k % valid
        if moved and (await ring.used_slot(k % bad))[0] == 0:
            why = "" if bad < valid else f" above QueueNumMax {dut.queue_max[0]}"
            if bad & (bad - 1):
                why = f": 65536 is not a multiple of {bad}, so the ring breaks at the index wrap"
            raise fail(
                f"the device runs the ring with QueueNum {bad} (request {k + 1} came "
                f"back in used slot {k % bad}, not {k % valid}){why}"
            )
        await finish(dut, ring, [req])
    return rejected(
        f"QueueNum {bad} ignored: the device kept {valid} ({steps} requests, slots wrapped at it)"
    )


def _probe_sizes(dut: Dut) -> int | None:
    """The valid size the probes start from; None when the queue is too small for them."""
    return 4 if dut.queue_max and dut.queue_max[0] >= 4 else None


@check(
    "queue.num-above-max",
    "4.2.2.2",
    "QueueNum above QueueNumMax is refused (ignored or DEVICE_NEEDS_RESET), never used",
    devices=IO_DEVICES,
    expect=(REJECT, WEDGED),
    violation=True,
)
async def queue_num_above_max(dut: Dut) -> Outcome:
    if (valid := _probe_sizes(dut)) is None:
        return skipped("QueueNumMax below 4")
    return await size_probe(dut, valid, 2 * dut.queue_max[0])


@check(
    "queue.num-not-pow2",
    "2.7",
    "a QueueNum that is not a power of 2 is refused (ignored or DEVICE_NEEDS_RESET), never used",
    devices=IO_DEVICES,
    expect=(REJECT, WEDGED),
    violation=True,
)
async def queue_num_not_pow2(dut: Dut) -> Outcome:
    if (valid := _probe_sizes(dut)) is None:
        return skipped("QueueNumMax below 4")
    return await size_probe(dut, valid, 3)


@check(
    "queue.num-zero",
    "4.2.3.2",
    "QueueNum 0 is refused (ignored or DEVICE_NEEDS_RESET)",
    devices=IO_DEVICES,
    expect=(REJECT, WEDGED),
    violation=True,
)
async def queue_num_zero(dut: Dut) -> Outcome:
    if (valid := _probe_sizes(dut)) is None:
        return skipped("QueueNumMax below 4")
    return await size_probe(dut, valid, 0)


@check(
    "queue.nonexistent-sel",
    "4.2.3.2",
    "a QueueSel past the last queue reads QueueNumMax 0; writes to that queue change nothing",
    expect=(REJECT,),
    violation=True,
)
async def queue_nonexistent_sel(dut: Dut) -> Outcome:
    rings = await _live(dut)
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
    works = await _still_works(dut, rings)
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
    devices=IO_DEVICES,
    expect=(PASS, REJECT, WEDGED),
    violation=True,
)
async def queue_before_features_ok(dut: Dut) -> Outcome:
    await dut.set_status(Status.ACKNOWLEDGE)
    await dut.set_status(ACK_DRIVER)
    ring = await dut.ring()
    await ring.program()
    ready = await dut.read(Reg.QUEUE_READY)
    req = await request(dut, ring)
    await ring.publish(req.head)
    await ring.notify()
    await dut.quiet()
    if await ring.pending_used():
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
    devices=IO_DEVICES,
    expect=(REJECT, WEDGED),
    violation=True,
)
async def queue_write_while_ready(dut: Dut) -> Outcome:
    ring = await dut.up()
    other = await dut.ring()
    req_b = await request(dut, other)
    await other.publish(req_b.head)
    await dut.select(0)
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


# -- notifications (§2.1.2, §4.2.3.3) -------------------------------------------------------------


@check(
    "notify.before-driver-ok",
    "2.1.2",
    "buffers notified before DRIVER_OK are not consumed; once live they are",
    versions=(2,),
    devices=IO_DEVICES,
    expect=(REJECT, WEDGED),
    violation=True,
)
async def notify_before_driver_ok(dut: Dut) -> Outcome:
    await dut.begin()
    ring = await dut.ring()
    await ring.program()
    req = await request(dut, ring)
    await ring.publish(req.head)
    await ring.notify()
    await dut.quiet()
    if await ring.pending_used():
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
    devices=IO_DEVICES,
    expect=(REJECT, PASS),
    violation=True,
)
async def notify_nonexistent_queue(dut: Dut) -> Outcome:
    ring = await dut.up()
    req = await request(dut, ring)
    await ring.publish(req.head)
    for index in (dut.num_queues, 0xFFFF):
        await dut.write(Reg.QUEUE_NOTIFY, index)
    await dut.quiet()
    early = await ring.pending_used()
    if await dut.status() & Status.DEVICE_NEEDS_RESET:
        return wedged("DEVICE_NEEDS_RESET for a notification of a non-existent queue")
    await ring.notify()
    await finish(dut, ring, [req])
    if early:
        return passed("served queue 0 on it: a spurious notification is allowed (2.7.10)")
    return rejected(f"notifications for queues {dut.num_queues} and 0xffff ignored")


# -- malformed rings (§2.7.4 - §2.7.6) -----------------------------------------------------------

Builder = Callable[[Dut, Ring], Awaitable[tuple[str, int]]]
"""Lays out a malformed chain and publishes it; returns what is wrong with it and how many
device-writable bytes it really has (for a chain the device may serve, 0 otherwise)."""


async def broken_chain(
    dut: Dut, build: Builder, *, extra: int = 0, allow_use: bool = False
) -> Outcome:
    """Bring the device up, publish a malformed chain, notify, and judge the reaction."""
    ring = await dut.up(extra=extra)
    what, writable = await build(dut, ring)
    await ring.notify()
    state = await ring.wait_used(1, _silence(dut))
    if state == "used":
        return await _used_broken(dut, ring, what, writable if allow_use else None)
    if state == "needs-reset":
        return await _needs_reset(dut, what)
    return rejected(
        f"{what}: neither used nor reported (no DEVICE_NEEDS_RESET) within {_silence(dut):.2f} s"
    )


async def _used_broken(dut: Dut, ring: Ring, what: str, writable: int | None) -> Outcome:
    count = min(await ring.pending_used(), ring.num)
    elems = [await ring.used_elem(k) for k in range(count)]
    shown = ", ".join(f"id {i} len {n}" for i, n in elems)
    if writable is None:
        raise fail(f"the device used the malformed chain ({what}): {shown}")
    if count != 1 or elems[0][0] != 0 or elems[0][1] > writable:
        raise fail(
            f"{what}: used elements {shown}, expected one for head 0 with at most {writable} bytes"
        )
    return passed(f"{what}: served without harm ({shown}; tolerated)")


async def _needs_reset(dut: Dut, what: str) -> Outcome:
    status = await dut.status()
    notified = ""
    if dut.version == 2 and status & Status.DRIVER_OK:
        if await _isr_with(dut, Interrupt.CONFIG) is None:
            raise fail(
                f"{what}: DEVICE_NEEDS_RESET set while DRIVER_OK without a configuration "
                "change notification (2.1.2: the device MUST send one)"
            )
        notified = ", configuration change notified"
    return wedged(f"{what}: DEVICE_NEEDS_RESET{notified}")


def ring_check(id: str, section: str, title: str, **kw: Any) -> Callable[[Builder], Builder]:
    """A malformed-chain check on blk/rng: WEDGED expected (legacy: WEDGED or REJECT)."""
    extra = kw.pop("extra", 0)
    allow_use = kw.pop("allow_use", False)
    expect = kw.pop("expect", RING_EXPECT)

    def register(build: Builder) -> Builder:
        async def run(dut: Dut) -> Outcome:
            return await broken_chain(dut, build, extra=extra, allow_use=allow_use)

        run.__name__ = run.__qualname__ = build.__name__
        check(id, section, title, devices=IO_DEVICES, expect=expect, violation=True, **kw)(run)
        return build

    return register


class Parts:
    """The buffers of one request: rng ``data`` (64 writable bytes); blk ``header`` (a read of
    sector 0), ``data`` (512 writable) and ``status`` (1 writable). ``extra`` is 16 writable
    bytes, for chains that need one more buffer."""

    def __init__(self, dut: Dut) -> None:
        self.dut = dut
        self.rng = dut.device_id == DeviceId.ENTROPY
        self.header = self.data = self.status = self.extra = 0

    async def make(self) -> Parts:
        dut = self.dut
        if not self.rng:
            self.header = await dut.buffer(data=BLK_HEADER.pack(BlkType.IN, 0, 0))
            self.status = await dut.buffer(1, fill=0xFF)
            self.data = await dut.buffer(512)
        else:
            self.data = await dut.buffer(64)
        self.extra = await dut.buffer(16)
        return self

    def around(self, body: list[Desc]) -> list[Desc]:
        """blk: header, then ``body`` (indices from 1), then status; rng: ``body`` alone.
        In ``body`` a next of -1 means "the descriptor after me"."""
        if self.rng:
            return [(a, n, f, i + 1 if nx == -1 else nx) for i, (a, n, f, nx) in enumerate(body)]
        out = [(self.header, 16, N, 1)]
        for i, (a, n, f, nx) in enumerate(body, start=1):
            out.append((a, n, f, i + 1 if nx == -1 else nx))
        out.append((self.status, 1, W, 0))
        last = len(out) - 2
        a, n, f, nx = out[last]
        out[last] = (a, n, f | N, last + 1) if not f & N else (a, n, f, nx)
        return out

    @property
    def size(self) -> int:
        return 64 if self.rng else 512


async def _lay(ring: Ring, descs: list[Desc]) -> None:
    """Descriptors 0, 1, … then publish head 0."""
    for i, desc in enumerate(descs):
        await ring.set_desc(i, *desc)
    await ring.publish(0)


@ring_check("ring.desc-loop", "2.7.5.2", "descriptors whose next fields form a loop")
async def ring_desc_loop(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    if p.rng:
        await _lay(ring, [(p.data, 64, W | N, 1), (p.extra, 16, W | N, 0)])
        return "descriptors 0 → 1 → 0", 0
    await _lay(ring, [(p.header, 16, N, 1), (p.data, 512, W | N, 2), (p.status, 1, W | N, 1)])
    return "descriptors 1 → 2 → 1", 0


@ring_check(
    "ring.next-out-of-range",
    "2.7.5",
    "a descriptor whose next is beyond the table (next = queue size)",
)
async def ring_next_out_of_range(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    descs = chained(_segments_of(p))
    a, n, f, _ = descs[-1]
    descs[-1] = (a, n, f | N, ring.num)
    await _lay(ring, descs)
    return f"next = {ring.num} in a table of {ring.num}", 0


def _segments_of(p: Parts) -> list[tuple[int, int, bool]]:
    if p.rng:
        return [(p.data, 64, True)]
    return [(p.header, 16, False), (p.data, 512, True), (p.status, 1, True)]


@ring_check(
    "ring.head-out-of-range", "2.7.6", "an available ring entry naming a head beyond the table"
)
async def ring_head_out_of_range(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    for i, desc in enumerate(chained(_segments_of(p))):
        await ring.set_desc(i, *desc)
    await ring.publish(ring.num)
    return f"head {ring.num} in a table of {ring.num}", 0


@ring_check(
    "ring.addr-outside-ram",
    "2.7.5",
    "a buffer address outside guest RAM is refused, or served without touching guest RAM",
    allow_use=True,
    expect=TOLERANT_EXPECT,
)
async def ring_addr_outside_ram(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    outside = dut.outside_ram()
    await _lay(ring, p.around([(outside, p.size, W, -1)]))
    return f"a {p.size}-byte buffer at {outside:#x}, outside guest RAM", p.size + (not p.rng)


@ring_check(
    "ring.zero-length",
    "2.7.5",
    "a zero-length descriptor is refused, or served without harm (QEMU refuses it)",
    allow_use=True,
    expect=TOLERANT_EXPECT,
)
async def ring_zero_length(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    await _lay(ring, p.around([(p.extra, 0, W | N, -1), (p.data, p.size, W, -1)]))
    return "a writable descriptor of length 0 in the chain", p.size + (0 if p.rng else 1)


@ring_check(
    "ring.readable-after-writable",
    "2.7.4.2",
    "a device-readable descriptor after a device-writable one",
)
async def ring_readable_after_writable(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    readable = await dut.buffer(data=bytes(16))
    descs = chained(_segments_of(p))
    a, n, f, _ = descs[-1]
    descs[-1] = (a, n, f | N, len(descs))
    descs.append((readable, 16, 0, 0))
    await _lay(ring, descs)
    return "a readable descriptor last, after the writable ones", 0


@ring_check(
    "ring.indirect-nested",
    "2.7.5.3.1",
    "an indirect table that points to another indirect table",
    feature=Feature.RING_INDIRECT_DESC,
    extra=INDIRECT,
)
async def ring_indirect_nested(dut: Dut, ring: Ring) -> tuple[str, int]:
    inner, inner_len = await indirect_table(dut, _segments_of(await Parts(dut).make()))
    outer, outer_len = await raw_table(dut, [(inner, inner_len, VIRTQ_DESC_F_INDIRECT, 0)])
    await _lay(ring, [(outer, outer_len, VIRTQ_DESC_F_INDIRECT, 0)])
    return "an INDIRECT entry inside an indirect table", 0


@ring_check(
    "ring.indirect-bad-len",
    "2.7.5.3",
    "an indirect descriptor whose len is not a multiple of 16",
    feature=Feature.RING_INDIRECT_DESC,
    extra=INDIRECT,
)
async def ring_indirect_bad_len(dut: Dut, ring: Ring) -> tuple[str, int]:
    table, length = await indirect_table(dut, _segments_of(await Parts(dut).make()))
    await _lay(ring, [(table, length - 8, VIRTQ_DESC_F_INDIRECT, 0)])
    return f"an indirect table of len {length - 8}", 0


@ring_check(
    "ring.indirect-with-next",
    "2.7.5.3.1",
    "a descriptor with both INDIRECT and NEXT is refused, or served from the table alone",
    feature=Feature.RING_INDIRECT_DESC,
    extra=INDIRECT,
    allow_use=True,
    expect=TOLERANT_EXPECT,
)
async def ring_indirect_with_next(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    table, length = await indirect_table(dut, _segments_of(p))
    await _lay(ring, [(table, length, VIRTQ_DESC_F_INDIRECT | N, 1), (p.extra, 16, W, 0)])
    return "INDIRECT | NEXT on one descriptor", p.size + (not p.rng)


@ring_check(
    "ring.indirect-not-negotiated",
    "2.7.5.3.1",
    "an indirect descriptor without VIRTIO_F_INDIRECT_DESC negotiated is refused, or served",
    allow_use=True,
    expect=TOLERANT_EXPECT,
)
async def ring_indirect_not_negotiated(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    table, length = await indirect_table(dut, _segments_of(p))
    await _lay(ring, [(table, length, VIRTQ_DESC_F_INDIRECT, 0)])
    return "INDIRECT without the feature", p.size + (not p.rng)


@ring_check("ring.avail-idx-jump", "2.7.13", "avail.idx moved ahead by more than the queue size")
async def ring_avail_idx_jump(dut: Dut, ring: Ring) -> tuple[str, int]:
    for i, desc in enumerate(chained(_segments_of(await Parts(dut).make()))):
        await ring.set_desc(i, *desc)
    await ring.put(0, 0)
    await ring.set_avail_idx(ring.num + 1)
    return f"avail.idx {ring.num + 1} with {ring.num} entries", 0


# -- reset (§2.4, §4.2.2.1) ----------------------------------------------------------------------


@check(
    "reset.clears-state",
    "4.2.2.1",
    "a reset clears Status, InterruptStatus and QueueReady/QueuePFN, and drops the line",
)
async def reset_clears_state(dut: Dut) -> Outcome:
    await _live(dut)
    pending = await dut.interrupt_status()
    asserted = dut.irq_level
    await verify_reset(dut)
    if asserted and not await dut.wait_irq_level(False):
        raise fail("the interrupt line stays asserted after the reset cleared InterruptStatus")
    what = f"InterruptStatus {pending:#x} → 0" + (", line dropped" if asserted else "")
    return passed(f"Status → 0, {what}, {dut.num_queues} queue(s) out of use")


@check(
    "reset.ring-indices",
    "2.4.1",
    "after a reset the device starts the rings from index 0 again",
    devices=IO_DEVICES,
)
async def reset_ring_indices(dut: Dut) -> Outcome:
    ring = await dut.up()
    await io_round(dut, ring, 3 if dut.device_id == DeviceId.ENTROPY else 2)
    await dut.begin()
    await ring.rezero()
    await ring.program()
    await dut.driver_ok()
    try:
        await io_round(dut, ring)
    except CheckFailed as exc:
        raise fail(
            f"the same ring, zeroed, after a reset: {exc} (indices kept across reset?)"
        ) from None
    return passed("a zeroed ring at the same addresses starts from index 0")


@check(
    "reset.in-flight",
    "2.4.1",
    "after the reset completes the device writes no guest memory and raises no interrupt",
    devices=IO_DEVICES,
)
async def reset_in_flight(dut: Dut) -> Outcome:
    ring = await dut.up()
    per = 1 if dut.device_id == DeviceId.ENTROPY else 3
    reqs = [
        await request(dut, ring, k * per, in_len=4096) if per == 3 else await request(dut, ring, k)
        for k in range(ring.num // per)
    ]
    await ring.publish(*(r.head for r in reqs))
    await ring.notify()
    await dut.write(Reg.STATUS, 0)
    await dut.reset()
    events = len(dut.irq_events)
    regions = [(ring.used, 6 + USED_ELEM_SIZE * ring.num)] + [w for r in reqs for w in r.writable]
    snapshot = [await dut.memory.read(g, n) for g, n in regions]
    await dut.quiet()
    await dut.quiet()
    for (gpa, length), before in zip(regions, snapshot, strict=True):
        if await dut.memory.read(gpa, length) != before:
            raise fail(
                f"guest memory at {gpa:#x} changed after the reset completed (2.4.1: no "
                "interaction with the queues after reset)"
            )
    if True in dut.irq_events[events:]:
        raise fail("the interrupt line was asserted after the reset completed (2.4.1)")
    return passed(f"{len(reqs)} requests in flight at the reset; nothing written after it")


@check(
    "reset.storm",
    "2.4",
    "40 resets interleaved with every stage of setup; then the correct flow still works",
)
async def reset_storm(dut: Dut) -> Outcome:
    rand = random.Random(dut.options.seed + dut.index)
    ring = await dut.ring() if dut.queue_max else None
    stages = _storm_stages(dut, ring)
    depths = []
    for i in range(40):
        depth = rand.randint(1, len(stages))
        depths.append(depth)
        if ring is not None:
            await ring.rezero()
        for stage in stages[:depth]:
            await stage()
        await dut.write(Reg.STATUS, 0)
        try:
            await dut.reset()
        except CheckFailed as exc:
            raise fail(f"reset {i + 1} (after {depth} setup stages): {exc}") from None
    if dut.io:
        ring = await dut.up()
        await io_round(dut, ring)
    return passed(
        f"40 resets after 1..{len(stages)} setup stages (mean "
        f"{sum(depths) / len(depths):.1f}); the correct flow works after them"
    )


def _storm_stages(dut: Dut, ring: Ring | None) -> list[Callable[[], Awaitable[None]]]:
    async def ack() -> None:
        await dut.set_status(Status.ACKNOWLEDGE)

    async def driver() -> None:
        await dut.set_status(ACK_DRIVER)
        if dut.version == 1:
            await dut.write(Reg.GUEST_PAGE_SIZE, 4096)

    async def features() -> None:
        await dut.write_features(dut.features_for())
        if dut.version == 2:
            await dut.set_status(ACK_DRIVER | Status.FEATURES_OK)

    async def queue() -> None:
        if ring is not None:
            await ring.program()

    async def live() -> None:
        await dut.add_status(Status.DRIVER_OK)

    async def kick() -> None:
        if ring is not None and dut.io:
            req = await request(dut, ring, (ring.avail_idx * 3) % ring.num)
            await ring.publish(req.head)
            await ring.notify()

    return [ack, driver, features, queue, live, kick]


# -- the driver viowire ships (Linux's sequence) --------------------------------------------------


@check(
    "driver.linux-flow",
    "3.1.1",
    "viowire's Linux-equivalent driver attaches, does I/O through interrupts and detaches",
    devices=IO_DEVICES,
)
async def driver_linux_flow(dut: Dut) -> Outcome:
    dev = VirtioMmioDevice(
        dut.bus, dut.base, dut.info.irq, dut.memory, dut.allocator, size=dut.info.size
    )
    try:
        async with asyncio.timeout(3 * dut.options.io_timeout):
            if dut.device_id == DeviceId.BLOCK:
                drv = await BlockDriver.attach(dev)
                await drv.read(0, 4096)
                await drv.flush()
                serial = await drv.get_id()
                what = f"read 4 KiB, flush, serial {serial!r}"
            else:
                drv = await EntropyDriver.attach(dev)
                what = f"read {len(await drv.read(256))} random bytes"
            features = dev.negotiated_features
            await drv.detach()
    except VirtioError as exc:
        raise fail(f"the driver failed: {exc}") from None
    except TimeoutError:
        raise fail(
            "the driver's requests were not completed through interrupts within "
            f"{3 * dut.options.io_timeout:g} s"
        ) from None
    finally:
        with contextlib.suppress(Exception):
            await dev.del_vqs()
        dut.install_irq()
    return passed(f"attach (probe, features {features:#x}), {what}, detach")


# -- last: a check that can stall a lax device for a long time ------------------------------------
# QEMU 7.2's virtio-rng, given this chain, sets out to produce ~8 GiB of entropy (its memory grows
# by hundreds of MB per second); run last, so that only this check is lost to such a device.


@ring_check(
    "ring.huge-length",
    "2.7.5.2",
    "two buffers of 0xfffff000 bytes: a chain of more than 2^32 bytes",
)
async def ring_huge_length(dut: Dut, ring: Ring) -> tuple[str, int]:
    p = await Parts(dut).make()
    huge = 0xFFFF_F000
    await _lay(ring, p.around([(p.data, huge, W | N, -1), (p.extra, huge, W, -1)]))
    return "two writable buffers of 0xfffff000 bytes (backed by far less)", 0
