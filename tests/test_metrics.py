"""``--metrics``: a real server, a real client doing I/O, scrapes over HTTP parsed by
prometheus_client's own text parser; counters move by exactly what the I/O did."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import io
import json
import os
import socket
from typing import ClassVar

import pytest
from cli_run import serve, viowire
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from servers import running_server, url_of

from viowire import load, metrics
from viowire.client.connection import connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.net import NetDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.load.config import LoadConfig
from viowire.load.metrics import LoadCollector
from viowire.load.runner import LoadRun
from viowire.metrics import MAX_CONNECTIONS, registry_with, start_endpoint
from viowire.server.metrics import LATENCY_BOUNDS, ServerCollector
from viowire.server.platform import DeviceSpec, PlatformSpec
from viowire.virtio.constants import DeviceId

TIMEOUT = 10
BLK_HEADER = 16  # struct virtio_blk_req's type, reserved, sector


async def http(port: int, request: bytes) -> bytes:
    """Send ``request`` to 127.0.0.1:``port``; everything the server answers until it closes."""
    async with asyncio.timeout(TIMEOUT):
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await writer.drain()
        answer = await reader.read()
        writer.close()
        await writer.wait_closed()
        return answer


async def scrape(port: int) -> dict[tuple[str, tuple], float]:
    """``/metrics`` as {(sample name, sorted labels): value}."""
    answer = await http(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK"), head
    assert b"Content-Type: text/plain; version=" in head
    samples = {}
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    return samples


def value(samples, name: str, **labels) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def delta(before, after, name: str, **labels) -> float:
    return value(after, name, **labels) - value(before, name, **labels)


@pytest.fixture
async def metered(tmp_path):
    async with running_server(tmp_path) as server:
        endpoint = await start_endpoint("tcp://127.0.0.1:0", ServerCollector(server))
        try:
            yield server, endpoint.endpoint.port
        finally:
            await endpoint.close()


def pick(platform, device_id: int, version: int = 2):
    return next(d for d in platform if d.device_id == device_id and d.version == version)


@pytest.mark.parametrize("memory", ["shared", "proxied"])
async def test_counters_move_by_what_the_client_did(metered, memory):
    server, port = metered
    blocks, size = 8, 8192
    async with await connect(url_of(server, "unix"), memory=memory) as conn:
        platform = await conn.platform()
        blk = await BlockDriver.attach(await conn.attach(pick(platform, DeviceId.BLOCK)))
        rng = await EntropyDriver.attach(await conn.attach(pick(platform, DeviceId.ENTROPY)))
        before = await scrape(port)
        assert value(before, "viowire_sessions") == 1
        assert value(before, "viowire_devices", type="blk") == 2
        assert value(before, "viowire_devices", type="rng") == 2
        assert value(before, "viowire_guest_memory_bytes", mode=memory) == conn.ram.size

        chunks = [os.urandom(size) for _ in range(blocks)]
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(*(blk.write(i * size, c) for i, c in enumerate(chunks)))
            await blk.flush()
            back = await asyncio.gather(*(blk.read(i * size, size) for i in range(blocks)))
            entropy = await rng.read(64)
        assert back == chunks and len(entropy) == 64
        after = await scrape(port)

    blk_q = {"type": "blk", "queue": "0"}
    requests = 2 * blocks + 1  # the writes, the flush, the reads
    assert delta(before, after, "viowire_requests_total", **blk_q) == requests
    # Every request has its header readable and a status byte writable.
    assert delta(before, after, "viowire_request_read_bytes_total", **blk_q) == (
        requests * BLK_HEADER + blocks * size
    )
    assert delta(before, after, "viowire_request_written_bytes_total", **blk_q) == (
        requests + blocks * size
    )
    count = delta(before, after, "viowire_request_duration_seconds_count", **blk_q)
    assert count == requests
    inf = delta(before, after, "viowire_request_duration_seconds_bucket", le="+Inf", **blk_q)
    assert inf == requests
    assert delta(before, after, "viowire_request_duration_seconds_sum", **blk_q) > 0
    first = delta(
        before,
        after,
        "viowire_request_duration_seconds_bucket",
        le=repr(LATENCY_BOUNDS[0]),
        **blk_q,
    )
    assert 0 <= first <= requests

    rng_q = {"type": "rng", "queue": "0"}
    rng_requests = delta(before, after, "viowire_requests_total", **rng_q)
    assert rng_requests >= 1
    assert delta(before, after, "viowire_request_written_bytes_total", **rng_q) == 64

    for labels, done in ((blk_q, requests), (rng_q, rng_requests)):
        assert 1 <= delta(before, after, "viowire_notifications_total", **labels) <= done
        assert 1 <= delta(before, after, "viowire_interrupts_total", **labels) <= done
    # Shared memory on a Unix socket notifies on a channel, not in frames; the IRQ status is
    # still read and acknowledged in frames.
    assert delta(before, after, "viowire_frames_total", direction="in") > 0
    assert delta(before, after, "viowire_frames_total", direction="out") > 0
    proxied_read = delta(before, after, "viowire_proxied_bytes_total", direction="read")
    proxied_write = delta(before, after, "viowire_proxied_bytes_total", direction="write")
    if memory == "proxied":  # the data and the rings, both ways
        assert proxied_read > blocks * size and proxied_write > blocks * size
    else:
        assert proxied_read == proxied_write == 0

    closed = await scrape(port)
    assert value(closed, "viowire_sessions") == 0
    assert value(closed, "viowire_devices", type="blk") == 0


async def test_protocol_errors_by_code(metered):
    server, port = metered
    async with await connect(url_of(server, "tcp"), memory="proxied") as conn:
        before = await scrape(port)
        for _ in range(3):
            with pytest.raises(Exception, match="no device"):
                await asyncio.wait_for(conn.mmio_read(0x4, 4), TIMEOUT)
        after = await scrape(port)
    assert delta(before, after, "viowire_protocol_errors_total", code="BUS_ERROR") == 3
    assert delta(before, after, "viowire_protocol_errors_total", code="BAD_WIDTH") == 0


async def test_series_do_not_grow_with_devices(metered):
    server, port = metered
    samples = await scrape(port)
    async with (
        await connect(url_of(server, "tcp"), memory="proxied"),
        await connect(url_of(server, "unix"), memory="proxied"),
    ):
        more = await scrape(port)
    assert value(more, "viowire_sessions") == 2
    assert value(more, "viowire_devices", type="blk") == 4
    # No label names a session or a device: two sessions add no series.
    assert set(more) == set(samples)


BAD_REQUESTS = [
    (b"\x00\xff garbage\r\n\r\n", b"400"),
    (b"GET /metrics\r\n\r\n", b"400"),
    (b"GET / HTTP/1.1\r\n\r\n", b"404"),
    (b"GET /metricsX HTTP/1.1\r\n\r\n", b"404"),
    (b"POST /metrics HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc", b"405"),
    (b"GET /metrics HTTP/1.1\r\n" + b"X: " + b"y" * 20000 + b"\r\n\r\n", b"431"),
    (b"GET /metr", b""),  # ends mid-line: closed unanswered
    (b"", b""),
]


async def test_bad_http_requests_do_not_disturb_the_server(metered, monkeypatch):
    # a request head that never ends is cut after REQUEST_TIMEOUT: shortened, the same cut
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 0.5)
    server, port = metered
    async with await connect(url_of(server, "tcp"), memory="proxied") as conn:
        rng = await EntropyDriver.attach(await conn.attach(pick(await conn.platform(), 4)))
        silent = [await asyncio.open_connection("127.0.0.1", port) for _ in range(3)]
        for request, status in BAD_REQUESTS:
            answer = await http(port, request)
            assert answer.startswith(b"HTTP/1.1 " + status) if status else answer == b""
        # Connections that never speak hold no scrape back, and a flood is cut at the limit.
        flood = [
            await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS + 4)
        ]
        for _, writer in [*silent, *flood]:
            writer.close()
        assert value(await scrape(port), "viowire_sessions") == 1
        assert len(await asyncio.wait_for(rng.read(32), TIMEOUT)) == 32


def test_serve_metrics_over_http(tmp_path):
    with serve("--listen", "tcp://127.0.0.1:0", "--metrics", "tcp://127.0.0.1:0") as served:
        line = next(line for line in served.lines if line.startswith("metrics on "))
        url = line.split()[-1]
        assert url.startswith("http://127.0.0.1:") and url.endswith("/metrics")
        port = int(url.rsplit(":", 1)[1].split("/")[0])
        samples = asyncio.run(scrape(port))
    assert value(samples, "viowire_sessions") == 0
    assert ("process_resident_memory_bytes", ()) in samples


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("unix:///tmp/x.sock", "use tcp://HOST:PORT"),
        ("tcp://127.0.0.1", "needs a host and a port"),
        ("7000", "use tcp://HOST:PORT"),
        ("tcp://192.0.2.1:9100", "cannot listen there"),  # TEST-NET-1: never on this host
    ],
)
def test_bad_metrics_address_is_one_line_and_exit_2(url, says):
    result = viowire("serve", "--listen", "tcp://127.0.0.1:0", "--metrics", url)
    assert result.returncode == 2, result
    assert result.stderr.count("\n") == 1 and says in result.stderr, result.stderr
    assert result.stderr.startswith("viowire serve: --metrics")


def test_metrics_with_workers_is_refused():
    result = viowire(
        "serve", "--listen", "tcp://127.0.0.1:0", "--workers", "2", "--metrics", "tcp://127.0.0.1:0"
    )
    assert result.returncode == 2 and "--workers 1" in result.stderr, result


# -- load --metrics --------------------------------------------------------------------------


def load_args(*argv: str):
    parser = argparse.ArgumentParser(prog="viowire")
    load.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["load", *argv])


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def test_load_metrics_are_scraped_while_it_runs(tmp_path, capsys):
    port = free_port()
    async with running_server(tmp_path) as server:
        args = load_args(
            url_of(server, "unix"), "--sessions", "2", "--duration", "1.5", "--mix", "rng=1",
            "--metrics", f"tcp://127.0.0.1:{port}", "--json", "--no-progress",
        )  # fmt: skip
        run = asyncio.get_running_loop().create_task(load.run(args))
        async with asyncio.timeout(TIMEOUT):
            while True:  # until the workload has completed requests
                await asyncio.sleep(0.1)
                with contextlib.suppress(ConnectionError):
                    live = await scrape(port)
                    if value(live, "viowire_load_requests_total", phase="workload", op="rng"):
                        break
            status = await run
    summary = json.loads(capsys.readouterr().out)
    assert status == 0
    assert value(live, "viowire_load_sessions") == 2
    assert value(live, "viowire_load_devices") == summary["devices"]
    assert value(live, "viowire_load_phase", phase="workload") == 1
    assert ("viowire_load_phase", (("phase", "read-back"),)) in live  # at 0, but there
    assert sum(v for (name, _), v in live.items() if name == "viowire_load_phase") == 1
    requests = value(live, "viowire_load_requests_total", phase="workload", op="rng")
    assert 0 < requests <= summary["ops"]["rng"]["requests"]
    p50 = value(live, "viowire_load_latency_seconds", phase="workload", op="rng", quantile="0.5")
    p99 = value(live, "viowire_load_latency_seconds", phase="workload", op="rng", quantile="0.99")
    assert 0 < p50 <= p99
    with pytest.raises(ConnectionError):  # the endpoint ends with the run
        await http(port, b"GET /metrics HTTP/1.1\r\n\r\n")


async def test_load_collector_reads_the_summary_figures(tmp_path):
    async with running_server(tmp_path) as server:
        config = LoadConfig.from_args(
            load_args(url_of(server, "unix"), "--sessions", "1", "--requests", "120",
                      "--no-progress", "--span", "64K")
        )  # fmt: skip
        load_run = LoadRun(config, stderr=io.StringIO())
        summary = await asyncio.wait_for(load_run.execute(), TIMEOUT)
    registry = registry_with(LoadCollector(load_run))
    samples = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for sample in family.samples:
            samples[sample.name, tuple(sorted(sample.labels.items()))] = sample.value
    for op, figures in summary["ops"].items():
        labels = {"phase": "workload", "op": op}
        assert value(samples, "viowire_load_requests_total", **labels) == figures["requests"]
        assert value(samples, "viowire_load_bytes_total", **labels) == figures["bytes"]
        assert value(samples, "viowire_load_errors_total", **labels) == 0
    total = sum(
        value(samples, "viowire_load_requests_total", phase="workload", op=op)
        for op in summary["ops"]
    )
    assert total == 120
    readback = value(samples, "viowire_load_requests_total", phase="readback", op="blk-read")
    assert readback == summary["readback"]["read"]


# -- net devices and links ---------------------------------------------------------------------


async def test_net_frames_by_link(tmp_path):
    spec = PlatformSpec([DeviceSpec.parse("net,link=mlan"), DeviceSpec.parse("net,link=mfar")])
    async with running_server(tmp_path, spec) as server:
        endpoint = await start_endpoint("tcp://127.0.0.1:0", ServerCollector(server))
        port = endpoint.endpoint.port
        try:
            async with (
                await connect(url_of(server, "unix")) as one,
                await connect(url_of(server, "unix")) as two,
            ):
                nets = []
                for conn in (one, two):
                    info = next(d for d in await conn.platform() if d.device_id == DeviceId.NET)
                    drv = await NetDriver.attach(await conn.attach(info))
                    await drv.config()  # a round trip: its port is on the link now
                    nets.append(drv)
                a, b = nets
                before = await scrape(port)
                hello = b"\xff" * 6 + a.mac + b"\x88\xb5" + b"metrics"
                for _ in range(3):
                    await a.send(hello)
                    async with asyncio.timeout(TIMEOUT):
                        assert await anext(b.frames()) == hello
                after = await scrape(port)
        finally:
            await endpoint.close()
    lan = {"link": "mlan"}
    assert delta(before, after, "viowire_net_frames", direction="tx", **lan) == 3
    assert delta(before, after, "viowire_net_frames", direction="rx", **lan) == 3
    assert delta(before, after, "viowire_net_dropped", direction="rx", **lan) == 0
    assert delta(before, after, "viowire_link_frames", switched="flooded", **lan) == 3
    assert value(after, "viowire_link_ports", **lan) == 2
    assert ("viowire_link_ports", (("link", "mfar"),)) not in after  # no port: no link yet
    assert value(after, "viowire_devices", type="net") == 4


def test_queue_labels_are_bounded_per_type():
    """A console of 64 ports has 130 queues: they make 5 queue labels, the last one "4+"."""
    ports = ";".join(f"p{i}:echo" for i in range(1, 64))
    platform = PlatformSpec([DeviceSpec.parse(f"console,ports={ports}")]).build(name_prefix="t ")
    assert len(platform.slots[0].device.queues) == 130

    class NoSessions:
        sessions: ClassVar[set] = set()

    text = generate_latest(registry_with(ServerCollector(NoSessions()))).decode()
    queues = {
        sample.labels["queue"]
        for family in text_string_to_metric_families(text)
        if family.name == "viowire_requests"
        for sample in family.samples
        if sample.labels["type"] == "console"
    }
    assert queues == {"0", "1", "2", "3", "4+"}


def test_load_with_a_bad_metrics_address_is_one_line_and_exit_2():
    result = viowire("load", "--device", "rng", "--requests", "5", "--metrics", "unix:///x")
    assert result.returncode == 2, result
    assert result.stderr == (
        "viowire load: --metrics 'unix:///x': use tcp://HOST:PORT (HTTP for a scraper)\n"
    )
