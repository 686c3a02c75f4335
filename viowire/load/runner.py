"""A load run: open the sessions, bring the devices up, drive the mix, read every write back.

Phases, in order:

1. *plan*: one short probe session reads the platform table; the devices of the kinds the mix
   uses are spread over the sessions (a proportional share of each kind per session) and each
   session's guest RAM is sized from its devices, the queue depth and the block size.
2. *bring-up*: ``bringup_concurrency`` workers probe devices through the whole virtio
   initialisation (to DRIVER_OK), interleaved across sessions.
3. *workload*: ``concurrency`` workers take devices round-robin from per-kind pools
   (:mod:`viowire.load.pool`), pick an operation by the mix weights, and time each request,
   bounded by ``timeout``. Every block written carries a verifiable pattern
   (:mod:`viowire.load.pattern`); the generation last written to each block is remembered, and
   every read is checked against it.
4. *read-back*: every block ever written is read again and checked.

Net devices have a step of their own between bring-up and workload: they are paired into flows
on their links, and each flow's first frame must arrive (:mod:`viowire.load.net`). Without
``--mix``, the mix is the default one less the operations of device types the platform lacks.

With ``--workload`` the mix gives way to the user's function (:mod:`viowire.load.workload`):
the devices it drives are brought up with their type's driver, each call is one operation,
and there is nothing to read back.

A request that fails or times out leaves its block *uncertain*: it may hold the old or the new
generation, and either is accepted afterwards. A device whose request timed out (or whose
session broke) leaves the workload: its state is unknown, and one hung device must not stall
the workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import itertools
import mmap
import random
import resource
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, TextIO

from viowire import registry
from viowire.client.connection import Connection, DeviceInfo
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.net import NetDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.client.errors import RequestError
from viowire.client.target import connect_session, sessions_allowed
from viowire.load.config import OP_KIND, LoadConfig
from viowire.load.frames import FramePattern
from viowire.load.net import LOST, NetTraffic
from viowire.load.pattern import BlockPattern
from viowire.load.pool import DevicePool
from viowire.load.progress import Progress
from viowire.load.report import format_us
from viowire.load.stats import MAX_SAMPLES, Stats, error_kind, fairness
from viowire.load.timeseries import RowWriter, TimeSeries, per_second
from viowire.load.workload import Workload, failure
from viowire.runtime import loop_name
from viowire.virtio.net import ETH_HEADER

PROBE_RAM = 1 << 20  # the planning session only reads the platform table
RING_BYTES = 16 << 10  # a 256-entry split ring: 12 KiB legacy (page-aligned), 6.7 KiB modern
DMA_SLACK = 512  # per request beside its data: header, status, indirect table, alignment
RAM_SLACK = 1 << 20  # first-fit fragmentation, interrupts of bad luck
CONNECT_CONCURRENCY = 32
# Requests awaiting a reply, per session: half the protocol's max_inflight (256), leaving room
# for the interrupt handlers' register reads. Each probing device has one such request out.
SESSION_BRINGUP = 128
# Virtio requests in flight per session, on average (workers go round-robin over the sessions).
SESSION_CONCURRENCY = 128
# Devices, rings and drivers live until the end of the run. Frozen out of the collector's sight
# as they come up, full collections stop walking them: with 10,000 devices each one paused the
# load for 300 ms, which showed as the load generator's own latency tail.
FREEZE_EVERY = 500
NET_RX_MIN = 8  # receive buffers a net device keeps posted, at least (2 x --depth if more)
NET_PLAN_MTU = 9000  # guest RAM is planned for receive buffers of this MTU (jumbo frames)
NET_RX_BUFFER = 12 + 18 + NET_PLAN_MTU  # virtio_net_hdr, Ethernet header and VLAN tag, payload


@dataclass(eq=False, slots=True)
class LoadDevice:
    """One device under load, and what the load generator knows of its blocks."""

    index: int
    session: int
    info: DeviceInfo
    kind: str  # "blk", "rng" or "net", or the kind of device a --workload drives
    driver: Any = None
    blocks: int = 0  # blocks the workload uses, from offset 0
    generation: int = 0  # last generation handed out on this device
    expected: dict[int, int] = field(default_factory=dict)  # block -> generation it holds
    uncertain: dict[int, set[int]] = field(default_factory=dict)  # block -> what it may hold
    written: list[int] = field(default_factory=list)  # blocks ever written, first write order
    busy: set[int] = field(default_factory=set)  # blocks with a request in flight
    out: str = ""  # why it left the workload ("" while it is in)

    @property
    def name(self) -> str:
        return f"session {self.session} {self.kind}@{self.info.base:#x}"

    def candidates(self, block: int) -> set[int] | tuple[int]:
        """The generations the block may hold now (0: never written)."""
        return self.uncertain.get(block) or (self.expected.get(block, 0),)


def device_id(kind: str) -> int:
    """The virtio device ID of the device type ``kind`` (``blk``), as the registry knows it."""
    return registry.lookup(kind).device_id


Matches = Callable[[str, DeviceInfo], bool]
"""Whether a device of the platform is of a kind (by default: of the type the kind names)."""


def of_kind(kind: str, info: DeviceInfo) -> bool:
    return info.device_id == device_id(kind)


def select_devices(
    platform: list[DeviceInfo], kinds: tuple[str, ...], n: int, matches: Matches = of_kind
) -> list[DeviceInfo]:
    """``n`` devices of ``kinds`` with each kind's share of the platform, at least one of each
    kind when ``n`` allows, spread evenly over the platform's slots."""
    pools = {k: [d for d in platform if matches(k, d)] for k in kinds}
    ranked = sorted(
        (rank / len(pool), kind, rank) for kind, pool in pools.items() for rank in range(len(pool))
    )
    return sorted((pools[kind][rank] for _, kind, rank in ranked[:n]), key=lambda d: d.base)


