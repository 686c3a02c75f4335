"""The exact failure semantics of docs/protocol.md, from bytes (issue 12, item 4).

A client that refuses one of the server's MEM_WRITEs puts the session's running devices in
DEVICE_NEEDS_RESET; POSTED means something only once POSTED_WRITES is negotiated, in both
directions; register accesses of width 1, 2 and 8 get what the protocol says; guest RAM cannot be
registered over a device window; the OK of a QueueNotify leaves before the memory traffic the
notification causes; MEM_WRITE frames respect a small max_frame; a session's devices live as long
as its connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import pytest
from servers import running_server
from test_bad_input import (
    AVAIL,
    BLK,
    DESC,
    PROXIED_RAM,
    RAM_BASE,
    RNG,
    RUNNING,
    USED,
    V1,
    HandDriver,
    RawPeer,
    assert_needs_reset,
    hello_msg,
    mem_register,
    raw_frame,
)

from viowire.protocol import messages as m
from viowire.protocol.codec import decode_body, encode
from viowire.protocol.framing import FrameReader
from viowire.virtio.constants import CONFIG_OFFSET, MAGIC_VALUE, VIRTQ_DESC_F_WRITE, Reg, Status
from viowire.virtio.ring import DESC as DESCRIPTOR

TIMEOUT = 5.0
BUFFER = RAM_BASE + 0x3000
SCHEMES = pytest.mark.parametrize("scheme", ["tcp", "unix"])
PROXIED_ONLY = m.ProtoFeature.MEMORY_PROXIED | m.ProtoFeature.MEMORY_MEMFD


class RecordingReader(FrameReader):
    """Every frame the server sent, in the order it sent them (RawPeer sorts them apart)."""

    def __init__(self) -> None:
        super().__init__()
        self.order: list = []

    def feed(self, data, limit=None):
        frames = super().feed(data, limit)
        self.order += frames
        return frames


class GuestRam:
    """The client's guest RAM, which the test serves to the server's MEM_READs by hand."""

    def __init__(self) -> None:
        self.data = bytearray(PROXIED_RAM)

    def read(self, gpa: int, length: int) -> bytes:
        return bytes(self.data[gpa - RAM_BASE : gpa - RAM_BASE + length])

    def write(self, gpa: int, data: bytes) -> None:
        self.data[gpa - RAM_BASE : gpa - RAM_BASE + len(data)] = data

    def one_chain(self, length: int) -> None:
        """Descriptor 0, device-writable, ``length`` bytes at BUFFER, made available."""
        self.write(DESC, DESCRIPTOR.pack(BUFFER, length, VIRTQ_DESC_F_WRITE, 0))
        self.write(AVAIL + 4, struct.pack("<H", 0))  # ring[0] = head 0
        self.write(AVAIL + 2, struct.pack("<H", 1))  # avail.idx = 1

    def used_idx(self) -> int:
        return struct.unpack("<H", self.read(USED + 2, 2))[0]


async def serve_memory(peer: RawPeer, ram: GuestRam, writes: list, *, refuse: bool) -> None:
    """Answer the server's MEM_READs from ``ram``; apply its MEM_WRITEs (OK unless POSTED) or,
    with ``refuse``, answer each with ERROR MEMORY_FAULT."""
    while True:
        frame = await peer.server_request(timeout=30)
        msg = decode_body(frame.type, frame.body)
        if frame.type == m.MsgType.MEM_READ:
            data = b"".join(ram.read(gpa, length) for gpa, length in msg.ranges)
            await peer.send(raw_frame(m.MsgType.MEM_READ_REPLY, data, frame.request_id, 1))
            continue
        writes.append(frame)
        if refuse:
            error = m.Error(code=m.ErrorCode.MEMORY_FAULT, message="refused by the test")
            await peer.send(encode(error, frame.request_id, m.Flags.REPLY))
            continue
        pos = 0
        for gpa, length in msg.ranges:
            ram.write(gpa, msg.data[pos : pos + length])
            pos += length
        if not frame.flags & m.Flags.POSTED:
            await peer.send(encode(m.Ok(), frame.request_id, m.Flags.REPLY))


class Unposted:
    """RawPeer's register access with every write awaiting its OK (no POSTED flag)."""

    def __init__(self, peer: RawPeer) -> None:
        self.peer = peer

    async def mmio_read(self, addr: int, width: int = 4) -> int:
        return await self.peer.mmio_read(addr, width)

    async def mmio_write(self, addr: int, width: int, value: int) -> None:
        await self.peer.mmio_write(addr, width, value, posted=False)


