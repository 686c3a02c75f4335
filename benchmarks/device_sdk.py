#!/usr/bin/env python3
"""Issue 9's figures for devices whose requests wait: ``python benchmarks/device_sdk.py``.

::

    python benchmarks/device_sdk.py                  # 5 runs, uvloop, Unix sockets
    python benchmarks/device_sdk.py --runs 3 --json  # the results as JSON
    python benchmarks/device_sdk.py --loop asyncio   # both ends on asyncio's loop

The figures, each beside a baseline (the ratio is the median of the per-run ratios):

``latency.qd32``
    4 KiB reads at depth 32 on one queue of a RAM disk served with ``latency=10ms``: IOPS,
    against the ceiling of 32 requests per 10 ms (3,200/s; not measured: the arithmetic).
``sessions10.latency``, ``sessions10.file``
    10 sessions, each with one disk, issue one 100 ms request at the same moment: the time
    until all are done, against the same 10 requests one after another (about 1 s), measured
    in the same run. ``latency``: a RAM disk with ``latency=100ms``; ``file``: a file-backed
    disk whose reads take 100 ms in the I/O thread (a server of this script's own, ``serve``
    below, sleeps 100 ms before each pread, as a slow medium would).
``idle.read_rtt``
    The p50 of an idle session's register reads (MMIO_READ round trips) while another process
    streams 4 KiB reads at depth 32 from a file-backed disk of the same server, against the
    same p50 with nothing else running, measured just before. ``stream_iops`` tells the load.
    Two references, without targets: ``.ram``, the stream from a RAM disk instead; and
    ``.threads``, the file-backed stream with every read on an I/O thread (the server's inline
    read of cached data turned off), which shows why the inline read is there.

Servers and the streaming client are processes of their own; this process is the measuring
client. Nothing here is asserted: the targets are printed as met or missed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import queue
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__":
    _root = Path(__file__).resolve().parents[1]
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

from viowire.client.connection import Connection, connect
from viowire.client.drivers.blk import BlockDriver
from viowire.perf.ring import closed_loop
from viowire.perf.stats import Target, percentile, summarise, table
from viowire.perf.suite import terminate
from viowire.runtime import run as run_loop
from viowire.virtio.constants import Reg

BLOCK = 4096
QD = 32
LATENCY = 0.010  # latency.qd32
SLOW = 0.100  # sessions10: one request's time
SESSIONS = 10
IMAGE_BYTES = 64 << 20

TARGETS = {
    "latency.qd32": Target("value", ">=", 2500),
    "sessions10.latency": Target("value", "<=", 0.3),
    "sessions10.file": Target("value", "<=", 0.3),
    "idle.read_rtt": Target("ratio", "<=", 1.5),
}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- child processes ----------------------------------------------------------------------------
class Children:
    """Processes started by this run, each stopped by its own pid at the end."""

    def __init__(self, tmp: Path, loop: str) -> None:
        self.tmp = tmp
        self.loop = loop
        self.procs: list[subprocess.Popen] = []

    def spawn(self, args: list[str], ready: str, name: str) -> tuple[subprocess.Popen, str]:
        """Run this script with ``args``; wait for a stdout line starting with ``ready`` and
        return the process and the rest of that line. Its stdout is drained all its life."""
        log = (self.tmp / f"{name}-{len(self.procs)}.log").open("w")
        proc = subprocess.Popen(
            [sys.executable, __file__, *args],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        log.close()
        self.procs.append(proc)
        lines: queue.Queue[str] = queue.Queue()

        def drain() -> None:
            for line in proc.stdout:
                lines.put(line.rstrip("\n"))
            lines.put("")

        threading.Thread(target=drain, daemon=True).start()
        while True:
            try:
                line = lines.get(timeout=60)
            except queue.Empty:
                line = ""
            if line.startswith(ready):
                proc.lines = lines  # type: ignore[attr-defined]
                return proc, line[len(ready) :].strip()
            if not line:
                self.stop(proc)
                raise RuntimeError(f"{name} did not start: {(self.tmp / log.name).read_text()}")

    def server(self, *devices: str, reads: str = "usual") -> str:
        """A server with ``devices``; ``reads``: ``usual``, ``threads`` or ``slow`` (see
        :func:`serve`)."""
        socket = self.tmp / f"viowire-{len(self.procs)}.sock"
        args = ["_serve", self.loop, reads, "--listen", f"unix://{socket}"]
        for spec in devices:
            args += ["--device", spec]
        _, url = self.spawn(args, "listening on ", "server")
        return url

    def stop(self, proc: subprocess.Popen) -> str:
        """SIGTERM, then wait; the process's last stdout line (its report)."""
        terminate(proc)
        last = ""
        with contextlib.suppress(AttributeError, queue.Empty):
            while (line := proc.lines.get(timeout=5)) != "":  # type: ignore[attr-defined]
                last = line
        return last

    def close(self) -> None:
        for proc in reversed(self.procs):
            self.stop(proc)
        self.procs.clear()


