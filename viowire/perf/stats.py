"""Results: medians of several runs with their spread, ratios to a baseline, targets, a table.

A result is a plain dict, so it goes to JSON as it is::

    {"name", "value", "unit", "baseline", "ratio", "loop", "socket",
     "runs", "spread", "value_range", "baseline_range", "ratio_range",
     "target", "meets_target", "note", ...}

Latency figures add the tail of every sample of every run (:func:`tails`): ``p90``, ``p99``,
``p99_9``, ``max`` and ``histogram``, the encoded HdrHistogram of those samples (the form of
:mod:`viowire.load.latency`: results of several processes or machines merge exactly), and
``baseline_p99`` and ``baseline_histogram`` for the baseline.

``ratio`` is the median of the per-run ratios (each run measures viowire and its baseline back
to back), which cancels most of the drift of a shared machine; ``value`` and ``baseline`` are
the medians of their own runs. ``spread`` is (max - min) / median of ``value``.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

from viowire.load.latency import NS_PER_US, Latency

KEYS = ("name", "value", "unit", "baseline", "ratio", "loop", "socket")


@dataclass(frozen=True)
class Target:
    """``ratio <= 1.25``, ``ratio >= 0.5``, ``value <= 2.0`` ... checked on the medians."""

    field: str  # "ratio" or "value"
    op: str  # "<=" or ">="
    limit: float

    def __str__(self) -> str:
        unit = "x" if self.field == "ratio" else ""
        return f"{self.field} {self.op} {self.limit:.4g}{unit}"

    def met(self, result: dict) -> bool | None:
        got = result.get(self.field)
        if got is None or (isinstance(got, float) and math.isnan(got)):
            return None
        return got <= self.limit if self.op == "<=" else got >= self.limit


def percentile(samples: Sequence[float], q: float) -> float:
    """The q-th percentile (0..100) by nearest rank; samples need not be sorted."""
    ordered = sorted(samples)
    if not ordered:
        return math.nan
    rank = max(0, min(len(ordered) - 1, math.ceil(q / 100 * len(ordered)) - 1))
    return ordered[rank]


def tails(values: Sequence[Sequence[float]], baselines: Sequence[Sequence[float] | None]) -> dict:
    """p90, p99, p99.9 and max (µs) of every sample of every run, within 1 % (an HdrHistogram
    of them all: one run's p99 rests on few samples, the median of runs' p99s on fewer); the
    encoded histograms of the samples and of the baseline's."""
    ours = _histogram(values)
    summary = ours.summary()
    out: dict[str, object] = {key: summary[key] for key in ("p90", "p99", "p99_9", "max")}
    out["histogram"] = ours.encode()
    theirs = _histogram([b for b in baselines if b])
    if theirs.count:
        out["baseline_p99"] = theirs.summary()["p99"]
        out["baseline_histogram"] = theirs.encode()
    return out


def _histogram(runs: Sequence[Sequence[float]]) -> Latency:
    latency = Latency()
    for samples in runs:
        for us in samples:
            latency.record(round(us * NS_PER_US))
    return latency


def _median(values: Sequence[float | None]) -> float | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return statistics.median(present) if present else None


def _range(values: Sequence[float | None]) -> list[float] | None:
    present = [v for v in values if v is not None and not math.isnan(v)]
    return [min(present), max(present)] if present else None


def summarise(
    name: str,
    unit: str,
    values: Sequence[float],
    baselines: Sequence[float | None],
    *,
    loop: str | None,
    socket: str | None,
    target: Target | None = None,
    **extra: object,
) -> dict:
    """One result from paired per-run samples (``baselines[i]`` measured next to ``values[i]``)."""
    ratios = [
        v / b if b not in (None, 0) and v is not None else None
        for v, b in zip(values, baselines, strict=True)
    ]
    value = _median(values)
    result = {
        "name": name,
        "value": value,
        "unit": unit,
        "baseline": _median(baselines),
        "ratio": _median(ratios),
        "loop": loop,
        "socket": socket,
        "runs": len(values),
        "spread": (max(values) - min(values)) / value if value else None,
        "value_range": _range(values),
        "baseline_range": _range(baselines),
        "ratio_range": _range(ratios),
    }
    if target is not None:
        result["target"] = str(target)
        result["meets_target"] = target.met(result)
    for key, samples in extra.items():
        # lists of per-run numbers become their median; anything else is kept as it is
        if isinstance(samples, list) and samples and isinstance(samples[0], int | float):
            result[key] = _median(samples)
        else:
            result[key] = samples
    return result


def _fmt(value: object) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        magnitude = abs(value)
        if magnitude >= 1000:
            return f"{value:,.0f}"
        if magnitude >= 100:
            return f"{value:.0f}"
        if magnitude >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}"
    return str(value)


def _pattern(names: list[str]) -> str:
    """``blk.read.shared.qd1`` and ``blk.write.shared.qd32`` -> ``blk.*.shared.*``."""
    split = [n.split(".") for n in dict.fromkeys(names)]
    if len({len(parts) for parts in split}) != 1:
        return ", ".join(dict.fromkeys(names))
    return ".".join(
        column[0] if len(set(column)) == 1 else "*" for column in zip(*split, strict=True)
    )


def table(results: Sequence[dict]) -> str:
    """An aligned table: name, loop/socket, value ± spread, baseline, ratio, target."""
    header = ("benchmark", "loop/socket", "value", "unit", "baseline", "ratio", "target", "")
    rows = [header]
    for r in results:
        spread = r.get("spread")
        value = _fmt(r["value"]) + (f" ±{spread / 2:.0%}" if spread else "")
        if r.get("p99") is not None:
            value += f" (p99 {_fmt(r['p99'])})"
        ratio = r.get("ratio")
        met = r.get("meets_target")
        rows.append(
            (
                r["name"],
                f"{r.get('loop') or '-'}/{r.get('socket') or '-'}",
                value,
                r["unit"],
                _fmt(r.get("baseline")),
                f"{ratio:.2f}x" if isinstance(ratio, float) else "-",
                r.get("target", ""),
                {True: "ok", False: "MISSED", None: ""}[met],
            )
        )
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(header))]
    right = {2, 4, 5}
    lines = []
    for row in rows:
        cells = [
            str(cell).rjust(widths[i]) if i in right else str(cell).ljust(widths[i])
            for i, cell in enumerate(row)
        ]
        lines.append("  ".join(cells).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    groups: dict[str, list[str]] = {}
    for r in results:
        if r.get("baseline_name"):
            groups.setdefault(r["baseline_name"], []).append(r["name"])
    if groups:
        lines += ["", "baselines:"]
        lines += [f"  {_pattern(names)}: {text}" for text, names in groups.items()]
    notes = [f"  {r['name']}: {r['note']}" for r in results if r.get("note")]
    if notes:
        lines += ["", "notes:", *dict.fromkeys(notes)]
    lines += [
        "",
        "value and baseline: medians of the runs; ratio = value / baseline, the median of the "
        "per-run ratios; ± half the spread (max - min) of the runs around the median",
    ]
    return "\n".join(lines)
