"""The device server's counters, kept as plain ints where the work happens.

Nothing on the hot path calls prometheus_client: a queue adds to the :class:`QueueStats` of its
device type and queue index (an attribute increment, a ``bisect`` for the latency bucket), a
session adds to :data:`SERVER`, and :class:`ServerCollector` turns them into metric families
only when ``/metrics`` is scraped (:mod:`viowire.metrics` serves it). Labels stay bounded: a
device type and a queue index, never a session or a device, so 100,000 devices make as many
series as one device of each type.

The counters belong to the process (a test running several servers in one process sees their
sum); gauges (sessions, devices, guest memory) are read from the server being scraped.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Iterator
from typing import TYPE_CHECKING

from viowire.protocol import messages as m
from viowire.server import link as links

# prometheus_client is imported by the functions that build the families, at scrape time: a
# server without --metrics never loads it (it is most of the import time of `viowire serve`).
if TYPE_CHECKING:
    from prometheus_client.core import Metric

    from viowire.device import Device
    from viowire.server.app import Server

# Upper bounds of the request latency buckets, seconds (+Inf is implied): 10 µs (a request
# served in place from shared memory) to 1 s (a proxied request behind a slow client).
LATENCY_BOUNDS = (
    1e-5, 2.5e-5, 5e-5, 1e-4, 2.5e-4, 5e-4, 1e-3, 2.5e-3, 5e-3, 1e-2, 2.5e-2, 0.1, 0.25, 1.0,
)  # fmt: skip
now = time.perf_counter
# Queues with a label of their own, per device type; the rest share the label "4+" (a console's
# ports beyond the first, a multiqueue device's extra pairs), so series stay bounded by type.
QUEUE_LABELS = 4


class QueueStats:
    """Every queue with index ``queue`` of devices of type ``device_type``, summed (index
    :data:`QUEUE_LABELS`: every queue from there on)."""

    __slots__ = (
        "buckets",
        "device_type",
        "interrupts",
        "latency_sum",
        "notifications",
        "queue",
        "read_bytes",
        "requests",
        "written_bytes",
    )

    def __init__(self, device_type: str, queue: int) -> None:
        self.device_type = device_type
        self.queue = queue
        self.requests = 0
        self.read_bytes = 0  # device-readable bytes of the completed requests
        self.written_bytes = 0  # used.len of the completed requests
        self.notifications = 0  # QueueNotify writes (or channel kicks) that were served
        self.interrupts = 0  # used-buffer notifications the device sent (§2.7.7)
        self.buckets = [0] * (len(LATENCY_BOUNDS) + 1)
        self.latency_sum = 0.0

    def done(self, popped: float, readable: int, written: int) -> None:
        """A request taken off the ring at ``popped`` (:data:`now`) completed."""
        seconds = now() - popped
        self.requests += 1
        self.read_bytes += readable
        self.written_bytes += written
        self.buckets[bisect_left(LATENCY_BOUNDS, seconds)] += 1  # le: bound >= seconds
        self.latency_sum += seconds


class TypeStats:
    """What happens to a device type's devices rather than to one queue (rare events)."""

    __slots__ = ("config_changes", "failures")

    def __init__(self) -> None:
        self.config_changes = 0
        self.failures = 0  # entered DEVICE_NEEDS_RESET (a bad ring, a request that raised)


class ServerStats:
    """The connections' side: frames, protocol errors, proxied guest memory traffic."""

    __slots__ = ("frames_in", "frames_out", "protocol_errors", "proxied_read", "proxied_written")

    def __init__(self) -> None:
        self.frames_in = 0
        self.frames_out = 0
        self.protocol_errors: dict[int, int] = {}  # ErrorCode -> ERROR frames sent
        self.proxied_read = 0  # bytes read from the client's memory by MEM_READ
        self.proxied_written = 0  # bytes written to it by MEM_WRITE

    def error(self, code: int) -> None:
        self.protocol_errors[code] = self.protocol_errors.get(code, 0) + 1


SERVER = ServerStats()
_QUEUES: dict[tuple[str, int], QueueStats] = {}
_TYPES: dict[str, TypeStats] = {}