def serve(loop: str, reads: str, argv: Sequence[str]) -> int:
    """``viowire serve ARGV`` on ``loop``. ``reads``, for file-backed disks: ``usual``;
    ``threads``, every read on an I/O thread (none inline, cached or not); ``slow``, every
    read on a thread that first sleeps :data:`SLOW`: a slow medium, for sessions10.file."""
    from viowire import cli
    from viowire.server.devices import blk

    if reads in ("threads", "slow"):
        blk._NOWAIT = 0  # as on a kernel without RWF_NOWAIT: no read is tried inline
    if reads == "slow":
        fast = blk._pread

        def slow(fd: int, offset: int, length: int) -> bytes:
            time.sleep(SLOW)
            return fast(fd, offset, length)

        blk._pread = slow
    return cli.main(["--loop", loop, "serve", *argv])


async def stream(url: str, index: int) -> None:
    """The load of idle.read_rtt: 4 KiB reads at depth 32 until SIGTERM; prints IOPS."""
    conn, blk = await open_disk(url, index)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    done = 0
    blocks = IMAGE_BYTES // BLOCK

    async def worker(first: int) -> None:
        nonlocal done
        i = first
        while not stop.is_set():
            await blk.read((i * 7919 % blocks) * BLOCK, BLOCK)
            i += QD
            done += 1

    workers = [asyncio.create_task(worker(n)) for n in range(QD)]
    while done < 1000:  # streaming at full depth before the parent measures
        await asyncio.sleep(0.01)
    start, before = time.perf_counter(), done
    print("streaming", flush=True)
    await stop.wait()
    elapsed = time.perf_counter() - start
    await asyncio.gather(*workers)
    print(f"iops {(done - before) / elapsed:.1f}", flush=True)
    await conn.close()


# -- the measuring client -----------------------------------------------------------------------
async def open_disk(url: str, index: int = 0) -> tuple[Connection, BlockDriver]:
    conn = await connect(url)
    try:
        return conn, await BlockDriver.attach(await conn.attach((await conn.platform())[index]))
    except BaseException:
        await conn.close()
        raise


async def latency_qd32(url: str, budget: float) -> float:
    """IOPS of 4 KiB reads at depth 32 on one queue."""
    conn, blk = await open_disk(url)
    async with conn:
        blocks = blk.size // BLOCK
        return await closed_loop(
            lambda i: blk.read(i % blocks * BLOCK, BLOCK), QD, budget, least=QD * 10
        )


async def sessions_at_once(url: str) -> tuple[float, float]:
    """Seconds for one read in each of 10 sessions: all at once, then one after another."""
    disks = [await open_disk(url) for _ in range(SESSIONS)]
    try:
        # warm: the first request of a session pays for more than I/O (all at once: warming
        # them in turn took a second of 100 ms reads per run)
        await asyncio.gather(*(blk.read(0, BLOCK) for _, blk in disks))
        start = time.perf_counter()
        await asyncio.gather(*(blk.read(BLOCK, BLOCK) for _, blk in disks))
        together = time.perf_counter() - start
        start = time.perf_counter()
        for _, blk in disks:
            await blk.read(BLOCK, BLOCK)
        in_turn = time.perf_counter() - start
    finally:
        for conn, _ in disks:
            await conn.close()
    return together, in_turn


async def read_rtt(conn: Connection, addr: int, count: int) -> list[float]:
    """``count`` MMIO_READ round trips, µs, one at a time."""
    clock = time.perf_counter_ns
    samples = []
    for _ in range(count):
        start = clock()
        await conn.mmio_read(addr, 4)
        samples.append((clock() - start) / 1000)
    return samples


