"""The benchmark suite runs every case and reports the right shape; no timing is asserted."""

from __future__ import annotations

import argparse
import json
import math

import pytest
from servers import running_server, url_of

from viowire import bench
from viowire.perf import suite
from viowire.perf.stats import KEYS, Target, summarise, table

TINY = ["--quick", "--runs", "1", "--seconds", "0.02", "--json"]
SIZES = ["--bringup-devices", "4", "--bringup-sessions", "2", "--memory-devices", "20"]


def run_json(capsys, argv: list[str]) -> list[dict]:
    assert suite.main(suite.parse(argv)) == 0
    return json.loads(capsys.readouterr().out)["results"]


def check_shape(results: list[dict]) -> None:
    for result in results:
        assert set(KEYS) <= set(result), result
        assert isinstance(result["name"], str) and isinstance(result["unit"], str)
        assert isinstance(result["value"], int | float) and not math.isnan(result["value"])
        for key in ("baseline", "ratio"):
            assert result[key] is None or isinstance(result[key], int | float)
        if "meets_target" in result:
            assert result["meets_target"] in (True, False, None)
            assert isinstance(result["target"], str)


def test_every_case_runs_spawned(capsys):
    """uvloop over a Unix socket, all of it: codec, worker cases, memory."""
    results = run_json(capsys, [*TINY, *SIZES, "--loop", "uvloop", "--socket", "unix"])
    check_shape(results)
    names = [r["name"] for r in results]
    assert names == suite.all_names()
    for result in results:
        if result["name"].startswith("codec."):
            assert result["loop"] is None and result["socket"] is None
        else:
            assert (result["loop"], result["socket"]) == ("uvloop", "unix")
        assert result["baseline"] is not None, result["name"]
    rtt = next(r for r in results if r["name"] == "mmio.read_rtt")
    assert "p99" in rtt and "baseline_p99" in rtt
    assert rtt["value"] <= rtt["p99"] <= rtt["p99_9"] <= rtt["max"]
    assert rtt["histogram"].startswith("HISTF")  # every sample of every run, mergeable


def test_asyncio_over_tcp_subset(capsys):
    only = ["--only", "mmio.read_rtt", "--only", "blk.read.*.qd1", "--only", "irq"]
    results = run_json(capsys, [*TINY, *only, "--loop", "asyncio", "--socket", "tcp"])
    check_shape(results)
    assert [r["name"] for r in results] == [
        "mmio.read_rtt",
        "blk.read.shared.qd1",
        "blk.read.proxied.qd1",
        "irq.latency",
    ]
    assert {(r["loop"], r["socket"]) for r in results} == {("asyncio", "tcp")}


async def test_url_mode_against_a_running_server(tmp_path, capsys):
    """``viowire bench URL`` measures that server; cases that need a spawned one are skipped."""
    async with running_server(tmp_path) as server:
        parser = argparse.ArgumentParser()
        bench.add_parser(parser.add_subparsers(dest="command"))
        args = parser.parse_args(
            [
                "bench",
                url_of(server, "unix"),
                *TINY,
                "--loop",
                "asyncio",
                "--only",
                "mmio.posted_write",
                "--only",
                "irq",
                "--only",
                "platform",
                "--only",
                "memory",
            ]
        )
        assert await bench.run(args) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    check_shape(results)
    assert [r["name"] for r in results] == ["mmio.posted_write", "platform.bringup"]


def test_selection_and_listing(capsys):
    assert suite.select_names(["blk.read.shared"]) == [
        "blk.read.shared.qd1",
        "blk.read.shared.qd32",
        "blk.read.shared.qd1.poll",
        "blk.read.shared.qd32.poll",
    ]
    assert suite.select_names(["blk.read.shared.qd1"]) == [
        "blk.read.shared.qd1",
        "blk.read.shared.qd1.poll",
    ]
    assert suite.select_names(["codec.irq"]) == ["codec.irq", "codec.irq.vs_construct"]
    with pytest.raises(ValueError, match="matches no benchmark"):
        suite.select_names(["nonesuch"])
    assert suite.main(suite.parse(["--list"])) == 0
    assert capsys.readouterr().out.split() == suite.all_names()


def test_summary_and_table():
    result = summarise(
        "x.rate",
        "ops/s",
        [10.0, 12.0, 11.0],
        [20.0, None, 22.0],
        loop="uvloop",
        socket="unix",
        target=Target("ratio", ">=", 0.5),
        p99=[1.0, 3.0, 2.0],
    )
    assert result["value"] == 11.0 and result["baseline"] == 21.0 and result["p99"] == 2.0
    assert result["ratio"] == pytest.approx((0.5 + 0.5) / 2)
    assert result["meets_target"] is True and result["runs"] == 3
    text = table([result])
    assert "x.rate" in text and "uvloop/unix" in text and "0.50x" in text


def test_profile_collapse():
    raw = (
        "proc;run (a/loop.py:1);work (viowire/server/mmio.py:5);send (libc.so.6) 3\n"
        "proc;run (a/loop.py:1);work (viowire/server/mmio.py:9) 1\n"
        "proc;run (a/loop.py:1);epoll_wait (libc.so.6) 6\n"
    )
    own, total, busy, idle = suite.collapse(raw)
    assert (busy, idle) == (4, 6)
    assert own == {"send (libc.so.6)": 3, "work (server/mmio.py)": 1}
    assert total["work (server/mmio.py)"] == 4
    assert "60% idle" in suite.profile_report("server", raw)
