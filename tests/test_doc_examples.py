"""Every shell and TOML example of README.md and docs/*.md runs as written, or says why not.

Each command line of a ``sh`` block is either run here or matched by NOT_HERE, with the reason
(no Docker engine, a QEMU guest, hours of mutation testing, a network outside a namespace...).
A new example that is neither fails test_every_example_is_run_or_excused. Commands run in a
temporary directory with /tmp/ moved into it, against servers of the test's own (port 7000
becomes a free port, 0.0.0.0 becomes 127.0.0.1: no test listens beyond loopback), and load's
--duration is cut to 1 s, and its --sessions and --devices from 20 up to a tenth (the README's
40 sessions of 250 devices become 4 of 250: what a session brings up stays as written; 10,000
devices took 14 s here, 30 s on busy cores). The listings of docs/devices.md and the README's
Python example are tests/test_docs_devices.py's and tests/test_readme.py's.
"""

from __future__ import annotations

import contextlib
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import RUN_TIMEOUT, VIOWIRE, run, serve

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

NOT_HERE: list[tuple[str, str]] = [
    (r"^docker ", "needs a Docker engine (tests/test_compose.py checks the compose file)"),
    (r"^mmdebstrap ", "a base image for a Docker engine (scripts/compose-test makes one)"),
    (r"docker compose", "needs a Docker engine (tests/test_compose.py checks the compose file)"),
    (
        r"^qemu-system|^qemu-storage-daemon|^\s*-|qtest\+unix",
        "starts QEMU with a guest or a disk of its own (tests/test_qtest.py, "
        "test_vhost_user_guest.py and test_vhost_user_frontend.py run these flows)",
    ),
    (r"\.venv/bin/pip install", "installs from the network (tests/test_readme.py checks it)"),
    (r"scripts/mutation-test", "runs for hours (docs/mutation.md)"),
    (
        r"net-attach|^ip |^ping ",
        "a TAP and addresses outside a network namespace "
        "(tests/test_netattach.py runs it inside one)",
    ),
    (r"--link lan,connect=tcp://server-a", "a second host named server-a"),
    (r"devices\.example|\bURL\b", "a placeholder host or URL"),
    (r"backend=pty:", "an interactive shell on a terminal (tests/test_console_cli.py)"),
    (r"^viowire bench", "runs for minutes (tests/test_bench.py runs it quick)"),
    (r"vhost-user", "a vhost-user socket pair (tests/test_vhost_user*.py run these)"),
    (r"--port org\.qemu\.guest_agent|ports=org\.qemu\.guest_agent", "a guest agent socket"),
    (r"^python -m pytest", "the test suite itself"),
    (r"2a0000000001", "a session id of the reader's own trace"),
    (r"^curl ", "a scraper of --metrics (tests/test_metrics.py scrapes it over HTTP)"),
    (r"^kubectl ", "needs a Kubernetes cluster (tests/test_load_k8s.py checks the manifests)"),
    (r"tls://", "needs a certificate authority and certificates (tests/test_auth.py makes them)"),
    (r"10\.203\.", "addresses of a test network (docs/containers.md sets it up by hand)"),
    (r"^viowire console unix", "interactive: a terminal at the other end"),
    (
        r"^python examples/loopback_client",
        "drives devices.md's server of section 2 (tests/test_docs_devices.py runs the pair)",
    ),
]


def _commands(block: str) -> list[str]:
    """The command lines of a shell block: continuations joined, comments dropped."""
    joined = re.sub(r"\\\n\s*", " ", block)
    lines = [re.sub(r"\s+#\s.*$", "", line).strip() for line in joined.splitlines()]
    return [line for line in lines if line]


def _examples() -> list[tuple[str, str, str]]:
    """(where, language, text) of every sh command and toml block."""
    found = []
    for path in DOCS:
        text = path.read_text()
        for number, match in enumerate(re.finditer(r"```(sh|toml)\n(.*?)```", text, re.S)):
            where = f"{path.relative_to(ROOT)} block {number}"
            if match.group(1) == "toml":
                found.append((where, "toml", match.group(2)))
                continue
            found += [(where, "sh", line) for line in _commands(match.group(2))]
    return found


EXAMPLES = _examples()


def _excuse(line: str) -> str | None:
    return next((why for pattern, why in NOT_HERE if re.search(pattern, line)), None)


def _runnable() -> list[tuple[str, str]]:
    return [(where, line) for where, lang, line in EXAMPLES if lang == "sh" and not _excuse(line)]


def _blocks() -> dict[str, list[str]]:
    """The runnable lines by block: a block's commands run in order, its servers stay up."""
    found: dict[str, list[str]] = {}
    for where, line in _runnable():
        found.setdefault(where, []).append(line)
    return found


