"""viowire's driver on QEMU's own virtio-mmio devices, through QEMU's qtest socket.

The first half needs no QEMU: the line parser, and the bus and guest memory against a small
in-process qtest peer. The second half drives a real QEMU (microvm, legacy and modern) and is
skipped only when qemu-system-x86_64 is not installed.
"""

from __future__ import annotations

import asyncio
import logging
import os

import pytest
from fakeqtest import FakeQtest, fake_qtest
from qemu import BLK_SLOT, RNG_SLOT, needs_qemu, running_qemu

from viowire.client.connection import DeviceInfo
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.client.errors import NoDeviceError
from viowire.client.qtest import (
    QEMU_MICROVM_SLOTS,
    QtestBus,
    QtestClosed,
    QtestCommandError,
    QtestError,
    QtestIrq,
    QtestParser,
    QtestProtocolError,
    QtestReply,
    connect_qtest,
    microvm_slots,
    parse_qtest_url,
    slot_of,
)
from viowire.virtio.constants import MAGIC_VALUE, DeviceId, Feature, Interrupt, Reg, Status
from viowire.virtio.memory import GuestMemoryError

QEMU_VENDOR_ID = 0x554D4551  # "QEMU"
WAIT = 5.0  # seconds: the bound on every wait for QEMU
versions = pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "modern"])


# -- the sans-IO parser ---------------------------------------------------------------------------


def test_parser_copes_with_split_and_coalesced_reads():
    parser = QtestParser()
    assert parser.feed(b"OK 0x00") == []
    events = parser.feed(b"12\nIRQ raise 23\nOK\nFAIL Unknown command 'x'\nERR invalid")
    assert events == [
        QtestReply(True, "OK 0x0012"),
        QtestIrq(23, True),
        QtestReply(True, "OK"),
        QtestReply(False, "FAIL Unknown command 'x'"),
    ]
    assert parser.feed(b" argument size\nIRQ lower 5\n") == [
        QtestReply(False, "ERR invalid argument size"),
        QtestIrq(5, False),
    ]


@pytest.mark.parametrize("junk", [b"hello\n", b"IRQ raise\n", b"IRQ up 3\n", b"\xff\n", b"\n"])
def test_parser_refuses_what_is_not_qtest(junk):
    with pytest.raises(QtestProtocolError):
        QtestParser().feed(junk)


def test_parser_bounds_a_line():
    parser = QtestParser(max_line=16)
    with pytest.raises(QtestProtocolError, match="longer than 16"):
        parser.feed(b"OK " + b"A" * 32)


def test_urls_and_declarations():
    assert parse_qtest_url("qtest+unix:///tmp/q.sock") == "/tmp/q.sock"
    for bad in ("unix:///tmp/q.sock", "qtest+unix://", "qtest+tcp://h:1"):
        with pytest.raises(ValueError, match=r"qtest\+unix:///PATH"):
            parse_qtest_url(bad)

    class Declaration:  # the shape of viowire.declarations.Declaration
        base, size, irq, id = 0x1000_1000, 0x200, 7, 3

    assert slot_of((0x1000, 0x200, 5)) == (0x1000, 0x200, 5)
    assert slot_of((0x1000, 0x200, 5, 9)) == (0x1000, 0x200, 5)
    assert slot_of(Declaration()) == (0x1000_1000, 0x200, 7)
    with pytest.raises(ValueError, match="0x100 bytes"):
        slot_of((0x1000, 0x10, 5))
    assert QEMU_MICROVM_SLOTS[7] == (0xFEB0_0E00, 0x200, 23)
    assert microvm_slots(acpi=False)[0] == (0xFEB0_0000, 0x200, 5)


# -- bus and memory against the in-process peer -------------------------------------------------


