"""The bare baselines on a socket: a request/reply responder and a pipelined echo.

Frames have viowire's 12-byte header shape (``<IBBHI``: length, type, flags, reply size, id) and
the sizes of the viowire messages they stand for, so the bytes on the wire are the same and only
viowire's own work (codec, dispatch, register file) is missing. The server parses nothing but
the length field and the flags: ``REPLY`` asks for a reply frame of the size the header names,
``ECHO`` for the frame itself back. It answers every read with one ``write`` (as viowire's
server gathers its replies). Both ends are plain ``asyncio.Protocol`` objects on the loop's own
transports (uvloop's C transports under uvloop), over TCP with TCP_NODELAY or a Unix socket.

Run a server: ``python -m viowire.perf.bare --loop uvloop --listen unix:///tmp/bare.sock``.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import os
import signal
import socket
import struct
import time
from collections.abc import Sequence

from viowire.runtime import run as run_loop
from viowire.urls import parse_endpoint

HEADER = struct.Struct("<IBBHI")  # length (bytes after this field), type, flags, reply size, id
REPLY = 0x01
ECHO = 0x02
POSTED = 0x00


def frame(size: int, flags: int, reply_size: int = 0) -> bytes:
    """A frame of ``size`` bytes in all; ``reply_size`` is the size of the reply it asks for."""
    return HEADER.pack(size - 4, 0x10, flags, reply_size, 1).ljust(size, b"\0")


class BareServerProtocol(asyncio.Protocol):
    """Answers REPLY frames with a reply of the asked size and ECHO frames with themselves."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._replies: dict[int, bytes] = {}

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        out = []
        offset, size = 0, len(buf)
        unpack = HEADER.unpack_from
        while size - offset >= HEADER.size:
            length, _type, flags, reply_size, _id = unpack(buf, offset)
            end = offset + 4 + length
            if end > size:
                break
            if flags & ECHO:
                out.append(bytes(buf[offset:end]))
            elif flags & REPLY:
                reply = self._replies.get(reply_size)
                if reply is None:
                    reply = self._replies[reply_size] = frame(reply_size, 0)
                out.append(reply)
            offset = end
        del buf[:offset]
        if out:
            self.transport.write(b"".join(out))


class BareClient(asyncio.Protocol):
    """The client end: ``await request(frame)``, ``post(frame)``, and echo counting."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self._buffer = bytearray()
        self._waiters: collections.deque[asyncio.Future] = collections.deque()
        self._can_write = asyncio.Event()
        self._can_write.set()
        self._echo_target = 0
        self._echoed = 0
        self._echo_done: asyncio.Future | None = None
        self.closed = asyncio.get_running_loop().create_future()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def connection_lost(self, exc: Exception | None) -> None:
        for waiter in self._waiters:
            if not waiter.done():
                waiter.set_exception(ConnectionError("bare server closed the connection"))
        if not self.closed.done():
            self.closed.set_result(None)

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    def data_received(self, data: bytes) -> None:
        buf = self._buffer
        buf += data
        offset, size = 0, len(buf)
        frames = 0
        while size - offset >= 4:
            (length,) = struct.unpack_from("<I", buf, offset)
            if size - offset < 4 + length:
                break
            offset += 4 + length
            frames += 1
        del buf[:offset]
        waiters = self._waiters
        while frames and waiters:
            waiters.popleft().set_result(None)
            frames -= 1
        if frames:  # echoes of pipelined frames
            self._echoed += frames
            if self._echoed >= self._echo_target and self._echo_done and not self._echo_done.done():
                self._echo_done.set_result(None)

    async def request(self, data: bytes) -> None:
        """Send a frame that asks for a reply and wait for the reply (replies come in order)."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        self.transport.write(data)
        await waiter

    async def post(self, data: bytes) -> None:
        """Send a frame that gets no reply, waiting only when the transport asks us to."""
        if not self._can_write.is_set():
            await self._can_write.wait()
        self.transport.write(data)

    def expect_echoes(self, count: int) -> asyncio.Future:
        self._echoed = 0
        self._echo_target = count
        self._echo_done = asyncio.get_running_loop().create_future()
        return self._echo_done

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()


