"""Load beyond one machine: a run in a mergeable form, and the summary of many runs.

``viowire load --histogram-out FILE`` writes a JSON document: the run's summary, each
operation's latency as an encoded HdrHistogram (the standard compressed form, see
:mod:`viowire.load.latency`) and the per-device request counts behind the fairness lines. Given
a directory (or a path ending in ``/``), the file is ``load-HOST-PID.json`` inside it, so the
replicas of a scaled compose service or the pods of a Kubernetes Job can share one volume.

``viowire load merge FILES...`` reads such files and prints one summary in the format of a
single run: counts and bytes added, latency percentiles from the merged histograms (exact to
the histogram's 1 %, not an average of percentiles), fairness over every device of every run.
Rates are added: runs that overlap in time load the server together, and their combined rate is
the sum of theirs; the summary says how much the runs' time windows overlapped, since rates of
runs that did not overlap do not add up to a load the server ever saw.
"""

from __future__ import annotations

import json
import os
import socket
from collections import Counter
from pathlib import Path
from typing import Any

from viowire.load.latency import Latency
from viowire.load.stats import MAX_SAMPLES, fairness

FORMAT = "viowire-load-histograms"
VERSION = 1


def document(summary: dict[str, Any], mergeable: dict[str, Any]) -> dict:
    """The file's content (``mergeable`` from :meth:`~viowire.load.runner.LoadRun.mergeable`)."""
    started, ended = mergeable["workload_unix"]
    return {
        "format": FORMAT,
        "version": VERSION,
        "host": socket.gethostname(),
        "pid": os.getpid(),
        "started_unix": round(started, 3),  # the workload's wall-clock window, for the overlap
        "ended_unix": round(ended, 3),
        "summary": summary,
        "latency": {"ops": mergeable["ops"], "readback": mergeable["readback"]},
        "devices": mergeable["devices"],
    }


def output_path(given: str) -> Path:
    """``given``, or ``load-HOST-PID.json`` inside it when it is a directory."""
    path = Path(given)
    if given.endswith("/") or path.is_dir():
        path.mkdir(parents=True, exist_ok=True)
        return path / f"load-{socket.gethostname()}-{os.getpid()}.json"
    return path


def write(given: str, doc: dict) -> Path:
    """Write ``doc`` to ``given`` (see :func:`output_path`) whole or not at all."""
    path = output_path(given)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(doc) + "\n")
    partial.replace(path)  # a reader that globs *.json never sees half a file
    return path


def read(path: str) -> dict:
    """A histogram file, checked enough that merging it cannot go wrong silently."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise ValueError(f"{path}: cannot read a load histogram file ({exc})") from None
    if not isinstance(doc, dict) or doc.get("format") != FORMAT:
        raise ValueError(f"{path}: not a file of viowire load --histogram-out")
    if doc.get("version") != VERSION:
        raise ValueError(
            f"{path}: version {doc.get('version')} of the histogram file; this viowire reads "
            f"version {VERSION}"
        )
    return doc


def merge(docs: list[dict]) -> dict[str, Any]:
    """One summary of the runs of ``docs`` (histogram files), in a single run's format."""
    if not docs:
        raise ValueError("viowire load merge: give one or more files of --histogram-out")
    runs = [d["summary"] for d in docs]
    first = runs[0]
    out: dict[str, Any] = dict(first)
    for key in (
        "requests", "completed", "lost", "bytes", "errors", "verify_failures", "sessions",
        "sessions_target", "devices", "devices_target", "written_blocks",
        "requests_per_s", "bytes_per_s", "devices_per_s", "concurrency",
    ):  # fmt: skip
        out[key] = sum(r[key] for r in runs)
    for key in ("requests_per_s", "bytes_per_s", "devices_per_s"):
        out[key] = round(out[key], 1)
    for key in ("devices_by_kind", "devices_out", "errors_by_kind"):
        total: Counter[str] = Counter()
        for r in runs:
            total.update(r[key])
        out[key] = (
            dict(total.most_common()) if key == "errors_by_kind" else dict(sorted(total.items()))
        )
    out |= {
        "ok": all(r["ok"] for r in runs),
        "url": _joined(r["url"] for r in runs),
        "loop": _joined(r["loop"] for r in runs),
        "memory": _joined(r["memory"] for r in runs),
        "seed": _joined(str(r["seed"]) for r in runs),
        "interrupted": any(r["interrupted"] for r in runs),
        "duration_s": max(r["duration_s"] for r in runs),
        "bringup_s": max(r["bringup_s"] for r in runs),
        "platform_devices": max(r["platform_devices"] for r in runs),  # per session's platform
        "error_samples": [s for r in runs for s in r["error_samples"]][:MAX_SAMPLES],
        "runs": len(runs),
        "overlap": overlap(docs),
    }
    out["ops"] = _ops(docs, runs)
    latency = Latency()
    for op in out["ops"]:
        latency.merge(_latency(docs, "ops", op))
    out["latency_us"] = latency.summary()
    out["histogram_us"] = [list(row) for row in latency.rows()]
    out["net"] = _net(runs)
    out["fairness"] = _fairness(docs, list(dict.fromkeys(k for r in runs for k in r["fairness"])))
    out["readback"] = _readback(docs, runs)
    return out