async def test_bus_accesses_of_every_width():
    fake = FakeQtest()
    async with fake_qtest(fake) as url, await connect_qtest(url, [], ram_size=64 << 10) as conn:
        assert fake.log[:2] == ["endianness", "irq_intercept_in ioapic"]
        bus = conn.bus
        await bus.mmio_write(0x10, 4, 0x1_2345_6789)  # masked to the width
        assert await bus.mmio_read(0x10, 4) == 0x2345_6789
        assert await bus.mmio_read(0x10, 2) == 0x6789
        assert await bus.mmio_read(0x13, 1) == 0x23
        await bus.store(0x20, 8, 0x0102_0304_0506_0708)
        assert await bus.load(0x20, 8) == 0x0102_0304_0506_0708
        assert fake.log[-1] == "readq 0x20"
        with pytest.raises(ValueError, match="1, 2, 4 or 8"):
            await bus.load(0, 3)
        with pytest.raises(ValueError, match="64-bit"):
            await bus.load(-4, 4)


async def test_fail_replies_raise_and_the_bus_goes_on():
    fake = FakeQtest()
    async with fake_qtest(fake) as url, await connect_qtest(url, []) as conn:
        with pytest.raises(QtestCommandError, match="Unknown command 'clock_step'"):
            await conn.bus.command("clock_step")
        assert await conn.bus.load(0, 4) == 0


async def test_interrupt_lines_reach_handlers_before_the_reply():
    fake = FakeQtest()
    fake.before_reply["writel"] = ["IRQ raise 23", "IRQ raise 0"]
    async with fake_qtest(fake) as url, await connect_qtest(url, []) as conn:
        seen: list[tuple[int, bool]] = []
        conn.set_irq_handler(23, lambda level: seen.append((23, level)))
        await conn.bus.mmio_write(0x100, 4, 1)
        assert seen == [(23, True)]  # IRQ 0 has no handler: ignored
        assert conn.bus.irq_levels == {23: True, 0: True}
        # A handler that joins while the line is high is told so (the line is level-triggered).
        late: list[bool] = []
        conn.set_irq_handler(0, late.append)
        await asyncio.sleep(0)
        assert late == [True]
        conn.set_irq_handler(23, None)
        fake.before_reply["writel"] = ["IRQ lower 23"]
        await conn.bus.mmio_write(0x100, 4, 0)
        assert seen == [(23, True)]
        assert conn.bus.irq_levels[23] is False


async def test_a_silent_qemu_times_out_and_the_bus_closes():
    fake = FakeQtest()
    fake.silent.add("readl")
    async with fake_qtest(fake) as url, await connect_qtest(url, [], timeout=0.2) as conn:
        with pytest.raises(QtestClosed, match=r"no reply to 'readl 0x0' within 0\.2 s"):
            await conn.bus.mmio_read(0, 4)
        # A late reply would be taken for the next command's: the bus refuses to go on.
        with pytest.raises(QtestClosed):
            await conn.bus.mmio_read(4, 4)


async def test_qemu_exiting_fails_pending_and_later_commands():
    fake = FakeQtest()
    fake.silent.add("readl")
    async with fake_qtest(fake) as url, await connect_qtest(url, []) as conn:
        pending = asyncio.create_task(conn.bus.mmio_read(0, 4))
        await asyncio.sleep(0.05)
        fake.hang_up()
        with pytest.raises(QtestClosed, match="did QEMU exit"):
            await asyncio.wait_for(pending, WAIT)
        with pytest.raises(QtestClosed):
            await conn.bus.mmio_write(0, 4, 0)
        assert conn.closed


async def test_a_cancelled_command_does_not_shift_the_replies():
    fake = FakeQtest()
    fake.delay = 0.05
    async with fake_qtest(fake) as url, await connect_qtest(url, []) as conn:
        await conn.bus.store(0, 4, 0x1111)
        await conn.bus.store(4, 4, 0x2222)
        slow = asyncio.create_task(conn.bus.load(0, 4))
        await asyncio.sleep(0.01)
        slow.cancel()
        assert await conn.bus.load(4, 4) == 0x2222  # not the cancelled read's 0x1111


