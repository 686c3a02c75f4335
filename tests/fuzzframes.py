"""Frame fuzzing of a running ``viowire serve``: hostile sessions from a seeded ``random.Random``.

One implementation for both runs: tests/test_fuzz_frames.py draws the ``Random`` from hypothesis
(a CI time budget), scripts/fuzz-long from a seed (a million frames and more). A session is

- a handshake: a valid HELLO most of the time, then AUTH with the right token, a wrong one or
  none (the server requires one), or garbage instead;
- then frames: messages of every type with fields biased to the edges (device windows and their
  registers, widths 0..9, regions over RAM and over device windows, POSTED and REPLY flags, ids
  reused), bodies cut, grown or bit-flipped, a header made invalid now and then (which ends the
  connection), and raw bytes; the peer answers the server's MEM_READs with random bytes of the
  right length, or of a wrong one;
- then a half-close, after which the server must close the connection within ``HANG_AFTER``.

Every frame the server sends must decode and be of a type a server sends. A separate process
meanwhile opens a fresh session every ``PROBE_EVERY`` seconds (HELLO, AUTH, one register read)
and records how long it took: the "fresh client served within 100 ms throughout" figure.
"""

from __future__ import annotations

import asyncio
import contextlib
import multiprocessing
import os
import random
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from viowire import auth
from viowire.protocol import messages as m
from viowire.protocol.codec import HEADER, decode_body, encode
from viowire.protocol.framing import FrameReader
from viowire.virtio.constants import Reg

HANG_AFTER = 5.0  # seconds from the half-close to the server closing: more is a hang
PROBE_EVERY = 0.05
PROBE_LIMIT = 0.1  # "a fresh client served within 100 ms"
RAM_GPA = 0x8000_0000
RAM_SIZE = 1 << 20
MAGIC = 0x74726976  # "virt"
SERVER_SENDS = {
    m.MsgType.HELLO_REPLY,
    m.MsgType.ERROR,
    m.MsgType.OK,
    m.MsgType.AUTH_REPLY,
    m.MsgType.MMIO_READ_REPLY,
    m.MsgType.PLATFORM_INFO,
    m.MsgType.MEM_READ,
    m.MsgType.MEM_WRITE,
    m.MsgType.IRQ,
}
REGISTERS = [int(r) for r in Reg] + [0x101, 0x108, 0x1FC, 0x200, 0xFFC]


@dataclass
class Target:
    """Where the server listens, the token it requires, its device windows."""

    urls: list[str]
    token: bytes
    windows: list[int] = field(default_factory=list)
    versions: dict[int, int] = field(default_factory=dict)  # window -> virtio-mmio Version


@dataclass
class Tally:
    sessions: int = 0
    frames: int = 0
    bytes: int = 0
    replies: int = 0
    mem_reads: int = 0  # the server's MEM_READs (rings, buffers) the peer answered
    fatal: int = 0  # connections the server ended itself (a fatal ERROR, or AUTH_FAILED)
    problems: list[str] = field(default_factory=list)


# -- what to send ---------------------------------------------------------------------------------
def _int(rng: random.Random, bits: int) -> int:
    top = (1 << bits) - 1
    pick = rng.random()
    if pick < 0.2:
        return rng.choice([0, 1, top, top - 1, 1 << (bits - 1)])
    if pick < 0.5:
        return rng.randrange(256)
    return rng.getrandbits(bits)


def _addr(rng: random.Random, target: Target) -> int:
    pick = rng.random()
    if pick < 0.75 and target.windows:
        return (rng.choice(target.windows) + rng.choice(REGISTERS)) & (1 << 64) - 1
    if pick < 0.85:
        return RAM_GPA + rng.randrange(RAM_SIZE)
    return _int(rng, 64)