def type_name(backend: Device) -> str:
    """The label of a device's type: its registered name (``blk``), else its class's."""
    return getattr(backend, "type_name", "") or type(backend).__name__


def queue_stats(backend: Device, index: int) -> QueueStats:
    """The shared counters of queue ``index`` of ``backend``'s type (made on first use)."""
    key = (type_name(backend), min(index, QUEUE_LABELS))
    stats = _QUEUES.get(key)
    if stats is None:
        stats = _QUEUES[key] = QueueStats(*key)
    return stats


def type_stats(backend: Device) -> TypeStats:
    """The shared counters of ``backend``'s type (made on first use)."""
    name = type_name(backend)
    stats = _TYPES.get(name)
    if stats is None:
        stats = _TYPES[name] = TypeStats()
    return stats


class ServerCollector:
    """A prometheus_client collector of one :class:`~viowire.server.app.Server`: the process's
    counters and the server's gauges, built at scrape time."""

    def __init__(self, server: Server) -> None:
        self.server = server

    def describe(self) -> list[Metric]:
        return []  # no describe-time scrape: collect() reads live sessions

    def collect(self) -> Iterator[Metric]:
        yield from self._gauges()
        yield from _queue_families()
        yield from _type_families()
        yield from _server_families()

    def _gauges(self) -> Iterator[Metric]:
        from prometheus_client.core import GaugeMetricFamily

        sessions = list(self.server.sessions)
        yield GaugeMetricFamily("viowire_sessions", "Open sessions", value=len(sessions))
        # Every type this process has made a device of, zeros included: a series that comes
        # and goes with the sessions breaks rate() and alerts.
        devices = dict.fromkeys([name for name, _ in _QUEUES] + list(_TYPES), 0)
        nets: dict[str, list[int]] = {}  # link -> tx frames, tx dropped, rx frames, rx dropped
        memory = {"shared": 0, "proxied": 0}
        for session in sessions:
            platform = session.platform
            if platform is None:
                continue  # no HELLO yet: no devices
            for slot in platform.slots:
                backend = slot.device.backend
                name = type_name(backend)
                devices[name] = devices.get(name, 0) + 1
                if name == "net":
                    _count_net(nets, backend)
            if session.memory is not None:
                mode = "proxied" if session.memory is session._proxied else "shared"
                memory[mode] += sum(region.size for region in session.memory.regions)
        family = GaugeMetricFamily("viowire_devices", "Devices of open sessions", labels=["type"])
        for name, count in sorted(devices.items()):
            family.add_metric([name], count)
        yield family
        family = GaugeMetricFamily(
            "viowire_guest_memory_bytes",
            "Guest RAM registered by open sessions: mapped here (shared) or reached by "
            "MEM_READ/MEM_WRITE (proxied)",
            labels=["mode"],
        )
        for mode, size in memory.items():
            family.add_metric([mode], size)
        yield family
        yield from _net_families(nets)


def _count_net(nets: dict[str, list[int]], backend: Device) -> None:
    counts = nets.setdefault(getattr(backend, "link_name", ""), [0, 0, 0, 0])
    for i, attr in enumerate(("tx_frames", "tx_dropped", "rx_frames", "rx_dropped")):
        counts[i] += getattr(backend, attr, 0)


def _net_families(nets: dict[str, list[int]]) -> Iterator[Metric]:
    """Net devices of the open sessions by link, and the links' switches: gauges, as both
    go when their devices go (a counter must never go down)."""
    from prometheus_client.core import GaugeMetricFamily

    frames = GaugeMetricFamily(
        "viowire_net_frames",
        "Frames the open sessions' net devices sent (tx) and received (rx), by link",
        labels=["link", "direction"],
    )
    dropped = GaugeMetricFamily(
        "viowire_net_dropped",
        "Frames they dropped: tx refused, rx with no room (receive buffers, backlog)",
        labels=["link", "direction"],
    )
    for name, (tx, tx_dropped, rx, rx_dropped) in sorted(nets.items()):
        frames.add_metric([name, "tx"], tx)
        frames.add_metric([name, "rx"], rx)
        dropped.add_metric([name, "tx"], tx_dropped)
        dropped.add_metric([name, "rx"], rx_dropped)
    yield frames
    yield dropped
    switched = GaugeMetricFamily(
        "viowire_link_frames",
        "Frames each in-server link switched since it was made: to one port (forwarded), to "
        "all (flooded), or not at all (filtered)",
        labels=["link", "switched"],
    )
    ports = GaugeMetricFamily("viowire_link_ports", "Ports on each link", labels=["link"])
    for name, link in sorted(links._links.items()):
        for kind in ("forwarded", "flooded", "filtered"):
            switched.add_metric([name, kind], getattr(link, kind))
        ports.add_metric([name], len(link.ports))
    yield switched
    yield ports