def _joined(values: Any) -> str:
    return ",".join(dict.fromkeys(values))


def _latency(docs: list[dict], phase: str, op: str) -> Latency:
    total = Latency()
    for doc in docs:
        encoded = doc["latency"][phase].get(op)
        if encoded:
            total.merge(Latency.decode(encoded))
    return total


def _ops(docs: list[dict], runs: list[dict]) -> dict[str, Any]:
    names = list(dict.fromkeys(op for r in runs for op in r["ops"]))
    out = {}
    for op in names:
        mine = [r["ops"][op] for r in runs if op in r["ops"]]
        merged = {k: sum(o[k] for o in mine) for k in ("requests", "bytes", "errors", "lost")}
        merged["per_s"] = round(sum(o["per_s"] for o in mine), 1)
        merged["bytes_per_s"] = round(sum(o["bytes_per_s"] for o in mine), 1)
        merged["latency_us"] = _latency(docs, "ops", op).summary()
        out[op] = merged
    return out


def _net(runs: list[dict]) -> dict[str, Any]:
    net = dict(runs[0]["net"])
    for key in ("flows", "unpaired", "twins", "sent", "received", "lost", "late", "foreign"):
        net[key] = sum(r["net"].get(key, 0) for r in runs)
    net["loss_error"] = any(r["net"]["loss_error"] for r in runs)
    return net


def _fairness(docs: list[dict], device_kinds: list[str]) -> dict[str, Any]:
    """Every device of every run as one population (device names get their run's host)."""
    per_device: dict[str, list[int]] = {"requests": [], "timed": [], "latency_ns": []}
    names: list[str] = []
    kinds: list[str] = []
    for doc in docs:
        devices = doc["devices"]
        for key, values in per_device.items():
            values += devices[key]
        names += [f"{doc['host']}/{doc['pid']} {name}" for name in devices["names"]]
        kinds += devices["kinds"]
    return {
        kind: fairness(per_device, names, [i for i, k in enumerate(kinds) if k == kind])
        for kind in device_kinds
    }


def _readback(docs: list[dict], runs: list[dict]) -> dict[str, Any]:
    keys = ("blocks", "read", "verified", "verify_failures", "errors", "unverified")
    out: dict[str, Any] = {k: sum(r["readback"][k] for r in runs) for k in keys}
    out["seconds"] = max(r["readback"]["seconds"] for r in runs)
    out["latency_us"] = _latency(docs, "readback", "blk-read").summary()
    return out


def overlap(docs: list[dict]) -> float:
    """How much the runs ran together: the time all of them were running over the longest run's
    time (1.0: the same window; 0: at least two never ran at once). Wall-clock, so only as
    good as the machines' clocks agree."""
    start = max(d["started_unix"] for d in docs)
    end = min(d["ended_unix"] for d in docs)
    longest = max(d["ended_unix"] - d["started_unix"] for d in docs)
    return round(max(0.0, end - start) / longest, 3) if longest > 0 else 1.0
