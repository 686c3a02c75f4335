#!/usr/bin/env python3
"""Issue 13's scrape figure: ``python benchmarks/metrics_scrape.py``.

::

    python benchmarks/metrics_scrape.py                      # 10,000 devices, 4 sessions
    python benchmarks/metrics_scrape.py --devices 1000 --sessions 1 --json

A server (its own process, ``serve --metrics``) serves ``--devices / --sessions`` rng devices a
session; this process opens ``--sessions`` sessions (each builds its instance of the platform:
the devices exist), brings the first devices of each up and reads entropy from them (so the
request counters and latency histograms hold data), then scrapes ``/metrics`` ``--scrapes``
times over HTTP, one after the other. The figures:

``scrape.ms``
    the time from sending ``GET /metrics`` to the end of the answer (p50, max), the server's
    whole scrape: its collector walking every session's devices, ``generate_latest``, HTTP;
``series``
    the samples in the answer, parsed by prometheus_client's text parser;
``bytes``
    the size of the answer.

The issue's bar, printed beside the figures: a scrape ≤ 100 ms and ≤ 1,000 series with 10,000
devices. Nothing is asserted.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__":
    _root = Path(__file__).resolve().parents[1]
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

from prometheus_client.parser import text_string_to_metric_families

from viowire.client.connection import connect
from viowire.client.drivers.rng import EntropyDriver
from viowire.perf.memory import write_config
from viowire.perf.suite import Children
from viowire.runtime import run as run_loop

BAR_MS, BAR_SERIES = 100.0, 1000
BUSY_DEVICES = 8  # devices a session brings up and reads from


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def get(port: int) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
    answer = await reader.read()
    writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"scrape failed: {head[:200]!r}")
    return body


async def measure(url: str, port: int, sessions: int, scrapes: int) -> dict:
    conns = [await connect(url, memory="proxied") for _ in range(sessions)]
    try:
        for conn in conns:
            platform = await conn.platform()
            for info in platform[:BUSY_DEVICES]:
                rng = await EntropyDriver.attach(await conn.attach(info))
                await asyncio.wait_for(rng.read(64), 10)
        times, body = [], b""
        for _ in range(scrapes):
            start = time.perf_counter()
            body = await asyncio.wait_for(get(port), 30)
            times.append((time.perf_counter() - start) * 1000)
        samples = [s for f in text_string_to_metric_families(body.decode()) for s in f.samples]
        devices = sum(s.value for s in samples if s.name == "viowire_devices")
    finally:
        for conn in conns:
            await conn.close()
    times.sort()
    return {
        "devices": int(devices),
        "sessions": sessions,
        "scrapes": scrapes,
        "scrape_ms_p50": round(times[len(times) // 2], 2),
        "scrape_ms_max": round(times[-1], 2),
        "series": len(samples),
        "bytes": len(body),
        "bar": {"scrape_ms": BAR_MS, "series": BAR_SERIES},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=10_000, help="in all (default 10000)")
    parser.add_argument("--sessions", type=int, default=4, help="sessions (default 4)")
    parser.add_argument("--scrapes", type=int, default=20, help="scrapes (default 20)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        kids = Children(Path(tmp))
        try:
            config = write_config(Path(tmp) / "platform.toml", args.devices // args.sessions)
            port = free_port()
            argv = ["viowire.perf.server", "--loop", args.loop, "serve"]
            argv += ["--listen", f"unix://{tmp}/viowire.sock", "--config", str(config)]
            argv += ["--metrics", f"tcp://127.0.0.1:{port}"]
            _, url = kids.start(argv, "viowire-server")
            result = run_loop(measure(url, port, args.sessions, args.scrapes), loop=args.loop)
        finally:
            kids.close()
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{result['devices']} devices in {result['sessions']} sessions: scrape "
            f"{result['scrape_ms_p50']} ms p50, {result['scrape_ms_max']} ms max "
            f"(bar {BAR_MS:g} ms); {result['series']} series (bar {BAR_SERIES}); "
            f"{result['bytes']} bytes"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
