"""What ``viowire load`` leaves behind besides its summary, from real runs against real servers:
the progress line's rate (the summary's), the time series, the HTML report, histogram files
and ``viowire load merge``."""

from __future__ import annotations

import asyncio
import csv
import json
import re
from pathlib import Path
from xml.etree import ElementTree

import pytest
from servers import running_server, url_of
from test_load import LOAD_PLATFORM, RUN_TIMEOUT, parse, platform

from viowire import load
from viowire.load.latency import Latency
from viowire.options import UsageError


async def load_run(*argv: str) -> int:
    return await asyncio.wait_for(load.run(parse(*argv)), RUN_TIMEOUT)


async def test_the_progress_line_and_the_summary_give_the_same_rate(tmp_path, capsys):
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:
        status = await load_run(url_of(server, "unix"), "--sessions", "2", "--duration", "1.3")
    out, err = capsys.readouterr()
    assert status == 0
    last = [line for line in err.splitlines() if line.startswith("load:")][-1]
    rate, requests = re.search(r"\| ([\d,]+) req/s \| ([\d,]+) requests", last).groups()
    summary = re.search(r"^workload .*: ([\d,]+) requests \(([\d,]+)/s\)", out, re.M)
    assert summary is not None, out
    assert (requests, rate) == summary.groups()


# Two whole seconds in one format show the ticks keep to the second; the other formats need one.
@pytest.mark.parametrize(
    ("name", "fmt", "duration"),
    [("series.csv", None, 2.4), ("series.jsonl", None, 1.4), ("series.txt", "jsonl", 1.4)],
)
async def test_a_time_series_row_per_second(tmp_path, capsys, name, fmt, duration):
    path = tmp_path / name
    extra = ("--timeseries-format", fmt) if fmt else ()
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:
        status = await load_run(
            url_of(server, "unix"), "--sessions", "2", "--duration", str(duration), "--no-progress",
            "--json", "--timeseries", str(path), *extra,
        )  # fmt: skip
    summary = json.loads(capsys.readouterr().out)
    assert status == 0
    text = path.read_text()
    if name.endswith(".csv"):
        rows = list(csv.DictReader(text.splitlines()))
        per_op = {op: sum(int(r[f"{op}_requests"]) for r in rows) for op in summary["ops"]}
    else:
        rows = [json.loads(line) for line in text.splitlines()]
        per_op = {op: sum(r["ops"][op]["requests"] for r in rows) for op in summary["ops"]}
    # whole seconds, then the rest of the workload (scheduling may shift a tick a little)
    whole = int(duration)
    assert len(rows) == whole + 1
    times = [float(r["t"]) for r in rows]
    assert times[:whole] == pytest.approx(list(range(1, whole + 1)), abs=0.3)
    assert times[whole] == pytest.approx(summary["duration_s"], abs=0.01)
    assert sum(int(r["requests"]) for r in rows) == summary["completed"]
    assert per_op == {op: o["requests"] for op, o in summary["ops"].items()}
    for r in rows:
        assert 0 < float(r["p50_us"]) <= float(r["p99_us"])
        assert int(r["errors"]) == 0
        rate = int(r["requests"]) / float(r["seconds"])
        assert float(r["ops_per_s"]) == pytest.approx(rate, rel=0.005)  # "seconds" is to 1 ms
        assert float(r["mb_per_s"]) == pytest.approx(rate * 4096 / 1e6, rel=0.01)


def test_a_time_series_file_needs_a_known_format():
    with pytest.raises(ValueError, match=r"--timeseries x\.dat: name a \.csv or \.jsonl"):
        load.config.LoadConfig.from_args(parse("unix:///x", "--timeseries", "x.dat"))


async def test_a_self_contained_html_report(tmp_path, capsys):
    page = tmp_path / "run.html"
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:
        status = await load_run(
            url_of(server, "unix"), "--sessions", "2", "--duration", "1.5", "--no-progress",
            "--report", str(page),
        )  # fmt: skip
    out = capsys.readouterr().out
    assert status == 0
    text = page.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.rstrip().endswith("</html>")
    # nothing fetched: no scripts, stylesheets or images from anywhere, no URL but SVG's namespace
    assert not re.search(r"<script|<link|<img|src=|href=|@import|url\(", text)
    assert set(re.findall(r"https?://[^'\" ]+", text)) == {"http://www.w3.org/2000/svg"}
    assert text.count("<svg") == 2 + 3  # latency and rate over time; a histogram per operation
    for svg in re.findall(r"<svg.*?</svg>", text, re.S):
        ElementTree.fromstring(svg)  # well-formed, so a browser draws it
    assert text.count("<polyline") >= 2 * 3 + 3  # p50 and p99 per operation; rates
    for op in ("blk-read", "blk-write", "rng"):
        assert f"Latency histogram: {op}" in text
    assert "result     OK" in text and "result     OK" in out  # the summary, escaped, beneath