def _queue_families() -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    labels = ["type", "queue"]
    families = {
        "requests": CounterMetricFamily(
            "viowire_requests", "Requests (descriptor chains) completed", labels=labels
        ),
        "read_bytes": CounterMetricFamily(
            "viowire_request_read_bytes",
            "Device-readable bytes of the completed requests",
            labels=labels,
        ),
        "written_bytes": CounterMetricFamily(
            "viowire_request_written_bytes",
            "Bytes the device wrote for the completed requests (used.len)",
            labels=labels,
        ),
        "notifications": CounterMetricFamily(
            "viowire_notifications",
            "Driver notifications (QueueNotify or a notification channel's kick) served",
            labels=labels,
        ),
        "interrupts": CounterMetricFamily(
            "viowire_interrupts",
            "Used-buffer notifications sent to the driver",
            labels=labels,
        ),
    }
    latency = HistogramMetricFamily(
        "viowire_request_duration_seconds",
        "From taking a request off the available ring to completing it",
        labels=labels,
    )
    for stats in sorted(_QUEUES.values(), key=lambda s: (s.device_type, s.queue)):
        values = [stats.device_type, _queue_label(stats.queue)]
        for attr, family in families.items():
            family.add_metric(values, getattr(stats, attr))
        counts, total = list(stats.buckets), 0
        buckets = []
        for bound, count in zip((*LATENCY_BOUNDS, float("inf")), counts, strict=True):
            total += count
            buckets.append((_le(bound), total))
        latency.add_metric(values, buckets, stats.latency_sum)
    yield from families.values()
    yield latency


def _queue_label(index: int) -> str:
    return f"{QUEUE_LABELS}+" if index >= QUEUE_LABELS else str(index)


def _le(bound: float) -> str:
    return "+Inf" if bound == float("inf") else repr(bound)


def _type_families() -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    failures = CounterMetricFamily(
        "viowire_device_failures",
        "Devices that entered DEVICE_NEEDS_RESET (a malformed ring, a request that raised)",
        labels=["type"],
    )
    changes = CounterMetricFamily(
        "viowire_config_changes", "Configuration changes of devices", labels=["type"]
    )
    for name, stats in sorted(_TYPES.items()):
        failures.add_metric([name], stats.failures)
        changes.add_metric([name], stats.config_changes)
    yield failures
    yield changes


def _server_families() -> Iterator[Metric]:
    from prometheus_client.core import CounterMetricFamily

    frames = CounterMetricFamily(
        "viowire_frames", "Protocol frames received and sent", labels=["direction"]
    )
    frames.add_metric(["in"], SERVER.frames_in)
    frames.add_metric(["out"], SERVER.frames_out)
    yield frames
    errors = CounterMetricFamily(
        "viowire_protocol_errors", "ERROR frames sent to clients, by code", labels=["code"]
    )
    for code in m.ErrorCode:  # every code, zeros included: a rate() needs the series to exist
        errors.add_metric([code.name], SERVER.protocol_errors.get(int(code), 0))
    yield errors
    proxied = CounterMetricFamily(
        "viowire_proxied_bytes",
        "Guest memory bytes moved by MEM_READ and MEM_WRITE (proxied sessions)",
        labels=["direction"],
    )
    proxied.add_metric(["read"], SERVER.proxied_read)
    proxied.add_metric(["write"], SERVER.proxied_written)
    yield proxied
