"""virtio-net through an in-server link, measured: two client sessions, a net device each on the
same link of one server, frames between them.

- *ping-pong* (:func:`ping_pong`): A sends a frame to B, B sends it back, A has it: µs per round
  trip, one frame in flight. The frame crosses the server twice each way (A's transmitq, the
  switch, B's receiveq; then back).
- *stream* (:func:`stream`): A sends frames to B with ``depth`` in flight (sent, not yet
  received by B): frames per second received by B.

Each frame carries its number after the Ethernet header, so a receipt is matched to its frame;
a frame not received within :data:`RECEIPT_TIMEOUT` fails the measurement (the windows stay
below the receive buffers, so the link never has to drop one).
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
import time
from dataclasses import dataclass, field

from viowire.client.connection import Connection, connect
from viowire.client.drivers.net import NetDriver
from viowire.perf.ring import closed_loop
from viowire.virtio.constants import DeviceId

ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental
SEQ = struct.Struct("<Q")
RX_BUFFERS = 64  # posted per device: twice the deepest stream window
RECEIPT_TIMEOUT = 5.0
SIZES = (64, 1500)  # frame bytes, Ethernet header included


@dataclass(eq=False)
class End:
    """One session and its net device, with the frames it is waiting for, by number."""

    conn: Connection
    drv: NetDriver
    waiting: dict[int, asyncio.Future[None]] = field(default_factory=dict)
    echo_to: bytes | None = None  # send every frame back to this MAC (the ping-pong's B)
    reader: asyncio.Task[None] | None = None

    async def read(self) -> None:
        async for frame in self.drv.frames():
            if self.echo_to is not None:
                await self.drv.send(self.echo_to + self.drv.mac + frame[12:])
                continue
            (seq,) = SEQ.unpack_from(frame, 14)
            waiter = self.waiting.pop(seq, None)
            if waiter is not None and not waiter.done():
                waiter.set_result(None)

    def expect(self, seq: int) -> asyncio.Future[None]:
        waiter = asyncio.get_running_loop().create_future()
        self.waiting[seq] = waiter
        return waiter


class NetPair:
    """Two sessions of ``url``, each with its first net device up, on the same link (the same
    slot of the platform: the same device spec)."""

    def __init__(self, a: End, b: End) -> None:
        self.a, self.b = a, b

    @classmethod
    async def open(cls, url: str, memory: str) -> NetPair:
        ends: list[End] = []
        try:
            for _ in range(2):
                conn = await connect(url, memory=memory)
                infos = [d for d in await conn.platform() if d.device_id == DeviceId.NET]
                if not infos:
                    await conn.close()
                    raise LookupError("the server has no net device (serve --device net)")
                drv = await NetDriver.attach(await conn.attach(infos[0]), rx_buffers=RX_BUFFERS)
                ends.append(End(conn, drv))
        except BaseException:
            for end in ends:
                await end.conn.close()
            raise
        pair = cls(*ends)
        for end in ends:
            end.reader = asyncio.get_running_loop().create_task(end.read())
        # one frame each way teaches the switch both MACs: nothing is flooded afterwards
        await pair.a.drv.send(pair.a.drv.mac + pair.a.drv.mac + ETHERTYPE)
        await pair.b.drv.send(pair.b.drv.mac + pair.b.drv.mac + ETHERTYPE)
        return pair

    def frame(self, dst: bytes, src: bytes, seq: int, size: int) -> bytes:
        return (dst + src + ETHERTYPE + SEQ.pack(seq)).ljust(size, b"\xa5")

    async def close(self) -> None:
        for end in (self.a, self.b):
            if end.reader is not None:
                end.reader.cancel()
                with contextlib.suppress(BaseException):
                    await end.reader
            with contextlib.suppress(Exception):
                await end.drv.detach()
            await end.conn.close()


async def ping_pong(pair: NetPair, size: int, budget: float, least: int) -> list[float]:
    """Round trips (µs) of one ``size``-byte frame, A to B and back, one in flight."""
    a, b = pair.a, pair.b
    b.echo_to = a.drv.mac
    clock = time.perf_counter_ns
    samples: list[float] = []
    deadline = time.perf_counter() + budget
    seq = 0
    try:
        while len(samples) < least or time.perf_counter() < deadline:
            seq += 1
            back = a.expect(seq)
            start = clock()
            await a.drv.send(pair.frame(b.drv.mac, a.drv.mac, seq, size))
            await asyncio.wait_for(back, RECEIPT_TIMEOUT)
            samples.append((clock() - start) / 1000)
    finally:
        b.echo_to = None
    return samples


async def stream(pair: NetPair, size: int, depth: int, budget: float, least: int) -> float:
    """Frames per second from A to B, ``depth`` of them sent and not yet received."""
    a, b = pair.a, pair.b
    base = 1 << 40  # numbers of their own: a late echo of the ping-pong matches nothing

    async def one(i: int) -> None:
        seq = base + i
        got = b.expect(seq)
        await a.drv.send(pair.frame(b.drv.mac, a.drv.mac, seq, size))
        await asyncio.wait_for(got, RECEIPT_TIMEOUT)

    return await closed_loop(one, depth, budget, least)
