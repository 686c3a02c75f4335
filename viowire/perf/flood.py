"""The starvation flood of issue 12, and the fresh client timed while it runs.

``python -m viowire.perf.flood HOST PORT CONNECTIONS SECONDS`` prints ``connecting``, opens
CONNECTIONS TCP connections and sends each a HELLO, prints ``flooding``, then for SECONDS
pipelines MMIO_READs on every one of them as fast as the sockets take them and never reads a
reply; it prints ``sent BYTES`` and exits. Plain blocking sockets and a selector, no event
loop: it is meant to run as a process of its own (tests/test_flood.py, benchmarks/flood.py), so
that the process timing the fresh client measures only the server.

:func:`fresh_client` is that fresh client: a new connection, HELLO (and the guest RAM
registration ``connect`` makes), one register read, close; it returns the seconds it took.
"""

from __future__ import annotations

import asyncio
import contextlib
import selectors
import socket
import sys
import time

from viowire.protocol import messages as m
from viowire.protocol.codec import encode
from viowire.virtio.constants import Reg

BASE = 0x1000_1000  # the first device window of the default platform
MAGIC = 0x74726976  # "virt": what MagicValue reads
PIPELINED = 2000  # MMIO_READs in the buffer each send() offers


def hello(name: str = "flood") -> object:
    return m.Hello(
        magic=m.HELLO_MAGIC,
        version=m.PROTOCOL_VERSION,
        reserved=0,
        features=0,
        max_frame=m.DEFAULT_MAX_FRAME,
        max_inflight=m.DEFAULT_MAX_INFLIGHT,
        host_id=bytes(16),
        name=name,
    )


def flood(host: str, port: int, count: int, duration: float, out=sys.stdout) -> int:
    """Open ``count`` connections, HELLO on each, then pipeline MMIO_READs on all of them for
    ``duration`` seconds without reading; the bytes sent."""
    reads = b"".join(
        encode(m.MmioRead(addr=BASE + Reg.MAGIC_VALUE, width=4), i + 1) for i in range(PIPELINED)
    )
    selector = selectors.DefaultSelector()
    socks = []
    print("connecting", file=out, flush=True)
    try:
        for _ in range(count):
            sock = socket.create_connection((host, port))
            socks.append(sock)
            sock.sendall(encode(hello(), 1))
            sock.setblocking(False)
            selector.register(sock, selectors.EVENT_WRITE)
        print("flooding", file=out, flush=True)
        end = time.monotonic() + duration
        sent = 0
        while time.monotonic() < end:
            for key, _ in selector.select(0.05):
                with contextlib.suppress(BlockingIOError, InterruptedError):
                    sent += key.fileobj.send(reads)
        print("sent", sent, file=out, flush=True)
        return sent
    finally:
        selector.close()
        for sock in socks:
            sock.close()


async def fresh_client(url: str, timeout: float = 10.0) -> float:
    """Seconds for a new client's connection, HELLO and one register read (MagicValue of the
    first device), the connection closed after."""
    from viowire.client.connection import connect

    start = time.perf_counter()
    async with asyncio.timeout(timeout):
        conn = await connect(url, memory="proxied")
        try:
            value = await conn.mmio_read(BASE + Reg.MAGIC_VALUE, 4)
        finally:
            await conn.close()
    if value != MAGIC:
        raise RuntimeError(f"MagicValue read {value:#x}, not {MAGIC:#x}")
    return time.perf_counter() - start


def main(argv: list[str]) -> int:
    if len(argv) != 4:
        print("usage: python -m viowire.perf.flood HOST PORT CONNECTIONS SECONDS", file=sys.stderr)
        return 2
    host, port, count, duration = argv[0], int(argv[1]), int(argv[2]), float(argv[3])
    flood(host, port, count, duration)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
