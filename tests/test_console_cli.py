"""``viowire console`` as a user runs it: real subprocesses with stdin piped (or a terminal),
on a private server (``--device console,...``) and on a ``viowire serve``; every wait bounded
and every process ended (cli_run)."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import termios
import threading
import time

import cli_run
from cli_run import VIOWIRE, end_group, serve

TIMEOUT = 20.0


def viowire(*args: str, input: str) -> subprocess.CompletedProcess[str]:
    """``viowire ARGS`` with ``input`` on a pipe as its stdin; its process group ended after."""
    with subprocess.Popen(
        [*VIOWIRE, *args],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    ) as proc:
        try:
            stdout, stderr = proc.communicate(input, timeout=TIMEOUT)
        finally:
            end_group(proc)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def test_piped_stdin_through_a_program_on_a_private_server():
    out = viowire("console", "--device", "console,backend=exec:cat", input="hello\nworld\n")
    assert (out.returncode, out.stdout) == (0, "hello\nworld\n"), out.stderr


def test_a_shell_on_a_served_console_and_a_named_port(tmp_path):
    sock = f"unix://{tmp_path}/v.sock"
    device = "console,backend=exec:sh,ports=org.example.upper:exec:sh -c 'exec cat'"
    with serve("--listen", sock, "--device", device) as served:
        url = served.url("unix")
        out = viowire("console", url, input="echo $((6 * 7)); echo oops >&2\n")
        assert (out.returncode, out.stdout) == (0, "42\noops\n"), out.stderr
        out = viowire("console", url, "--device", "0", "--port", "org.example.upper", input="x")
        assert (out.returncode, out.stdout) == (0, "x"), out.stderr


def test_the_end_of_the_host_side_ends_the_command():
    # MULTIPORT: the program's end is PORT_OPEN(0), after which nothing more can come
    device = "console,multiport=on,backend=exec:sh -c 'echo one; echo two'"
    started = time.monotonic()
    out = viowire("console", "--device", device, "--linger", "30", input="")
    assert (out.returncode, out.stdout) == (0, "one\ntwo\n"), out.stderr
    assert time.monotonic() - started < TIMEOUT  # it did not wait for the 30 s linger


def test_unknown_port_and_wrong_device_are_usage_errors(tmp_path):
    out = viowire("console", "--device", "console,ports=a:echo", "--port", "b", input="")
    assert out.returncode == 2
    assert "--port b: the device has no such port (its ports: 0 '', 1 'a')" in out.stderr
    with serve("--listen", f"unix://{tmp_path}/v.sock", "--device", "rng") as served:
        out = viowire("console", served.url("unix"), input="")
        assert out.returncode == 2 and "no virtio-console device" in out.stderr
        out = viowire("console", served.url("unix"), "--device", "0", input="")
        assert out.returncode == 2 and "device 0 is virtio-rng, not virtio-console" in out.stderr


def _lines(stream, into: queue.Queue) -> None:
    with stream:
        while chunk := os.read(stream.fileno(), 4096):
            into.put(chunk)
    into.put(b"")


def _until(into: queue.Queue, want: bytes, got: bytearray) -> None:
    deadline = time.monotonic() + TIMEOUT
    while want not in got:
        chunk = into.get(timeout=max(deadline - time.monotonic(), 0))
        assert chunk, f"ended before {want!r}: {bytes(got)!r}"
        got += chunk


def test_terminal_raw_mode_escape_key_and_restore():
    master, slave = os.openpty()
    before = termios.tcgetattr(slave)
    proc = subprocess.Popen(
        [*VIOWIRE, "console", "--device", "console"],
        stdin=slave,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    out: queue.Queue[bytes] = queue.Queue()
    err: queue.Queue[bytes] = queue.Queue()
    threading.Thread(target=_lines, args=(proc.stdout, out), daemon=True).start()
    threading.Thread(target=_lines, args=(proc.stderr, err), daemon=True).start()
    try:
        seen_err, seen_out = bytearray(), bytearray()
        _until(err, b"Escape character is '^]'.", seen_err)
        os.write(master, b"ab\x03c")  # raw: Ctrl-C is a byte for the port, not a signal
        _until(out, b"ab\x03c", seen_out)  # the echo backend sends it back
        os.write(master, b"\x1d")  # Ctrl-]
        assert proc.wait(timeout=TIMEOUT) == 0
        assert termios.tcgetattr(slave) == before  # the terminal's mode is restored
    finally:
        end_group(proc)
        os.close(master)
        os.close(slave)


def test_viowire_conform_passes_the_console_checks():
    out = cli_run.viowire("conform", "--device", "console,name=hvc,ports=org.example.agent:echo")
    assert out.returncode == 0, out.stdout + out.stderr
    for check in ("console.config", "console.multiport-handshake", "console.port-names"):
        assert re.search(rf"^  {re.escape(check)} +5\.3\.\S+ +PASS ", out.stdout, re.M), check
    assert "port 0 'hvc', port 1 'org.example.agent'" in out.stdout
    assert re.search(r"^1 device\(s\), \d+ checks: .* 0 FAIL", out.stdout, re.M)


def test_the_python_example_of_docs_console_runs(tmp_path):
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent / "docs" / "console.md").read_text()
    (code,) = re.findall(r"```python\n(.*?)```", doc, re.S)
    (expected,) = re.findall(r"prints\n\n```text\n(.*?)```", doc, re.S)
    sock = f"unix://{tmp_path}/v.sock"
    with serve("--listen", sock, "--device", "console,backend=exec:sh"):
        code = code.replace("unix:///tmp/viowire.sock", sock)
        out = cli_run.run([sys.executable, "-c", code], cwd=tmp_path)
    assert (out.returncode, out.stdout) == (0, expected), out.stderr
