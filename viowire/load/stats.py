"""What a load run counts: requests, bytes, latency, errors by kind, and per-device shares.

One :class:`Stats` per phase (the workload, the final read-back). Recording a request is a few
list and counter updates and one histogram record, cheap enough for every request of a run.

Latencies go into a histogram of the current interval per operation; :meth:`Stats.roll` (once a
second, for the time series) folds it into the run's and starts the next, so a request is
recorded once and the time series costs nothing per request.
"""

from __future__ import annotations

import statistics
from collections import Counter
from dataclasses import dataclass, field

from viowire.client.connection import ProtocolError
from viowire.client.errors import RequestError
from viowire.load.latency import Latency
from viowire.protocol.messages import ErrorCode
from viowire.virtio.blk import BlkStatus

MAX_SAMPLES = 10  # error messages kept verbatim for the summary


def error_kind(exc: BaseException) -> str:
    """A short, countable name: ``timeout``, ``ProtocolError:BUS_ERROR``, ``RequestError:IOERR``,
    else the exception's class name."""
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, ProtocolError):
        return f"ProtocolError:{_name(ErrorCode, exc.code)}"
    if isinstance(exc, RequestError):
        return f"RequestError:{_name(BlkStatus, exc.status)}"
    return type(exc).__name__


def _name(enum_type: type, value: int) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return str(value)


@dataclass
class OpStats:
    requests: int = 0
    bytes: int = 0
    errors: int = 0
    lost: int = 0  # net frames a link dropped (errors too, unless loss is allowed)
    recent: Latency = field(default_factory=Latency)  # since the last roll
    settled: Latency = field(default_factory=Latency)  # up to the last roll

    def roll(self) -> Latency:
        """The latencies since the last roll, now folded into the run's."""
        recent, self.recent = self.recent, Latency()
        self.settled.merge(recent)
        return recent

    @property
    def latency(self) -> Latency:
        """Every latency of the phase so far (a copy: the current interval stays open)."""
        total = Latency()
        total.merge(self.settled)
        total.merge(self.recent)
        return total


class Stats:
    """Counters of one phase over ``devices`` devices (indexed 0..devices-1)."""

    def __init__(self, devices: int, ops: tuple[str, ...]) -> None:
        self.issued = 0
        self.completed = 0
        self.bytes = 0
        self.ops = {op: OpStats() for op in ops}
        self.errors: Counter[str] = Counter()
        self.verify_failures = 0
        self.samples: list[str] = []
        self.dev_requests = [0] * devices  # completed, with or without an error
        self.dev_timed = [0] * devices  # completed without an error: these have a latency
        self.dev_latency_ns = [0] * devices

    def ok(self, op: str, device: int, latency_ns: int, nbytes: int) -> None:
        self.completed += 1
        self.bytes += nbytes
        stats = self.ops[op]
        stats.requests += 1
        stats.bytes += nbytes
        stats.recent.record(latency_ns)
        self.dev_requests[device] += 1
        self.dev_timed[device] += 1
        self.dev_latency_ns[device] += latency_ns

    @property
    def latency(self) -> Latency:
        """Every latency of the phase so far, of every operation."""
        total = Latency()
        for stats in self.ops.values():
            total.merge(stats.latency)
        return total

    def failed(self, op: str, device: int, kind: str, message: str) -> None:
        """A request that completed with an error (or timed out): counted, not timed."""
        self.completed += 1
        self.ops[op].requests += 1
        self.ops[op].errors += 1
        self.dev_requests[device] += 1
        self.error(kind, message)

    def lost(self, op: str, device: int, message: str, *, error: bool) -> None:
        """A frame that never arrived: counted, not timed; an error of kind ``lost`` too if
        ``error`` (the run does not allow loss)."""
        self.ops[op].lost += 1
        if error:
            self.failed(op, device, "lost", message)
            return
        self.completed += 1
        self.ops[op].requests += 1
        self.dev_requests[device] += 1

    def error(self, kind: str, message: str) -> None:
        self.errors[kind] += 1
        if kind.startswith("verify"):
            self.verify_failures += 1
        if len(self.samples) < MAX_SAMPLES:
            self.samples.append(f"{kind}: {message}")

    @property
    def error_count(self) -> int:
        return sum(self.errors.values())

    def per_device(self) -> dict[str, list[int]]:
        """What :func:`fairness` reads, as plain lists (a histogram file keeps them)."""
        return {
            "requests": self.dev_requests,
            "timed": self.dev_timed,
            "latency_ns": self.dev_latency_ns,
        }


def fairness(
    per_device: dict[str, list[int]], names: list[str], devices: list[int]
) -> dict[str, object]:
    """How evenly ``devices`` (of one kind) were served: request counts (min, median, max), and
    the device with the highest mean latency against the median device's mean latency.
    ``per_device`` holds a :class:`Stats`'s ``requests``, ``timed`` and ``latency_ns`` lists (of
    one run, or of merged runs)."""
    if not devices:
        return {}
    requests = [per_device["requests"][i] for i in devices]
    timed, total_ns = per_device["timed"], per_device["latency_ns"]
    means = [(total_ns[i] / timed[i] / 1000, i) for i in devices if timed[i]]
    out: dict[str, object] = {
        "devices": len(devices),
        "requests_min": min(requests),
        "requests_median": statistics.median(requests),
        "requests_max": max(requests),
        "idle_devices": sum(1 for n in requests if not n),
    }
    if means:
        median = statistics.median(mean for mean, _ in means)
        slowest, at = max(means)
        out |= {
            "mean_latency_us_median": round(median, 1),
            "mean_latency_us_slowest": round(slowest, 1),
            "slowest_device": names[at],
            "slowest_vs_median": round(slowest / median, 2) if median else None,
        }
    return out