async def test_memory_round_trip_chunks_and_zero_fill():
    fake = FakeQtest(ram_base=0x10_0000, ram_size=1 << 20)
    async with (
        fake_qtest(fake) as url,
        await connect_qtest(url, [], ram_base=0x10_0000, ram_size=1 << 20) as conn,
    ):
        memory = conn.ram.memory
        data = os.urandom(150_000)
        await memory.writev([(0x10_0000, data), (0x18_0000, b"")])
        assert await memory.read(0x10_0000, len(data)) == data
        assert sum(line.startswith("b64write") for line in fake.log) == 3  # 64 KiB chunks
        fake.log.clear()
        await memory.write(0x10_0000, bytes(4096))
        assert fake.log == ["memset 0x100000 0x1000 0"]
        await memory.write_u16(0x10_0002, 0xBEEF)
        assert await memory.read_u16(0x10_0002) == 0xBEEF
        assert fake.log[-2:] == ["writew 0x100002 0xbeef", "readw 0x100002"]
        assert await memory.readv([(0x10_0000, 0)]) == [b""]


async def test_memory_outside_the_window_is_refused_before_any_command():
    fake = FakeQtest(ram_base=0x10_0000)
    async with (
        fake_qtest(fake) as url,
        await connect_qtest(url, [], ram_base=0x10_0000, ram_size=0x1_0000) as conn,
    ):
        sent = len(fake.log)
        memory = conn.ram.memory
        with pytest.raises(GuestMemoryError):
            await memory.read(0x10_FFF0, 32)
        with pytest.raises(GuestMemoryError):  # a bad segment: nothing of the list is written
            await memory.writev([(0x10_0000, b"ok"), (0x0, b"outside")])
        with pytest.raises(GuestMemoryError):
            await memory.write_u16(0x11_0000, 1)
        assert len(fake.log) == sent


async def test_ram_window_and_allocator():
    fake = FakeQtest(ram_base=0x10_0000)
    async with (
        fake_qtest(fake) as url,
        await connect_qtest(url, [], ram_base=0x10_0000, ram_size=0x1_0000) as conn,
    ):
        ram = conn.ram
        assert (ram.base, ram.size, ram.backing, conn.memory_mode) == (
            0x10_0000, 0x1_0000, "qtest", "qtest",
        )  # fmt: skip
        fake.ram[0:64] = b"\xff" * 64
        gpa = await ram.alloc_zeroed(64, 64)
        assert gpa == 0x10_0000 and await ram.memory.read(gpa, 64) == bytes(64)
        ram.free(gpa)
        assert ram.free_bytes == 0x1_0000
    with pytest.raises(ValueError, match="multiples of 4096"):
        async with fake_qtest(FakeQtest()) as url:
            await connect_qtest(url, [], ram_base=0x800)


async def test_nothing_listening_is_a_clear_error(tmp_path):
    url = f"qtest+unix://{tmp_path}/absent.sock"
    with pytest.raises(QtestClosed, match=r"nothing accepts connections .*,server=on,wait=off"):
        await connect_qtest(url, connect_timeout=0.1)


async def test_closing_fails_later_commands_clearly():
    async with fake_qtest(FakeQtest()) as url:
        conn = await connect_qtest(url, [])
        await conn.close()
        assert conn.closed and conn.ram is None
        with pytest.raises(QtestClosed, match="closed by this client"):
            await conn.mmio_read(0, 4)


async def test_a_big_endian_target_is_refused():
    fake = FakeQtest()
    fake.endianness = "big"
    async with fake_qtest(fake) as url:
        with pytest.raises(QtestError, match="little-endian targets only"):
            await connect_qtest(url)


# -- real QEMU ------------------------------------------------------------------------------------


