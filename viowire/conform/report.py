"""Reporting conformance results: a table (streamed as checks finish), JSON and JUnit XML."""

from __future__ import annotations

import io
import json
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from typing import TextIO

from viowire.conform.model import Check, Result, Verdict, summary
from viowire.virtio.constants import device_name

ID_WIDTH = 30
SECTION_WIDTH = 10
VERDICT_WIDTH = 7


def summary_line(results: Sequence[Result]) -> str:
    """``4 devices, 220 checks: 90 PASS, 60 REJECT, 40 WEDGED, 30 SKIP, 0 FAIL``."""
    counts = summary(results)
    devices = len({r.device for r in results})
    parts = ", ".join(f"{counts[v]} {v}" for v in Verdict)
    return f"{devices} device(s), {len(results)} checks: {parts}"


def _row(result: Result) -> str:
    return (
        f"  {result.id:<{ID_WIDTH}} {result.section:<{SECTION_WIDTH}} "
        f"{result.verdict:<{VERDICT_WIDTH}} {result.detail}"
    )


class TableWriter:
    """Writes one row per result as it arrives, with a heading per device."""

    def __init__(self, stream: TextIO) -> None:
        self.stream = stream
        self._device = ""

    def add(self, result: Result) -> None:
        if result.device != self._device:
            if self._device:
                self.stream.write("\n")
            self._device = result.device
            self.stream.write(f"{result.device}\n")
            self.stream.write(
                f"  {'ID':<{ID_WIDTH}} {'SECTION':<{SECTION_WIDTH}} "
                f"{'VERDICT':<{VERDICT_WIDTH}} DETAIL\n"
            )
        self.stream.write(_row(result) + "\n")
        self.stream.flush()

    def close(self, results: Sequence[Result]) -> None:
        if results:
            self.stream.write("\n")
        self.stream.write(summary_line(results) + "\n")
        self.stream.flush()


def format_table(results: Sequence[Result]) -> str:
    """The whole table and the summary line, as one string."""
    out = io.StringIO()
    writer = TableWriter(out)
    for result in results:
        writer.add(result)
    writer.close(results)
    return out.getvalue()


def to_json(results: Sequence[Result]) -> str:
    """A JSON list of ``{id, section, title, device, verdict, detail}``."""
    return json.dumps([r.as_dict() for r in results], indent=2, ensure_ascii=False)


def to_junit(results: Sequence[Result], name: str = "viowire conform") -> str:
    """JUnit XML: a testsuite per device, a testcase per check; FAIL is a <failure>, a check
    that does not apply is <skipped>. The section and verdict are testcase properties."""
    root = ET.Element("testsuites", name=name)
    by_device: dict[str, list[Result]] = {}
    for result in results:
        by_device.setdefault(result.device, []).append(result)
    for device, rows in by_device.items():
        counts = summary(rows)
        suite = ET.SubElement(
            root,
            "testsuite",
            name=device,
            tests=str(len(rows)),
            failures=str(counts[Verdict.FAIL]),
            errors="0",
            skipped=str(counts[Verdict.SKIP]),
            time=f"{sum(r.duration for r in rows):.3f}",
        )
        for result in rows:
            _testcase(suite, device, result)
    counts = summary(results)
    root.set("tests", str(len(results)))
    root.set("failures", str(counts[Verdict.FAIL]))
    root.set("errors", "0")
    root.set("skipped", str(counts[Verdict.SKIP]))
    root.set("time", f"{sum(r.duration for r in results):.3f}")
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"


def _testcase(suite: ET.Element, device: str, result: Result) -> None:
    case = ET.SubElement(
        suite, "testcase", classname=device, name=result.id, time=f"{result.duration:.3f}"
    )
    props = ET.SubElement(case, "properties")
    ET.SubElement(props, "property", name="section", value=result.section)
    ET.SubElement(props, "property", name="verdict", value=str(result.verdict))
    ET.SubElement(props, "property", name="title", value=result.title)
    if result.verdict == Verdict.FAIL:
        failure = ET.SubElement(case, "failure", message=result.detail, type="FAIL")
        failure.text = f"{result.title} ({result.section})\n{result.detail}"
    elif result.verdict == Verdict.SKIP:
        ET.SubElement(case, "skipped", message=result.detail)
    else:
        ET.SubElement(case, "system-out").text = f"{result.verdict}: {result.detail}"


def format_checks(checks: Sequence[Check]) -> str:
    """The catalogue for ``--list``: id, section, applicability, expected verdicts, title."""
    lines = [
        f"{'ID':<{ID_WIDTH}} {'SECTION':<{SECTION_WIDTH}} {'APPLIES TO':<22} {'EXPECTED':<36} TITLE"
    ]
    for c in checks:
        lines.append(
            f"{c.id:<{ID_WIDTH}} {c.section:<{SECTION_WIDTH}} {_applies(c):<22} "
            f"{_expected(c):<36} {c.title}"
        )
    return "\n".join(lines) + "\n"


def _applies(check: Check) -> str:
    parts = []
    if check.versions != (1, 2):
        parts.append("v" + "/".join(map(str, check.versions)))
    if check.devices is not None:
        parts.append("/".join(device_name(d).removeprefix("virtio-") for d in check.devices))
    elif check.io:
        parts.append("I/O")  # any type that declares a sample request
    if check.feature is not None:
        parts.append(f"bit {check.feature}")
    return " ".join(parts) or "all"


def _expected(check: Check) -> str:
    by_version = {v: "|".join(check.expected(v)) for v in check.versions}
    if len(set(by_version.values())) == 1:
        return next(iter(by_version.values()))
    return " ".join(f"v{v}:{e}" for v, e in by_version.items())