@contextlib.asynccontextmanager
async def peer_of(server, scheme: str) -> AsyncIterator[RawPeer]:
    peer = await RawPeer.connect(server, scheme)
    peer.reader = RecordingReader()
    try:
        yield peer
    finally:
        await peer.aclose()


@contextlib.asynccontextmanager
async def memory_served(peer: RawPeer, ram: GuestRam, writes: list, *, refuse: bool):
    task = asyncio.get_running_loop().create_task(serve_memory(peer, ram, writes, refuse=refuse))
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, EOFError):
            await task


async def needs_reset(peer: RawPeer, driver: HandDriver) -> None:
    """The device enters DEVICE_NEEDS_RESET once the server has the client's ERROR, which the
    serving task sends after the used-buffer IRQ may already be in: wait for the status, then
    check the rest (assert_needs_reset)."""
    async with asyncio.timeout(TIMEOUT):
        while not await driver.status() & Status.DEVICE_NEEDS_RESET:
            await asyncio.sleep(0.01)
    await assert_needs_reset(peer, driver)


async def rng_on_proxied_memory(
    peer: RawPeer, bus, ram: GuestRam, *, register: bool = True
) -> HandDriver:
    if register:
        await peer.expect_ok(mem_register(RAM_BASE, PROXIED_RAM, m.MemoryKind.PROXIED))
    driver = HandDriver(bus, RNG)
    await driver.negotiate(V1)
    await driver.setup_queue(0, 8, DESC, AVAIL, USED)
    await driver.driver_ok()
    assert await driver.status() == RUNNING
    ram.one_chain(16)
    return driver


# -- a refused MEM_WRITE -------------------------------------------------------------------------
@SCHEMES
async def test_a_refused_posted_mem_write_puts_the_running_devices_in_needs_reset(tmp_path, scheme):
    async with running_server(tmp_path) as server, peer_of(server, scheme) as peer:
        await peer.hello()
        ram, writes = GuestRam(), []
        driver = await rng_on_proxied_memory(peer, peer, ram)
        async with memory_served(peer, ram, writes, refuse=True):
            await driver.notify()
            await needs_reset(peer, driver)
        assert writes and all(w.flags == m.Flags.POSTED for w in writes)
        assert all(w.request_id & 0x8000_0000 for w in writes)  # matched without remembering
        assert ram.used_idx() == 0  # the driver never saw the request completed
        # The session goes on: other devices answer, and the rng works again after its reset.
        assert await peer.mmio_read(BLK + Reg.MAGIC_VALUE) == MAGIC_VALUE
        ram = GuestRam()
        driver = await rng_on_proxied_memory(peer, peer, ram, register=False)
        async with memory_served(peer, ram, writes, refuse=False):
            await driver.notify()
            async with asyncio.timeout(TIMEOUT):
                while ram.used_idx() != 1:
                    await asyncio.sleep(0.01)
        assert await driver.status() == RUNNING


# -- the client's closing ERROR ------------------------------------------------------------------
@SCHEMES
async def test_a_clients_closing_error_fails_the_mem_reads_it_leaves_unanswered(tmp_path, scheme):
    """ERROR with request_id 0 and flags 0 is its sender's last word: not answered, and the
    server's MEM_READ awaiting the client fails at once with its reason (no 10 s timeout)."""
    async with running_server(tmp_path) as server, peer_of(server, scheme) as peer:
        await peer.hello()
        driver = await rng_on_proxied_memory(peer, peer, GuestRam())
        await driver.notify()
        mem_read = await peer.server_request()
        assert mem_read.type == m.MsgType.MEM_READ
        closing = m.Error(code=m.ErrorCode.INTERNAL, message="the test is going away")
        await peer.send(encode(closing, 0, 0))
        await needs_reset(peer, driver)  # well within the 10 s a MEM_READ may wait
        await peer.expect_quiet()  # nothing answered the ERROR


