"""One client process per (event loop, socket kind): runs the selected cases and prints JSON.

Each case is measured ``runs`` times; a run measures viowire and its bare twin back to back
(alternating which goes first), so the per-run ratio compares figures taken within a second or
two of each other. The configuration is one JSON argument (see ``viowire.perf.suite``); the
results go to stdout as ``{"results": [...]}``; progress goes to stderr.

``python -m viowire.perf.worker '{"loop": "uvloop", "socket": "unix", "url": ..., ...}'``
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sys
import time
from collections.abc import Awaitable, Callable, Sequence

from viowire.client.connection import Connection, connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.perf import bare, cases, ring
from viowire.perf import net as netperf
from viowire.perf.stats import Target, percentile, summarise, tails
from viowire.runtime import run as run_loop
from viowire.virtio.constants import DeviceId

BLK_CASES = [
    (op, memory, depth)
    for op in ("read", "write")
    for depth in (1, 32)
    for memory in ("shared", "proxied")
]

NET_CASES = [
    (kind, memory, size)
    for kind in ("rtt", "stream")
    for size in netperf.SIZES
    for memory in ("shared", "proxied")
]
NET_STREAM_DEPTH = 32  # frames sent and not yet received, in the stream cases

POLL_US = 200  # both ends poll this long after each request in the .poll cases
POLL_CASES = {f"blk.read.shared.qd{depth}.poll": depth for depth in (1, 32)}
# Issue 13's figure: each case on a server with --metrics, scraped every METRICS_SCRAPE_S
# meanwhile, against the same case on the plain server (the baseline), run by run.
METRICS_CASES = ("metrics.mmio.read_rtt", "metrics.blk.read.shared.qd32")
METRICS_SCRAPE_S = 1.0

TARGETS = {
    "mmio.read_rtt": Target("ratio", "<=", 1.25),
    "mmio.posted_write": Target("ratio", ">=", 0.5),
    "mmio.queue_notify": Target("ratio", ">=", 0.5),
    "blk.read.shared.qd1": Target("ratio", ">=", 0.6),
    "blk.read.shared.qd32": Target("ratio", ">=", 0.5),
    "blk.read.proxied.qd32": Target("ratio", ">=", 0.25),
    "platform.bringup": Target("value", ">=", 10_000 / 30),
    "metrics.mmio.read_rtt": Target("ratio", "<=", 1.05),
    "metrics.blk.read.shared.qd32": Target("ratio", ">=", 0.95),
}


VHOST_USER_CASES = [(op, depth) for op in ("read", "write") for depth in (1, 32)]


def vhost_user_case_names() -> list[str]:
    """The cases of ``viowire bench --vhost-user``: blk through the vhost-user front-end."""
    return [f"vhost-user.blk.{op}.qd{depth}" for op, depth in VHOST_USER_CASES]


def case_names() -> list[str]:
    """Every case a worker can run, in the order it runs them."""
    names = ["mmio.read_rtt", "mmio.posted_write", "mmio.queue_notify"]
    names += [f"blk.{op}.{memory}.qd{depth}" for op, memory, depth in BLK_CASES]
    names += [f"net.{kind}.{memory}.{size}" for kind, memory, size in NET_CASES]
    return [*names, *POLL_CASES, "irq.latency", "platform.bringup", *METRICS_CASES]


class Scraper:
    """GET /metrics from 127.0.0.1:``port`` every ``seconds`` while it runs, as Prometheus
    would; ``count`` says how many answered 200."""

    def __init__(self, port: int, seconds: float) -> None:
        self.port, self.seconds, self.count = port, seconds, 0
        self.task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while True:
            reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            writer.write(b"GET /metrics HTTP/1.1\r\nHost: bench\r\n\r\n")
            if not (await reader.read()).startswith(b"HTTP/1.1 200"):
                raise RuntimeError("the metrics endpoint did not answer 200")
            writer.close()
            self.count += 1
            await asyncio.sleep(self.seconds)

    async def stop(self) -> None:
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class Worker:
    def __init__(self, cfg: dict) -> None:
        self.cfg = cfg
        self.loop_name: str = cfg["loop"]
        self.socket: str = cfg["socket"]
        self.selected: set[str] = set(cfg["cases"])
        self.runs: int = 1 if cfg.get("profile") else cfg["runs"]
        self.budget: float = cfg.get("profile") or cfg["budget"]
        self.least: int = cfg["least"]
        self.results: list[dict] = []
        self._blk: dict[str, tuple[Connection, BlockDriver]] = {}
        self._net: dict[str, netperf.NetPair] = {}
        self._bare: bare.BareClient | None = None
        self._ring: ring.BareRing | None = None
        self._marked = False

    # -- shared fixtures ---------------------------------------------------------------------
    async def blk(self, memory: str) -> tuple[Connection, BlockDriver]:
        if memory not in self._blk:
            self._blk[memory] = await cases.open_blk(self.cfg["url"], memory)
        return self._blk[memory]

    async def net_pair(self, memory: str) -> netperf.NetPair:
        if memory not in self._net:
            self._net[memory] = await netperf.NetPair.open(self.cfg["url"], memory)
        return self._net[memory]

    async def bare_client(self) -> bare.BareClient:
        if self._bare is None:
            self._bare = await bare.open_client(self.cfg["bare_url"])
        return self._bare

    def bare_ring(self) -> ring.BareRing:
        if self._ring is None:
            self._ring = ring.BareRing(self.loop_name)
        return self._ring

    async def close(self) -> None:
        for pair in self._net.values():
            await pair.close()
        for conn, drv in self._blk.values():
            with contextlib.suppress(Exception):
                await drv.detach()
            await conn.close()
        if self._bare is not None:
            self._bare.close()
        if self._ring is not None:
            self._ring.close()

    # -- running -----------------------------------------------------------------------------
    @property
    def profiling(self) -> bool:
        return bool(self.cfg.get("profile"))

    def mark(self) -> None:
        """In profile mode, tell the parent the measured part starts now (once)."""
        if self.profiling and not self._marked:
            self._marked = True
            log("PROFILE-START")

    async def paired(
        self,
        name: str,
        measure: Callable[[float, int], Awaitable],
        baseline: Callable[[float, int], Awaitable] | None,
        least: int | None = None,
        *,
        warm: bool = True,
    ) -> tuple[list, list]:
        """Warm both up, then ``runs`` pairs of (viowire, baseline), alternating the order.

        Each measurement lasts ``budget`` seconds and at least ``least`` operations."""
        least = least or self.least
        budget = self.budget
        if warm and not self.profiling:
            await measure(budget / 5, max(1, least // 10))
            if baseline is not None:
                await baseline(budget / 5, max(1, least // 10))
        values, baselines = [], []
        for run in range(self.runs):
            log(f"[{self.loop_name}/{self.socket}] {name}: run {run + 1}/{self.runs}")
            if baseline is None or self.profiling:
                self.mark()
                values.append(await measure(budget, least))
                baselines.append(None)
            elif run % 2:
                baselines.append(await baseline(budget, least))
                values.append(await measure(budget, least))
            else:
                values.append(await measure(budget, least))
                baselines.append(await baseline(budget, least))
        return values, baselines

    def add(self, name: str, unit: str, values: Sequence, baselines: Sequence, **extra) -> None:
        self.results.append(
            summarise(
                name,
                unit,
                values,
                baselines,
                loop=self.loop_name,
                socket=self.socket,
                target=TARGETS.get(name),
                **extra,
            )
        )

    async def run(self) -> list[dict]:
        try:
            if self.selected & {"mmio.read_rtt", "mmio.posted_write", "mmio.queue_notify"}:
                await self.registers()
            for op, memory, depth in BLK_CASES:
                if memory == "shared" and self._want_blk(op, depth):
                    await self.block(op, depth)
            if any(name.startswith("net.") for name in self.selected):
                await self.network()
            for name, depth in POLL_CASES.items():
                if name in self.selected and self.cfg.get("poll_url"):
                    await self.block_polled(name, depth)
            if "irq.latency" in self.selected:
                await self.interrupts()
            if "platform.bringup" in self.selected and self.cfg.get("bringup_url"):
                await self.bringup()
            if self.selected & set(METRICS_CASES) and self.cfg.get("metrics_url"):
                await self.metrics_on()
            for op, depth in VHOST_USER_CASES:
                if f"vhost-user.blk.{op}.qd{depth}" in self.selected:
                    await self.vhost_user_block(op, depth)
        finally:
            await self.close()
        return self.results

    def _want_blk(self, op: str, depth: int) -> bool:
        return any(
            f"blk.{op}.{memory}.qd{depth}" in self.selected for memory in ("shared", "proxied")
        )

    # -- cases -------------------------------------------------------------------------------
    async def registers(self) -> None:
        conn, blk = await self.blk("shared")
        client = await self.bare_client()
        base = blk.dev.base
        magic = cases.magic_addr(base)
        if "mmio.read_rtt" in self.selected:
            values, baselines = await self.paired(
                "mmio.read_rtt",
                lambda budget, least: cases.mmio_rtt(conn, magic, budget, least),
                lambda budget, least: bare.rtt(client, *cases.READ_SIZES, budget, least),
            )
            self.add(
                "mmio.read_rtt",
                "µs p50",
                [percentile(v, 50) for v in values],
                [percentile(b, 50) if b else None for b in baselines],
                **tails(values, baselines),
                frame_bytes=list(cases.READ_SIZES),
                baseline_name="bare asyncio.Protocol request/reply, same frame sizes",
            )
        for name, addr, value in (
            ("mmio.posted_write", cases.queue_sel_addr(base), 0),
            ("mmio.queue_notify", cases.queue_notify_addr(base), blk.vq.index),
        ):
            if name not in self.selected:
                continue
            values, baselines = await self.paired(
                name,
                lambda budget, least, a=addr, v=value: cases.posted_writes(
                    conn, a, v, magic, budget, least
                ),
                lambda budget, least: bare.pipelined(client, cases.WRITE_SIZES[0], budget, least),
                max(self.least * 10, 1000),
            )
            self.add(
                name,
                "writes/s",
                values,
                baselines,
                frame_bytes=cases.WRITE_SIZES[0],
                baseline_name="bare pipelined echo, same frame size, one write() a frame",
            )

    async def block(self, op: str, depth: int) -> None:
        names = {memory: f"blk.{op}.{memory}.qd{depth}" for memory in ("shared", "proxied")}
        want_shared = names["shared"] in self.selected
        want_proxied = names["proxied"] in self.selected
        _, shared = await self.blk("shared")
        proxied = (await self.blk("proxied"))[1] if want_proxied else None
        the_ring = self.bare_ring() if want_shared else None
        least = max(self.least // 10, 4 * depth)  # requests, not round trips

        async def measure_shared(budget: float, n: int) -> float:
            return await cases.blk_iops(shared, op, depth, budget, n)

        async def measure_ring(budget: float, n: int) -> float:
            code = ring.OP_READ if op == "read" else ring.OP_WRITE
            return await ring.iops(the_ring, code, depth, budget, n)

        if want_shared:
            values, baselines = await self.paired(
                names["shared"], measure_shared, measure_ring, least
            )
            self.add(
                names["shared"],
                "IOPS",
                values,
                baselines,
                baseline_name="bare split ring over a memfd, eventfd notifications, same depth",
            )
        if want_proxied:
            values, baselines = await self.paired(
                names["proxied"],
                lambda budget, n: cases.blk_iops(proxied, op, depth, budget, n),
                measure_shared,
                least,
            )
            self.add(
                names["proxied"],
                "IOPS",
                values,
                baselines,
                baseline_name="viowire with shared memory, same depth",
            )

    async def network(self) -> None:
        """Frames between two sessions' net devices on one link, 64 and 1500 bytes: a ping-pong
        (p50 µs, against a bare round trip of the same size) and a stream (frames/s, against a
        bare pipelined echo of the same size); proxied memory against shared, as blk's are."""
        try:
            await self.net_pair("shared")
        except LookupError as exc:
            log(f"net: {exc}: skipped")
            return
        qd32 = next((r["value"] for r in self.results if r["name"] == "blk.read.shared.qd32"), None)
        for kind, memory, size in NET_CASES:
            name = f"net.{kind}.{memory}.{size}"
            if name not in self.selected:
                continue
            pair = await self.net_pair(memory)
            shared = await self.net_pair("shared")
            if kind == "rtt":
                await self.net_rtt(name, pair, shared if memory == "proxied" else None, size)
            else:
                await self.net_stream(name, pair, shared if memory == "proxied" else None, size)
            self.results[-1]["blk_read_shared_qd32_iops"] = qd32  # the same run's, beside

    async def net_rtt(
        self, name: str, pair: netperf.NetPair, shared: netperf.NetPair | None, size: int
    ) -> None:
        client = await self.bare_client()

        def measure(p: netperf.NetPair):
            return lambda budget, least: netperf.ping_pong(p, size, budget, least)

        baseline = (
            measure(shared)
            if shared is not None
            else lambda budget, least: bare.rtt(client, size, size, budget, least)
        )
        values, baselines = await self.paired(name, measure(pair), baseline, self.least // 4)
        self.add(
            name,
            "µs p50",
            [percentile(v, 50) for v in values],
            [percentile(b, 50) if b else None for b in baselines],
            **tails(values, baselines),
            frames_per_s=[1e6 / percentile(v, 50) for v in values],
            frame_bytes=size,
            baseline_name=(
                "viowire with shared memory, same frame size"
                if shared is not None
                else "bare asyncio.Protocol request/reply, frames of the same size both ways"
            ),
        )

    async def net_stream(
        self, name: str, pair: netperf.NetPair, shared: netperf.NetPair | None, size: int
    ) -> None:
        client = await self.bare_client()
        depth = NET_STREAM_DEPTH

        def measure(p: netperf.NetPair):
            return lambda budget, least: netperf.stream(p, size, depth, budget, least)

        baseline = (
            measure(shared)
            if shared is not None
            else lambda budget, least: bare.pipelined(client, size, budget, least)
        )
        least = max(self.least, 4 * depth)
        values, baselines = await self.paired(name, measure(pair), baseline, least)
        self.add(
            name,
            "frames/s",
            values,
            baselines,
            bytes_per_s=[v * size for v in values],
            frame_bytes=size,
            depth=depth,
            baseline_name=(
                "viowire with shared memory, same frame size"
                if shared is not None
                else "bare pipelined echo, frames of the same size, one write() a frame"
            ),
        )

    async def vhost_user_block(self, op: str, depth: int) -> None:
        """4 KiB I/O through the vhost-user front-end on each back-end of the run, the first
        one the baseline of the others, measured back to back run by run; with one back-end
        there is no baseline."""
        urls: list[str] = self.cfg["vhost_user"]
        drivers = []
        for url in urls:
            if url not in self._blk:
                self._blk[url] = await cases.open_blk(url, "shared")
            drivers.append(self._blk[url][1])
        least = max(self.least // 10, 4 * depth)
        name = f"vhost-user.blk.{op}.qd{depth}"

        def measure(blk: BlockDriver) -> Callable[[float, int], Awaitable[float]]:
            return lambda budget, n: cases.blk_iops(blk, op, depth, budget, n)

        first = measure(drivers[0])
        others = list(zip(urls[1:], drivers[1:], strict=True)) or [(urls[0], None)]
        for url, blk in others:
            values, baselines = await self.paired(
                name, measure(blk) if blk is not None else first, first if blk else None, least
            )
            self.add(
                name,
                "IOPS",
                values,
                baselines,
                backend=url,
                note=f"value: {url}",
                baseline_name=f"the same through the vhost-user front-end on {urls[0]}"
                if blk is not None
                else "",
            )

    async def block_polled(self, name: str, depth: int) -> None:
        """4K reads with both ends polling (serve --poll-us, the driver's poll_us) against the
        same bare ring as the plain case, which sleeps between notifications."""
        if "poll" not in self._blk:
            self._blk["poll"] = await cases.open_blk(self.cfg["poll_url"], "shared", POLL_US)
        blk = self._blk["poll"][1]
        the_ring = self.bare_ring()
        values, baselines = await self.paired(
            name,
            lambda budget, n: cases.blk_iops(blk, "read", depth, budget, n),
            lambda budget, n: ring.iops(the_ring, ring.OP_READ, depth, budget, n),
            max(self.least // 10, 4 * depth),
        )
        self.add(
            name,
            "IOPS",
            values,
            baselines,
            poll_us=POLL_US,
            baseline_name="bare split ring over a memfd, eventfd notifications (no polling), "
            "same depth",
        )

    async def metrics_on(self) -> None:
        """Register reads and blk QD32 on the server with ``--metrics`` (scraped meanwhile)
        against the same on the server without."""
        on_conn, on_blk = self._blk["metrics"] = await cases.open_blk(
            self.cfg["metrics_url"], "shared"
        )
        off_conn, off_blk = await self.blk("shared")
        scraper = Scraper(self.cfg["metrics_port"], METRICS_SCRAPE_S)
        off_name = "the same case on the same devices served without --metrics"
        try:
            name = "metrics.mmio.read_rtt"
            if name in self.selected:
                on, off = cases.magic_addr(on_blk.dev.base), cases.magic_addr(off_blk.dev.base)
                values, baselines = await self.paired(
                    name,
                    lambda budget, least: cases.mmio_rtt(on_conn, on, budget, least),
                    lambda budget, least: cases.mmio_rtt(off_conn, off, budget, least),
                )
                self.add(
                    name,
                    "µs p50",
                    [percentile(v, 50) for v in values],
                    [percentile(b, 50) for b in baselines],
                    scrape_every_s=METRICS_SCRAPE_S,
                    baseline_name=off_name,
                )
            name = "metrics.blk.read.shared.qd32"
            if name in self.selected:
                values, baselines = await self.paired(
                    name,
                    lambda budget, n: cases.blk_iops(on_blk, "read", 32, budget, n),
                    lambda budget, n: cases.blk_iops(off_blk, "read", 32, budget, n),
                    max(self.least // 10, 4 * 32),
                )
                self.add(
                    name,
                    "IOPS",
                    values,
                    baselines,
                    scrape_every_s=METRICS_SCRAPE_S,
                    scrapes=scraper.count,
                    baseline_name=off_name,
                )
        finally:
            await scraper.stop()

    async def interrupts(self) -> None:
        index = self.cfg.get("irq_device")
        if index is None:
            log("irq.latency: needs a server with a tsrng device (a spawned one): skipped")
            return
        async with await connect(self.cfg["url"], memory="shared") as conn:
            info = (await conn.platform())[index]
            if info.device_id != DeviceId.ENTROPY:
                raise LookupError(f"device {index} is not the tsrng device")
            rng = await EntropyDriver.attach(await conn.attach(info))
            the_ring = self.bare_ring()
            values, baselines = await self.paired(
                "irq.latency",
                lambda budget, least: cases.irq_latency(rng, budget, least),
                lambda budget, least: ring.stamp_latency(the_ring, budget, least),
            )
            await rng.detach()
        self.add(
            "irq.latency",
            "µs p50",
            [percentile(v, 50) for v in values],
            [percentile(b, 50) if b else None for b in baselines],
            **tails(values, baselines),
            baseline_name="bare ring: used.idx stored to the driver task running",
        )

    async def bringup(self) -> None:
        spec = self.cfg["bringup"]
        url = self.cfg["bringup_url"]
        patterns = await cases.access_patterns(url, spec["limit"])
        counts: list[int] = []
        sizes = {"r": cases.READ_SIZES, "w": cases.WRITE_SIZES, "p": cases.WRITE_SIZES}

        async def measure(budget: float, least: int) -> float:
            rate, count = await cases.bringup(
                url, spec["sessions"], spec["concurrency"], spec["limit"]
            )
            counts.append(count)
            return rate

        async def baseline(budget: float, least: int) -> float:
            rates = []
            for pattern in sorted(set(patterns)):
                share = patterns.count(pattern)
                rates.append(
                    (
                        share,
                        await bare.replay(
                            self.cfg["bare_url"],
                            pattern,
                            sizes,
                            share,
                            spec["sessions"],
                            spec["concurrency"],
                        ),
                    )
                )
            # the time for the whole mix: each pattern's devices at that pattern's rate
            total = sum(share for share, _ in rates) * spec["sessions"]
            return total / sum(share * spec["sessions"] / rate for share, rate in rates)

        # access_patterns() has warmed the server up; a warm-up pass here would cost a full run
        values, baselines = await self.paired("platform.bringup", measure, baseline, warm=False)
        per_run = counts[-1] if counts else 0
        reads = [p.count("r") + p.count("w") for p in patterns]
        self.add(
            "platform.bringup",
            "devices/s",
            values,
            baselines,
            devices_per_run=per_run,
            sessions=spec["sessions"],
            concurrency=spec["concurrency"],
            seconds_for_10000=[10_000 / v for v in values],
            round_trips_per_device=sum(reads) / max(1, len(reads)),
            accesses_per_device=sum(map(len, patterns)) / max(1, len(patterns)),
            baseline_name="bare replay of the same register accesses (same sessions, concurrency)",
        )


async def _main(cfg: dict) -> list[dict]:
    return await Worker(cfg).run()


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    cfg = json.loads(argv[0])
    started = time.perf_counter()
    results = run_loop(_main(cfg), loop=cfg["loop"])
    log(f"[{cfg['loop']}/{cfg['socket']}] done in {time.perf_counter() - started:.0f} s")
    print(json.dumps({"results": results}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
