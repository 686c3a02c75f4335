"""``viowire load``: the pieces (block pattern, pool, options), then whole runs against
real servers (in-process and a subprocess), including a corrupted block and a hung request."""

from __future__ import annotations

import argparse
import asyncio
import io
import json

import pytest
from cli_run import serve
from servers import running_server, url_of

from viowire import load
from viowire.client.connection import DeviceInfo
from viowire.load.config import LoadConfig, parse_mix
from viowire.load.pattern import MAGIC, BlockPattern
from viowire.load.pool import DevicePool
from viowire.load.progress import Progress
from viowire.load.runner import select_devices, session_ram, share
from viowire.server.devices import blk as blk_backend
from viowire.server.devices.rng import RngBackend
from viowire.server.platform import DeviceSpec, PlatformSpec
from viowire.virtio.constants import DeviceId

RUN_TIMEOUT = 20.0  # bound on a whole load run in these tests


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="viowire")
    load.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["load", *argv])


async def run_load(capsys, *argv: str) -> tuple[int, dict]:
    """Run ``viowire load ARGV --json`` in this loop; (exit status, summary)."""
    status = await asyncio.wait_for(load.run(parse(*argv, "--json")), RUN_TIMEOUT)
    return status, json.loads(capsys.readouterr().out)


def platform(*specs: str) -> PlatformSpec:
    return PlatformSpec([DeviceSpec.parse(spec) for spec in specs])


LOAD_PLATFORM = ("blk,size=1M,count=8", "rng,count=4")


# -- block pattern ---------------------------------------------------------------------------


def test_pattern_is_exact_and_says_what_went_wrong():
    pattern = BlockPattern(seed=42, block_size=4096)
    block = pattern.make(3, 8192, 5)
    assert block[:8] == MAGIC and len(block) == 4096
    assert pattern.matches(block, 3, 8192, {5})
    assert pattern.matches(pattern.zeroes, 3, 8192, (0,))
    assert pattern.matches(block, 3, 8192, {4, 5})  # an uncertain block: either will do

    def kind(data: bytes, generations=(5,)) -> str:
        assert not pattern.matches(data, 3, 8192, generations)
        return pattern.diagnose(data, 3, 8192, generations)[0]

    flipped = bytearray(block)
    flipped[1000] ^= 1
    assert kind(bytes(flipped)) == "corrupt"
    assert kind(pattern.zeroes) == "lost"
    assert kind(pattern.make(3, 8192, 4)) == "stale"
    assert kind(pattern.make(3, 4096, 5)) == "misdirected"
    assert kind(pattern.make(2, 8192, 5)) == "misdirected"
    assert kind(BlockPattern(43, 4096).make(3, 8192, 5)) == "misdirected"
    assert kind(bytes([0xAA]) * 4096) == "garbage"
    assert kind(block, (0,)) == "stale"
    assert kind(bytes([1]) * 4096, (0,)) == "unexpected"
    assert kind(block[:512]) == "length"


# -- scheduling --------------------------------------------------------------------------------


async def test_pool_serves_devices_round_robin_and_wakes_waiters():
    pool: DevicePool[str] = DevicePool()
    for name in "abc":
        pool.add(name)
    order = []
    for _ in range(6):
        dev = await pool.take()
        order.append(dev)
        pool.put(dev)
    assert order == list("abcabc")
    taken = [await pool.take() for _ in range(3)]
    waiter = asyncio.create_task(pool.take())
    await asyncio.sleep(0)
    pool.put(taken[0])
    assert await asyncio.wait_for(waiter, 1) == "a"
    for _ in range(3):
        pool.drop()  # every device left: the pool closes
    assert await asyncio.wait_for(pool.take(), 1) is None


def test_devices_are_shared_out_by_kind_and_evenly():
    infos = [
        DeviceInfo(0x1000 * i, 0x200, i, 2, DeviceId.BLOCK if i < 8 else DeviceId.ENTROPY, 0)
        for i in range(10)
    ]
    two = select_devices(infos, ("blk", "rng"), 2)
    assert sorted(d.device_id for d in two) == [DeviceId.BLOCK, DeviceId.ENTROPY]
    five = select_devices(infos, ("blk", "rng"), 5)
    assert sum(d.device_id == DeviceId.BLOCK for d in five) == 4
    assert len({d.base for d in select_devices(infos, ("blk", "rng"), 10)}) == 10
    assert all(d.device_id == DeviceId.BLOCK for d in select_devices(infos, ("blk",), 3))
    assert share(10, 4) == [3, 3, 2, 2]
    assert session_ram(250, 1, 4096) < 8 << 20  # far below the 64 MiB default per session


