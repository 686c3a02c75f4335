"""benchmarks/device_sdk.py runs every figure and reports the suite's shape; no timing is
asserted (its figures are in benchmarks/README.md)."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from viowire.perf.stats import KEYS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "device_sdk.py"
NAMES = [
    "latency.qd32",
    "sessions10.latency",
    "sessions10.file",
    "idle.read_rtt",
    "idle.read_rtt.ram",
    "idle.read_rtt.threads",
]


@pytest.mark.timeout(180)
def test_every_figure_runs():
    tiny = ["--runs", "1", "--seconds", "0.1", "--samples", "50", "--json"]
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *tiny], capture_output=True, text=True, timeout=150
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout)["results"]
    assert [r["name"] for r in results] == NAMES
    for result in results:
        assert set(KEYS) <= set(result), result
        assert isinstance(result["value"], float) and not math.isnan(result["value"])
        assert isinstance(result["baseline"], float) and result["baseline"] > 0
        assert result.get("meets_target") in (True, False, None)
    assert all(r["stream_iops"] > 0 for r in results if r["name"].startswith("idle."))