@needs_qemu
@versions
async def test_probe_every_microvm_slot(tmp_path, legacy):
    async with (
        running_qemu(tmp_path, legacy=legacy) as machine,
        await connect_qtest(machine.url) as conn,
    ):
        ids = {}
        for base, _size, _irq in QEMU_MICROVM_SLOTS:
            assert await conn.mmio_read(base + Reg.MAGIC_VALUE, 4) == MAGIC_VALUE
            assert await conn.mmio_read(base + Reg.VERSION, 4) == machine.version
            assert await conn.mmio_read(base + Reg.VENDOR_ID, 4) == QEMU_VENDOR_ID
            ids[base] = await conn.mmio_read(base + Reg.DEVICE_ID, 4)
        # Devices fill the slots from the top, in -device order; the rest are empty.
        assert ids == {base: 0 for base, _, _ in QEMU_MICROVM_SLOTS[:6]} | {
            RNG_SLOT[0]: DeviceId.ENTROPY,
            BLK_SLOT[0]: DeviceId.BLOCK,
        }
        platform = await conn.platform()
        assert [(d.base, d.size, d.irq, d.device_id) for d in platform] == [
            (*RNG_SLOT, DeviceId.ENTROPY),
            (*BLK_SLOT, DeviceId.BLOCK),
        ]
        assert {(d.version, d.vendor_id) for d in platform} == {(machine.version, QEMU_VENDOR_ID)}
        assert platform[1].name == "virtio-blk"
        # An empty slot: the driver's probe skips it having read only the first registers.
        with pytest.raises(NoDeviceError):
            empty = DeviceInfo(*QEMU_MICROVM_SLOTS[0], version=0, device_id=0, vendor_id=0)
            await (await conn.attach(empty)).probe()


@needs_qemu
async def test_platform_skips_a_declaration_with_no_device(tmp_path, caplog):
    async with running_qemu(tmp_path) as machine:
        declarations = [(0x0010_0000, 0x200, 5), BLK_SLOT]  # the first is plain RAM
        async with await connect_qtest(machine.url, declarations) as conn:
            with caplog.at_level(logging.WARNING, logger="viowire.client.qtest"):
                platform = await conn.platform()
            assert [d.device_id for d in platform] == [DeviceId.BLOCK]
            assert "no virtio-mmio device at 0x100000" in caplog.text


@needs_qemu
@versions
async def test_block_driver_on_qemu(tmp_path, legacy):
    preset = os.urandom(4096)
    async with running_qemu(tmp_path, legacy=legacy, image_data=preset) as machine:
        async with await connect_qtest(machine.url) as conn:
            lines: list[tuple[int, bool]] = []
            spy = _IrqSpy(conn.bus, lines)
            info = next(d for d in await conn.platform() if d.device_id == DeviceId.BLOCK)
            blk = await asyncio.wait_for(BlockDriver.attach(await conn.attach(info, bus=spy)), WAIT)
            dev = blk.dev
            assert dev.status & Status.DRIVER_OK
            assert bool(dev.status & Status.FEATURES_OK) == (not legacy)
            assert bool(blk.negotiated_features >> Feature.VERSION_1 & 1) == (not legacy)
            assert blk.capacity == (8 << 20) // 512
            assert dev.vqs[0].num == 1024  # QEMU's QueueNumMax

            assert await asyncio.wait_for(blk.read(0, 4096), WAIT) == preset
            chunks = [os.urandom(16384) for _ in range(16)]
            async with dev.interrupts() as interrupts:
                await asyncio.wait_for(
                    asyncio.gather(
                        *(blk.write(65536 + i * 16384, c) for i, c in enumerate(chunks))
                    ),
                    WAIT,
                )
                status = await asyncio.wait_for(anext(interrupts), WAIT)
            assert status & Interrupt.VRING
            await asyncio.wait_for(blk.flush(), WAIT)
            back = await asyncio.wait_for(blk.read(65536, 16 * 16384), WAIT)
            assert back == b"".join(chunks)
            assert await asyncio.wait_for(blk.get_id(), WAIT) == ""  # QEMU: no serial= given
            # Completions came as `IRQ raise 23` lines, and each ACK lowered the line again.
            assert (info.irq, True) in lines and (info.irq, False) in lines
            assert {irq for irq, _ in lines} == {info.irq}

            await blk.detach()
            assert await conn.mmio_read(info.base + Reg.STATUS, 4) == 0
            assert await conn.mmio_read(info.base + Reg.INTERRUPT_STATUS, 4) == 0
            await conn.mmio_write(info.base + Reg.QUEUE_SEL, 4, 0)
            in_use = Reg.QUEUE_PFN if legacy else Reg.QUEUE_READY
            assert await conn.mmio_read(info.base + in_use, 4) == 0
            assert conn.ram.free_bytes == conn.ram.size  # rings and buffers all returned

        # QEMU wrote the flushed data into the raw image file.
        with open(machine.image, "rb") as f:
            f.seek(65536)
            assert f.read(16 * 16384) == b"".join(chunks)


