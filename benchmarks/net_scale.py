#!/usr/bin/env python3
"""Issue 10's memory figures for virtio-net: ``python benchmarks/net_scale.py``.

::

    python benchmarks/net_scale.py                      # 1,000 net devices, 10 sessions
    python benchmarks/net_scale.py --devices 200 --sessions 4 --json

A server (its own process) serves ``--devices / --sessions`` net devices, all on one link; this
process opens ``--sessions`` sessions and brings every device of every session up (to
DRIVER_OK: its port is plugged into the link, its receive buffers posted). Then:

``broadcast``
    the first device sends a broadcast frame and every other device must receive it, intact;
    then the last device does the same. Every device is then asked for its status register:
    none may have failed or need a reset. The figure is the devices reached (all of them, or
    the script exits 1).
``memory.idle_net_device``
    the server's RSS growth per device when the sessions connect (each session builds its
    instance of the platform: idle devices), against the same for virtio-rng devices measured
    the same way in the same run (``viowire bench``'s ``memory.idle_device`` figure). What a
    session costs whatever it holds cancels out: the same is measured with one device per
    session, and the difference is divided by the devices more.
``memory.live_net_device``
    the same, once every driver is up and its device plugged into the link (idle included),
    against the same for rng devices.
``memory.link``, ``memory.port``
    what a link (the switch: its port list, MAC table) and one port on it cost, from
    ``tracemalloc`` in this process: 4,000 links of one port each, then one link of 4,000
    ports (a port's learned MAC included), against the bytes of a bare ``__slots__`` object
    of three fields. Fewer ports than a link's table holds (``MAX_ENTRIES``, 4,096): past it
    the switch learns no more MACs and floods, so 10,000 ports measured 5,904 unlearned ports
    and took 10 s of flooding.

Nothing is asserted but the broadcast: the figures are printed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Sequence
from pathlib import Path

if __name__ == "__main__":
    _root = Path(__file__).resolve().parents[1]
    if str(_root) not in sys.path:
        sys.path.insert(0, str(_root))

from viowire.client.connection import Connection, connect
from viowire.client.drivers.net import NetDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.perf.memory import rss_kib
from viowire.perf.stats import summarise, table
from viowire.perf.suite import Children
from viowire.runtime import run as run_loop
from viowire.server import link as links
from viowire.virtio.constants import DeviceId, Status
from viowire.virtio.net import BROADCAST

LINK = "scale"
RX_BUFFERS = 2  # per device: a broadcast at a time is all this needs
BRINGUP_CONCURRENCY = 64  # devices probed at once per session
FRAME_TIMEOUT = 60.0


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


async def bring_up(conns: list[Connection], kind: str) -> tuple[list, float]:
    """Every device of ``kind`` of every session up; (drivers, seconds)."""
    start = time.perf_counter()
    drivers: list = []

    async def session(conn: Connection) -> list:
        device_id = DeviceId.NET if kind == "net" else DeviceId.ENTROPY
        infos = [d for d in await conn.platform() if d.device_id == device_id]
        gate = asyncio.Semaphore(BRINGUP_CONCURRENCY)

        async def one(info):
            async with gate:
                dev = await conn.attach(info)
                if kind == "net":
                    return await NetDriver.attach(dev, rx_buffers=RX_BUFFERS)
                return await EntropyDriver.attach(dev)

        return await asyncio.gather(*(one(info) for info in infos))

    for found in await asyncio.gather(*(session(c) for c in conns)):
        drivers += found
    return drivers, time.perf_counter() - start


async def broadcast(drivers: list[NetDriver], sender: int) -> int:
    """Devices other than ``drivers[sender]`` that received its broadcast frame intact."""
    src = drivers[sender]
    frame = BROADCAST + src.mac + b"\x88\xb5" + f"hello from {sender}".encode().ljust(46, b".")
    others = [d for i, d in enumerate(drivers) if i != sender]

    async def receive(drv: NetDriver) -> bool:
        async for got in drv.frames():
            return got == frame
        return False

    waiting = [asyncio.ensure_future(receive(d)) for d in others]
    await asyncio.sleep(0)  # every reader waits before the frame is on its way
    await src.send(frame)
    try:
        async with asyncio.timeout(FRAME_TIMEOUT):
            reached = await asyncio.gather(*waiting)
    except TimeoutError:
        reached = [w.done() and not w.cancelled() and w.result() for w in waiting]
        for w in waiting:
            w.cancel()
    return sum(reached)


async def healthy(drivers: list) -> int:
    """Devices whose status has DRIVER_OK and neither FAILED nor DEVICE_NEEDS_RESET."""
    bad = Status.FAILED | Status.DEVICE_NEEDS_RESET
    count = 0
    for drv in drivers:
        status = await drv.dev.get_status()
        count += bool(status & Status.DRIVER_OK) and not status & bad
    return count


async def close(conns: list[Connection], drivers: list) -> None:
    for drv in drivers:
        with contextlib.suppress(Exception):
            await drv.detach()
    for conn in conns:
        await conn.close()


def server_memory(args: argparse.Namespace, tmp: Path, kind: str, per_session: int) -> dict:
    """RSS of a server of ``kind`` devices on one link: started, sessions in, devices up, and
    (net) after the broadcasts; and this client's RSS growth for the devices."""
    spec = f"net,link={LINK},count={per_session}" if kind == "net" else f"rng,count={per_session}"
    kids = Children(tmp)
    try:
        where = f"unix://{tmp}/{kind}-{per_session}.sock"
        proc, url = kids.viowire(args.loop, where, devices=[spec])
        out: dict = {"started_kib": rss_kib(proc.pid), "client_before_kib": rss_kib()}

        async def run() -> None:
            conns = [await connect(url, memory="shared") for _ in range(args.sessions)]
            out["sessions_kib"] = rss_kib(proc.pid)  # HELLO's reply: the platform is built
            drivers, seconds = await bring_up(conns, kind)
            out["devices"], out["bringup_s"] = len(drivers), seconds
            out["up_kib"] = rss_kib(proc.pid)
            out["client_up_kib"] = rss_kib()
            if kind == "net" and per_session > 1:
                say(f"net: {len(drivers):,} devices up in {seconds:.1f} s; two broadcasts")
                out["reached_first"] = await broadcast(drivers, 0)
                out["reached_last"] = await broadcast(drivers, len(drivers) - 1)
                out["after_kib"] = rss_kib(proc.pid)
            out["healthy"] = await healthy(drivers)
            await close(conns, drivers)

        run_loop(run(), loop=args.loop)
        return out
    finally:
        kids.close()