# -- POSTED only with POSTED_WRITES --------------------------------------------------------------
@SCHEMES
async def test_without_posted_writes_nothing_is_posted_either_way(tmp_path, scheme):
    async with running_server(tmp_path) as server, peer_of(server, scheme) as peer:
        reply = await peer.request(hello_msg(features=PROXIED_ONLY))
        assert not reply.features & m.ProtoFeature.POSTED_WRITES
        # A POSTED request is refused with its id and not applied.
        write = m.MmioWrite(addr=RNG + Reg.STATUS, width=4, value=Status.ACKNOWLEDGE)
        message = await peer.request_error(write, m.ErrorCode.UNSUPPORTED, flags=m.Flags.POSTED)
        assert "POSTED_WRITES" in message
        assert await peer.mmio_read(RNG + Reg.STATUS) == 0
        # The server's own MEM_WRITEs await the client's OK instead of being posted.
        ram, writes = GuestRam(), []
        driver = await rng_on_proxied_memory(peer, Unposted(peer), ram)
        async with memory_served(peer, ram, writes, refuse=False):
            await driver.notify()
            async with asyncio.timeout(TIMEOUT):
                while ram.used_idx() != 1:
                    await asyncio.sleep(0.01)
            await asyncio.sleep(0.1)  # the OKs arrive and are taken quietly
            assert await driver.status() == RUNNING
        assert writes and all(w.flags == 0 and w.request_id for w in writes)


@SCHEMES
async def test_an_error_answering_an_unposted_mem_write_also_needs_reset(tmp_path, scheme):
    async with running_server(tmp_path) as server, peer_of(server, scheme) as peer:
        await peer.request(hello_msg(features=PROXIED_ONLY))
        ram, writes = GuestRam(), []
        driver = await rng_on_proxied_memory(peer, Unposted(peer), ram)
        async with memory_served(peer, ram, writes, refuse=True):
            await driver.notify()
            await needs_reset(peer, driver)
        assert writes and all(w.flags == 0 for w in writes)


# -- the QueueNotify reply and the memory traffic it causes ---------------------------------------
@SCHEMES
async def test_the_ok_of_a_queue_notify_leaves_before_its_memory_traffic(tmp_path, scheme):
    async with running_server(tmp_path) as server, peer_of(server, scheme) as peer:
        await peer.hello()
        ram, writes = GuestRam(), []
        driver = await rng_on_proxied_memory(peer, peer, ram)
        before = len(peer.reader.order)
        async with memory_served(peer, ram, writes, refuse=False):
            notify_id = await peer.send_msg(
                m.MmioWrite(addr=RNG + Reg.QUEUE_NOTIFY, width=4, value=0)
            )
            async with asyncio.timeout(TIMEOUT):
                while ram.used_idx() != 1 or not peer.irqs:
                    await asyncio.sleep(0.01)
        assert await peer.reply() is not None  # the OK, taken from the replies
        sent = [(f.type, f.request_id) for f in peer.reader.order[before:]]
        ok = sent.index((m.MsgType.OK, notify_id))
        caused = [
            i
            for i, (t, _) in enumerate(sent)
            if t in (m.MsgType.MEM_READ, m.MsgType.MEM_WRITE, m.MsgType.IRQ)
        ]
        assert caused and ok < min(caused), sent
        assert driver.base == RNG