async def test_histogram_files_of_two_clients_merge_into_one_summary(tmp_path, capsys):
    out_dir = tmp_path / "histograms"
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:
        url = url_of(server, "unix")
        runs = await asyncio.gather(
            *(
                load_run(url, "--sessions", "2", "--requests", str(n), "--no-progress", "--json",
                         "--histogram-out", f"{out_dir}/", "--seed", str(n))
                for n in (300, 500)
            )
        )  # fmt: skip
    assert runs == [0, 0]
    # two clients in one process: one file name (host, pid); a third run names its own file
    files = sorted(out_dir.glob("*.json"))
    assert len(files) == 1
    capsys.readouterr()
    first = json.loads(files[0].read_text())
    assert first["format"] == "viowire-load-histograms" and first["summary"]["completed"] in (
        300,
        500,
    )
    second = tmp_path / "second.json"
    async with running_server(tmp_path, platform(*LOAD_PLATFORM)) as server:
        status = await load_run(
            url_of(server, "unix"), "--sessions", "3", "--requests", "400", "--no-progress",
            "--json", "--histogram-out", str(second),
        )  # fmt: skip
    assert status == 0
    alone = json.loads(capsys.readouterr().out)
    assert json.loads(second.read_text())["summary"] == alone

    assert await load_run("merge", str(files[0]), str(second), "--json") == 0
    merged = json.loads(capsys.readouterr().out)
    a, b = first["summary"], alone
    assert merged["runs"] == 2 and merged["ok"] is True
    for key in ("requests", "completed", "bytes", "sessions", "devices", "written_blocks"):
        assert merged[key] == a[key] + b[key], key
    assert merged["requests_per_s"] == pytest.approx(a["requests_per_s"] + b["requests_per_s"])
    lat, la, lb = merged["latency_us"], a["latency_us"], b["latency_us"]
    assert lat["count"] == la["count"] + lb["count"] == merged["completed"]
    assert lat["max"] == max(la["max"], lb["max"]) and lat["min"] == min(la["min"], lb["min"])
    assert min(la["p50"], lb["p50"]) <= lat["p50"] <= max(la["p50"], lb["p50"])
    whole = Latency()
    for doc in (first, json.loads(second.read_text())):
        for encoded in doc["latency"]["ops"].values():
            whole.merge(Latency.decode(encoded))
    assert lat == whole.summary()  # from the histograms, not an average of percentiles
    for op, o in merged["ops"].items():
        assert o["requests"] == a["ops"].get(op, {}).get("requests", 0) + b["ops"][op]["requests"]
    fair = merged["fairness"]["blk"]
    assert fair["devices"] == a["fairness"]["blk"]["devices"] + b["fairness"]["blk"]["devices"]
    assert merged["readback"]["verified"] == a["readback"]["verified"] + b["readback"]["verified"]

    assert await load_run("merge", str(files[0]), str(second)) == 0
    text = capsys.readouterr().out
    assert re.search(r"^merged +2 runs", text, re.M)
    assert re.search(rf"^workload .*: {merged['completed']:,} requests", text, re.M)
    assert re.search(r"^result +OK", text, re.M)


async def test_merge_refuses_what_it_cannot_merge(tmp_path):
    other = tmp_path / "other.json"
    other.write_text('{"results": []}')
    with pytest.raises(ValueError, match="not a file of viowire load --histogram-out"):
        await load_run("merge", str(other))
    with pytest.raises(ValueError, match="cannot read a load histogram file"):
        await load_run("merge", str(tmp_path / "missing.json"))
    with pytest.raises(ValueError, match="give one or more files"):
        await load_run("merge")
    with pytest.raises(UsageError, match="viowire load merge FILES"):
        await load_run("unix:///x", "unix:///y")


def test_the_merge_command_runs_from_the_shell(tmp_path):
    from cli_run import viowire

    result = viowire("load", "merge", str(Path(tmp_path) / "none.json"))
    assert result.returncode != 0 and "none.json" in result.stderr


def test_the_commands_of_docs_load_md_run_as_written(tmp_path):
    """The first example of docs/load.md in a fresh directory (its --duration cut to 1 s), run
    twice as two clients would, then its merge line over what they wrote."""
    from cli_run import CONSOLE_SCRIPT, run

    docs = (Path(__file__).resolve().parent.parent / "docs" / "load.md").read_text()
    block = re.search(r"```sh\n(.*?)```", docs, re.S)[1]
    load_line, merge_line = block.replace("\\\n", " ").strip().splitlines()
    assert load_line.startswith("viowire load --device") and "--duration 3" in load_line
    load_line = load_line.replace("--duration 3", "--duration 1")
    for _ in range(2):
        done = run(["sh", "-c", load_line.replace("viowire", str(CONSOLE_SCRIPT), 1)], cwd=tmp_path)
        assert done.returncode == 0, done.stderr
        assert re.search(r"^result +OK", done.stdout, re.M)
    assert (tmp_path / "run.html").read_text().startswith("<!DOCTYPE html>")
    assert (tmp_path / "run.csv").read_text().startswith("t,seconds,requests,")
    assert len(list((tmp_path / "results").glob("load-*.json"))) == 2
    merged = run(["sh", "-c", merge_line.replace("viowire", str(CONSOLE_SCRIPT), 1)], cwd=tmp_path)
    assert merged.returncode == 0, merged.stderr
    assert re.search(r"^merged +2 runs", merged.stdout, re.M)