class _Bare:
    __slots__ = ("a", "b", "c")

    def __init__(self) -> None:
        self.a, self.b, self.c = None, None, 0.0


LINK_PORTS = 4000  # below links.MAX_ENTRIES: every port's MAC is learned


def link_costs(count: int) -> dict[str, float]:
    """Bytes per link (one port each) and per port (on one link, its MAC learned), and a bare
    three-slot object, from tracemalloc."""

    def traced(make) -> float:
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        held = make()
        after = tracemalloc.get_traced_memory()[0]
        tracemalloc.stop()
        del held
        return (after - before) / count

    def ports(link: str | None, learn: bool):
        made = []
        for i in range(count):
            port = links.attach(link or f"bench-link-{i}", f"port {i}", lambda frame: None)
            if learn:  # a frame to itself: its MAC is learned, nothing is delivered
                mac = (0x0200_0000_0000 + i).to_bytes(6, "big")
                port.send(mac + mac + b"\x88\xb5")
            made.append(port)
        return made

    one_port_links = traced(lambda: ports(None, learn=False))
    plain_ports = traced(lambda: ports("bench-plain", learn=False))
    learned_ports = traced(lambda: ports("bench-learned", learn=True))
    bare = traced(lambda: [_Bare() for _ in range(count)])
    for link in list(links._links.values()):
        if link.name.startswith("bench-"):
            for port in list(link.ports):
                links.release(port)
    return {"link": one_port_links - plain_ports, "port": learned_ports, "bare": bare}


def per_device(many: dict, one: dict, key: str) -> float:
    """KiB per device of ``key``'s growth since start: the run with many devices per session
    less the run with one, so that what a session costs whatever it holds cancels out."""
    grown = (many[key] - many["started_kib"]) - (one[key] - one["started_kib"])
    return grown / (many["devices"] - one["devices"])


def measure(args: argparse.Namespace, tmp: Path) -> tuple[list[dict], bool]:
    d = args.devices // args.sessions
    net, net1 = (server_memory(args, tmp, "net", k) for k in (d, 1))
    rng, rng1 = (server_memory(args, tmp, "rng", k) for k in (d, 1))
    n = net["devices"]
    reached_all = net["reached_first"] == net["reached_last"] == n - 1 and net["healthy"] == n
    costs = link_costs(LINK_PORTS)
    common = {"loop": args.loop, "socket": "unix"}
    results = [
        summarise(
            "broadcast",
            "devices reached",
            [min(net["reached_first"], net["reached_last"]) + 1],
            [n],
            devices=n,
            sessions=args.sessions,
            healthy=net["healthy"],
            bringup_s=net["bringup_s"],
            baseline_name="the devices up (the sender counts itself)",
            **common,
        ),
        summarise(
            "memory.idle_net_device",
            "KiB/device",
            [per_device(net, net1, "sessions_kib")],
            [per_device(rng, rng1, "sessions_kib")],
            baseline_name="the same for idle virtio-rng devices, same run",
            **common,
        ),
        summarise(
            "memory.live_net_device",
            "KiB/device",
            [per_device(net, net1, "up_kib")],
            [per_device(rng, rng1, "up_kib")],
            client_kib_per_device=(net["client_up_kib"] - net["client_before_kib"]) / n,
            server_rss_mib=net["after_kib"] / 1024,
            baseline_name="the same for virtio-rng devices, same run",
            note="sessions up, every driver at DRIVER_OK, its port plugged into the link "
            f"(server RSS {net['after_kib'] / 1024:.0f} MiB after the broadcasts)",
            **common,
        ),
        summarise(
            "memory.link",
            "bytes/link",
            [costs["link"]],
            [costs["bare"]],
            baseline_name="a bare object of three __slots__",
            loop=None,
            socket=None,
        ),
        summarise(
            "memory.port",
            "bytes/port",
            [costs["port"]],
            [costs["bare"]],
            baseline_name="a bare object of three __slots__",
            loop=None,
            socket=None,
        ),
    ]
    return results, reached_all


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--devices", type=int, default=1000, help="net devices (default 1000)")
    parser.add_argument("--sessions", type=int, default=10, help="sessions (default 10)")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="uvloop")
    parser.add_argument("--json", action="store_true", help='print {"results": [...]}')
    args = parser.parse_args(argv)
    if args.sessions < 1 or args.devices < 2 * args.sessions:
        parser.error("give at least 2 devices per session and 1 session")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(argv)
    with tempfile.TemporaryDirectory(prefix="viowire-net-scale-") as tmp:
        results, reached_all = measure(args, Path(tmp))
    print(json.dumps({"results": results}, indent=1) if args.json else table(results))
    if not reached_all:
        say("net-scale: a broadcast did not reach every device, or a device is not healthy")
    return 0 if reached_all else 1


if __name__ == "__main__":
    sys.exit(main())
