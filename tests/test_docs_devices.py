"""docs/devices.md works as written: its listings are the example files, and every command and
program in it runs from the repository's root against real servers and gives what it shows."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import RUN_TIMEOUT, VIOWIRE, serve

ROOT = Path(__file__).resolve().parent.parent
DOC = (ROOT / "docs" / "devices.md").read_text()
DOC_SOCKET = "unix:///tmp/loopback.sock"


def section(number: int) -> str:
    match = re.search(rf"^## {number}\. .*?\n(.*?)(?=^## |\Z)", DOC, re.S | re.M)
    assert match, f"docs/devices.md has no section '## {number}.'"
    return match.group(1)


def blocks(text: str, lang: str) -> list[str]:
    return [block.strip() for block in re.findall(rf"```{lang}\n(.*?)```", text, re.S)]


def command(line: str, socket: str | None = None) -> list[str]:
    """A ``viowire ...`` or ``python ...`` line of the doc as argv, its socket moved to ours."""
    words = shlex.split(line.replace(DOC_SOCKET, socket) if socket else line)
    if words[0] == "viowire":
        return [*VIOWIRE, *words[1:]]
    assert words[0] == "python", line
    return [sys.executable, *words[1:]]


def run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        argv, capture_output=True, text=True, timeout=RUN_TIMEOUT, cwd=ROOT, check=False
    )


@pytest.mark.parametrize("name", ["examples/loopback.py", "examples/loopback_client.py"])
def test_listings_are_the_example_files(name):
    listing = re.search(rf"`{re.escape(name)}`:\n\n```python\n(.*?)```", DOC, re.S)
    assert listing, f"docs/devices.md does not list {name}"
    assert listing.group(1) == (ROOT / name).read_text(), f"the listing of {name} is stale"


def test_the_tutorial_device_is_about_40_lines():
    code = [line for line in (ROOT / "examples/loopback.py").read_text().splitlines() if line]
    assert len(code) <= 50


def test_serve_then_drive_from_python(tmp_path):
    (serve_line,) = blocks(section(2), "sh")[:1]
    client_line = blocks(section(3), "sh")[0]
    expected = blocks(section(3), "text")[0]
    socket = f"unix://{tmp_path}/loopback.sock"
    argv = command(serve_line, socket)
    assert argv[len(VIOWIRE)] == "serve"
    with serve(*argv[len(VIOWIRE) + 1 :], cwd=ROOT):
        result = run(command(client_line, socket))
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == expected


def test_probe_on_a_private_server():
    (line,) = blocks(section(2), "sh")[1:]
    result = run(command(line))
    assert result.returncode == 0, result.stderr
    assert "Config mtu: 4096" in result.stdout


def test_conform_on_a_private_server():
    (line,) = blocks(section(4), "sh")
    result = run(command(line))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "FAIL" not in result.stdout.replace("0 FAIL", "")


def test_unit_test_example_runs():
    (code,) = blocks(section(5), "python")
    result = run([sys.executable, "-c", code])
    assert result.returncode == 0, result.stderr


def test_entry_point_example_names_the_group():
    (toml,) = blocks(section(6), "toml")
    assert '[project.entry-points."viowire.devices"]' in toml
