"""The jobs measured through viowire itself, each the twin of a bare baseline.

Register reads, posted writes and QueueNotify go through :class:`Connection`; block I/O through
:class:`BlockDriver`; the interrupt latency through a virtqueue of a ``tsrng`` device (see
``viowire.perf.server``); bring-up through the real drivers' probe flow. The codec is measured
here too, against a hand-written ``struct`` codec and against interpreted construct.
"""

from __future__ import annotations

import asyncio
import contextlib
import operator
import struct
import time
import timeit
from collections.abc import Callable

from viowire.client.connection import Connection, DeviceInfo, connect
from viowire.client.drivers.base import VirtioDriver
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.client.target import connect_session
from viowire.perf.ring import closed_loop
from viowire.protocol import messages as m
from viowire.protocol.codec import decode_body, decode_body_construct, encode, encode_construct
from viowire.virtio.constants import DeviceId, Reg

BLOCK = 4096

# Frame sizes of the register messages, for the bare twins: (request, reply)
READ_SIZES = (
    len(encode(m.MmioRead(addr=0, width=4), 1)),
    len(encode(m.MmioReadReply(value=0), 1, m.Flags.REPLY)),
)
WRITE_SIZES = (
    len(encode(m.MmioWrite(addr=0, width=4, value=0), 1)),
    len(encode(m.Ok(), 1, m.Flags.REPLY)),
)


# --- registers ---------------------------------------------------------------------------------


async def mmio_rtt(conn: Connection, addr: int, budget: float, least: int) -> list[float]:
    """Round trips (µs) of MMIO_READ with one in flight."""
    clock = time.perf_counter_ns
    samples = []
    deadline = time.perf_counter() + budget
    while len(samples) < least or time.perf_counter() < deadline:
        start = clock()
        await conn.mmio_read(addr, 4)
        samples.append((clock() - start) / 1000)
    return samples


async def posted_writes(
    conn: Connection, addr: int, value: int, fence: int, budget: float, least: int
) -> float:
    """Posted MMIO_WRITEs per second, in bursts of 1000 each closed by a read of ``fence``
    (writes are applied in order, so the read's reply means the server has applied them)."""
    count = 0
    elapsed = 0.0
    while count < least or elapsed < budget:
        start = time.perf_counter()
        for _ in range(1000):
            await conn.mmio_write(addr, 4, value)
        await conn.mmio_read(fence, 4)
        elapsed += time.perf_counter() - start
        count += 1000
    if conn.posted_errors:
        raise RuntimeError(f"posted writes failed: {conn.posted_errors[0]}")
    return count / elapsed


# --- devices -----------------------------------------------------------------------------------


def pick(devices: list[DeviceInfo], device_id: int, *, version: int | None = 2) -> DeviceInfo:
    """The first device of a type, preferring ``version``."""
    matches = [d for d in devices if d.device_id == device_id]
    if not matches:
        raise LookupError(f"the server has no device with DeviceID {device_id}")
    return next((d for d in matches if d.version == version), matches[0])


async def open_blk(url: str, memory: str, poll_us: int = 0) -> tuple[Connection, BlockDriver]:
    """A connection and a BlockDriver on its first modern disk; ``poll_us``: the driver polls
    its used ring that long after each request (the server polls if it was started so). The
    URL may name a vhost-user back-end too (its one device)."""
    conn = await connect_session(url, memory=memory)
    try:
        info = pick(await conn.platform(), DeviceId.BLOCK)
        dev = await conn.attach(info)
        dev.poll_us = poll_us
        return conn, await BlockDriver.attach(dev)
    except BaseException:
        await conn.close()
        raise