def test_every_example_is_run_or_excused():
    kinds = {line.split()[0] for _, line in _runnable()}
    assert kinds <= {"viowire", "printf", "python", "openssl"}, kinds
    assert len(_runnable()) >= 20  # most of them run here
    tomls = [where for where, lang, _ in EXAMPLES if lang == "toml"]
    assert len(tomls) == 2  # the README's platform (run below) and devices.md's entry point


def _local(line: str, tmp_path: Path, urls: dict[str, str]) -> list[str]:
    line = line.replace("/tmp/", f"{tmp_path}/").replace("0.0.0.0", "127.0.0.1")
    for written, actual in urls.items():
        line = line.replace(written, actual)
    words = shlex.split(line)
    if "--duration" in words:
        words[words.index("--duration") + 1] = "1"
    for option in ("--sessions", "--devices"):  # a tenth: the same devices per session
        if option in words and int(words[words.index(option) + 1]) >= 20:
            words[words.index(option) + 1] = str(int(words[words.index(option) + 1]) // 10)
    return words


def _serve_args(words: list[str], tmp_path: Path, number: int = 1) -> list[str]:
    """A serve line's options, on free ports; one without --listen gets the default socket
    path (the block's first such server) or one of its own."""
    args = [re.sub(r"^tcp://127\.0\.0\.1:\d+$", "tcp://127.0.0.1:0", w) for w in words[2:]]
    if "--listen" not in args:
        name = "viowire.sock" if number == 1 else f"viowire-{number}.sock"
        args += ["--listen", f"unix://{tmp_path}/{name}", "--listen", "tcp://127.0.0.1:0"]
    return args


@pytest.mark.parametrize(("where", "lines"), list(_blocks().items()))
def test_example_block_runs(where, lines, tmp_path):
    if any("--token-file token" in line for line in lines):  # the user's own secret
        (tmp_path / "token").write_text("0123456789abcdef" * 4 + "\n")
        (tmp_path / "token").chmod(0o600)
    if any("--config platform.toml" in line for line in lines):
        (toml,) = [text for w, lang, text in EXAMPLES if lang == "toml" and "README" in w]
        (tmp_path / "platform.toml").write_text(toml)
    cwd = ROOT if any("examples." in line for line in lines) else tmp_path
    urls: dict[str, str] = {}  # as written -> where this test's server listens
    started = running = 0  # servers on the default socket path, servers in all
    with contextlib.ExitStack() as servers:
        for line in lines:
            words = _local(line, tmp_path, {})
            if words[:2] == ["viowire", "serve"] and "--list-devices" not in words:
                started += "--listen" not in words
                args = _serve_args(words, tmp_path, started)
                served = servers.enter_context(serve(*args, cwd=cwd))
                running += 1
                written = re.search(r"tcp://[\d.]+:(\d+)", line)
                if any(url.startswith("tcp") for url in served.endpoints):  # the first one
                    port = written.group(1) if written else 7000  # serves, as in the text
                    urls.setdefault(f"tcp://127.0.0.1:{port}", served.url("tcp"))
                continue
            if re.search(r"(?:unix|tcp)://", line) and not running:
                default = _serve_args(["viowire", "serve"], tmp_path)
                served = servers.enter_context(serve(*default, cwd=cwd))
                running += 1
                urls["tcp://127.0.0.1:7000"] = served.url("tcp")
            result = _run(line, _local(line, tmp_path, urls), cwd)
            assert result.returncode == 0, f"{line}\n{result.stdout}\n{result.stderr}"


def _run(line: str, words: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    if words[0] == "openssl":  # a shell line: redirection, &&
        return subprocess.run(
            ["bash", "-c", line], cwd=cwd, capture_output=True, text=True, timeout=60, check=False
        )
    words = [
        word for pattern in words
        for word in (sorted(str(p.relative_to(cwd)) for p in cwd.glob(pattern)) or [pattern]
                     if "*" in pattern else [pattern])
    ]  # fmt: skip  # the shell's globbing
    if line.startswith("printf"):  # printf TEXT | viowire ...
        text, command = line.split(" | ", 1)
        stdin = shlex.split(text)[1].encode().decode("unicode_escape")
        return subprocess.run(
            [*VIOWIRE, *shlex.split(command)[1:]],
            input=stdin, capture_output=True, text=True, timeout=RUN_TIMEOUT, check=False,
        )  # fmt: skip
    if words[0] == "viowire":
        return run([sys.executable, "-m", "viowire.cli", *words[1:]], cwd=cwd, timeout=60)
    return run([sys.executable, *words[1:]], cwd=ROOT, timeout=60)
