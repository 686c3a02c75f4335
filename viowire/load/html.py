"""``viowire load --report FILE.html``: the run as one self-contained page.

Inline SVG and a few lines of CSS, nothing fetched: the page opens from a CI artefact, a mail or
a laptop without a network. It shows the latency percentiles over time (p50 and p99 of each
second, per operation, on a log scale), the rate over time, a latency histogram per operation,
and the text summary beneath.
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from viowire.load.report import format_summary, format_us

WIDTH, HEIGHT = 760, 260
LEFT, RIGHT, TOP, BOTTOM = 70, 20, 30, 40
COLOURS = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2")
STYLE = (
    "body{font-family:system-ui,sans-serif;margin:2em;max-width:64em;color:#222}"
    "h1{font-size:1.3em}h2{font-size:1.05em;margin-top:2em}"
    "pre{background:#f6f6f6;padding:1em;overflow-x:auto;font-size:.85em}"
    "svg text{font-size:11px;fill:#333}.axis{stroke:#999}.grid{stroke:#eee}"
)

Series = dict[str, list[tuple[float, float]]]


def write_report(
    path: str, summary: dict[str, Any], rows: list[dict[str, Any]], histograms: dict[str, list]
) -> None:
    """The page of a run: its ``summary``, its time-series ``rows``, and the histogram rows
    (low µs, high µs, count) of each operation."""
    Path(path).write_text(page(summary, rows, histograms))


def page(summary: dict[str, Any], rows: list[dict[str, Any]], histograms: dict[str, list]) -> str:
    title = f"viowire load {summary['url']}"
    latency: Series = {}
    rate: Series = {}
    for op in summary["ops"]:
        for q in ("p50", "p99"):
            points = [(r["t"], r["ops"][op][f"{q}_us"]) for r in rows if r["ops"].get(op)]
            latency[f"{op} {q}"] = [(t, v) for t, v in points if v > 0]
        rate[op] = [(r["t"], r["ops"][op]["ops_per_s"]) for r in rows if r["ops"].get(op)]
    rate["all"] = [(r["t"], r["ops_per_s"]) for r in rows]
    parts = [
        f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
        f"<style>{STYLE}</style></head><body><h1>{html.escape(title)}</h1>",
        "<h2>Latency over time (each second's p50 and p99)</h2>",
        line_chart(latency, "latency", log_y=True, y_format=format_us),
        "<h2>Requests per second</h2>",
        line_chart(rate, "requests/s", log_y=False, y_format=lambda v: f"{v:,.0f}"),
    ]
    for op, table in histograms.items():
        lat = summary["ops"][op]["latency_us"]
        parts.append(
            f"<h2>Latency histogram: {html.escape(op)} ({lat['count']:,} requests; p50 "
            f"{format_us(lat['p50'])}, p99 {format_us(lat['p99'])}, p99.9 "
            f"{format_us(lat['p99_9'])}, max {format_us(lat['max'])})</h2>"
        )
        parts.append(bar_chart(table))
    parts.append(f"<h2>Summary</h2><pre>{html.escape(format_summary(summary))}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def _scale(lo: float, hi: float, size: float, log: bool):
    if log:
        lo, hi = math.log10(lo), math.log10(hi)
    span = (hi - lo) or 1.0

    def at(v: float) -> float:
        v = math.log10(v) if log else v
        return (v - lo) / span * size

    return at


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0**e for e in range(math.floor(math.log10(lo)), math.ceil(math.log10(hi)) + 1)]
    step = 10 ** math.floor(math.log10(hi or 1))
    if hi / step < 3:
        step /= 2
    return [step * i for i in range(int(hi / step) + 2)]


def _svg(body: list[str], legend: Sequence[tuple[str, str]] = ()) -> str:
    items = "".join(
        f"<tspan fill='{colour}'>&#9632; {html.escape(name)}</tspan>  " for name, colour in legend
    )
    head = f"<svg xmlns='http://www.w3.org/2000/svg' width='{WIDTH}' height='{HEIGHT}'>"
    return head + f"<text x='{LEFT}' y='16'>{items}</text>" + "".join(body) + "</svg>"


def line_chart(series: Series, what: str, *, log_y: bool, y_format) -> str:
    """Lines of (seconds, value) points; a log scale when ``log_y`` (values above 0)."""
    points = [p for pts in series.values() for p in pts]
    if not points:
        return f"<p>no {html.escape(what)} recorded</p>"
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    x_hi = max(t for t, _ in points) or 1.0
    y_values = [v for _, v in points]
    y_lo = min(y_values) if log_y else 0.0
    y_hi = max(y_values) or 1.0
    ticks = _ticks(y_lo, y_hi, log_y)
    y_lo, y_hi = (ticks[0], ticks[-1]) if log_y else (0.0, max(ticks[-1], y_hi))
    x_at, y_at = _scale(0, x_hi, w, False), _scale(y_lo, y_hi, h, log_y)
    body = []
    for tick in ticks:
        y = TOP + h - y_at(tick)
        body.append(f"<line class='grid' x1='{LEFT}' x2='{LEFT + w}' y1='{y:.1f}' y2='{y:.1f}'/>")
        body.append(
            f"<text x='{LEFT - 6}' y='{y + 4:.1f}' text-anchor='end'>{y_format(tick)}</text>"
        )
    for tick in _ticks(0, x_hi, False):
        if tick <= x_hi:
            x = LEFT + x_at(tick)
            body.append(
                f"<text x='{x:.1f}' y='{TOP + h + 16}' text-anchor='middle'>{tick:g} s</text>"
            )
    body.append(f"<rect class='axis' fill='none' x='{LEFT}' y='{TOP}' width='{w}' height='{h}'/>")
    legend = []
    for i, (name, pts) in enumerate(series.items()):
        coords = " ".join(f"{LEFT + x_at(t):.1f},{TOP + h - y_at(v):.1f}" for t, v in pts)
        # on the latency chart, an operation's p50 and p99 share a colour; p99 is dashed
        dash = " stroke-dasharray='4 3'" if i % 2 and log_y else ""
        colour = COLOURS[(i // 2 if log_y else i) % len(COLOURS)]
        legend.append((name, colour))
        body.append(
            f"<polyline fill='none' stroke='{colour}' stroke-width='1.5'{dash} points='{coords}'/>"
        )
        if len(pts) == 1:  # one second: a dot, a line needs two
            x, y = coords.split(",")
            body.append(f"<circle cx='{x}' cy='{y}' r='3' fill='{colour}'/>")
    return _svg(body, legend)


def bar_chart(table: Sequence[Sequence[float]]) -> str:
    """A histogram: one bar per row (low µs, high µs, count), share of requests upwards."""
    if not table:
        return "<p>no request completed</p>"
    w, h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    total = sum(n for *_, n in table) or 1
    peak = max(n for *_, n in table) / total
    width = w / len(table)
    body = [f"<rect class='axis' fill='none' x='{LEFT}' y='{TOP}' width='{w}' height='{h}'/>"]
    for i, (low, high, n) in enumerate(table):
        share = n / total
        bar = h * share / peak if peak else 0
        x = LEFT + i * width
        body.append(
            f"<rect x='{x + 1:.1f}' y='{TOP + h - bar:.1f}' width='{max(width - 2, 1):.1f}' "
            f"height='{bar:.1f}' fill='{COLOURS[0]}'><title>{format_us(low)} .. "
            f"{format_us(high)}: {n:,} ({share:.1%})</title></rect>"
        )
        if i % math.ceil(len(table) / 7) == 0:  # labels that do not overlap
            body.append(
                f"<text x='{x:.1f}' y='{TOP + h + 16}'>{html.escape(format_us(low))}</text>"
            )
    body.append(f"<text x='{LEFT - 6}' y='{TOP + 4}' text-anchor='end'>{peak:.0%}</text>")
    body.append(f"<text x='{LEFT - 6}' y='{TOP + h}' text-anchor='end'>0</text>")
    return _svg(body)
