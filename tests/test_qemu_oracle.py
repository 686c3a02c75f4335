"""QEMU's virtio-mmio devices as the oracle for viowire's: the same sequences, compared.

Each test runs one register-level sequence on QEMU's device (over qtest) and on viowire's (a
server in this process), modern with modern and legacy with legacy, and compares what a driver
observes: register values after each step, config fields both have, ring effects (used.len,
status bytes, data) and the interrupt line. Where the two differ, the test asserts the difference
recorded in docs/qemu-differences.md (named ``D<n>`` there and here), each judged by the spec.
VendorID and the device-type feature bits differ by nature and are not compared.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import struct
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from qemu import needs_qemu, running_qemu
from servers import running_server, url_of

from viowire.client.connection import DeviceInfo, connect
from viowire.client.qtest import connect_qtest
from viowire.client.virtqueue import Virtqueue
from viowire.server.platform import DeviceSpec, PlatformSpec
from viowire.virtio.blk import BlkFeature, BlkStatus, BlkType
from viowire.virtio.constants import (
    PAGE_SIZE,
    DeviceId,
    Feature,
    Interrupt,
    Reg,
    Status,
)

pytestmark = needs_qemu
versions = pytest.mark.parametrize("version", [1, 2], ids=["legacy", "modern"])

IMAGE_SIZE = 8 << 20  # both disks
RING_SIZE = 16
WAIT = 2.0  # seconds for a request to complete
QUIET = 0.2  # seconds in which a request that must not be served stays unserved
TRANSPORT_BITS = sum(1 << b for b in range(24, 41))  # §6: bits 24..40 belong to the transport
NUM_MAX = {"qemu": 1024, "viowire": 256}  # D1
_HEADER = struct.Struct("<IIQ")


@dataclass
class Completion:
    """What the driver sees of one request: the ring, the status byte, the interrupt line."""

    used_len: int
    status: int  # the last writable byte (-1: the chain has no status byte)
    data: bytes  # the device-writable data part after completion
    interrupt: tuple[int, list[str]]  # InterruptStatus and line changes at completion
    after_ack: tuple[int, list[str]]  # the same after InterruptACK


@dataclass
class Side:
    """One implementation's device, driven register by register."""

    name: str
    conn: object
    info: DeviceInfo
    lines: list[str] = field(default_factory=list)
    vq: Virtqueue | None = None

    def __post_init__(self) -> None:
        self.conn.set_irq_handler(
            self.info.irq, lambda level: self.lines.append("raise" if level else "lower")
        )

    @property
    def legacy(self) -> bool:
        return self.info.version == 1

    @property
    def memory(self):
        return self.conn.ram.memory

    async def read(self, reg: int, width: int = 4) -> int:
        return await self.conn.mmio_read(self.info.base + reg, width)

    async def write(self, reg: int, value: int) -> None:
        await self.conn.mmio_write(self.info.base + reg, 4, value)

    async def interrupts(self) -> tuple[int, list[str]]:
        """InterruptStatus, and the line changes so far. The read is also a barrier: both
        implementations send a line change before the reply to any later access."""
        status = await self.read(Reg.INTERRUPT_STATUS)
        lines, self.lines = self.lines, []
        return status, lines

    async def in_use(self) -> int:
        """QueuePFN (legacy) or QueueReady of the selected queue: non-zero means live."""
        return await self.read(Reg.QUEUE_PFN if self.legacy else Reg.QUEUE_READY)

    # -- initialisation, step by step -----------------------------------------------------------
    async def bring_up(
        self, *, accept: int | None = None, driver_ok: bool = True
    ) -> list[tuple[str, object]]:
        """The Linux flow with a check after each step; returns what was observed."""
        seen: list[tuple[str, object]] = []
        if self.legacy:
            await self.write(Reg.GUEST_PAGE_SIZE, PAGE_SIZE)  # Linux's probe, before the reset
        await self.write(Reg.STATUS, 0)
        status = await self.read(Reg.STATUS)
        seen.append(("reset: Status, InterruptStatus", (status, (await self.interrupts())[0])))
        for bits in (Status.ACKNOWLEDGE, Status.DRIVER):
            await self.write(Reg.STATUS, await self.read(Reg.STATUS) | bits)
            seen.append((f"Status after {bits.name}", await self.read(Reg.STATUS)))
        offered = await self.features()
        seen.append(("word 1 of the offer", offered >> 32))
        wanted = 1 << BlkFeature.FLUSH | 1 << Feature.VERSION_1 if accept is None else accept
        await self.accept(offered & wanted)
        if not self.legacy:
            await self.write(Reg.STATUS, await self.read(Reg.STATUS) | Status.FEATURES_OK)
            seen.append(("Status after FEATURES_OK", await self.read(Reg.STATUS)))
            generation = await self.read(Reg.CONFIG_GENERATION)
        await self.write(Reg.QUEUE_SEL, 1)
        seen.append(("QueueNumMax of queue 1", await self.read(Reg.QUEUE_NUM_MAX)))
        await self.write(Reg.QUEUE_SEL, 0)
        seen.append(("queue 0 in use before setup", await self.in_use()))
        num_max = await self.read(Reg.QUEUE_NUM_MAX)
        assert num_max == NUM_MAX[self.name]  # D1
        await self.setup_queue()
        pfn = self.vq.addresses.desc // PAGE_SIZE
        seen.append(("queue 0 in use after setup", await self.in_use() in (1, pfn)))
        if self.info.device_id == DeviceId.BLOCK:
            seen.append(("capacity", await self.config_u64(0)))
        if not self.legacy:
            changed = await self.read(Reg.CONFIG_GENERATION) != generation
            seen.append(("ConfigGeneration changed during setup", changed))
        if driver_ok:
            await self.write(Reg.STATUS, await self.read(Reg.STATUS) | Status.DRIVER_OK)
            seen.append(("Status after DRIVER_OK", await self.read(Reg.STATUS)))
        seen.append(("InterruptStatus and line", await self.interrupts()))
        return seen

    async def features(self, word: int | None = None) -> int:
        """The offer (64 bits, high word first as Linux reads it), or one selected word."""
        if word is not None:
            await self.write(Reg.DEVICE_FEATURES_SEL, word)
            return await self.read(Reg.DEVICE_FEATURES)
        high = await self.features(1)
        return high << 32 | await self.features(0)

    async def accept(self, features: int) -> None:
        await self.write(Reg.DRIVER_FEATURES_SEL, 1)
        await self.write(Reg.DRIVER_FEATURES, features >> 32)
        await self.write(Reg.DRIVER_FEATURES_SEL, 0)
        await self.write(Reg.DRIVER_FEATURES, features & 0xFFFF_FFFF)

    async def config_u64(self, offset: int) -> int:
        """A 64-bit config field the way Linux reads it: bytes (legacy) or two 32-bit reads."""
        if self.legacy:
            raw = [await self.read(Reg.CONFIG + offset + i, 1) for i in range(8)]
            return int.from_bytes(bytes(raw), "little")
        low = await self.read(Reg.CONFIG + offset)
        return (await self.read(Reg.CONFIG + offset + 4)) << 32 | low

    async def setup_queue(self) -> None:
        layout = "legacy" if self.legacy else "modern"
        self.vq = await Virtqueue.create(
            0, RING_SIZE, self.memory, self.conn.ram, layout, device=self.name
        )
        a = self.vq.addresses
        await self.write(Reg.QUEUE_SEL, 0)
        await self.write(Reg.QUEUE_NUM, RING_SIZE)
        if self.legacy:
            await self.write(Reg.QUEUE_ALIGN, PAGE_SIZE)
            await self.write(Reg.QUEUE_PFN, a.desc // PAGE_SIZE)
            return
        for low, gpa in (
            (Reg.QUEUE_DESC_LOW, a.desc),
            (Reg.QUEUE_AVAIL_LOW, a.avail),
            (Reg.QUEUE_USED_LOW, a.used),
        ):
            await self.write(low, gpa & 0xFFFF_FFFF)
            await self.write(low + 4, gpa >> 32)
        await self.write(Reg.QUEUE_READY, 1)

    # -- requests -------------------------------------------------------------------------------
    async def publish(self, out: list[bytes], in_len: int, *, status: bool = True) -> None:
        """One chain, legacy framing (a descriptor per part: header, data, status byte), kicked.

        The writable data is pre-filled with 0xA5 and the status byte with 0xEE, so what the
        device did not write shows."""
        size = sum(map(len, out)) + in_len + status
        base = self.conn.ram.alloc(size, 16)
        readable, at = [], base
        for part in out:
            readable.append((at, len(part)))
            at += len(part)
        writable = [(at, in_len)] if in_len else []
        if status:
            writable.append((at + in_len, 1))
        await self.memory.write(base, b"".join(out) + b"\xa5" * in_len + b"\xee" * status)
        await self.vq.add(readable, writable, token=(at, in_len + status))
        await self.write(Reg.QUEUE_NOTIFY, 0)

    async def used(self, wait: float = WAIT) -> tuple[object, int] | None:
        """The next used chain, polling the used ring for at most ``wait`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait
        while (got := await self.vq.get_buf()) is None and loop.time() < deadline:
            await asyncio.sleep(0.005)
        return got

    async def request(
        self, out: list[bytes], in_len: int = 0, *, status: bool = True, ack: bool = True
    ) -> Completion:
        await self.publish(out, in_len, status=status)
        got = await self.used()
        assert got is not None, f"{self.name}: request not completed within {WAIT} s"
        (writable, length), used_len = got
        interrupt = await self.interrupts()
        if ack:
            await self.write(Reg.INTERRUPT_ACK, interrupt[0])
        after_ack = await self.interrupts()
        raw = await self.memory.read(writable, length)
        if not status:
            return Completion(used_len, -1, raw, interrupt, after_ack)
        return Completion(used_len, raw[-1], raw[:-1], interrupt, after_ack)

    async def blk(
        self, type_: int, sector: int = 0, data: bytes = b"", in_len: int = 0, **kw
    ) -> Completion:
        out = [_HEADER.pack(type_, 0, sector)] + ([data] if data else [])
        return await self.request(out, in_len, **kw)


@contextlib.asynccontextmanager
async def pair(tmp_path: Path, version: int, device_id: int) -> AsyncIterator[tuple[Side, Side]]:
    """QEMU's and viowire's device of one type and version, each with a fresh disk."""
    spec = PlatformSpec([
        DeviceSpec.parse(f"blk,size={IMAGE_SIZE},version={version}"),
        DeviceSpec.parse(f"rng,version={version}"),
    ])  # fmt: skip
    sock_dir = Path(tempfile.mkdtemp(prefix="vw-oracle-"))  # short: Unix socket paths
    try:
        async with (
            running_qemu(tmp_path, legacy=version == 1, image_size=IMAGE_SIZE) as machine,
            running_server(sock_dir, spec) as server,
            await connect_qtest(machine.url) as qemu,
            await connect(url_of(server, "unix"), irq_status=False) as viowire,
        ):
            sides = []
            for name, conn in (("qemu", qemu), ("viowire", viowire)):
                info = next(d for d in await conn.platform() if d.device_id == device_id)
                assert info.version == version
                sides.append(Side(name, conn, info))
            yield sides[0], sides[1]
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


async def both(sides: tuple[Side, Side], scenario) -> tuple[object, object]:
    """Run the same scenario on each side, one after the other."""
    return await scenario(sides[0]), await scenario(sides[1])


# -- initialisation -------------------------------------------------------------------------------


@versions
async def test_register_values_after_each_initialisation_step(tmp_path, version):
    async with pair(tmp_path, version, DeviceId.BLOCK) as sides:
        qemu, viowire = await both(sides, lambda side: side.bring_up())
    assert qemu == viowire
    steps = dict(qemu)
    assert steps["capacity"] == IMAGE_SIZE // 512
    assert steps["Status after DRIVER_OK"] == (0x7 if version == 1 else 0xF)
    assert steps["word 1 of the offer"] == (0 if version == 1 else 0x101)  # VERSION_1, RING_RESET


@versions
async def test_transport_feature_bits(tmp_path, version):
    async def offer(side: Side) -> tuple[int, list[int]]:
        await side.write(Reg.STATUS, 0)
        return await side.features() & TRANSPORT_BITS, [await side.features(w) for w in (2, 3)]

    async with pair(tmp_path, version, DeviceId.BLOCK) as sides:
        (qemu_bits, qemu_beyond), (viowire_bits, viowire_beyond) = await both(sides, offer)
    ring = 1 << Feature.RING_INDIRECT_DESC | 1 << Feature.RING_EVENT_IDX
    if version == 2:
        assert qemu_bits == viowire_bits == ring | 1 << Feature.VERSION_1 | 1 << Feature.RING_RESET
        assert viowire_beyond == [0, 0]
        assert qemu_beyond == [0x101, 0x101]  # D3: QEMU repeats word 1 for any selector > 0
    else:
        # D2: QEMU's legacy device offers NOTIFY_ON_EMPTY and not ANY_LAYOUT; viowire's the
        # reverse. Neither is transitional, so neither bit is required.
        assert qemu_bits == ring | 1 << Feature.NOTIFY_ON_EMPTY
        assert viowire_bits == ring | 1 << Feature.ANY_LAYOUT
        assert qemu_beyond == viowire_beyond == [0, 0]


async def test_features_ok_is_refused_or_not(tmp_path):
    async def negotiate(side: Side) -> dict[str, int]:
        results = {}
        for name, accepted in (
            ("valid subset", 1 << Feature.VERSION_1),
            ("bit 3, not offered", 1 << Feature.VERSION_1 | 1 << 3),
            ("without VERSION_1", 0),
        ):
            await side.write(Reg.STATUS, 0)
            await side.write(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER)
            await side.accept(accepted)
            await side.write(Reg.STATUS, Status.ACKNOWLEDGE | Status.DRIVER | Status.FEATURES_OK)
            results[name] = await side.read(Reg.STATUS)
        return results

    async with pair(tmp_path, 2, DeviceId.BLOCK) as sides:
        qemu, viowire = await both(sides, negotiate)
    assert qemu["valid subset"] == viowire["valid subset"] == 0xB
    # D4: a set that is no subset of the offer: QEMU drops the bit and sets FEATURES_OK.
    assert (qemu["bit 3, not offered"], viowire["bit 3, not offered"]) == (0xB, 0x3)
    # D5: VERSION_1 not accepted: the spec lets the device refuse (viowire) or go on (QEMU).
    assert (qemu["without VERSION_1"], viowire["without VERSION_1"]) == (0xB, 0x3)


# -- requests -------------------------------------------------------------------------------------


@versions
async def test_block_requests_ring_effects(tmp_path, version):
    sector = bytes(range(256)) * 2

    async def requests(side: Side) -> dict[str, Completion]:
        await side.bring_up()
        return {
            "write": await side.blk(BlkType.OUT, 1, sector),
            "read": await side.blk(BlkType.IN, 1, in_len=512),
            "flush": await side.blk(BlkType.FLUSH),
            "get_id": await side.blk(BlkType.GET_ID, in_len=20),
            "unsupported, no data": await side.blk(0x33),
            "unsupported, 512 data": await side.blk(0x33, in_len=512),
        }

    async with pair(tmp_path, version, DeviceId.BLOCK) as sides:
        qemu, viowire = await both(sides, requests)

    assert qemu["read"].data == viowire["read"].data == sector
    # D11: QEMU (no serial= on its command line) writes the string and one NUL, not the NUL
    # padding to 20 bytes, yet reports all 20 in used.len; viowire pads.
    assert qemu["get_id"].data == b"\0" + b"\xa5" * 19
    assert viowire["get_id"].data == b"viowire-blk".ljust(20, b"\0")
    for name in qemu:
        q, v = qemu[name], viowire[name]
        assert q.interrupt == v.interrupt == (Interrupt.VRING, ["raise"]), name
        assert q.after_ack == v.after_ack == (0, ["lower"]), name
        assert q.status == v.status, name
        if name != "unsupported, 512 data":
            assert q.used_len == v.used_len, name
    assert qemu["write"].status == BlkStatus.OK and qemu["write"].used_len == 1
    assert qemu["read"].used_len == 513 and qemu["get_id"].used_len == 21
    assert qemu["unsupported, no data"].status == BlkStatus.UNSUPP
    # D9: neither writes the data part of a failed request; QEMU counts it in used.len anyway,
    # viowire reports 0 (the status byte does not start the writable area, 2.7.8.2).
    q, v = qemu["unsupported, 512 data"], viowire["unsupported, 512 data"]
    assert q.data == v.data == b"\xa5" * 512
    assert (q.used_len, v.used_len) == (513, 0)


@versions
async def test_entropy_request(tmp_path, version):
    async def entropy(side: Side) -> Completion:
        await side.bring_up(accept=1 << Feature.VERSION_1)
        return await side.request([], 4096, status=False)

    async with pair(tmp_path, version, DeviceId.ENTROPY) as sides:
        qemu, viowire = await both(sides, entropy)
    assert qemu.used_len == viowire.used_len == 4096
    assert (qemu.interrupt, qemu.after_ack) == (viowire.interrupt, viowire.after_ack)
    assert qemu.interrupt == (Interrupt.VRING, ["raise"])
    assert qemu.data != b"\xa5" * 4096 and viowire.data != b"\xa5" * 4096


@versions
async def test_no_interrupt_flag_suppresses_the_interrupt(tmp_path, version):
    async def suppressed(side: Side) -> tuple[int, tuple[int, list[str]]]:
        await side.bring_up()
        await side.vq.disable_cb()  # avail.flags = NO_INTERRUPT (no EVENT_IDX negotiated)
        await side.publish([_HEADER.pack(BlkType.FLUSH, 0, 0)], 0)
        got = await side.used()
        return got[1], await side.interrupts()

    async with pair(tmp_path, version, DeviceId.BLOCK) as sides:
        qemu, viowire = await both(sides, suppressed)
    assert qemu == viowire == (1, (0, []))


# -- stopping, resetting ------------------------------------------------------------------------


@versions
async def test_reset_with_the_line_asserted(tmp_path, version):
    async def reset(side: Side) -> list[object]:
        await side.bring_up()
        done = await side.blk(BlkType.FLUSH, ack=False)
        await side.write(Reg.STATUS, 0)
        await side.write(Reg.QUEUE_SEL, 0)
        seen = [
            done.interrupt,
            await side.read(Reg.STATUS),
            await side.interrupts(),
            await side.in_use(),
        ]
        # The device starts over: a new ring from used index 0.
        await side.bring_up()
        seen.append((await side.blk(BlkType.FLUSH)).used_len)
        return seen

    async with pair(tmp_path, version, DeviceId.BLOCK) as sides:
        qemu, viowire = await both(sides, reset)
    assert qemu == viowire == [(Interrupt.VRING, ["raise"]), 0, (0, ["lower"]), 0, 1]


async def test_queue_ready_zero_then_notify(tmp_path):
    async def stop(side: Side) -> tuple[int, int, bool]:
        await side.bring_up()
        await side.blk(BlkType.FLUSH)
        await side.write(Reg.QUEUE_SEL, 0)
        await side.write(Reg.QUEUE_READY, 0)
        ready, status = await side.read(Reg.QUEUE_READY), await side.read(Reg.STATUS)
        await side.publish([_HEADER.pack(BlkType.FLUSH, 0, 0)], 0)
        return ready, status, await side.used(QUIET) is not None

    async with pair(tmp_path, 2, DeviceId.BLOCK) as sides:
        qemu, viowire = await both(sides, stop)
    assert qemu[:2] == viowire[:2] == (0, 0xF)
    # D7: QueueReady reads 0, yet QEMU still serves the queue on the next notify.
    assert (qemu[2], viowire[2]) == (True, False)


async def test_legacy_queue_pfn_zero(tmp_path):
    async def stop(side: Side) -> tuple[int, int]:
        await side.bring_up()
        await side.write(Reg.QUEUE_SEL, 0)
        await side.write(Reg.QUEUE_PFN, 0)
        return await side.read(Reg.QUEUE_PFN), await side.read(Reg.STATUS)

    async with pair(tmp_path, 1, DeviceId.BLOCK) as sides:
        qemu, viowire = await both(sides, stop)
    # D8: the queue stops on both; QEMU resets the whole device with it.
    assert qemu == (0, 0)
    assert viowire == (0, Status.ACKNOWLEDGE | Status.DRIVER | Status.DRIVER_OK)


@versions
async def test_notify_before_driver_ok(tmp_path, version):
    async def early(side: Side) -> list[bool]:
        await side.bring_up(driver_ok=False)
        await side.publish([_HEADER.pack(BlkType.FLUSH, 0, 0)], 0)
        served = [await side.used(QUIET) is not None]
        await side.write(Reg.STATUS, await side.read(Reg.STATUS) | Status.DRIVER_OK)
        served.append(served[0] or await side.used(QUIET) is not None)
        await side.write(Reg.QUEUE_NOTIFY, 0)
        served.append(served[1] or await side.used() is not None)
        return served

    async with pair(tmp_path, version, DeviceId.BLOCK) as sides:
        qemu, viowire = await both(sides, early)
    if version == 1:
        assert qemu == viowire == [True, True, True]  # legacy drivers kick during probe
    else:
        # D6: QEMU serves a chain notified before DRIVER_OK; viowire drops that notify and
        # serves the chain at the first notify after DRIVER_OK.
        assert (qemu, viowire) == ([True, True, True], [False, False, True])


# -- register misuse ------------------------------------------------------------------------------


@versions
async def test_misused_registers_read_zero(tmp_path, version):
    async def misuse(side: Side) -> dict[str, int]:
        await side.bring_up()
        seen = {
            "Status read 16 bits wide": await side.read(Reg.STATUS, 2),
            "MagicValue read 8 bits wide": await side.read(Reg.MAGIC_VALUE, 1),
            "reserved 0x0c8": await side.read(0xC8),
            "write-only QueueSel": await side.read(Reg.QUEUE_SEL),
            "config past its end": await side.read(Reg.CONFIG + 0xFC),
        }
        await side.write(Reg.QUEUE_SEL, 5)
        seen["QueueNumMax of a missing queue"] = await side.read(Reg.QUEUE_NUM_MAX)
        seen["in use, missing queue"] = await side.in_use()
        await side.write(Reg.MAGIC_VALUE, 0)  # read-only: ignored
        seen["MagicValue after a write"] = await side.read(Reg.MAGIC_VALUE)
        if not side.legacy:
            await side.write(Reg.SHM_SEL, 0)
            for reg in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
                seen[reg.name] = await side.read(reg)
        return seen

    async with pair(tmp_path, version, DeviceId.BLOCK) as sides:
        qemu, viowire = await both(sides, misuse)
    shm_base = {"SHM_BASE_LOW", "SHM_BASE_HIGH"}
    assert {k: v for k, v in qemu.items() if k not in shm_base} == {
        k: v for k, v in viowire.items() if k not in shm_base
    }
    assert qemu["config past its end"] == 0xFFFF_FFFF
    assert qemu["MagicValue after a write"] == 0x74726976
    if version == 2:
        assert qemu["SHM_LEN_LOW"] == qemu["SHM_LEN_HIGH"] == 0xFFFF_FFFF  # length -1: no region
        # D10: the base of a region that does not exist is all ones; QEMU says 0.
        assert (qemu["SHM_BASE_LOW"], qemu["SHM_BASE_HIGH"]) == (0, 0)
        assert (viowire["SHM_BASE_LOW"], viowire["SHM_BASE_HIGH"]) == (0xFFFF_FFFF, 0xFFFF_FFFF)
