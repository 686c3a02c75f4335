"""One row per second of a load's workload: rates, latency percentiles and errors, per operation.

:class:`TimeSeries` takes a row from a :class:`~viowire.load.stats.Stats` at each tick: the
counters' growth since the last row, over the seconds since it, and the percentiles of the
latencies recorded in between (the interval histograms, then folded into the run's). A
:class:`RowWriter` writes each row as it comes, as CSV or JSON lines, so a long run can be
followed with ``tail -f``.

Columns (CSV; a JSON line nests the per-operation ones under ``ops``): ``t`` (seconds since the
workload started, at the row's end), ``seconds`` (the row's length: 1, the last one shorter),
``requests`` (completed in the row), ``ops_per_s``, ``mb_per_s`` (10^6 bytes), ``p50_us``,
``p99_us``, ``errors``, then the same six for each operation OP: ``OP_requests``,
``OP_ops_per_s`` ... ``OP_errors``. Latencies are those of requests that completed without
error; ``requests`` and the rates count every completed request.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from viowire.load.latency import Latency

if TYPE_CHECKING:  # the options (config.py) read this module without the client's imports
    from viowire.load.stats import Stats

FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "jsonl"}
FIELDS = ("requests", "ops_per_s", "mb_per_s", "p50_us", "p99_us", "errors")


def per_second(count: float, seconds: float) -> float:
    """The one rate of a load run: ``count`` over ``seconds``, to 0.1 (the progress line, the
    summary and the time series all use it)."""
    return round(count / seconds, 1) if seconds > 0 else 0.0


def _fields(requests: int, nbytes: int, errors: int, latency: Latency, seconds: float) -> dict:
    p50, p99 = latency.percentiles_us((50, 99))
    return {
        "requests": requests,
        "ops_per_s": per_second(requests, seconds),
        "mb_per_s": round(per_second(nbytes, seconds) / 1e6, 3),
        "p50_us": p50,
        "p99_us": p99,
        "errors": errors,
    }


class TimeSeries:
    """Rows of ``stats`` (a workload's), each from the previous row's end to ``now``."""

    def __init__(self, stats: Stats, start: float) -> None:
        self.stats = stats
        self.last_t = start
        self.start = start
        self.rows: list[dict[str, Any]] = []
        self._seen = self._counters()

    def _counters(self) -> dict[str, tuple[int, int, int]]:
        out = {op: (o.requests, o.bytes, o.errors) for op, o in self.stats.ops.items()}
        out[""] = (self.stats.completed, self.stats.bytes, self.stats.error_count)
        return out

    def tick(self, now: float) -> dict[str, Any]:
        """The row from the last tick to ``now`` (seconds on the run's monotonic clock)."""
        seconds = now - self.last_t
        counters = self._counters()
        grown = {
            key: [a - b for a, b in zip(now_, self._seen[key], strict=True)]
            for key, now_ in counters.items()
        }
        recent = {op: o.roll() for op, o in self.stats.ops.items()}
        total = Latency()
        for latency in recent.values():
            total.merge(latency)
        row: dict[str, Any] = {"t": round(now - self.start, 3), "seconds": round(seconds, 3)}
        row |= _fields(*grown[""], total, seconds)
        row["ops"] = {op: _fields(*grown[op], recent[op], seconds) for op in recent}
        self.rows.append(row)
        self._seen, self.last_t = counters, now
        return row


def timeseries_format(path: str, given: str | None) -> str:
    """``csv`` or ``jsonl``: as given, else by the file's extension."""
    if given:
        return given
    fmt = FORMATS.get(Path(path).suffix.lower())
    if fmt is None:
        raise ValueError(
            f"--timeseries {path}: name a .csv or .jsonl file, or give --timeseries-format "
            "csv|jsonl"
        )
    return fmt


class RowWriter:
    """Writes rows to ``stream`` as they come, in ``fmt`` (``csv`` or ``jsonl``)."""

    def __init__(self, stream: TextIO, fmt: str, ops: list[str]) -> None:
        self.stream = stream
        self.fmt = fmt
        self.ops = ops
        self._csv: Any = None
        if fmt == "csv":
            columns = ["t", "seconds", *FIELDS] + [f"{op}_{f}" for op in ops for f in FIELDS]
            self._csv = csv.writer(stream)
            self._csv.writerow(columns)

    def write(self, row: dict[str, Any]) -> None:
        if self._csv is None:
            self.stream.write(json.dumps(row) + "\n")
        else:
            flat = [row["t"], row["seconds"], *(row[f] for f in FIELDS)]
            flat += [row["ops"][op][f] for op in self.ops for f in FIELDS]
            self._csv.writerow(flat)
        self.stream.flush()