def _text(rng: random.Random) -> str:
    pick = rng.random()
    if pick < 0.3:
        return ""
    if pick < 0.6:
        return rng.choice(["viowire-x", "../../etc/passwd", "/dev/shm/x", "a" * 300, "é\x00"])
    return "".join(chr(rng.randrange(32, 0x3000)) for _ in range(rng.randrange(20)))


def _hello(rng: random.Random) -> object:
    return m.Hello(
        magic=m.HELLO_MAGIC if rng.random() < 0.95 else _int(rng, 32),
        version=m.PROTOCOL_VERSION if rng.random() < 0.9 else _int(rng, 16),
        reserved=0 if rng.random() < 0.95 else _int(rng, 16),
        features=rng.getrandbits(8) if rng.random() < 0.9 else _int(rng, 64),
        max_frame=rng.choice([m.DEFAULT_MAX_FRAME, m.MIN_MAX_FRAME, _int(rng, 32)]),
        max_inflight=rng.choice([m.DEFAULT_MAX_INFLIGHT, 1, 4, _int(rng, 32)]),
        host_id=rng.randbytes(16),
        name=_text(rng),
    )


def _message(rng: random.Random, target: Target) -> object:
    kind = rng.random()
    if kind < 0.3:
        return m.MmioRead(addr=_addr(rng, target), width=rng.choice([1, 2, 4, 4, 4, 8, 0, 3, 9]))
    if kind < 0.6:
        return m.MmioWrite(
            addr=_addr(rng, target),
            width=rng.choice([1, 2, 4, 4, 4, 8, 0, 3]),
            value=rng.choice([_int(rng, 32), _int(rng, 64), RAM_GPA + rng.randrange(RAM_SIZE)]),
        )
    if kind < 0.65:
        return m.PlatformQuery(first=_int(rng, 32), max_count=_int(rng, 32))
    if kind < 0.72:
        return m.MemRegister(
            gpa=rng.choice([RAM_GPA, _addr(rng, target), _int(rng, 64)]),
            size=rng.choice([RAM_SIZE, 4096, 0, _int(rng, 64)]),
            kind=rng.choice([m.MemoryKind.PROXIED] * 3 + [1, 2, _int(rng, 8)]),
            offset=_int(rng, 64) if rng.random() < 0.3 else 0,
            name=_text(rng),
        )
    if kind < 0.75:
        return m.MemUnregister(gpa=rng.choice([RAM_GPA, _int(rng, 64)]))
    if kind < 0.78:
        return m.NotifyChannel(base=_addr(rng, target), attach=_int(rng, 8))
    if kind < 0.80:
        return _hello(rng)
    if kind < 0.82:
        return m.Auth(nonce=rng.randbytes(32), mac=rng.randbytes(32), shm_proof=rng.randbytes(32))
    if kind < 0.86:
        gpa = RAM_GPA + rng.randrange(RAM_SIZE)
        ranges = [(gpa, rng.randrange(64)) for _ in range(rng.randrange(3))]
        return rng.choice(
            [
                m.MemReadReply(data=rng.randbytes(rng.randrange(64))),
                m.MemWrite(ranges=ranges, data=rng.randbytes(rng.randrange(64))),
                m.MemRead(ranges=ranges),
            ]
        )
    if kind < 0.9:  # what only a server sends, sent to it
        return rng.choice(
            [
                m.Ok(),
                m.Error(code=_int(rng, 32), message=_text(rng)),
                m.Irq(irq=_int(rng, 32), level=_int(rng, 8), status=_int(rng, 32)),
                m.MmioReadReply(value=_int(rng, 64)),
                m.AuthReply(features=_int(rng, 64), mac=rng.randbytes(32)),
                m.PlatformInfo(total=_int(rng, 32), first=0, devices=[]),
            ]
        )
    return _bring_up_step(rng, target)