async def blk_iops(blk: BlockDriver, op: str, depth: int, budget: float, least: int) -> float:
    """4 KiB reads or writes per second with ``depth`` requests in flight."""
    payload = bytes(range(256)) * (BLOCK // 256)
    if op == "read":

        def make(i: int):
            return blk.read((i % 1000) * BLOCK, BLOCK)
    else:

        def make(i: int):
            return blk.write((i % 1000) * BLOCK, payload)

    return await closed_loop(make, depth, budget, least)


async def irq_latency(rng: EntropyDriver, budget: float, least: int) -> list[float]:
    """µs from the tsrng device finishing a buffer to the submitting task running again."""
    dev = rng.dev
    gpa = dev.allocator.alloc(16, 16)
    samples = []
    try:
        deadline = time.perf_counter() + budget
        while len(samples) < least or time.perf_counter() < deadline:
            await rng.vq.submit([], [(gpa, 8)])
            woke = time.monotonic_ns()
            stamp = int.from_bytes(await dev.memory.read(gpa, 8), "little")
            samples.append((woke - stamp) / 1000)
    finally:
        dev.allocator.free(gpa)
    return samples


# --- bring-up ----------------------------------------------------------------------------------

DRIVERS: dict[int, type[VirtioDriver]] = {
    DeviceId.BLOCK: BlockDriver,
    DeviceId.ENTROPY: EntropyDriver,
}


class CountingBus:
    """A RegisterBus wrapper that writes down each access: r read, w non-posted, p posted."""

    def __init__(self, bus: Connection) -> None:
        self.bus = bus
        self.pattern: list[str] = []

    async def mmio_read(self, addr: int, width: int) -> int:
        self.pattern.append("r")
        return await self.bus.mmio_read(addr, width)

    async def mmio_write(self, addr: int, width: int, value: int, *, posted: bool = True) -> None:
        self.pattern.append("p" if posted else "w")
        await self.bus.mmio_write(addr, width, value, posted=posted)

    def set_irq_handler(self, irq: int, handler: Callable[[bool], None] | None) -> None:
        self.bus.set_irq_handler(irq, handler)


async def access_patterns(url: str, limit: int) -> list[str]:
    """The register accesses of one bring-up of each of the first ``limit`` devices."""
    async with await connect(url) as conn:
        devices = (await conn.platform())[:limit]
        patterns = {}
        out = []
        for info in devices:
            key = (info.device_id, info.version)
            if key not in patterns and info.device_id in DRIVERS:
                bus = CountingBus(conn)
                await DRIVERS[info.device_id].attach(await conn.attach(info, bus=bus))
                patterns[key] = "".join(bus.pattern)
            if key in patterns:
                out.append(patterns[key])
        return out


async def bringup(url: str, sessions: int, concurrency: int, limit: int) -> tuple[float, int]:
    """Devices per second brought from probe to DRIVER_OK, ``sessions`` connections at once,
    ``concurrency`` devices at a time in each; connecting (HELLO builds the session's platform)
    is counted too. Returns (devices per second, devices)."""

    async def one_session() -> tuple[Connection, int]:
        conn = await connect(url)
        devices = [d for d in (await conn.platform())[:limit] if d.device_id in DRIVERS]
        gate = asyncio.Semaphore(concurrency)

        async def one(info: DeviceInfo) -> None:
            async with gate:
                await DRIVERS[info.device_id].attach(await conn.attach(info))

        await asyncio.gather(*(one(d) for d in devices))
        return conn, len(devices)

    start = time.perf_counter()
    done = await asyncio.gather(*(one_session() for _ in range(sessions)))
    elapsed = time.perf_counter() - start
    for conn, _ in done:
        with contextlib.suppress(Exception):
            await conn.close()
    count = sum(n for _, n in done)
    return count / elapsed, count


# --- codec -------------------------------------------------------------------------------------


def _hand_codec(msg_type: m.MsgType) -> tuple[Callable, Callable]:
    """A hand-written ``struct`` codec of a fixed-size message: the floor viowire's derives to."""
    fields = {
        m.MsgType.MMIO_READ: ("addr", "width", "QB"),
        m.MsgType.MMIO_READ_REPLY: ("value", "Q"),
        m.MsgType.MMIO_WRITE: ("addr", "width", "value", "QBQ"),
        m.MsgType.IRQ: ("irq", "level", "status", "IBI"),
    }[msg_type]
    *names, codes = fields
    body = struct.Struct("<" + codes)
    whole = struct.Struct("<IBBHI" + codes)
    cls = m.MESSAGE_CLASSES[msg_type]
    length, type_byte = whole.size - 4, int(msg_type)
    values = operator.attrgetter(*names)
    if len(names) == 1:
        (name,) = names

        def pack(msg, request_id: int) -> bytes:
            return whole.pack(length, type_byte, 0, 0, request_id, getattr(msg, name))
    else:

        def pack(msg, request_id: int) -> bytes:
            return whole.pack(length, type_byte, 0, 0, request_id, *values(msg))

    unpack = body.unpack

    def decode(_type: int, data: bytes):
        return cls(*unpack(data))

    return pack, decode


CODEC_MESSAGES = {
    m.MsgType.MMIO_READ: m.MmioRead(addr=0x1000_1070, width=4),
    m.MsgType.MMIO_READ_REPLY: m.MmioReadReply(value=0x7472_6976),
    m.MsgType.MMIO_WRITE: m.MmioWrite(addr=0x1000_1050, width=4, value=0),
    m.MsgType.IRQ: m.Irq(irq=3, level=1, status=1),
}


def codec_costs(msg_type: m.MsgType, number: int) -> dict[str, float]:
    """µs per encode + decode of one message: viowire's codec, hand ``struct``, construct."""
    msg = CODEC_MESSAGES[msg_type]
    body = encode(msg, 1)[m.HEADER_SIZE :]
    pack, unpack = _hand_codec(msg_type)
    type_byte = int(msg_type)

    def per_message(enc: Callable, dec: Callable, n: int) -> float:
        def round_trip() -> None:
            enc(msg, 1)
            dec(type_byte, body)

        return min(timeit.repeat(round_trip, number=n, repeat=3)) / n * 1e6

    if unpack(type_byte, body) != msg or pack(msg, 1) != encode(msg, 1):
        raise AssertionError(f"the hand-written struct codec of {msg_type.name} is wrong")
    return {
        "viowire": per_message(encode, decode_body, number),
        "struct": per_message(pack, unpack, number),
        "construct": per_message(encode_construct, decode_body_construct, max(1, number // 20)),
    }


def queue_notify_addr(dev_base: int) -> int:
    return dev_base + Reg.QUEUE_NOTIFY


def queue_sel_addr(dev_base: int) -> int:
    return dev_base + Reg.QUEUE_SEL


def magic_addr(dev_base: int) -> int:
    return dev_base + Reg.MAGIC_VALUE
