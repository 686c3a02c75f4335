"""``load --metrics``: a load run's counters as Prometheus metrics, read at scrape time.

:class:`LoadCollector` reads what the run counts anyway (:mod:`viowire.load.stats`): nothing is
added to the request path. Labels are the operation (``blk-read``, ``rng``, ...) and the phase
(``workload``, ``readback``), never a session or a device. Latency is given as quantile gauges
from the run's own HdrHistograms (the figures the summary prints), not as a second histogram.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

if TYPE_CHECKING:
    from viowire.load.runner import LoadRun
    from viowire.load.stats import Stats

QUANTILES = (50.0, 90.0, 99.0, 99.9)
PHASES = ("plan", "connect", "bring-up", "workload", "read-back")  # LoadRun.phase, in order
_US = 1e-6


class LoadCollector:
    """The metrics of one :class:`~viowire.load.runner.LoadRun`, as it goes."""

    def __init__(self, run: LoadRun) -> None:
        self.run = run

    def describe(self) -> list[Metric]:
        return []

    def collect(self) -> Iterator[Metric]:
        run = self.run
        yield GaugeMetricFamily("viowire_load_sessions", "Sessions up", value=run.sessions_up)
        yield GaugeMetricFamily("viowire_load_devices", "Devices brought up", value=run.devices_up)
        phase = GaugeMetricFamily(
            "viowire_load_phase", "The run's phase (1: now)", labels=["phase"]
        )
        for name in dict.fromkeys((*PHASES, run.phase)):  # every phase, so no series vanishes
            phase.add_metric([name], int(name == run.phase))
        yield phase
        labels = ["phase", "op"]
        requests = CounterMetricFamily("viowire_load_requests", "Requests completed", labels=labels)
        errors = CounterMetricFamily(
            "viowire_load_errors", "Requests completed with an error or timed out", labels=labels
        )
        moved = CounterMetricFamily("viowire_load_bytes", "Bytes moved", labels=labels)
        latency = GaugeMetricFamily(
            "viowire_load_latency_seconds",
            "Request latency quantiles of the run so far (the summary's figures)",
            labels=[*labels, "quantile"],
        )
        verify = CounterMetricFamily(
            "viowire_load_verify_failures", "Data that failed verification", labels=["phase"]
        )
        for name, stats in (("workload", run.stats), ("readback", run.readback)):
            _add_phase(name, stats, requests, errors, moved, latency)
            verify.add_metric([name], stats.verify_failures)
        yield from (requests, errors, moved, latency, verify)


def _add_phase(name: str, stats: Stats, *families: Metric) -> None:
    requests, errors, moved, latency = families
    for op, counts in stats.ops.items():
        values = [name, op]
        requests.add_metric(values, counts.requests)
        errors.add_metric(values, counts.errors)
        moved.add_metric(values, counts.bytes)
        for q, us in zip(QUANTILES, counts.latency.percentiles_us(QUANTILES), strict=True):
            latency.add_metric([*values, f"{q / 100:g}"], us * _US)