def _bring_up_step(rng: random.Random, target: Target) -> object:
    """A register write of the Linux driver's bring-up, values plausible or not: reaches the
    queues, the rings (in proxied RAM the peer fills with random bytes) and the devices."""
    if not target.windows:
        return m.Ok()
    reg, value = rng.choice(
        [
            (Reg.STATUS, rng.choice([0, 1, 3, 11, 15, 0x4F, _int(rng, 32)])),
            (Reg.DRIVER_FEATURES, _int(rng, 32)),
            (Reg.DRIVER_FEATURES_SEL, rng.randrange(3)),
            (Reg.QUEUE_SEL, rng.randrange(4)),
            (Reg.QUEUE_NUM, rng.choice([1, 2, 8, 16, 128, 256, 3, _int(rng, 32)])),
            (Reg.QUEUE_DESC_LOW, RAM_GPA + rng.randrange(0, RAM_SIZE, 16)),
            (Reg.QUEUE_AVAIL_LOW, RAM_GPA + rng.randrange(0, RAM_SIZE, 2)),
            (Reg.QUEUE_USED_LOW, RAM_GPA + rng.randrange(0, RAM_SIZE, 4)),
            (Reg.QUEUE_READY, rng.randrange(2)),
            (Reg.QUEUE_NOTIFY, rng.randrange(4)),
            (Reg.QUEUE_PFN, (RAM_GPA >> 12) + rng.randrange(256)),
            (Reg.GUEST_PAGE_SIZE, rng.choice([4096, 0, 3])),
            (Reg.INTERRUPT_ACK, rng.randrange(4)),
            (Reg.QUEUE_RESET, 1),
        ]
    )
    return m.MmioWrite(addr=rng.choice(target.windows) + reg, width=4, value=value)


def _flags(rng: random.Random) -> int:
    pick = rng.random()
    if pick < 0.75:
        return 0
    if pick < 0.9:
        return m.Flags.POSTED
    if pick < 0.95:
        return m.Flags.REPLY
    return rng.getrandbits(8)


def _mutated(rng: random.Random, frame: bytes) -> bytes:
    """The frame with its body cut, grown or bit-flipped; the length field kept consistent."""
    body = bytearray(frame[HEADER.size :])
    pick = rng.random()
    if pick < 0.35 and body:
        del body[rng.randrange(len(body)) :]
    elif pick < 0.6:
        body += rng.randbytes(rng.randrange(1, 32))
    else:
        for _ in range(rng.randrange(1, 4)):
            if body:
                body[rng.randrange(len(body))] ^= 1 << rng.randrange(8)
    _, type_, flags, reserved, request_id = HEADER.unpack_from(frame)
    return HEADER.pack(8 + len(body), type_, flags, reserved, request_id) + bytes(body)


def _broken_header(rng: random.Random, frame: bytes) -> bytes:
    """A header the framing refuses (the connection then ends) or a type nobody knows."""
    length, type_, flags, reserved, request_id = HEADER.unpack_from(frame)
    pick = rng.random()
    if pick < 0.25:
        length = rng.randrange(8)
    elif pick < 0.5:
        length = rng.choice([m.DEFAULT_MAX_FRAME + 1, 0xFFFF_FFFF, _int(rng, 32)])
    elif pick < 0.7:
        reserved = rng.randrange(1, 1 << 16)
    else:
        type_ = rng.choice([0, 0x07, 0x13, 0x7F, 0xFF, rng.randrange(256)])
    return HEADER.pack(length, type_, flags, reserved, request_id) + frame[HEADER.size :]