async def idle_under_load(
    children: Children, url: str, disk: int, samples: int
) -> tuple[float, float, float]:
    """(p50 with another session streaming from disk ``disk``, p50 with nothing else running,
    the stream's IOPS). The idle session's own disk is the server's last."""
    conn, blk = await open_disk(url, -1)  # it is never used: only its registers are read
    async with conn:
        magic = blk.dev.base + Reg.MAGIC_VALUE
        await read_rtt(conn, magic, samples // 10)  # warm
        idle = percentile(await read_rtt(conn, magic, samples), 50)
        load, _ = children.spawn(["_stream", children.loop, url, str(disk)], "streaming", "stream")
        try:
            loaded = percentile(await read_rtt(conn, magic, samples), 50)
        finally:
            report = children.stop(load)
            children.procs.remove(load)
        iops = float(report.split()[-1]) if report.startswith("iops") else float("nan")
    return loaded, idle, iops


def measure(args: argparse.Namespace, tmp: Path) -> list[dict]:
    loop, runs = args.loop, args.runs
    image = tmp / "disk.img"
    with open(image, "wb") as f:
        f.truncate(IMAGE_BYTES)
        f.write(os.urandom(1 << 20))  # some data; the rest reads as zeroes, from the page cache
    children = Children(tmp, loop)
    results = []
    common = {"loop": loop, "socket": "unix"}
    try:
        say(f"latency.qd32: {runs} runs of {args.seconds} s")
        url = children.server(f"blk,size=16M,latency={LATENCY * 1000:g}ms")
        run_loop(latency_qd32(url, args.seconds / 5), loop)  # warm
        values = [run_loop(latency_qd32(url, args.seconds), loop) for _ in range(runs)]
        ceiling = QD / LATENCY
        results.append(
            summarise(
                "latency.qd32",
                "IOPS",
                values,
                [ceiling] * runs,
                target=TARGETS["latency.qd32"],
                baseline_name=f"the ceiling: {QD} requests per {LATENCY * 1000:g} ms",
                **common,
            )
        )
        for name, devices, reads in (
            ("sessions10.latency", [f"blk,size=1M,latency={SLOW * 1000:g}ms"], "usual"),
            ("sessions10.file", [f"blk,path={image}"], "slow"),
        ):
            say(f"{name}: {runs} runs")
            url = children.server(*devices, reads=reads)
            pairs = [run_loop(sessions_at_once(url), loop) for _ in range(runs)]
            results.append(
                summarise(
                    name,
                    "s",
                    [together for together, _ in pairs],
                    [in_turn for _, in_turn in pairs],
                    target=TARGETS[name],
                    baseline_name=f"the same {SESSIONS} requests of {SLOW * 1000:g} ms, "
                    "one after another",
                    **common,
                )
            )
        say(f"idle.read_rtt: {runs} runs of {args.samples} reads idle, then under load")
        usual = children.server(f"blk,path={image}", "blk,size=64M", "blk,size=1M")
        threads = children.server(f"blk,path={image}", "blk,size=1M", reads="threads")
        variants = {  # name: (server, the streamed disk, what streams)
            "idle.read_rtt": (usual, 0, "file-backed"),
            "idle.read_rtt.ram": (usual, 1, "RAM disk"),
            "idle.read_rtt.threads": (threads, 0, "file-backed, every read on a thread,"),
        }
        measured: dict[str, list[tuple[float, float, float]]] = {name: [] for name in variants}
        for _ in range(runs):  # the variants take turns, so that drift hits all alike
            for name, (url, disk, _what) in variants.items():
                measured[name].append(
                    run_loop(idle_under_load(children, url, disk, args.samples), loop)
                )
        for name, (_url, _disk, what) in variants.items():
            triples = measured[name]
            iops = [i for _, _, i in triples]
            results.append(
                summarise(
                    name,
                    "µs p50",
                    [loaded for loaded, _, _ in triples],
                    [idle for _, idle, _ in triples],
                    target=TARGETS.get(name),
                    stream_iops=iops,
                    baseline_name="the same session's p50 with no other session running",
                    note=f"another process streams 4 KiB {what} reads at QD32 "
                    f"(median {statistics.median(iops):,.0f} IOPS)",
                    **common,
                )
            )
    finally:
        children.close()
    return results


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="runs per figure (default 5)")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--loop", choices=("uvloop", "asyncio"), default="uvloop")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="length of one latency.qd32 run (default 2)"
    )
    parser.add_argument(
        "--samples", type=int, default=3000, help="register reads per p50 (default 3000)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["_serve"]:  # a child: _serve LOOP READS [viowire serve options]
        return serve(argv[1], argv[2], argv[3:])
    if argv[:1] == ["_stream"]:  # a child: _stream LOOP URL DISK, the load of idle.read_rtt
        run_loop(stream(argv[2], int(argv[3])), argv[1])
        return 0
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="viowire-device-sdk-") as tmp:
        results = measure(args, Path(tmp))
    if args.json:
        print(json.dumps({"results": results}, indent=2))
    else:
        print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
