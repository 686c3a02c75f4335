"""Latency histograms: HdrHistogram, nanoseconds recorded, microseconds reported.

``hdrhistogram`` (PyPI; the C-accelerated port of Gil Tene's HdrHistogram) with two significant
digits keeps 128 linear sub-buckets per power of two from 1 ns to an hour: a reported percentile
is within 1/128 (0.8 %) of the recorded value, whatever the range, in 4,608 counters. Recording is
one C call; merging adds counters; :meth:`Latency.encode` gives the standard compressed,
base64 form ("HISTFAAA..."), which any HdrHistogram implementation (Java, C, Go, Rust, the
HistogramLogAnalyzer) decodes and merges, so histograms of many load clients, on many machines,
combine exactly (``viowire load merge``).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

from hdrh.histogram import HdrHistogram

LOWEST_NS = 1
HIGHEST_NS = 3600 * 10**9  # an hour: a request that took longer is recorded as an hour
SIGNIFICANT_DIGITS = 2  # 128 sub-buckets per power of two: <= 1/128 relative error
RELATIVE_ERROR = 1 / 128
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
NS_PER_US = 1000
MAX_ROWS = 16  # of a histogram table


def percentile_key(q: float) -> str:
    """50 -> 'p50', 99.9 -> 'p99_9' (the keys of :meth:`Latency.summary`)."""
    return f"p{q:g}".replace(".", "_")


class Latency:
    """One histogram of request latencies in nanoseconds."""

    __slots__ = ("hist",)

    def __init__(self, hist: HdrHistogram | None = None) -> None:
        self.hist = hist or HdrHistogram(LOWEST_NS, HIGHEST_NS, SIGNIFICANT_DIGITS)

    def record(self, ns: int) -> None:
        self.hist.record_value(min(max(ns, 0), HIGHEST_NS))

    @property
    def count(self) -> int:
        return self.hist.get_total_count()

    def merge(self, other: Latency) -> None:
        if other.count:
            self.hist.add(other.hist)

    def encode(self) -> str:
        """The standard compressed HdrHistogram form, base64 (ASCII)."""
        return self.hist.encode().decode("ascii")

    @classmethod
    def decode(cls, text: str) -> Latency:
        try:
            decoded = HdrHistogram.decode(text.encode("ascii"))
        except Exception as exc:  # the library raises several kinds on bad input
            raise ValueError(f"not an encoded HdrHistogram ({exc})") from None
        latency = cls()
        latency.hist.add(decoded)  # into our own range and precision
        return latency

    def percentile_us(self, q: float) -> float:
        """The value at or below which ``q`` % of the recorded latencies lie, in microseconds."""
        return self.percentiles_us([q])[0]

    def percentiles_us(self, qs: Sequence[float]) -> list[float]:
        """Percentiles by nearest rank (the smallest value with at least ``q`` % of the values
        at or below it), each the highest value of its bucket: never below the truth, at most
        1/128 above. (HdrHistogram's own rounds the rank to the nearest; this is the usual
        definition, and the one the tests check against.)"""
        n = self.count
        if not n:
            return [0.0 for _ in qs]
        ranks = [max(1, math.ceil(q * n / 100 - 1e-9)) for q in qs]
        out = [0.0] * len(qs)
        pending = sorted(range(len(qs)), key=ranks.__getitem__)
        seen = 0
        for _, high, count in self.values():
            seen += count
            while pending and ranks[pending[0]] <= seen:
                out[pending.pop(0)] = _us(high)
            if not pending:
                break
        return out

    def summary(self) -> dict[str, float | int]:
        """count, min, mean, p50, p90, p99, p99_9, max (microseconds)."""
        hist = self.hist
        out: dict[str, float | int] = {"count": self.count}
        out["min"] = _us(hist.get_min_value()) if self.count else 0.0
        out["mean"] = _us(hist.get_mean_value()) if self.count else 0.0
        for q, value in zip(PERCENTILES, self.percentiles_us(PERCENTILES), strict=True):
            out[percentile_key(q)] = value
        out["max"] = _us(hist.get_max_value()) if self.count else 0.0
        return out

    def values(self) -> list[tuple[int, int, int]]:
        """(lowest, highest, count) in nanoseconds of every non-empty bucket, in order."""
        hist = self.hist
        return [
            (
                hist.get_lowest_equivalent_value(item.value_iterated_to),
                item.value_iterated_to,
                item.count_added_in_this_iter_step,
            )
            for item in hist.get_recorded_iterator()
        ]

    def rows(self, max_rows: int = MAX_ROWS) -> list[tuple[float, float, int]]:
        """(low, high, count) in microseconds, from the lowest to the highest non-empty row, at
        the finest of 4, 2 or 1 rows per power of two that fits ``max_rows`` rows (at most
        ``max_rows`` unless the latencies span more powers of two): a text histogram's rows."""
        values = self.values()
        for per_octave in (4, 2):
            table = log_rows(values, per_octave)
            if len(table) <= max_rows:
                return table
        return log_rows(values, 1)


def log_rows(values: Iterable[Sequence[int]], per_octave: int) -> list[tuple[float, float, int]]:
    """Buckets of nanoseconds (low, high, count) gathered into rows of ``per_octave`` per power
    of two, in microseconds; rows are contiguous (an empty row between two counts is kept)."""
    counts: dict[int, int] = {}
    for low, _, n in values:
        row = math.floor(math.log2(max(low, 1)) * per_octave)
        counts[row] = counts.get(row, 0) + n
    if not counts:
        return []
    return [
        (_us(2 ** (row / per_octave)), _us(2 ** ((row + 1) / per_octave)), counts.get(row, 0))
        for row in range(min(counts), max(counts) + 1)
    ]


def _us(ns: float) -> float:
    return round(ns / NS_PER_US, 3)