class _IrqSpy:
    """A bus wrapper that records the interrupt lines the device's handler receives."""

    def __init__(self, bus: QtestBus, lines: list[tuple[int, bool]]) -> None:
        self.bus = bus
        self.lines = lines

    async def mmio_read(self, addr: int, width: int) -> int:
        return await self.bus.mmio_read(addr, width)

    async def mmio_write(self, addr: int, width: int, value: int, *, posted: bool = True) -> None:
        await self.bus.mmio_write(addr, width, value, posted=posted)

    def set_irq_handler(self, irq, handler) -> None:
        if handler is None:
            self.bus.set_irq_handler(irq, None)
            return

        def record(level: bool) -> None:
            self.lines.append((irq, level))
            handler(level)

        self.bus.set_irq_handler(irq, record)


@needs_qemu
@versions
async def test_entropy_driver_on_qemu(tmp_path, legacy):
    async with (
        running_qemu(tmp_path, legacy=legacy) as machine,
        await connect_qtest(machine.url) as conn,
    ):
        info = next(d for d in await conn.platform() if d.device_id == DeviceId.ENTROPY)
        assert info.irq == RNG_SLOT[2]
        rng = await asyncio.wait_for(EntropyDriver.attach(await conn.attach(info)), WAIT)
        data = await asyncio.wait_for(rng.read(256), WAIT)
        assert len(data) == 256 and len(set(data)) > 64
        await rng.detach()
        assert await conn.mmio_read(info.base + Reg.STATUS, 4) == 0


@needs_qemu
async def test_qemu_dying_mid_request_fails_it_clearly(tmp_path):
    async with (
        running_qemu(tmp_path, legacy=False) as machine,
        await connect_qtest(machine.url) as conn,
    ):
        info = next(d for d in await conn.platform() if d.device_id == DeviceId.ENTROPY)
        # Kicks are dropped: the buffer stays with the device and never comes back. (QueueReady
        # = 0 would not do: QEMU goes on serving the queue, docs/qemu-differences.md D7.)
        bus = _NoKick(conn.bus, info.base + Reg.QUEUE_NOTIFY)
        rng = await asyncio.wait_for(EntropyDriver.attach(await conn.attach(info, bus=bus)), WAIT)
        reading = asyncio.create_task(rng.read(16))
        await asyncio.sleep(0.05)
        assert not reading.done()
        machine.process.kill()
        with pytest.raises(QtestClosed, match="did QEMU exit"):
            await asyncio.wait_for(reading, WAIT)
        with pytest.raises(QtestClosed):
            await conn.mmio_read(info.base, 4)


class _NoKick(_IrqSpy):
    """A bus wrapper that drops QueueNotify writes."""

    def __init__(self, bus: QtestBus, notify_addr: int) -> None:
        super().__init__(bus, [])
        self.notify_addr = notify_addr

    async def mmio_write(self, addr: int, width: int, value: int, *, posted: bool = True) -> None:
        if addr != self.notify_addr:
            await self.bus.mmio_write(addr, width, value, posted=posted)