def test_options_are_checked():
    assert parse_mix("blk-read=1") == {"blk-read": 1, "blk-write": 0, "rng": 0, "net": 0}
    for bad in ("blk-read=-1", "nvme=3", "rng", "blk-read=0"):
        with pytest.raises(ValueError):
            parse_mix(bad)
    with pytest.raises(ValueError, match="--block-size"):
        LoadConfig.from_args(parse("unix:///x", "--block-size", "1000"))
    with pytest.raises(ValueError, match="--span"):
        LoadConfig.from_args(parse("unix:///x", "--span", "8K", "--depth", "4"))
    with pytest.raises(SystemExit):
        parse("unix:///x", "--duration", "1", "--requests", "5")
    config = LoadConfig.from_args(parse("unix:///x"))
    assert (config.duration, config.requests, config.kinds) == (10.0, None, ("blk", "net", "rng"))
    assert not config.mix_given
    assert LoadConfig.from_args(parse("unix:///x", "--mix", "net=1")).mix_given
    for size in ("59", "65550"):
        with pytest.raises(ValueError, match="--frame-size"):
            LoadConfig.from_args(parse("unix:///x", "--frame-size", size))


def test_progress_redraws_one_line_on_a_terminal():
    class Tty(io.StringIO):
        def isatty(self) -> bool:
            return True

    tty, pipe = Tty(), io.StringIO()
    Progress(tty, lambda t: "load: 5 req/s").show()
    Progress(pipe, lambda t: "load: 5 req/s").show()
    assert tty.getvalue() == "\rload: 5 req/s\x1b[K"
    assert pipe.getvalue() == "load: 5 req/s\n"


# -- whole runs --------------------------------------------------------------------------------