def net_rx_buffers(depth: int) -> int:
    """Receive buffers per net device: room for a flow's ``depth`` frames and as many more."""
    return max(NET_RX_MIN, 2 * depth)


def session_ram(devices: int, depth: int, block_size: int, net: int = 0, frame: int = 0) -> int:
    """Guest RAM for a session: rings, plus ``depth`` request buffers per device, plus slack;
    ``net`` of the devices are net devices: two rings, receive buffers and ``depth`` frames."""
    size = devices * (RING_BYTES + depth * (block_size + DMA_SLACK)) + RAM_SLACK
    per_net = RING_BYTES + net_rx_buffers(depth) * NET_RX_BUFFER + depth * (frame + DMA_SLACK)
    size += net * per_net
    return -(-size // mmap.PAGESIZE) * mmap.PAGESIZE


def share(total: int, parts: int) -> list[int]:
    """``total`` split over ``parts`` as evenly as integers allow, larger shares first."""
    return [total // parts + (i < total % parts) for i in range(parts)]


def _raise_fd_limit(wanted: int) -> None:
    """Many sessions need many descriptors: lift the soft limit towards the hard one."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))


class LoadRun:
    """One run of ``viowire load``; :meth:`execute` returns the summary as a dict."""

    def __init__(
        self, config: LoadConfig, *, stderr: TextIO, timeseries: TextIO | None = None
    ) -> None:
        self.cfg = config
        self.timeseries_out = timeseries  # --timeseries: a row a second, as it comes
        self.rng = random.Random(config.seed)
        self.pattern = BlockPattern(config.seed, config.block_size)
        self.net: NetTraffic | None = None
        self.workload = Workload.load(config.workload) if config.workload else None
        mix = config.mix if self.workload is None else ((self.workload.op, 1),)
        self.mix = dict(mix)
        self.ops = [op for op, weight in mix if weight]
        self.cum_weights = list(accumulate(weight for _, weight in mix if weight))
        self.op_kind = (
            dict(OP_KIND) if self.workload is None else {self.workload.op: self.workload.kind}
        )
        self.kinds = config.kinds if self.workload is None else (self.workload.kind,)
        self.conns: list[Connection | None] = []
        self.devices: list[LoadDevice] = []
        self.platform_size = 0
        self.phase = "plan"
        self.phase_start = time.monotonic()
        self.setup_errors: Counter[str] = Counter()
        self.setup_samples: list[str] = []
        self.sessions_up = 0
        self.sessions_target = config.sessions
        self.workers = 0
        self.devices_up = 0
        self.timing: dict[str, float] = {}
        self.stats = Stats(0, tuple(self.ops))
        self.readback = Stats(0, ("blk-read",))
        self.readback_blocks = 0
        self.unverified = 0
        self.interrupted = False
        self.pools: dict[str, DevicePool[LoadDevice]] = {}
        self._stopping = False
        self._limit = config.requests
        self.run_start = time.monotonic()
        self.workload_start = 0.0
        self.workload_end: float | None = None
        self.series: TimeSeries | None = None
        self.progress = Progress(stderr, self._status, enabled=config.progress)

    # -- the run -----------------------------------------------------------------------------

    async def execute(self) -> dict[str, Any]:
        start = self.run_start = time.monotonic()
        per_session = await self._plan()
        self.progress.start()
        try:
            await self._connect(per_session)
            await self._bring_up(per_session)
            if "net" in self.kinds and self.workload is None:
                await self._start_net()
            self.timing["bringup_s"] = time.monotonic() - start
            gc.freeze()
            if self.devices_up:
                undo_signal = self._catch_sigint()
                try:
                    await self._workload()
                finally:
                    undo_signal()
                await self._read_back()
        finally:
            gc.unfreeze()
            await self.progress.stop()
            if self.net is not None:
                await self.net.stop()
            await self._close()
        return self.summary()

    async def _plan(self) -> list[list[DeviceInfo]]:
        """Read the platform once, check there are enough devices, share them out."""
        cfg = self.cfg
        allowed = sessions_allowed(cfg.url)
        if allowed is not None and cfg.sessions > allowed:
            raise ValueError(
                f"{cfg.url} takes {allowed} session at a time (a vhost-user back-end serves "
                f"one front-end per socket): use --sessions {allowed}"
            )
        try:
            async with asyncio.timeout(cfg.timeout):
                probe = await connect_session(
                    cfg.url, memory=cfg.memory, ram_size=PROBE_RAM, name="viowire-load"
                )
                try:
                    platform = await probe.platform()
                finally:
                    await probe.close()
        except TimeoutError:
            raise ConnectionError(
                f"{cfg.url} did not answer within --timeout {cfg.timeout:g} s"
            ) from None
        if self.workload is None and not cfg.mix_given:
            self._narrow_mix({k for k in self.kinds if any(self._matches(k, d) for d in platform)})
        for kind in self.kinds:
            if not any(self._matches(kind, d) for d in platform):
                raise ValueError(self._none_of(kind))
        usable = [d for d in platform if any(self._matches(k, d) for k in self.kinds)]
        self.platform_size = len(usable)
        wanted = cfg.devices if cfg.devices is not None else len(usable) * cfg.sessions
        if wanted > len(usable) * cfg.sessions:
            need = -(-wanted // len(usable))
            raise ValueError(
                f"--devices {wanted} over --sessions {cfg.sessions} needs "
                f"{-(-wanted // cfg.sessions)} devices per session, but each session's platform "
                f"has {len(usable)} ({'/'.join(self.kinds)}): use --sessions {need} or more, or "
                f"serve more devices (viowire serve --device blk,size=1M,count=N)"
            )
        counts = [n for n in share(wanted, cfg.sessions) if n]
        return [select_devices(usable, self.kinds, n, self._matches) for n in counts]

    def _narrow_mix(self, present: set[str]) -> None:
        """The default mix, less the operations of kinds the platform does not have."""
        if not present:
            raise ValueError(
                f"the server's platform has no {', '.join(self.kinds)} device for the default "
                "mix: serve some (--device blk,count=N), or drive what it has with --workload"
            )
        self.mix = {op: w for op, w in self.mix.items() if self.op_kind[op] in present}
        self.ops = [op for op, weight in self.mix.items() if weight]
        self.cum_weights = list(accumulate(weight for weight in self.mix.values() if weight))
        self.kinds = tuple(k for k in self.kinds if k in present)

    def _matches(self, kind: str, info: DeviceInfo) -> bool:
        if self.workload is not None:
            return self.workload.drives(info)
        return of_kind(kind, info)

    def _none_of(self, kind: str) -> str:
        """The error for a platform without a device of ``kind``."""
        if self.workload is None:
            ops = ", ".join(op for op in self.ops if self.op_kind[op] == kind)
            return (
                f"--mix asks for {ops}, but the server's platform has no {kind} device: "
                f"serve some (--device {kind},count=N) or set their weight to 0 in --mix"
            )
        if self.workload.device_type is None:
            return "the server's platform has no device for --workload to drive"
        return (
            f"--workload {self.workload.reference} drives {kind} devices (its device_type), but "
            f"the server's platform has none: serve some (--device TYPE,count=N)"
        )

    async def _connect(self, per_session: list[list[DeviceInfo]]) -> None:
        self.phase, self.phase_start = "connect", time.monotonic()
        cfg = self.cfg
        self.conns = [None] * len(per_session)
        self.sessions_target = len(per_session)
        _raise_fd_limit(3 * len(per_session) + 64)  # a socket and a memfd per session
        gate = asyncio.Semaphore(CONNECT_CONCURRENCY)

        async def one(i: int, infos: list[DeviceInfo]) -> None:
            net = 0
            if self.workload is None and "net" in self.kinds:
                net = sum(1 for info in infos if of_kind("net", info))
            ram = session_ram(len(infos), cfg.depth, cfg.block_size, net, cfg.frame_size)
            async with gate:
                try:
                    async with asyncio.timeout(cfg.timeout):
                        conn = await connect_session(
                            cfg.url, memory=cfg.memory, ram_size=ram, name=f"viowire-load-{i}"
                        )
                except Exception as exc:
                    self._setup_error("connect", exc, f"session {i}")
                    return
            self.conns[i] = conn
            self.sessions_up += 1

        await asyncio.gather(*(one(i, infos) for i, infos in enumerate(per_session)))

    async def _bring_up(self, per_session: list[list[DeviceInfo]]) -> None:
        """Every device to DRIVER_OK, interleaved across sessions so all progress together."""
        self.phase, self.phase_start = "bring-up", time.monotonic()
        longest = max(len(infos) for infos in per_session)
        for k in range(longest):
            for s, infos in enumerate(per_session):
                if k < len(infos):
                    info = infos[k]
                    kind = next(kind for kind in self.kinds if self._matches(kind, info))
                    self.devices.append(LoadDevice(len(self.devices), s, info, kind))
        self.stats = Stats(len(self.devices), tuple(self.ops))
        self.readback = Stats(len(self.devices), ("blk-read",))
        todo = iter(self.devices)
        gates = [asyncio.Semaphore(SESSION_BRINGUP) for _ in per_session]

        async def worker() -> None:
            for dev in todo:
                async with gates[dev.session]:
                    await self._attach(dev)

        count = min(self.cfg.bringup_concurrency, len(self.devices))
        await asyncio.gather(*(worker() for _ in range(count)))
        self.progress.show()

    async def _attach(self, dev: LoadDevice) -> None:
        conn = self.conns[dev.session]
        if conn is None:
            dev.out = "its session did not connect"
            return
        cfg = self.cfg
        try:
            async with asyncio.timeout(cfg.timeout):
                mmio = await conn.attach(dev.info)
                if self.workload is not None:
                    dev.driver = await self.workload.attach(mmio, dev.info, cfg.depth)
                elif dev.kind == "blk":
                    dev.driver = await BlockDriver.attach(mmio, queue_depth=cfg.depth)
                elif dev.kind == "net":
                    dev.driver = await NetDriver.attach(mmio, rx_buffers=net_rx_buffers(cfg.depth))
                else:
                    dev.driver = await EntropyDriver.attach(mmio)
        except Exception as exc:
            dev.out = "bring-up failed"
            self._setup_error("bringup", exc, dev.name)
            return
        if self.workload is None and dev.kind == "blk":
            span = min(cfg.span or dev.driver.size, dev.driver.size)
            dev.blocks = span // cfg.block_size
            if dev.blocks < cfg.depth:
                dev.out = "disk too small"
                self._setup_error(
                    "bringup:disk-too-small",
                    None,
                    f"{dev.name}: {dev.driver.size} bytes hold fewer than --depth {cfg.depth} "
                    f"blocks of {cfg.block_size}",
                )
                return
        too_big = dev.kind == "net" and cfg.frame_size > ETH_HEADER + dev.driver.mtu
        if self.workload is None and too_big:
            dev.out = "MTU too small"
            self._setup_error(
                "bringup:mtu-too-small",
                None,
                f"{dev.name}: MTU {dev.driver.mtu} is below --frame-size {cfg.frame_size} less "
                "the 14-byte Ethernet header: use a smaller --frame-size, or serve net,mtu=N",
            )
            return
        self.devices_up += 1
        if self.devices_up % FREEZE_EVERY == 0:
            gc.freeze()

    async def _start_net(self) -> None:
        """Pair the net devices into flows and check each reaches its partner (load/net.py)."""
        devices = [d for d in self.devices if d.kind == "net" and d.driver and not d.out]
        if not devices:
            return
        self.net = NetTraffic(
            FramePattern(self.cfg.seed, self.cfg.frame_size),
            self.cfg.timeout,
            lambda kind, message: self.stats.error(kind, message),
        )
        failed = await self.net.start(devices, self.cfg.bringup_concurrency)
        for dev, why in failed:
            dev.out = "its frames did not reach its partner"
            self._setup_error("bringup:net-unreachable", None, f"{dev.name}: {why}")
        for dev in devices:
            if dev.index not in self.net.flows and not dev.out:
                dev.out = "no partner on its link"
                if self.net.twin(dev):
                    dev.out = "its MAC is another net device's too (mac= in its spec)"
        if not self.net.flows:
            self._setup_error(
                "bringup:net-unpaired",
                None,
                f"{len(devices)} net device(s) and no two to pair: a net device streams frames "
                "to another on its link (serve two, or run with --sessions 2 or more)",
            )

    def _setup_error(self, phase: str, exc: BaseException | None, where: str) -> None:
        kind = phase if exc is None else f"{phase}:{error_kind(exc)}"
        self.setup_errors[kind] += 1
        if len(self.setup_samples) < MAX_SAMPLES:
            self.setup_samples.append(f"{kind}: {where}" + (f": {exc}" if exc else ""))

    async def _close(self) -> None:
        """Close every session: the server resets its devices as it tears the session down.

        Posted register writes that the server refused are reported on the session; they are
        errors of the run like any other.
        """
        for conn in self.conns:
            for exc in conn.posted_errors if conn is not None else ():
                self._setup_error("posted", exc, str(conn.endpoint))
        await asyncio.gather(
            *(conn.close() for conn in self.conns if conn is not None), return_exceptions=True
        )

    def _catch_sigint(self):
        """Ctrl-C ends the workload early; the read-back and the summary still happen."""
        loop = asyncio.get_running_loop()
        if threading.current_thread() is not threading.main_thread():
            return lambda: None
        try:
            loop.add_signal_handler(signal.SIGINT, self._interrupt)
        except (NotImplementedError, RuntimeError, ValueError):
            return lambda: None
        return lambda: loop.remove_signal_handler(signal.SIGINT)

    def _interrupt(self) -> None:
        self.interrupted = True
        self._stop()

    # -- workload ----------------------------------------------------------------------------

    async def _workload(self) -> None:
        cfg = self.cfg
        self.pools = {kind: DevicePool() for kind in self.kinds}
        live = [dev for dev in self.devices if not dev.out]
        for _ in range(cfg.depth):
            for dev in live:
                self.pools[dev.kind].add(dev)
        for pool in self.pools.values():
            if not pool.tokens:
                pool.close()
        workers = min(
            cfg.concurrency, len(live) * cfg.depth, self.sessions_up * SESSION_CONCURRENCY
        )
        self.workers = workers
        timer = None
        if cfg.duration is not None:
            timer = asyncio.get_running_loop().call_later(cfg.duration, self._stop)
        # One start and one end for every rate of the workload: the progress line's, the
        # summary's and the time series'.
        start = self.workload_start = self.phase_start = time.monotonic()
        self.phase = "workload"
        self.series = TimeSeries(self.stats, start)
        writer = None
        if self.timeseries_out is not None:
            writer = RowWriter(self.timeseries_out, self.cfg.timeseries_format, list(self.ops))
        ticker = asyncio.get_running_loop().create_task(self._tick(writer), name="load ticks")
        try:
            await asyncio.gather(*(self._worker() for _ in range(workers)))
        finally:
            if timer is not None:
                timer.cancel()
            ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await ticker
        end = self.workload_end = time.monotonic()
        if end > self.series.last_t:
            self._row(writer, end)  # the last, shorter second
        self.timing["workload_s"] = end - start
        self.progress.show()

    async def _tick(self, writer: RowWriter | None) -> None:
        """A time-series row at each whole second of the workload."""
        for second in itertools.count(1):
            await asyncio.sleep(max(0.0, self.workload_start + second - time.monotonic()))
            self._row(writer, time.monotonic())

    def _row(self, writer: RowWriter | None, now: float) -> None:
        row = self.series.tick(now)
        if writer is not None:
            writer.write(row)

    def workload_seconds(self) -> float:
        """Seconds of workload so far (all of it, once it ended)."""
        if not self.workload_start:
            return 0.0
        return (self.workload_end or time.monotonic()) - self.workload_start

    def _stop(self) -> None:
        self._stopping = True
        for pool in self.pools.values():
            pool.close()

    async def _worker(self) -> None:
        stats = self.stats
        while not self._stopping:
            if self._limit is not None and stats.issued >= self._limit:
                return
            op = self._pick_op()
            if op is None:
                return
            pool = self.pools[self.op_kind[op]]
            stats.issued += 1  # a ticket, taken before waiting so --requests is exact
            dev = await pool.take()
            if dev is None or self._stopping:
                stats.issued -= 1
                if dev is not None:
                    pool.put(dev)
                if pool.tokens <= 0:
                    self._retire(op)
                continue
            try:
                await self._request(op, dev)
            finally:
                if dev.out:
                    pool.drop()
                else:
                    pool.put(dev)

    def _pick_op(self) -> str | None:
        if not self.ops:
            return None
        return self.rng.choices(self.ops, cum_weights=self.cum_weights)[0]

    def _retire(self, op: str) -> None:
        """Every device of ``op``'s kind left the workload: the rest of the mix goes on."""
        kind = self.op_kind[op]
        keep = [
            (o, w)
            for o, w in zip(self.ops, self._weights(), strict=True)
            if self.op_kind[o] != kind
        ]
        self.ops = [o for o, _ in keep]
        self.cum_weights = list(accumulate(w for _, w in keep))

    def _weights(self) -> list[int]:
        return [b - a for a, b in zip([0, *self.cum_weights], self.cum_weights, strict=False)]

    async def _request(self, op: str, dev: LoadDevice) -> None:
        if self.workload is not None:
            await self._custom(op, dev, self.workload)
            return
        if op == "rng":
            await self._rng_read(dev)
            return
        if op == "net":
            await self._net_frame(dev)
            return
        block = self._pick_block(dev, write=op == "blk-write")
        dev.busy.add(block)
        try:
            if op == "blk-write":
                await self._blk_write(dev, block)
            else:
                await self._blk_read(dev, block, self.stats, op)
        finally:
            dev.busy.discard(block)

    def _pick_block(self, dev: LoadDevice, *, write: bool) -> int:
        """Reads go to a written block half the time (so most reads check real data)."""
        rng = self.rng
        for _ in range(8):
            if not write and dev.written and rng.random() < 0.5:
                block = rng.choice(dev.written)
            else:
                block = rng.randrange(dev.blocks)
            if block not in dev.busy:
                return block
        return next(b for b in range(dev.blocks) if b not in dev.busy)  # depth <= blocks

    async def _rng_read(self, dev: LoadDevice) -> None:
        size = self.cfg.block_size
        start = time.perf_counter_ns()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                data = await dev.driver.read(size)
        except Exception as exc:
            self._failed(self.stats, "rng", dev, exc)
            return
        self.stats.ok("rng", dev.index, time.perf_counter_ns() - start, size)
        if len(data) != size or data == self.pattern.zeroes:
            self.stats.error("verify:rng", f"{dev.name}: {len(data)} bytes, all zero")

    async def _net_frame(self, dev: LoadDevice) -> None:
        """Send the next frame of ``dev``'s flow and wait until its partner has it."""
        net = self.net
        flow = net.flows.get(dev.index) if net is not None else None
        if net is None or flow is None or flow.receiver.index in net.deaf:
            self.stats.issued -= 1  # no frame: the ticket goes back
            dev.out = "its partner stopped receiving"  # its frames would go nowhere
            return
        start = time.perf_counter_ns()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                seq, receipt = await net.transmit(flow)
        except Exception as exc:
            self._failed(self.stats, "net", dev, exc)
            return
        arrived = await net.receipt(flow, seq, receipt)
        if arrived == LOST:
            what = f"{dev.name}: frame {seq} to {flow.receiver.name} never arrived"
            self.stats.lost("net", dev.index, what, error=not self.cfg.allow_loss)
            return
        self.stats.ok("net", dev.index, arrived - start, self.cfg.frame_size)

    async def _custom(self, op: str, dev: LoadDevice, workload: Workload) -> None:
        """One call of the user's workload function: one operation."""
        start = time.perf_counter_ns()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                moved = await workload.run(dev.driver, self.rng)
        except Exception as exc:
            kind, leaves = failure(exc)
            what = f"{type(exc).__name__}: {exc}"
            if kind == "timeout":
                what = "no completion within the timeout"
            self.stats.failed(op, dev.index, kind, f"{dev.name}: {what}")
            if leaves and not dev.out:
                dev.out = f"left the workload after {kind}"
            return
        self.stats.ok(op, dev.index, time.perf_counter_ns() - start, moved)

    async def _blk_write(self, dev: LoadDevice, block: int) -> None:
        size = self.cfg.block_size
        offset = block * size
        dev.generation += 1
        generation = dev.generation
        before = dev.candidates(block)
        if block not in dev.expected and block not in dev.uncertain:
            dev.written.append(block)
        data = self.pattern.make(dev.index, offset, generation)
        start = time.perf_counter_ns()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                await dev.driver.write(offset, data)
        except Exception as exc:
            dev.uncertain[block] = {*before, generation}  # it may or may not have landed
            self._failed(self.stats, "blk-write", dev, exc)
            return
        latency = time.perf_counter_ns() - start
        dev.expected[block] = generation
        dev.uncertain.pop(block, None)
        self.stats.ok("blk-write", dev.index, latency, size)

    async def _blk_read(self, dev: LoadDevice, block: int, stats: Stats, op: str) -> bool:
        """Read and verify one block; False if the request failed (not if it verified badly)."""
        size = self.cfg.block_size
        offset = block * size
        want = dev.candidates(block)
        start = time.perf_counter_ns()
        try:
            async with asyncio.timeout(self.cfg.timeout):
                data = await dev.driver.read(offset, size)
        except Exception as exc:
            self._failed(stats, op, dev, exc)
            return False
        stats.ok(op, dev.index, time.perf_counter_ns() - start, size)
        if not self.pattern.matches(data, dev.index, offset, want):
            kind, detail = self.pattern.diagnose(data, dev.index, offset, want)
            where = f"{dev.name} block {block} (offset {offset:#x})"
            stats.error(f"verify:{kind}", f"{where}: {detail}")
        return True

    def _failed(self, stats: Stats, op: str, dev: LoadDevice, exc: Exception) -> None:
        kind = error_kind(exc)
        what = "no completion within the timeout" if kind == "timeout" else str(exc)
        stats.failed(op, dev.index, kind, f"{dev.name}: {what}")
        if not isinstance(exc, RequestError) and not dev.out:
            # Timed out, or the session or the device broke: its state is unknown from here.
            dev.out = f"left the workload after {kind}"

    # -- read-back ---------------------------------------------------------------------------

    async def _read_back(self) -> None:
        """Read every block ever written, device by device interleaved, and verify it."""
        self.phase, self.phase_start = "read-back", time.monotonic()
        todo_per_device = [
            [(dev, block) for block in sorted(dev.written)] for dev in self.devices if dev.written
        ]
        longest = max((len(blocks) for blocks in todo_per_device), default=0)
        todo = [b[k] for k in range(longest) for b in todo_per_device if k < len(b)]
        self.readback_blocks = len(todo)
        given_up: set[int] = set()  # devices whose read failed: the rest of theirs is skipped
        items = iter(todo)

        async def worker() -> None:
            for dev, block in items:
                if dev.index in given_up:
                    self.unverified += 1
                    continue
                self.readback.issued += 1
                if not await self._blk_read(dev, block, self.readback, "blk-read"):
                    given_up.add(dev.index)
                    self.unverified += 1

        start = time.monotonic()
        await asyncio.gather(*(worker() for _ in range(min(self.cfg.concurrency, len(todo)))))
        self.timing["readback_s"] = time.monotonic() - start
        self.progress.show()

    # -- progress and summary ----------------------------------------------------------------

    def _status(self, elapsed: float) -> str:
        now = time.monotonic() - self.phase_start
        if self.phase in ("plan", "connect"):
            return f"connecting: {self.sessions_up}/{self.sessions_target} sessions"
        target = len(self.devices)
        if self.phase == "bring-up":
            done = self.devices_up + sum(1 for d in self.devices if d.out)
            # as the summary's devices/s: from the start of the run
            rate = per_second(self.devices_up, time.monotonic() - self.run_start)
            return (
                f"bring-up: {self.devices_up:,}/{target:,} devices up ({rate:,.0f}/s), "
                f"{sum(self.setup_errors.values())} errors, {done:,} done, {elapsed:.1f} s"
            )
        stats = self.stats if self.phase == "workload" else self.readback
        errors = stats.error_count
        if self.phase == "workload":
            # The summary's rate: every request so far over the workload's seconds so far.
            seconds = self.workload_seconds()
            rate = per_second(stats.completed, seconds)
            live = sum(1 for d in self.devices if not d.out and d.driver is not None)
            left = f"/{self.cfg.duration:g}" if self.cfg.duration else ""
            rows = self.series.rows if self.series else []
            last = f" | p99 {format_us(rows[-1]['p99_us'])} (last s)" if rows else ""
            return (
                f"load: {live:,}/{target:,} devices | {rate:,.0f} req/s | "
                f"{stats.completed:,} requests{last} | {errors} errors "
                f"({stats.verify_failures} verify) | {seconds:.1f}{left} s"
            )
        rate = per_second(stats.completed, now)
        return (
            f"read-back: {stats.completed + self.unverified:,}/{self.readback_blocks:,} blocks "
            f"| {rate:,.0f} req/s | {errors} errors ({stats.verify_failures} verify)"
        )

    def summary(self) -> dict[str, Any]:
        cfg, stats, back = self.cfg, self.stats, self.readback
        workload_s = self.timing.get("workload_s", 0.0)
        bringup_s = self.timing.get("bringup_s", 0.0)
        errors = Counter(self.setup_errors)
        errors.update(stats.errors)
        errors.update({f"readback:{k}": n for k, n in back.errors.items() if "verify" not in k})
        errors.update({k: n for k, n in back.errors.items() if "verify" in k})
        kinds = Counter(d.kind for d in self.devices if d.driver is not None and not d.out)
        names = [d.name for d in self.devices]
        verified = back.completed - back.error_count  # failed reads and bad data verify nothing
        written = sum(len(d.written) for d in self.devices)
        lost = stats.issued - stats.completed + back.issued - back.completed
        total_errors = errors.total()
        net = self._net_summary()
        latency = stats.latency
        return {
            "ok": not total_errors and not self.unverified and not lost and not net["loss_error"],
            "url": cfg.url,
            "loop": loop_name(),
            "memory": "/".join(sorted({c.memory_mode for c in self.conns if c})) or cfg.memory,
            "seed": cfg.seed,
            "workload": cfg.workload,
            "mix": self.mix,
            "block_size": cfg.block_size,
            "depth": cfg.depth,
            "concurrency": self.workers or cfg.concurrency,
            "timeout_s": cfg.timeout,
            "sessions": self.sessions_up,
            "sessions_target": self.sessions_target,
            "platform_devices": self.platform_size,
            "devices": self.devices_up,
            "devices_target": len(self.devices),
            "devices_by_kind": dict(sorted(kinds.items())),
            "devices_out": dict(Counter(d.out for d in self.devices if d.out)),
            "bringup_s": round(bringup_s, 3),
            "devices_per_s": per_second(self.devices_up, bringup_s),
            "duration_s": round(workload_s, 3),
            "interrupted": self.interrupted,
            "requests": stats.issued,
            "completed": stats.completed,
            "lost": lost,
            "requests_per_s": per_second(stats.completed, workload_s),
            "bytes": stats.bytes,
            "bytes_per_s": per_second(stats.bytes, workload_s),
            "errors": total_errors,
            "errors_by_kind": dict(errors.most_common()),
            "error_samples": self.setup_samples + stats.samples + back.samples,
            "verify_failures": stats.verify_failures + back.verify_failures,
            "latency_us": latency.summary(),
            "histogram_us": [list(row) for row in latency.rows()],
            "ops": {
                op: {
                    "requests": s.requests,
                    "bytes": s.bytes,
                    "errors": s.errors,
                    "lost": s.lost,
                    "per_s": per_second(s.requests, workload_s),
                    "bytes_per_s": per_second(s.bytes, workload_s),
                    "latency_us": s.latency.summary(),
                }
                for op, s in stats.ops.items()
            },
            "net": net,
            "fairness": {
                kind: fairness(
                    stats.per_device(), names, [d.index for d in self.devices if d.kind == kind]
                )
                for kind in self.kinds
            },
            "written_blocks": written,
            "readback": {
                "blocks": self.readback_blocks,
                "read": back.completed,
                "verified": verified,
                "verify_failures": back.verify_failures,
                "errors": back.error_count - back.verify_failures,
                "unverified": self.unverified,
                "seconds": round(self.timing.get("readback_s", 0.0), 3),
                "latency_us": back.latency.summary(),
            },
        }

    def _net_summary(self) -> dict[str, Any]:
        """The net flows: frames sent, received intact or not, lost, and whether loss fails."""
        out: dict[str, Any] = {"flows": 0, "unpaired": 0, "frame_size": self.cfg.frame_size}
        out |= {"twins": 0, "sent": 0, "received": 0, "lost": 0, "late": 0, "foreign": 0}
        if self.net is not None:
            out |= self.net.summary()
        out["allow_loss"] = self.cfg.allow_loss
        out["loss_error"] = bool(out["lost"]) and not self.cfg.allow_loss
        return out

    def mergeable(self) -> dict[str, Any]:
        """What ``viowire load merge`` needs beside the summary: each operation's latency
        histogram (encoded) and the per-device counts behind the fairness lines."""
        ago = time.monotonic() - self.workload_start
        now = time.time()
        return {
            "workload_unix": (now - ago, now - ago + self.workload_seconds()),
            "ops": {op: s.latency.encode() for op, s in self.stats.ops.items()},
            "readback": {op: s.latency.encode() for op, s in self.readback.ops.items()},
            "devices": {
                "names": [d.name for d in self.devices],
                "kinds": [d.kind for d in self.devices],
                **self.stats.per_device(),
            },
        }