# -- register widths ------------------------------------------------------------------------------
@SCHEMES
async def test_register_widths_from_bytes(tmp_path, scheme):
    """Registers (below 0x100) are aligned 32-bit: another width or alignment reads 0 and a write
    is ignored. The configuration space takes 1, 2, 4 and 8 bytes at any offset."""
    async with running_server(tmp_path) as server, peer_of(server, scheme) as peer:
        await peer.hello()
        for width in (1, 2, 8):
            assert await peer.mmio_read(BLK + Reg.MAGIC_VALUE, width) == 0
        assert await peer.mmio_read(BLK + Reg.MAGIC_VALUE + 2, 4) == 0  # unaligned
        for width in (1, 2, 8):
            await peer.mmio_write(BLK + Reg.STATUS, width, Status.ACKNOWLEDGE, posted=False)
            assert await peer.mmio_read(BLK + Reg.STATUS) == 0
        capacity = 4 << 20 >> 9  # small_platform's 4 MiB disk, in 512-byte sectors
        assert await peer.mmio_read(BLK + CONFIG_OFFSET, 8) == capacity
        assert await peer.mmio_read(BLK + CONFIG_OFFSET, 4) == capacity
        assert await peer.mmio_read(BLK + CONFIG_OFFSET + 1, 2) == capacity >> 8 & 0xFFFF
        assert await peer.mmio_read(BLK + CONFIG_OFFSET, 1) == capacity & 0xFF
        await peer.request_error(
            m.MmioRead(addr=BLK + Reg.MAGIC_VALUE, width=3), m.ErrorCode.BAD_WIDTH
        )


# -- MEM_REGISTER over a device window ------------------------------------------------------------
@SCHEMES
async def test_guest_ram_over_a_device_window_is_refused(tmp_path, scheme):
    async with running_server(tmp_path) as server, peer_of(server, scheme) as peer:
        await peer.hello()
        for gpa, size in ((RNG, 4096), (RNG - 4096, 4097), (RNG + 0x1FF, 1), (0, 1 << 40)):
            message = await peer.request_error(
                mem_register(gpa, size, m.MemoryKind.PROXIED), m.ErrorCode.MEMORY_FAULT
            )
            assert "device window" in message
        await peer.expect_ok(mem_register(RAM_BASE, 4096, m.MemoryKind.PROXIED))
        assert await peer.mmio_read(RNG + Reg.MAGIC_VALUE) == MAGIC_VALUE


# -- max_frame and how MEM_WRITE is cut ------------------------------------------------------------
@SCHEMES
async def test_mem_writes_fit_the_smallest_max_frame(tmp_path, scheme):
    async with running_server(tmp_path) as server, peer_of(server, scheme) as peer:
        await peer.request_error(hello_msg(max_frame=m.MIN_MAX_FRAME - 1), m.ErrorCode.UNSUPPORTED)
        reply = await peer.request(hello_msg(max_frame=m.MIN_MAX_FRAME))
        assert reply.max_frame == m.MIN_MAX_FRAME
        ram, writes = GuestRam(), []
        driver = await rng_on_proxied_memory(peer, peer, ram)
        size = 3 * m.MIN_MAX_FRAME
        ram.one_chain(size)
        async with memory_served(peer, ram, writes, refuse=False):
            await driver.notify()
            async with asyncio.timeout(TIMEOUT):
                while ram.used_idx() != 1:
                    await asyncio.sleep(0.01)
        assert all(4 + 8 + len(w.body) <= m.MIN_MAX_FRAME for w in writes)
        data = [r for w in writes for r in decode_body(w.type, w.body).ranges if r[0] >= BUFFER]
        assert len(data) > 1 and sum(length for _, length in data) == size  # cut in order
        assert [gpa for gpa, _ in data] == sorted(gpa for gpa, _ in data)


# -- the lifetime of a session's devices -----------------------------------------------------------
@SCHEMES
async def test_devices_live_as_long_as_their_connection(tmp_path, scheme):
    async with running_server(tmp_path) as server:
        async with peer_of(server, scheme) as first, peer_of(server, scheme) as second:
            await first.hello()
            await second.hello()
            await first.mmio_write(BLK + Reg.STATUS, 4, Status.ACKNOWLEDGE, posted=False)
            assert await first.mmio_read(BLK + Reg.STATUS) == Status.ACKNOWLEDGE
            assert await second.mmio_read(BLK + Reg.STATUS) == 0  # its own devices
        async with peer_of(server, scheme) as again:
            await again.hello()
            assert await again.mmio_read(BLK + Reg.STATUS) == 0  # nothing carried over