def _bring_up(rng: random.Random, target: Target) -> list[object]:
    """Proxied RAM, then one device brought up as Linux does with its queues in that RAM: the
    server then walks rings whose bytes the peer makes up as it answers MEM_READ."""
    base = rng.choice(target.windows)
    legacy = target.versions.get(base, 2) == 1
    if rng.random() < 0.15:
        legacy = not legacy  # the other version's registers, now and then
    high = (0 if legacy else 1) if rng.random() < 0.85 else rng.choice([0, 1, 5])  # VERSION_1
    steps: list[tuple[int, int]] = [(Reg.STATUS, 0), (Reg.STATUS, 1), (Reg.STATUS, 3)]
    steps += [(Reg.DRIVER_FEATURES_SEL, 1), (Reg.DRIVER_FEATURES, high)]
    pick = rng.random()  # no feature, INDIRECT_DESC, or anything
    low = 0 if pick < 0.6 else 1 << 28 if pick < 0.9 else _int(rng, 32)
    steps += [(Reg.DRIVER_FEATURES_SEL, 0), (Reg.DRIVER_FEATURES, low)]
    steps += [(Reg.GUEST_PAGE_SIZE, 4096)] if legacy else [(Reg.STATUS, 11)]
    for queue in range(1 if rng.random() < 0.8 else 2):
        ring = RAM_GPA + rng.randrange(0, RAM_SIZE // 2, 4096)
        steps += [(Reg.QUEUE_SEL, queue), (Reg.QUEUE_NUM, rng.choice([2, 8, 16, 128]))]
        if legacy:
            steps += [(Reg.QUEUE_ALIGN, 4096), (Reg.QUEUE_PFN, ring >> 12)]
        else:
            steps += [(Reg.QUEUE_DESC_LOW, ring), (Reg.QUEUE_AVAIL_LOW, ring + 2048)]
            steps += [(Reg.QUEUE_USED_LOW, ring + 4096), (Reg.QUEUE_READY, 1)]
    steps += [(Reg.STATUS, 15)] + [(Reg.QUEUE_NOTIFY, 0)] * rng.randrange(1, 6)
    memory = m.MemRegister(gpa=RAM_GPA, size=RAM_SIZE, kind=m.MemoryKind.PROXIED, offset=0, name="")
    return [memory] + [m.MmioWrite(addr=base + reg, width=4, value=v) for reg, v in steps]


def frames(rng: random.Random, target: Target, count: int) -> Iterator[bytes]:
    """``count`` hostile frames (or runs of raw bytes, one each)."""
    ids = 1
    if target.windows and rng.random() < 0.5:
        for msg in _bring_up(rng, target)[:count]:
            ids += 1
            count -= 1
            yield encode(msg, ids, m.Flags.POSTED if rng.random() < 0.5 else 0)
    for _ in range(count):
        ids = rng.choice([ids + 1, ids + 1, ids, 0, _int(rng, 32)]) & 0xFFFF_FFFF
        frame = encode(_message(rng, target), ids, _flags(rng))
        pick = rng.random()
        if pick < 0.12:
            frame = _mutated(rng, frame)
        elif pick < 0.14:
            frame = _broken_header(rng, frame)
        elif pick < 0.15:
            frame = rng.randbytes(rng.randrange(1, 64))
        yield frame


# -- one hostile session --------------------------------------------------------------------------
async def _open(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    if url.startswith("unix://"):
        return await asyncio.open_unix_connection(url.removeprefix("unix://"))
    host, _, port = url.removeprefix("tcp://").rpartition(":")
    return await asyncio.open_connection(host, int(port))


def guest_bytes(rng: random.Random, length: int) -> bytes:
    """Guest RAM as a hostile driver fills it: ring indexes and descriptors that are nearly
    right (small indexes, buffers in RAM, flags that chain) or plain random bytes."""
    if rng.random() < 0.3:
        return rng.randbytes(length)
    if length in (2, 4):  # an index, flags + index, a used element's part
        return rng.choice([0, 1, 2, 3, 0xFFFF, rng.randrange(16)]).to_bytes(length, "little")
    if length % 16 == 0 and length:  # descriptors: addr, len, flags, next
        return b"".join(
            struct.pack(
                "<QIHH",
                RAM_GPA + rng.randrange(RAM_SIZE) if rng.random() < 0.9 else _int(rng, 64),
                rng.choice([1, 16, 512, 4096, rng.randrange(1 << 16), _int(rng, 32)]),
                rng.choice([0, 1, 2, 3, 4, 5, rng.getrandbits(16)]),
                rng.randrange(8),
            )
            for _ in range(length // 16)
        )
    return rng.randbytes(length)


class _Peer:
    """Reads and checks every frame the server sends, answers its MEM_READs, until EOF."""

    def __init__(self, reader, writer, rng: random.Random, tally: Tally) -> None:
        self.reader, self.writer, self.rng, self.tally = reader, writer, rng, tally
        self.frames = FrameReader(max_frame=1 << 24)
        self.hello_reply: asyncio.Future = asyncio.get_running_loop().create_future()
        self.half_closed = False
        self.last_mem_read = 0.0
        self.task = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(ConnectionError):
            while data := await self.reader.read(1 << 16):
                for frame in self.frames.feed(data):
                    self._check(frame)

    def _check(self, frame) -> None:
        self.tally.replies += 1
        if frame.type not in SERVER_SENDS:
            raise AssertionError(f"the server sent type {frame.type:#x}: {frame}")
        msg = decode_body(frame.type, frame.body)  # raises if it does not decode
        if frame.request_id == 1 and frame.flags & m.Flags.REPLY and not self.hello_reply.done():
            self.hello_reply.set_result(msg)  # HELLO_REPLY, or an ERROR refusing the HELLO
        if isinstance(msg, m.Error) and frame.request_id == 0 and frame.flags == 0:
            self.tally.fatal += 1
        if isinstance(msg, m.MemRead):
            self.tally.mem_reads += 1
            self.last_mem_read = time.monotonic()
        if isinstance(msg, m.MemRead) and not self.half_closed:
            data = b"".join(guest_bytes(self.rng, length) for _, length in msg.ranges)
            if self.rng.random() < 0.05:
                data = data[: self.rng.randrange(len(data) + 1)] + self.rng.randbytes(2)
            with contextlib.suppress(ConnectionError, RuntimeError):
                self.writer.write(encode(m.MemReadReply(data=data), frame.request_id, 1))


@dataclass
class Plan:
    """Everything a session sends, drawn before it starts: what the server does (and when) then
    changes nothing of what is drawn, so a seed, or hypothesis, replays the same session."""

    url: str
    hello: bytes  # a HELLO frame, or raw bytes
    auth: str  # "right", "wrong" or "none"
    auth_fields: tuple[bytes, bytes]  # a wrong mac, a shm_proof
    chunks: list[bytes]  # the frames, cut and joined anywhere, in writes
    count: int
    size: int
    peer_seed: int  # the answers to MEM_READ draw from a stream of their own


def plan(rng: random.Random, target: Target, count: int) -> Plan:
    pick = rng.random()
    if pick < 0.05:
        hello = rng.randbytes(rng.randrange(1, 40))
    else:
        hello = encode(_hello(rng) if pick < 0.15 else _hello_ok(rng), 1)
    pick = rng.random()
    auth_mode = "none" if pick < 0.05 else "wrong" if pick < 0.15 else "right"
    if not hello.startswith(m.HELLO_MAGIC.to_bytes(4, "little"), HEADER.size):
        auth_mode = "none"  # raw bytes, or a HELLO the server refuses: no reply to wait for
    auth_fields = (rng.randbytes(32), rng.randbytes(32))
    sent = list(frames(rng, target, count))
    stream = b"".join(sent)
    cuts = sorted({rng.randrange(len(stream) + 1) for _ in range(rng.randrange(len(sent) + 1))})
    chunks = [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True) if b > a]
    return Plan(
        rng.choice(target.urls),
        hello,
        auth_mode,
        auth_fields,
        chunks,
        len(sent),
        len(stream),
        rng.getrandbits(64),
    )


async def fuzz_session(rng: random.Random, target: Target, count: int, tally: Tally) -> None:
    """One connection: handshake, ``count`` hostile frames, half-close; the server must close
    it within HANG_AFTER seconds, having sent only valid frames. Failures raise."""
    session = plan(rng, target, count)
    reader, writer = await asyncio.wait_for(_open(session.url), HANG_AFTER)
    peer = _Peer(reader, writer, random.Random(session.peer_seed), tally)
    tally.sessions += 1
    tally.frames += session.count
    tally.bytes += session.size
    try:
        with contextlib.suppress(OSError):  # the server may end the connection at any point
            await _handshake(session, target, writer, peer)
            for chunk in session.chunks:
                writer.write(chunk)
                await asyncio.wait_for(writer.drain(), HANG_AFTER)
            await _while_reading_memory(peer)
            peer.half_closed = True
            if writer.can_write_eof():
                writer.write_eof()
        try:
            await asyncio.wait_for(asyncio.shield(peer.task), HANG_AFTER)
        except TimeoutError:
            raise AssertionError(
                f"the server kept the connection {HANG_AFTER} s after EOF"
            ) from None
        peer.task.result()
    finally:
        peer.task.cancel()
        writer.transport.abort()


async def _while_reading_memory(peer: _Peer, quiet: float = 0.02, most: float = 0.3) -> None:
    """Wait while the server still walks rings (MEM_READs keep coming), up to ``most``."""
    until = time.monotonic() + most
    await asyncio.sleep(0.005)
    while time.monotonic() - peer.last_mem_read < quiet and time.monotonic() < until:
        await asyncio.sleep(0.005)


async def _handshake(session: Plan, target: Target, writer, peer: _Peer) -> None:
    writer.write(session.hello)
    await writer.drain()
    if session.auth == "none":
        return  # no AUTH: every request is refused, then the handshake deadline ends it
    try:
        reply = await asyncio.wait_for(asyncio.shield(peer.hello_reply), HANG_AFTER)
    except TimeoutError:
        if peer.task.done():
            return  # the server refused the HELLO and closed
        raise AssertionError(f"no answer to HELLO within {HANG_AFTER} s") from None
    if not isinstance(reply, m.HelloReply):
        return  # refused: the frames that follow meet a session without a handshake
    nonce = auth.new_nonce()
    mac = auth.client_mac(target.token, reply.nonce, nonce)
    if session.auth == "wrong":
        mac = session.auth_fields[0]
    writer.write(encode(m.Auth(nonce=nonce, mac=mac, shm_proof=session.auth_fields[1]), 2))


def _hello_ok(rng: random.Random) -> object:
    return m.Hello(
        magic=m.HELLO_MAGIC,
        version=m.PROTOCOL_VERSION,
        reserved=0,
        features=rng.choice([0, 2, 2, 2, 3, rng.getrandbits(7) | 2]),  # mostly MEMORY_PROXIED
        max_frame=rng.choice([m.DEFAULT_MAX_FRAME, m.MIN_MAX_FRAME]),
        max_inflight=rng.choice([m.DEFAULT_MAX_INFLIGHT, 2, 16]),
        host_id=rng.randbytes(16),
        name="fuzz",
    )


# -- a fresh client, timed ------------------------------------------------------------------------
def fresh_session(
    url: str, token: bytes, timeout: float = 5.0
) -> tuple[float, list[tuple[int, int]]]:
    """Seconds from connect to the answer of one register read (HELLO, AUTH, PLATFORM_QUERY,
    MMIO_READ of the first window's MagicValue, blocking sockets); and each device's window
    and virtio-mmio Version."""
    started = time.perf_counter()
    if url.startswith("unix://"):
        sock = socket.socket(socket.AF_UNIX)
        address: object = url.removeprefix("unix://")
    else:
        host, _, port = url.removeprefix("tcp://").rpartition(":")
        sock, address = socket.socket(), (host, int(port))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    sock.settimeout(timeout)
    with sock:
        sock.connect(address)
        reader = FrameReader()
        pending: list = []

        def ask(msg: object, request_id: int) -> object:
            sock.sendall(encode(msg, request_id))
            while not pending:
                data = sock.recv(1 << 16)
                if not data:
                    raise ConnectionError("the server closed a fresh session")
                pending.extend(f for f in reader.feed(data) if f.type != m.MsgType.IRQ)
            frame = pending.pop(0)
            return decode_body(frame.type, frame.body)

        hello = ask(_hello_ok(random.Random(0)), 1)
        nonce = auth.new_nonce()
        mac = auth.client_mac(token, hello.nonce, nonce)
        answer = ask(m.Auth(nonce=nonce, mac=mac, shm_proof=bytes(32)), 2)
        assert isinstance(answer, m.AuthReply), answer
        info = ask(m.PlatformQuery(first=0, max_count=64), 3)
        windows = [(entry[0], entry[3]) for entry in info.devices]  # (base, size, irq, version..)
        value = ask(m.MmioRead(addr=windows[0][0] + Reg.MAGIC_VALUE, width=4), 4)
        assert value.value == MAGIC, value
    return time.perf_counter() - started, windows


def _probe_loop(url: str, token: bytes, conn, every: float) -> None:
    latencies: list[float] = []
    failures: list[str] = []
    while not conn.poll(every):
        try:
            latencies.append(fresh_session(url, token)[0])
        except Exception as exc:  # a failed probe is a finding, reported
            failures.append(f"{type(exc).__name__}: {exc}")
    conn.send((latencies, failures))


class Prober:
    """A process of its own that times a fresh session every ``every`` seconds (another process,
    so the fuzzer's own work does not count against the server)."""

    def __init__(self, url: str, token: bytes, every: float = PROBE_EVERY) -> None:
        ctx = multiprocessing.get_context("fork")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_probe_loop, args=(url, token, child, every), daemon=True)
        self.proc.start()
        child.close()

    def stop(self) -> tuple[list[float], list[str]]:
        self.conn.send("stop")
        result = self.conn.recv() if self.conn.poll(30) else ([], ["the prober did not answer"])
        self.proc.join(10)
        if self.proc.is_alive():
            self.proc.kill()
            self.proc.join()
        self.conn.close()
        return result


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


# -- the server under test -----------------------------------------------------------------------
TOKEN = b"fuzz-token-0123456789abcdef"


@dataclass
class Served:
    proc: subprocess.Popen
    target: Target
    stderr: Path

    def problems(self) -> list[str]:
        """Lines of the server's log that mean the server itself went wrong."""
        text = self.stderr.read_text(errors="replace")
        return [ln for ln in text.splitlines() if "Traceback" in ln or " ERROR " in ln]


@contextlib.contextmanager
def serve(workdir: Path, *args: str, loop: str = "auto") -> Iterator[Served]:
    """``viowire serve`` on loopback TCP and a Unix socket in ``workdir``, token required, its
    log in ``workdir/server.err``; killed (its process group) on the way out."""
    token = workdir / "token"
    token.write_bytes(TOKEN)
    stderr = workdir / "server.err"
    command = [sys.executable, "-m", "viowire.cli", "--loop", loop, "serve"]
    command += ["--token-file", str(token)]
    command += ["--listen", "tcp://127.0.0.1:0", "--listen", f"unix://{workdir}/s.sock", *args]
    with stderr.open("w") as err:
        proc = subprocess.Popen(
            command, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True
        )
    try:
        urls = []
        while len(urls) < 2:
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the server did not start: {stderr.read_text()}")
            if found := re.match(r"listening on (\S+)", line):
                urls.append(found.group(1))
        proc.stdout.close()  # nothing more is printed there
        served = Served(proc, Target(urls, TOKEN), stderr)
        devices = fresh_session(urls[0], TOKEN)[1]
        served.target.windows = [base for base, _ in devices]
        served.target.versions = dict(devices)
        yield served
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