def assert_clean(summary: dict, requests: int) -> None:
    assert summary["ok"] is True
    assert summary["requests"] == summary["completed"] == requests
    assert summary["lost"] == 0
    assert summary["errors"] == summary["verify_failures"] == 0
    assert summary["errors_by_kind"] == {}
    readback = summary["readback"]
    assert summary["written_blocks"] > 0
    assert readback["blocks"] == readback["read"] == readback["verified"]
    assert readback["blocks"] == summary["written_blocks"]
    assert readback["unverified"] == readback["errors"] == 0
    lat = summary["latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert sum(n for _, _, n in summary["histogram_us"]) == lat["count"]


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
@pytest.mark.parametrize("memory", ["shared", "proxied"])
async def test_a_verified_mixed_load(tmp_path, capsys, scheme, memory):
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:
        status, s = await run_load(
            capsys,
            url_of(server, scheme),
            "--sessions", "3",
            "--devices", "30",
            "--requests", "400",
            "--depth", "2",
            "--concurrency", "16",
            "--memory", memory,
            "--seed", "5",
            "--span", "64K",
        )  # fmt: skip
    assert status == 0
    assert_clean(s, 400)
    assert (s["sessions"], s["devices"], s["devices_target"]) == (3, 30, 30)
    assert s["devices_by_kind"] == {"blk": 21, "rng": 9}  # each session: 7 of 8 blk, 3 of 4 rng
    assert s["memory"] == memory
    assert s["bytes"] == 4096 * 400
    assert set(s["ops"]) == {"blk-read", "blk-write", "rng"}
    assert sum(o["requests"] for o in s["ops"].values()) == 400
    for kind in ("blk", "rng"):
        fair = s["fairness"][kind]
        assert fair["requests_min"] <= fair["requests_median"] <= fair["requests_max"]
        assert fair["slowest_vs_median"] >= 1
    assert s["bringup_s"] > 0 and s["devices_per_s"] > 0


async def test_a_timed_run_with_the_text_summary(tmp_path, capsys):
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:
        args = parse(url_of(server, "unix"), "--sessions", "2", "--duration", "0.5")
        status = await asyncio.wait_for(load.run(args), RUN_TIMEOUT)
    out, err = capsys.readouterr()
    assert status == 0
    assert "result     OK" in out
    assert "latency    min" in out and "|#" in out  # percentiles and a histogram
    assert "fairness   blk:" in out and "slowest" in out
    assert "devices    24/24 up" in out  # default --devices: every device of every session
    assert "bring-up: 24/24 devices up" in err and "load: 24/24 devices" in err


async def test_a_write_only_mix_on_a_disk_only_server(tmp_path, capsys):
    async with running_server(tmp_path, platform("blk,size=64K,count=2")) as server:
        url = url_of(server, "unix")
        status, s = await run_load(
            capsys, url, "--sessions", "2", "--requests", "100", "--mix", "blk-write=1",
            "--no-progress",
        )  # fmt: skip
        assert status == 0
        assert_clean(s, 100)
        assert s["ops"]["blk-write"]["requests"] == 100
        with pytest.raises(ValueError, match="no rng device"):
            await load.run(parse(url, "--requests", "10", "--mix", "rng=1"))


async def test_too_few_devices_per_session_is_a_clear_error(tmp_path):
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:
        args = parse(url_of(server, "unix"), "--sessions", "2", "--devices", "25")
        with pytest.raises(ValueError, match=r"needs 13 devices per session.*has 12.*--sessions 3"):
            await asyncio.wait_for(load.run(args), RUN_TIMEOUT)


async def test_a_corrupted_block_is_caught(tmp_path, capsys, monkeypatch):
    read = blk_backend._RamImage.pread
    flipped: list[int] = []

    def pread(self, offset: int, length: int) -> bytes:
        data = read(self, offset, length)
        if not flipped and data[: len(MAGIC)] == MAGIC:  # once, in a block the load wrote
            flipped.append(offset)
            data = data[:100] + bytes([data[100] ^ 0x40]) + data[101:]
        return data

    monkeypatch.setattr(blk_backend._RamImage, "pread", pread)
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:
        status, s = await run_load(
            capsys, url_of(server, "unix"), "--sessions", "2", "--requests", "300", "--no-progress"
        )
    assert flipped
    assert status == 1 and s["ok"] is False
    assert s["verify_failures"] == 1
    assert s["errors_by_kind"] == {"verify:corrupt": 1}
    assert "byte 100 is" in s["error_samples"][0]
    assert s["requests"] == s["completed"] == 300


async def test_a_hung_request_is_a_timeout_not_a_hang(tmp_path, capsys, monkeypatch):
    handle = RngBackend.handle
    hung: list[RngBackend] = []

    async def handle_or_hang(self, queue, chain, memory):
        if not hung:
            hung.append(self)
            await asyncio.Event().wait()  # never answers; the server's close cancels it
        return await handle(self, queue, chain, memory)

    monkeypatch.setattr(RngBackend, "handle", handle_or_hang)
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:
        status, s = await run_load(
            capsys,
            url_of(server, "unix"),
            "--sessions", "2",
            "--requests", "200",
            "--mix", "blk-read=1,blk-write=1,rng=2",
            "--timeout", "0.5",
            "--no-progress",
        )  # fmt: skip
    assert hung
    assert status == 1
    assert s["errors_by_kind"] == {"timeout": 1}
    assert s["ops"]["rng"]["errors"] == 1
    assert s["devices_out"] == {"left the workload after timeout": 1}
    assert s["requests"] == s["completed"] == 200  # everything else went on
    assert s["verify_failures"] == 0 and s["readback"]["unverified"] == 0


def test_against_a_served_platform_with_device_counts(tmp_path, capsys):
    sock = tmp_path / "load.sock"
    with serve(
        "--listen", f"unix://{sock}", "--device", "blk,size=256K,count=6", "--device", "rng,count=2"
    ) as served:  # fmt: skip
        status = asyncio.run(
            asyncio.wait_for(
                load.run(
                    parse(
                        served.url("unix"), "--sessions", "4", "--devices", "20",
                        "--requests", "300", "--json", "--no-progress",
                    )
                ),
                RUN_TIMEOUT,
            )
        )  # fmt: skip
    s = json.loads(capsys.readouterr().out)
    assert status == 0
    assert_clean(s, 300)
    assert (s["sessions"], s["devices"], s["platform_devices"]) == (4, 20, 8)
    assert s["devices_by_kind"] == {"blk": 16, "rng": 4}


async def test_a_server_that_drops_every_session_ends_the_run_without_losing_requests(
    tmp_path, capsys, monkeypatch
):
    """The run is asked for an hour; it ends as soon as every device has left the workload
    (the test's RUN_TIMEOUT would fail it otherwise), once the server dropped the sessions in the
    middle of the workload (after it had served some requests of every session)."""
    handle = RngBackend.handle
    served: set[int] = set()  # sessions whose rng requests the server has handled
    workload_running = asyncio.Event()

    async def handle_and_count(self, queue, chain, memory):
        served.add(id(memory))  # one guest memory per session
        if len(served) == 2:
            workload_running.set()
        return await handle(self, queue, chain, memory)

    monkeypatch.setattr(RngBackend, "handle", handle_and_count)
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:

        async def drop_sessions() -> None:
            await workload_running.wait()
            for session in list(server.sessions):
                session.transport.close()

        dropper = asyncio.create_task(drop_sessions())
        try:
            status, s = await run_load(
                capsys, url_of(server, "unix"), "--sessions", "2", "--duration", "3600",
                "--no-progress",
            )  # fmt: skip
        finally:
            dropper.cancel()
        assert dropper.done() and not dropper.cancelled()
    assert status == 1
    assert s["requests"] == s["completed"] > 0
    assert s["devices_out"] and sum(s["devices_out"].values()) == 24
    assert "ConnectionClosed" in s["errors_by_kind"]
    assert s["readback"]["unverified"] + s["readback"]["errors"] >= s["written_blocks"] > 0


async def test_a_silent_server_is_an_error_not_a_hang(tmp_path):
    async def accept_and_say_nothing(reader, writer) -> None:
        await reader.read()
        writer.close()

    silent = await asyncio.start_unix_server(accept_and_say_nothing, tmp_path / "silent.sock")
    async with silent:
        args = parse(f"unix://{tmp_path}/silent.sock", "--timeout", "0.3", "--no-progress")
        with pytest.raises(ConnectionError, match=r"did not answer within --timeout 0\.3 s"):
            await asyncio.wait_for(load.run(args), RUN_TIMEOUT)
