"""A log-linear latency histogram (HDR-like): 16 linear sub-buckets per power of two.

Values are integers (microseconds here). Below 32 every value has its own bucket; above, a
bucket spans 1/16 of its power of two, so a reported percentile is within 6.25 % of the true
value whatever the range, in a fixed ~700 counters. Recording is one ``bit_length`` and one list
increment; two histograms merge by adding counters. Exact min, max and sum are kept beside.

(``hdrhistogram`` on PyPI does the same with configurable precision; for one fixed precision
these forty lines are cheaper than a dependency.)
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence

SUB_BITS = 4  # 2**4 = 16 sub-buckets per power of two: <= 6.25 % relative error
MAX_SHIFT = 44  # up to ~2**49 us (about 18 years): plenty
PERCENTILES = (50.0, 90.0, 99.0, 99.9)
_BUCKETS = (MAX_SHIFT + 2) << SUB_BITS


def bucket_index(value: int, sub_bits: int = SUB_BITS) -> int:
    """The bucket of ``value`` (>= 0): ``value`` itself below 2 * 2**sub_bits, then 2**sub_bits
    buckets per power of two."""
    shift = value.bit_length() - sub_bits - 1
    if shift <= 0:
        return value
    return (shift << sub_bits) + (value >> shift)


def bucket_bounds(index: int, sub_bits: int = SUB_BITS) -> tuple[int, int]:
    """The lowest and highest value that land in bucket ``index``."""
    if index < 2 << sub_bits:
        return index, index
    shift = (index >> sub_bits) - 1
    mantissa = (1 << sub_bits) + (index & ((1 << sub_bits) - 1))
    return mantissa << shift, ((mantissa + 1) << shift) - 1


MAX_VALUE = bucket_bounds(_BUCKETS - 1)[1]


class LogHistogram:
    """Counts of values in log-linear buckets, with exact count, sum, min and max."""

    __slots__ = ("count", "counts", "max", "min", "total")

    def __init__(self) -> None:
        self.counts = [0] * _BUCKETS
        self.count = 0
        self.total = 0
        self.min = 0
        self.max = 0

    def record(self, value: int) -> None:
        value = min(max(value, 0), MAX_VALUE)
        self.counts[bucket_index(value)] += 1
        if not self.count or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += 1
        self.total += value

    def merge(self, other: LogHistogram) -> None:
        if not other.count:
            return
        self.counts = [a + b for a, b in zip(self.counts, other.counts, strict=True)]
        self.min = min(self.min, other.min) if self.count else other.min
        self.max = max(self.max, other.max)
        self.count += other.count
        self.total += other.total

    def percentile(self, q: float) -> int:
        """The value at or below which ``q`` % of the recorded values lie (the upper bound of
        its bucket, kept within the exact min and max); 0 when empty."""
        if not self.count:
            return 0
        rank = max(1, math.ceil(q / 100 * self.count))
        seen = 0
        for index, n in enumerate(self.counts):
            seen += n
            if seen >= rank:
                return min(max(bucket_bounds(index)[1], self.min), self.max)
        return self.max

    @property
    def mean(self) -> float:
        return self.total / self.count if self.count else 0.0

    def buckets(self) -> Iterator[tuple[int, int, int]]:
        """(low, high, count) of every non-empty bucket, in order."""
        for index, n in enumerate(self.counts):
            if n:
                low, high = bucket_bounds(index)
                yield low, high, n

    def summary(self) -> dict[str, float | int]:
        """count, min, mean, p50, p90, p99, p99_9, max."""
        out: dict[str, float | int] = {"count": self.count, "min": self.min}
        out["mean"] = round(self.mean, 1)
        for q in PERCENTILES:
            out[f"p{q:g}".replace(".", "_")] = self.percentile(q)
        out["max"] = self.max
        return out


def rows(buckets: Iterable[Sequence[int]], sub_bits: int = 2) -> list[tuple[int, int, int]]:
    """(low, high, count) of coarser buckets, 2**sub_bits per power of two, from the lowest to
    the highest non-empty one: the rows of a text histogram. ``buckets`` are (low, high, count)
    of this module's buckets, each of which lies inside one coarser bucket."""
    counts: dict[int, int] = {}
    for low, _, n in buckets:
        index = bucket_index(low, sub_bits)
        counts[index] = counts.get(index, 0) + n
    if not counts:
        return []
    return [
        (*bucket_bounds(index, sub_bits), counts.get(index, 0))
        for index in range(min(counts), max(counts) + 1)
    ]