async def open_client(url: str) -> BareClient:
    endpoint = parse_endpoint(url)
    loop = asyncio.get_running_loop()
    if endpoint.scheme == "tcp":
        _, client = await loop.create_connection(BareClient, endpoint.host, endpoint.port)
        client.transport.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1
        )
    else:
        _, client = await loop.create_unix_connection(BareClient, endpoint.path)
    return client


# --- measurements ------------------------------------------------------------------------------


async def rtt(client: BareClient, size: int, reply_size: int, budget: float, least: int) -> list:
    """Round trips (µs) of one request in flight, for ``budget`` seconds and ``least`` times."""
    data = frame(size, REPLY, reply_size)
    clock = time.perf_counter_ns
    samples = []
    deadline = time.perf_counter() + budget
    while len(samples) < least or time.perf_counter() < deadline:
        start = clock()
        await client.request(data)
        samples.append((clock() - start) / 1000)
    return samples


async def pipelined(client: BareClient, size: int, budget: float, least: int) -> float:
    """Frames per second: stream frames one ``write`` each, without waiting, all echoed back."""
    data = frame(size, ECHO)
    count = 0
    start = time.perf_counter()
    chunks = []
    while count < least or time.perf_counter() - start < budget:
        done = client.expect_echoes(1000)
        t0 = time.perf_counter()
        for _ in range(1000):
            await client.post(data)
        await done
        chunks.append(time.perf_counter() - t0)
        count += 1000
    return count / sum(chunks)


async def replay(
    url: str,
    pattern: str,
    sizes: dict[str, tuple[int, int]],
    devices: int,
    sessions: int,
    concurrency: int,
) -> float:
    """Devices per second when each device costs the register accesses in ``pattern``.

    ``pattern`` is one letter per access of a real bring-up: ``r`` a read and ``w`` a
    non-posted write (a round trip each), ``p`` a posted write; sessions and concurrency as in
    the viowire case.
    """
    frames = {
        "r": frame(sizes["r"][0], REPLY, sizes["r"][1]),
        "w": frame(sizes["w"][0], REPLY, sizes["w"][1]),
        "p": frame(sizes["p"][0], POSTED),
    }
    clients = [await open_client(url) for _ in range(sessions)]

    async def one_device(client: BareClient) -> None:
        for op in pattern:
            if op == "p":
                await client.post(frames["p"])
            else:
                await client.request(frames[op])

    async def one_session(client: BareClient) -> None:
        gate = asyncio.Semaphore(concurrency)

        async def gated() -> None:
            async with gate:
                await one_device(client)

        await asyncio.gather(*(gated() for _ in range(devices)))

    try:
        start = time.perf_counter()
        await asyncio.gather(*(one_session(c) for c in clients))
        return devices * sessions / (time.perf_counter() - start)
    finally:
        for client in clients:
            client.close()


# --- the server process ------------------------------------------------------------------------


async def serve(urls: Sequence[str]) -> None:
    loop = asyncio.get_running_loop()
    servers = []
    for url in urls:
        endpoint = parse_endpoint(url)
        if endpoint.scheme == "tcp":
            server = await loop.create_server(
                BareServerProtocol, endpoint.host, endpoint.port, reuse_address=True
            )
            host, port = server.sockets[0].getsockname()[:2]
            where = f"tcp://{host}:{port}"
        else:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(endpoint.path)
            server = await loop.create_unix_server(BareServerProtocol, endpoint.path)
            where = f"unix://{endpoint.path}"
        servers.append(server)
        print(f"listening on {where}", flush=True)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    for server in servers:
        server.close()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bare request/reply and echo server")
    parser.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--listen", action="append", required=True, metavar="URL")
    args = parser.parse_args(argv)
    run_loop(serve(args.listen), loop=args.loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
