"""The latency histogram of ``viowire load`` (HdrHistogram): its error bound against exact
percentiles of random data, merging, the encoded form, and its table rows."""

from __future__ import annotations

import itertools
import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from viowire.load.latency import HIGHEST_NS, PERCENTILES, RELATIVE_ERROR, Latency, percentile_key

ONE_PERCENT = 0.01


def exact_percentile(values: list[int], q: float) -> int:
    """Nearest rank: the smallest value with at least q % of the values at or below it."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q / 100 * len(ordered)) - 1)]


def recorded(values: list[int]) -> Latency:
    latency = Latency()
    for value in values:
        latency.record(value)
    return latency


latencies_ns = st.lists(
    st.one_of(
        st.integers(0, 2_000),  # below the first power of two that has sub-buckets
        st.integers(1_000, 10**7),  # microseconds to milliseconds
        st.integers(10**7, 10**11),  # up to minutes: the tail
    ),
    min_size=1,
    max_size=400,
)


@settings(max_examples=150, deadline=None)
@given(values=latencies_ns, q=st.sampled_from([*PERCENTILES, 0.1, 75.0, 99.99, 100.0]))
def test_every_percentile_is_within_one_percent_of_the_exact_one(values, q):
    latency = recorded(values)
    exact = exact_percentile(values, q) / 1000
    got = latency.percentile_us(q)
    assert got >= exact - 0.0005  # never below the truth (to the ns rounding of µs)
    assert got <= exact * (1 + ONE_PERCENT) + 0.0005
    summary = latency.summary()
    assert summary["count"] == len(values)
    assert abs(summary["max"] - max(values) / 1000) <= max(values) / 1000 * ONE_PERCENT + 0.0005
    assert abs(summary["min"] - min(values) / 1000) <= min(values) / 1000 * ONE_PERCENT + 0.0005


def test_the_bound_holds_on_a_large_heavy_tailed_sample():
    rng = random.Random(13)
    values = [int(rng.lognormvariate(11, 1.8)) for _ in range(100_000)]
    latency = recorded(values)
    for q in PERCENTILES:
        exact = exact_percentile(values, q)
        error = latency.percentile_us(q) * 1000 / exact - 1
        assert 0 <= error <= RELATIVE_ERROR <= ONE_PERCENT, q


@settings(max_examples=60, deadline=None)
@given(values=latencies_ns, cut=st.integers(0, 400))
def test_merged_parts_and_decoded_parts_equal_the_whole(values, cut):
    whole = recorded(values)
    left, right = recorded(values[:cut]), recorded(values[cut:])
    merged = Latency()
    merged.merge(Latency.decode(left.encode()))  # as from another process's file
    merged.merge(Latency.decode(right.encode()))
    assert merged.summary() == whole.summary()
    assert merged.values() == whole.values()


def test_empty_histograms_and_out_of_range_values():
    empty = Latency()
    assert empty.summary() == {
        "count": 0, "min": 0.0, "mean": 0.0, "max": 0.0,
        **{percentile_key(q): 0.0 for q in PERCENTILES},
    }  # fmt: skip
    assert empty.rows() == [] and Latency.decode(empty.encode()).count == 0
    latency = recorded([-5, HIGHEST_NS * 10])  # a clock that stepped back; a runaway request
    assert latency.count == 2
    assert latency.summary()["min"] == 0.0
    assert latency.summary()["max"] >= HIGHEST_NS / 1000
    with pytest.raises(ValueError, match="not an encoded HdrHistogram"):
        Latency.decode("HISTFAAA-garbage")


def test_table_rows_are_contiguous_cover_every_value_and_stay_short():
    rng = random.Random(7)
    values = [int(rng.lognormvariate(12, 0.8)) for _ in range(20_000)]
    table = recorded(values).rows()
    assert sum(n for _, _, n in table) == len(values)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(table))
    assert table[0][0] <= min(values) / 1000 and table[-1][1] >= max(values) / 1000 * 0.99
    assert len(table) <= 16
    narrow = recorded([50_000, 51_000, 60_000]).rows()  # one power of two: quarter octaves
    assert 1 <= len(narrow) <= 4 and sum(n for *_, n in narrow) == 3


def test_bench_latency_tails_come_from_every_sample_of_every_run():
    from viowire.perf.stats import tails

    rng = random.Random(3)
    runs = [[rng.uniform(20, 80) for _ in range(500)] for _ in range(3)]
    runs[1][:10] = [5000.0] * 10  # one run's tail: 10 of 1500 samples, above p99
    out = tails(runs, [None, None, None])
    samples = [round(us * 1000) for run in runs for us in run]
    for key, q in (("p90", 90), ("p99", 99), ("p99_9", 99.9)):
        exact = exact_percentile(samples, q) / 1000
        assert exact <= out[key] <= exact * (1 + ONE_PERCENT), key
    assert out["p99_9"] >= 5000 > out["p99"]
    assert Latency.decode(out["histogram"]).count == 1500
    assert "baseline_p99" not in out
    with_baseline = tails(runs, [[10.0, 12.0], None, [11.0]])
    assert with_baseline["baseline_p99"] == pytest.approx(12.0, rel=ONE_PERCENT)
    assert Latency.decode(with_baseline["baseline_histogram"]).count == 3
