"""The summary of a load run as text: totals, per-operation latency, a histogram, fairness."""

from __future__ import annotations

from typing import Any

from viowire.units import format_size

BAR = 40  # characters of the longest histogram bar


def format_us(us: float) -> str:
    """1234 -> '1.23 ms'; 8000 -> '8.00 ms'; 87.25 -> '87.2 us'; 5.125 -> '5.12 us': three
    significant digits, as exact as the histogram's 1 %."""
    for unit, scale in (("s", 1e6), ("ms", 1e3)):
        if us >= scale:
            return f"{_three_digits(us / scale)} {unit}"
    return f"{_three_digits(us)} us"


def _three_digits(x: float) -> str:
    if x >= 100:
        return f"{x:.0f}"
    return f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def format_bytes(n: float) -> str:
    for unit, shift in (("GiB", 30), ("MiB", 20), ("KiB", 10)):
        if n >= 1 << shift:
            return f"{n / (1 << shift):.1f} {unit}"
    return f"{n:.0f} B"


def format_summary(s: dict[str, Any]) -> str:
    workload = s.get("workload")
    what = f"workload {workload}" if workload else f"block {format_size(s['block_size'])}"
    runs = s.get("runs")  # a summary of viowire load merge
    lines = [
        f"viowire load {s['url']}: {s['memory']} memory, {s['loop']}, seed {s['seed']}, "
        f"{what}, depth {s['depth']}, concurrency {s['concurrency']}",
        *_merged(runs, s.get("overlap", 1.0)),
        f"sessions   {s['sessions']}/{s['sessions_target']}",
        f"devices    {s['devices']:,}/{s['devices_target']:,} up in {s['bringup_s']:.2f} s "
        f"({s['devices_per_s']:,.0f} devices/s): "
        + ", ".join(f"{n:,} {kind}" for kind, n in s["devices_by_kind"].items()),
    ]
    for why, n in s["devices_out"].items():
        lines.append(f"           {n:,} out: {why}")
    lines.append(
        f"workload   {s['duration_s']:.2f} s{' (interrupted)' if s['interrupted'] else ''}: "
        f"{s['completed']:,} requests ({s['requests_per_s']:,.0f}/s), "
        f"{format_bytes(s['bytes'])} ({format_bytes(s['bytes_per_s'])}/s)"
    )
    for op, o in s["ops"].items():
        lat = o["latency_us"]
        lines.append(
            f"  {op:<10} {o['requests']:>10,} req {format_bytes(o['bytes']):>11}  "
            f"{o['per_s']:>9,.0f}/s {format_bytes(o['bytes_per_s']):>11}/s  "
            f"p50 {format_us(lat['p50']):>9}  p99 {format_us(lat['p99']):>9}  "
            f"max {format_us(lat['max']):>9}  errors {o['errors']}"
            + (f"  lost {o['lost']}" if o["lost"] else "")
        )
    lines += _latency(s["latency_us"], s["histogram_us"])
    lines += _fairness(s["fairness"])
    rb = s["readback"]
    disks = bool(s["mix"].get("blk-read") or s["mix"].get("blk-write"))
    if not workload and disks:
        lines.append(
            f"read-back  {rb['blocks']:,} blocks written, {rb['verified']:,} read back intact, "
            f"{rb['verify_failures']} verify failures, {rb['errors']} errors, "
            f"{rb['unverified']} not re-read ({rb['seconds']:.2f} s)"
        )
    lines += _net(s["net"])
    errors = s["errors_by_kind"]
    lines.append(
        "errors     "
        + (", ".join(f"{kind} {n:,}" for kind, n in errors.items()) if errors else "none")
    )
    lines += [f"           {sample}" for sample in s["error_samples"]]
    lines.append(f"verify     {s['verify_failures']} failures")
    verdict = "OK: " + ", ".join(_promises(s, disks))
    if workload:
        verdict = "OK: every operation completed without error"
    lines.append(f"result     {verdict if s['ok'] else 'FAILED'}")
    return "\n".join(lines) + "\n"


def _merged(runs: int | None, overlap: float) -> list[str]:
    if runs is None:
        return []
    line = (
        f"merged     {runs} runs (viowire load merge): counts and rates added, percentiles of "
        f"the merged histograms; the runs ran together {overlap:.0%} of the longest"
    )
    if overlap < 0.9:
        line += " (rates of runs that did not overlap add up to more than the server saw)"
    return [line]


def _promises(s: dict[str, Any], disks: bool) -> list[str]:
    """What an OK run vouches for: its requests, its disks' blocks, its frames."""
    kept = ["every request completed"]
    if disks:
        kept.append("every written block read back intact")
    if s["net"]["flows"]:
        frames = "every frame that arrived was" if s["net"]["lost"] else "every frame arrived"
        kept.append(f"{frames} intact and in order")
    return kept


def _latency(lat: dict[str, Any], table: list[list[float]]) -> list[str]:
    if not lat["count"]:
        return ["latency    no request completed"]
    out = [
        f"latency    min {format_us(lat['min'])}, p50 {format_us(lat['p50'])}, "
        f"p90 {format_us(lat['p90'])}, p99 {format_us(lat['p99'])}, "
        f"p99.9 {format_us(lat['p99_9'])}, max {format_us(lat['max'])} "
        f"(mean {format_us(lat['mean'])})"
    ]
    peak = max(n for _, _, n in table)
    for low, high, n in table:
        bar = "#" * (round(BAR * n / peak) if n else 0)
        if n and not bar:
            bar = "."
        out.append(
            f"  {format_us(low):>9} .. {format_us(high):>9} |{bar:<{BAR}}| "
            f"{n:>10,} {100 * n / lat['count']:5.1f}%"
        )
    return out


def _fairness(per_kind: dict[str, dict[str, Any]]) -> list[str]:
    out = []
    for kind, f in per_kind.items():
        if not f:
            continue
        idle = f" ({f['idle_devices']:,} idle)" if f["idle_devices"] else ""
        out.append(
            f"fairness   {kind}: requests per device min {f['requests_min']:,}, median "
            f"{f['requests_median']:,.0f}, max {f['requests_max']:,}{idle}"
        )
        if "slowest_device" in f:
            ratio = f["slowest_vs_median"]
            out.append(
                f"           slowest {f['slowest_device']}: mean "
                f"{format_us(f['mean_latency_us_slowest'])}, "
                f"{'-' if ratio is None else f'{ratio:.2f}x'} the median device's "
                f"{format_us(f['mean_latency_us_median'])}"
            )
    return out


def _net(net: dict[str, Any]) -> list[str]:
    if not net["flows"] and not net["unpaired"] and not net["twins"]:
        return []
    loss = "allowed (--allow-loss)" if net["allow_loss"] else "an error"
    late = f" ({net['late']:,} of them late)" if net["late"] else ""
    lines = [
        f"net        {net['flows']:,} flows of {net['frame_size']:,}-byte frames: "
        f"{net['sent']:,} sent, {net['received']:,} received, {net['lost']:,} lost{late} "
        f"(loss is {loss}), {net['foreign']:,} foreign frames ignored"
    ]
    if net["unpaired"]:
        lines.append(f"           {net['unpaired']:,} net devices without a partner on their link")
    if net["twins"]:
        lines.append(f"           {net['twins']:,} net devices left out: their MAC is another's")
    return lines
