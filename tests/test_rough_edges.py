"""Rough edges a new user met on the first day (issue 13), each as the user runs it."""

from __future__ import annotations

import pytest
from cli_run import serve, viowire


def _one_line(result) -> str:
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    return lines[0]


def test_conform_only_that_matches_nothing_exits_2_naming_the_checks():
    result = viowire("conform", "--device", "rng", "--only", "ring.nosuch")
    assert result.returncode == 2
    line = _one_line(result)
    assert "'ring.nosuch' matches no check" in line and "mmio.magic" in line
    assert "0 FAIL" not in result.stdout  # nothing ran
    listed = viowire("conform", "--list", "--only", "nothing*")
    assert listed.returncode == 2


@pytest.mark.parametrize(
    ("size", "nearest"), [("1000", "size=512 or size=1K"), ("100", "size=512")]
)
def test_a_disk_size_of_a_partial_sector_is_refused_with_the_nearest_sizes(size, nearest):
    result = viowire("probe", "--device", f"blk,size={size}")
    assert result.returncode == 2
    assert f"size={size} is not a whole number of 512-byte sectors: use {nearest}" in _one_line(
        result
    )
    assert viowire("probe", "--device", "blk,size=1K").returncode == 0


@pytest.mark.parametrize("option", ["--listen", "--link"])
def test_serve_names_the_listener_it_cannot_open(tmp_path, option):
    good, bad = f"unix://{tmp_path}/ok.sock", f"unix://{tmp_path}/no/such/dir/s.sock"
    given = [option, bad] if option == "--listen" else [option, f"lan,listen={bad}"]
    result = viowire("serve", "--device", "net,link=lan", "--listen", good, *given)
    assert result.returncode == 1
    assert _one_line(result) == f"viowire serve: cannot listen on {bad}: No such file or directory"


@pytest.mark.parametrize(
    "argv",
    [
        ["-v", "probe", "--device", "rng"],
        ["probe", "-v", "--device", "rng"],
        ["probe", "--device", "rng", "--log-level", "info"],
        ["--log-level", "info", "probe", "--device", "rng"],
    ],
)
def test_log_options_work_in_front_of_and_after_the_command(argv):
    result = viowire(*argv)
    assert result.returncode == 0, result.stderr
    assert "viowire.server INFO session" in result.stderr
    quiet = viowire("probe", "--device", "rng")
    assert "INFO" not in quiet.stderr


def test_serve_takes_v_after_the_command(tmp_path):
    url = f"unix://{tmp_path}/s.sock"
    with serve("-v", "--listen", url, "--device", "rng"):
        assert viowire("probe", url).returncode == 0


def test_v_counts_on_both_sides():
    # asyncio's own loop logs which selector it uses at DEBUG: -vv, one -v on each side
    result = viowire("-v", "--loop", "asyncio", "probe", "-v", "--device", "rng")
    assert result.returncode == 0 and "asyncio DEBUG" in result.stderr
    once = viowire("--loop", "asyncio", "probe", "-v", "--device", "rng")
    assert "asyncio DEBUG" not in once.stderr


def test_help_shows_no_restructuredtext_markup():
    for command in ("bench", "load", "conform", "serve", "trace"):
        text = viowire(command, "--help").stdout
        assert "``" not in text and ":mod:`" not in text, command


def test_a_default_conform_run_keeps_the_devices_warnings_to_the_verbose_log():
    quiet = viowire("conform", "--device", "rng", timeout=60)
    assert quiet.returncode == 0, quiet.stdout + quiet.stderr
    assert "0 FAIL" in quiet.stdout
    assert quiet.stderr.count("WARNING") <= 5
    verbose = viowire("-v", "conform", "--device", "rng", timeout=60)
    # the checks do provoke them: with -v they are there, as INFO
    assert verbose.stderr.count("viowire.device INFO") > 20


@pytest.mark.parametrize("command", [["probe"], ["io", "--device", "0", "-c", "flush"]])
@pytest.mark.parametrize("where", ["unix", "tcp"])
def test_a_server_that_is_not_there_is_one_line_naming_the_url(tmp_path, command, where):
    url = f"unix://{tmp_path}/nobody.sock" if where == "unix" else "tcp://127.0.0.1:1"
    result = viowire(command[0], url, *command[1:])
    assert result.returncode == 1
    line = _one_line(result)
    assert line.startswith(f"viowire {command[0]}: {url}: ")
    assert "no viowire server listens there" in line and "Errno" not in line
