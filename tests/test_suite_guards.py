"""The checks on the run as a whole (suite_guards, pytest-timeout), each shown to fail a run of
pytest on a small project of its own: a skip CI does not expect, a process or a temporary
directory left behind, a test that hangs."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
RUN_TIMEOUT = 60.0

CONFTEST = """
from pathlib import Path
import suite_guards

def pytest_configure(config):
    suite_guards.install(config, allowlist=Path(__file__).with_name("skip-allowlist.txt"))
"""


def run_pytest(
    tmp_path: Path,
    tests: str,
    *args: str,
    ci: bool,
    allowlist: str = "",
    prefix: tuple[str, ...] = (),
) -> subprocess.CompletedProcess[str]:
    """pytest on a project of one test file, with this suite's conftest guards; ``prefix``: a
    command to run it under (a namespace of its own)."""
    project = tmp_path / "project"
    (project / "tests").mkdir(parents=True)
    (project / "pyproject.toml").write_text(
        '[tool.pytest.ini_options]\nasyncio_mode = "auto"\n'
        'asyncio_default_fixture_loop_scope = "function"\n'
    )
    (project / "tests" / "conftest.py").write_text(CONFTEST)
    (project / "tests" / "skip-allowlist.txt").write_text(allowlist)
    (project / "tests" / "test_it.py").write_text(textwrap.dedent(tests))
    env = {k: v for k, v in os.environ.items() if k not in ("CI", "PYTEST_ADDOPTS")}
    if ci:
        env["CI"] = "true"
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS), str(ROOT), env.get("PYTHONPATH", "")])
    basetemp = str(tmp_path / "basetemp")
    return subprocess.run(
        [
            *prefix,
            sys.executable,
            "-m",
            "pytest",
            "-p",
            "no:cacheprovider",
            "-rs",
            "--basetemp",
            basetemp,
            *args,
        ],
        cwd=project,
        env=env,
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )


SKIPS = """
import pytest

@pytest.mark.skipif(True, reason="no frobnicator on this machine")
def test_needs_a_tool():
    pass

def test_skips_itself():
    pytest.skip("the frobnicator is busy")

@pytest.mark.xfail(reason="a known limit", strict=True)
def test_known_limit():
    assert False

def test_plain():
    pass
"""


def test_outside_ci_a_skip_is_a_skip_with_its_reason(tmp_path):
    result = run_pytest(tmp_path, SKIPS, ci=False)
    assert result.returncode == 0, result.stdout
    assert "2 passed" not in result.stdout and "1 passed, 2 skipped, 1 xfailed" in result.stdout
    assert "no frobnicator on this machine" in result.stdout


def test_in_ci_a_skip_not_on_the_allowlist_fails_with_its_reason(tmp_path):
    result = run_pytest(tmp_path, SKIPS, ci=True)
    assert result.returncode == 1, result.stdout
    assert re.search(r"1 failed, 1 passed, 1 xfailed, 1 error", result.stdout), result.stdout
    assert "skipped in CI: no frobnicator on this machine" in result.stdout
    assert "skipped in CI: the frobnicator is busy" in result.stdout
    assert "tests/test_it.py::test_needs_a_tool -- WHY" in result.stdout  # how to allow it


def test_in_ci_an_allowed_skip_is_a_skip(tmp_path):
    allowlist = (
        "# reviewed\n"
        "tests/test_it.py::test_needs_a_tool -- the frobnicator cannot run in CI\n"
        "tests/test_it.py::test_skips_* -- nor can it be reserved there\n"
        "tests/test_it.py::test_gone -- an entry that no longer skips\n"
    )
    result = run_pytest(tmp_path, SKIPS, ci=True, allowlist=allowlist)
    assert result.returncode == 0, result.stdout
    assert "1 passed, 2 skipped, 1 xfailed" in result.stdout
    assert "skip-allowlist.txt:4: tests/test_it.py::test_gone did not skip" in result.stdout


def test_an_allowlist_entry_needs_a_reason(tmp_path):
    result = run_pytest(tmp_path, SKIPS, ci=True, allowlist="tests/test_it.py::test_plain\n")
    assert result.returncode == 4, result.stdout + result.stderr  # usage error
    assert "TEST-ID -- WHY IT MAY SKIP IN CI" in result.stderr


def test_a_module_that_skips_at_collection_fails_in_ci(tmp_path):
    tests = "import pytest\npytest.importorskip('no_such_module_here')\n"
    result = run_pytest(tmp_path, tests, ci=True)
    assert result.returncode != 0, result.stdout
    assert "skipped in CI: could not import 'no_such_module_here'" in result.stdout


def test_an_unexpected_pass_of_an_xfail_fails(tmp_path):
    tests = "import pytest\n@pytest.mark.xfail(reason='was broken')\ndef test_it():\n    pass\n"
    result = run_pytest(tmp_path, tests, "-o", "xfail_strict=true", ci=False)
    assert result.returncode == 1 and "XPASS(strict)" in result.stdout, result.stdout


LEAKS = """
import os, subprocess, sys, tempfile

