"""The README works as written: its Python example runs against a real server, its two commands
come first and in the order a new user needs them, and CI runs exactly the test command."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from cli_run import RUN_TIMEOUT, serve

ROOT = Path(__file__).resolve().parent.parent
README = (ROOT / "README.md").read_text()
EXAMPLE_URL = "unix:///tmp/viowire.sock"
SETUP = "python3 -m venv .venv && .venv/bin/pip install -q -e '.[test]'"


def section(title: str) -> str:
    """The text of a ``## title`` section, up to the next ``## ``."""
    match = re.search(rf"^## {re.escape(title)}\n(.*?)(?=^## |\Z)", README, re.S | re.M)
    assert match, f"README.md has no '## {title}' section"
    return match.group(1)


def code_blocks(text: str, lang: str) -> list[str]:
    return [block.strip() for block in re.findall(rf"```{lang}\n(.*?)```", text, re.S)]


def test_python_example_runs_against_a_real_server(tmp_path):
    (code,) = code_blocks(section("From Python"), "python")
    assert code.count(EXAMPLE_URL) == 1
    sock = tmp_path / "s.sock"
    with serve("--listen", f"unix://{sock}", "--device", "blk,size=1M", "--device", "rng"):
        result = subprocess.run(
            [sys.executable, "-c", code.replace(EXAMPLE_URL, f"unix://{sock}")],
            capture_output=True,
            text=True,
            timeout=RUN_TIMEOUT,
            cwd=tmp_path,
            check=False,
        )
    assert result.returncode == 0, result.stderr
    assert re.fullmatch(r"[0-9a-f]{32}\n", result.stdout)  # the 16 random bytes, in hex


def test_two_commands_come_first_setup_and_demo_then_tests():
    first_section = re.search(r"^## (.*)$", README, re.M).group(1)
    assert first_section == "Two commands"
    demo, tests = code_blocks(section("Two commands"), "sh")
    assert demo == f"{SETUP} && .venv/bin/viowire demo"
    assert tests == f"{SETUP} && .venv/bin/python -m pytest -q"
    # No other shell block comes before them.
    assert README.index("```sh") == README.index(demo) - len("```sh\n")


def test_ci_runs_exactly_the_readme_test_command():
    _, tests = code_blocks(section("Two commands"), "sh")
    commands = [
        line.strip()
        for line in (ROOT / ".ci" / "run").read_text().splitlines()
        if line.strip()
        and not line.lstrip().startswith("#")
        and not line.startswith(("set ", "cd "))
    ]
    # Optional system tools first (the README names them), then exactly the test command.
    assert commands == ["scripts/install-test-tools", tests]
    assert "scripts/install-test-tools" in section("Two commands")
