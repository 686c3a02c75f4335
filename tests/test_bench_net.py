"""``viowire bench``'s net figures: every case runs, spawned and against a running server, and
reports the right shape beside the same run's blk QD32 figure; no timing is asserted."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

from servers import running_server, url_of
from test_bench import TINY, check_shape, run_json

from viowire import bench
from viowire.perf import suite
from viowire.server.platform import DeviceSpec, PlatformSpec

NET_NAMES = [
    f"net.{kind}.{memory}.{size}"
    for kind in ("rtt", "stream")
    for size in (64, 1500)
    for memory in ("shared", "proxied")
]


def test_net_cases_are_listed_and_selected():
    assert [n for n in suite.all_names() if n.startswith("net.")] == NET_NAMES
    assert suite.select_names(["net.rtt"]) == NET_NAMES[:4]
    assert suite.select_names(["net.*.proxied.1500"]) == [
        "net.rtt.proxied.1500",
        "net.stream.proxied.1500",
    ]


def test_net_cases_spawned_beside_blk_qd32(capsys):
    results = run_json(
        capsys, [*TINY, "--loop", "asyncio", "--socket", "unix", "--only", "net",
                 "--only", "blk.read.shared.qd32"],
    )  # fmt: skip
    check_shape(results)
    assert [r["name"] for r in results] == [
        "blk.read.shared.qd32",
        *NET_NAMES,
        "blk.read.shared.qd32.poll",
    ]
    qd32 = results[0]["value"]
    for r in results[1:-1]:
        assert r["baseline"] is not None and r["ratio"] is not None, r["name"]
        assert r["frame_bytes"] == int(r["name"].rsplit(".", 1)[1])
        assert r["blk_read_shared_qd32_iops"] == qd32
        assert (r["loop"], r["socket"]) == ("asyncio", "unix")
        if ".rtt." in r["name"]:
            assert r["unit"] == "µs p50" and r["p99"] >= r["value"] > 0
            assert r["frames_per_s"] > 0
        else:
            assert r["unit"] == "frames/s" and r["depth"] == 32
            assert r["bytes_per_s"] == r["value"] * r["frame_bytes"]
        assert "proxied" not in r["name"] or r["baseline_name"].startswith("viowire with shared")


async def test_url_mode_measures_net_and_skips_it_without_net_devices(tmp_path, capsys):
    parser = argparse.ArgumentParser()
    bench.add_parser(parser.add_subparsers(dest="command"))
    spec = PlatformSpec([DeviceSpec.parse("blk,size=1M"), DeviceSpec.parse("net,link=x")])
    async with running_server(tmp_path, spec) as server:
        args = parser.parse_args(
            ["bench", url_of(server, "unix"), *TINY, "--loop", "uvloop", "--only", "net.rtt.*.64"]
        )
        assert await bench.run(args) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    check_shape(results)
    assert [r["name"] for r in results] == ["net.rtt.shared.64", "net.rtt.proxied.64"]
    assert results[0]["blk_read_shared_qd32_iops"] is None  # not measured in this run

    async with running_server(tmp_path) as server:  # blk and rng only
        args = parser.parse_args(
            ["bench", url_of(server, "unix"), *TINY, "--loop", "uvloop", "--only", "net.rtt"]
        )
        assert await bench.run(args) == 0
    assert json.loads(capsys.readouterr().out)["results"] == []


def test_net_scale_script_reaches_every_device_and_reports_memory():
    """benchmarks/net_scale.py, small: every device hears both broadcasts and stays healthy."""
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "net_scale.py"
    done = subprocess.run(
        [sys.executable, str(script), "--devices", "6", "--sessions", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    check_shape(results)
    by_name = {r["name"]: r for r in results}
    assert list(by_name) == [
        "broadcast",
        "memory.idle_net_device",
        "memory.live_net_device",
        "memory.link",
        "memory.port",
    ]
    assert by_name["broadcast"]["value"] == by_name["broadcast"]["baseline"] == 6
    assert by_name["broadcast"]["healthy"] == 6
    assert by_name["memory.link"]["value"] > 0 and by_name["memory.port"]["value"] > 0