SLEEP = "import time; time.sleep(600)"

def test_clean(tmp_path):
    (tmp_path / "fine").write_text("tmp_path is pytest's to clean")
    subprocess.run([sys.executable, "-c", "pass"], check=True)

def test_leaves_a_server_running():
    subprocess.Popen([sys.executable, "-c", SLEEP])

def test_leaves_a_grandchild_running():
    # its parent exits at once: the orphan is still found (pytest is its subreaper)
    sleeper = "import subprocess, sys; subprocess.Popen([sys.executable, '-c', SLEEP])"
    subprocess.run([sys.executable, "-c", f"SLEEP = {SLEEP!r}; {sleeper}"], check=True)

def test_leaves_a_temporary_directory():
    tempfile.mkdtemp(prefix="forgotten-")
"""


def test_anything_left_behind_fails_the_run_and_names_the_test(tmp_path):
    result = run_pytest(tmp_path, LEAKS, ci=False)
    assert result.returncode == 1, result.stdout
    assert "4 passed" in result.stdout
    left = result.stdout.split("left behind by the tests", 1)[1]
    processes = re.findall(r"^process: (\d+) .*\(appeared during (\S+)\)$", left, re.M)
    assert sorted(test for _, test in processes) == [
        "tests/test_it.py::test_leaves_a_grandchild_running",
        "tests/test_it.py::test_leaves_a_server_running",
    ]
    assert re.search(
        r"^temporary file: \S+/forgotten-\S+ \(appeared during "
        r"tests/test_it.py::test_leaves_a_temporary_directory\)$",
        left,
        re.M,
    )
    assert "test_clean" not in left
    for pid, _ in processes:  # and they were ended
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text()


def test_a_clean_run_passes(tmp_path):
    result = run_pytest(tmp_path, LEAKS, "-k", "clean", ci=True)
    assert result.returncode == 0, result.stdout
    assert "left behind" not in result.stdout


HOST_NETWORK = """
import subprocess

def test_turns_forwarding_on():
    with open("/proc/sys/net/ipv4/ip_forward", "w") as f:
        f.write("1")

def test_adds_a_firewall_rule():
    subprocess.run(["iptables", "-A", "INPUT", "-s", "10.203.99.1", "-j", "DROP"], check=True)
"""


def test_a_forwarding_switch_or_firewall_rule_changed_fails_the_run(tmp_path):
    """What a Docker engine changes on the host (and compose-test's own engine must not), in a
    network namespace of the run's own: the host's are not touched."""
    from netns import require_netns

    require_netns("iptables")
    result = run_pytest(tmp_path, HOST_NETWORK, ci=False, prefix=("unshare", "--net"))
    assert result.returncode == 1, result.stdout + result.stderr
    left = result.stdout.split("left behind by the tests", 1)[1]
    assert "host network, new: ipv4/ip_forward = 1" in left
    assert "host network, gone: ipv4/ip_forward = 0" in left
    assert re.search(r"host network, new: iptables-save: -A INPUT -s 10.203.99.1/32 -j DROP", left)


LOST = """
import asyncio

async def test_a_callback_fails():
    asyncio.get_running_loop().call_soon(lambda: 1 / 0)
    await asyncio.sleep(0.01)

async def test_quiet():
    await asyncio.sleep(0)
"""


def test_an_error_only_asyncio_logged_fails_its_test(tmp_path):
    result = run_pytest(tmp_path, LOST, ci=False)
    assert result.returncode == 1, result.stdout
    assert "2 passed, 1 error" in result.stdout  # the callback's test, at its teardown
    assert "ERROR at teardown of test_a_callback_fails" in result.stdout
    assert "ZeroDivisionError" in result.stdout


# -- pytest-timeout ------------------------------------------------------------------------------
def test_the_suite_has_a_timeout_that_interrupts_the_test(pytestconfig):
    assert pytestconfig.pluginmanager.has_plugin("timeout"), "pytest-timeout is not installed"
    assert float(pytestconfig.getini("timeout")) == 60
    assert pytestconfig.getini("timeout_method") == "signal"


HANGS = """
import asyncio, time

def test_sleeps_forever():
    time.sleep(3600)

async def test_waits_forever():
    await asyncio.Event().wait()

def test_after_them():
    pass
"""


@pytest.mark.parametrize("ci", [False, True])
def test_a_hang_fails_with_its_traceback_and_the_run_goes_on(tmp_path, ci):
    """With this project's pytest settings (a shorter timeout): each hang fails where it hangs,
    and the tests after it still run."""
    result = run_pytest(
        tmp_path, HANGS, "-c", str(ROOT / "pyproject.toml"), "--rootdir", str(tmp_path / "project"),
        "-o", "timeout=0.5", ci=ci,
    )  # fmt: skip
    assert result.returncode == 1, result.stdout
    assert "2 failed, 1 passed" in result.stdout
    assert result.stdout.count("Failed: Timeout (>0.5s) from pytest-timeout.") == 2
    assert "time.sleep(3600)" in result.stdout  # the line that hung, in the traceback
    assert "await asyncio.Event().wait()" in result.stdout
