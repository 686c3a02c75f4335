"""The ``viowire`` command line as a user runs it: ``viowire serve`` in a subprocess, and
``probe``, ``io`` and ``demo`` against it, each a subprocess with a timeout."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from cli_run import CONSOLE_SCRIPT, RUN_TIMEOUT, serve, viowire

from viowire.declarations import parse_dts
from viowire.virtio.constants import VENDOR_ID_VIOWIRE

README = Path(__file__).resolve().parent.parent / "README.md"
CAPACITY_64M = (64 << 20) // 512


def no_traceback(result: subprocess.CompletedProcess[str]) -> None:
    assert "Traceback" not in result.stderr + result.stdout, result.stderr


@pytest.fixture(scope="module")
def default_server(tmp_path_factory):
    """``viowire serve`` with the default platform on a Unix socket and a free TCP port."""
    sock = tmp_path_factory.mktemp("cli") / "s.sock"
    with serve("--listen", f"unix://{sock}", "--listen", "tcp://127.0.0.1:0") as served:
        yield served


def test_serve_prints_devices_and_real_endpoints(default_server):
    assert default_server.lines[:4] == [
        "device blk  v1 at 0x10001000 irq 1",
        "device blk  v2 at 0x10002000 irq 2",
        "device rng  v1 at 0x10003000 irq 3",
        "device rng  v2 at 0x10004000 irq 4",
    ]
    tcp = default_server.url("tcp")
    assert re.fullmatch(r"tcp://127\.0\.0\.1:\d+", tcp) and not tcp.endswith(":0")
    assert Path(default_server.url("unix").removeprefix("unix://")).is_socket()


@pytest.mark.parametrize("scheme", ["unix", "tcp"])
def test_probe_text(default_server, scheme):
    result = viowire("probe", default_server.url(scheme))
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for i, (base, name) in enumerate(
        [
            (0x10001000, "virtio-blk"),
            (0x10002000, "virtio-blk"),
            (0x10003000, "virtio-rng"),
            (0x10004000, "virtio-rng"),
        ]
    ):
        assert f"{i}: {base:#010x} {name}" in out
        assert f"IRQ {i + 1}" in out
    assert out.count("QueueNumMax 256") == 4
    assert out.count("Version 1 (legacy)") == 2 and out.count("Version 2 (modern)") == 2
    assert out.count(f"Config capacity: {CAPACITY_64M} sectors (64.0 MiB)") == 2


def probe_json(url: str, *extra: str) -> list[dict]:
    result = viowire("probe", "--json", *extra, url)
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout)["devices"]


def test_probe_json(default_server):
    devices = probe_json(default_server.url("unix"))
    assert [
        (d["base"], d["size"], d["irq"], d["version"], d["device_id"], d["name"]) for d in devices
    ] == [
        (0x10001000, 0x200, 1, 1, 2, "virtio-blk"),
        (0x10002000, 0x200, 2, 2, 2, "virtio-blk"),
        (0x10003000, 0x200, 3, 1, 4, "virtio-rng"),
        (0x10004000, 0x200, 4, 2, 4, "virtio-rng"),
    ]
    for d in devices:
        assert d["vendor_id"] == VENDOR_ID_VIOWIRE
        assert d["queues"] == [{"index": 0, "num_max": 256}]
        assert all(isinstance(name, str) for name in d["features"])
        assert ("VERSION_1" in d["features"]) == (d["version"] == 2)
    blk_legacy, blk_modern = devices[:2]
    assert "FLUSH" in blk_legacy["features"] and "FLUSH" in blk_modern["features"]
    assert blk_legacy["config"]["capacity"] == blk_modern["config"]["capacity"] == CAPACITY_64M


def test_probe_dts(default_server):
    result = viowire("probe", "--dts", default_server.url("unix"))
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("/dts-v1/;")
    nodes = re.findall(r"virtio_mmio@([0-9a-f]+) \{\n(.*?)\n\t\};", result.stdout, re.S)
    assert [base for base, _ in nodes] == ["10001000", "10002000", "10003000", "10004000"]
    for i, (base, body) in enumerate(nodes):
        assert 'compatible = "virtio,mmio";' in body
        assert f"reg = <0x0 0x{base} 0x0 0x200>;" in body
        assert f"interrupts = <{i + 1:#x}>;" in body
    devices = parse_dts(result.stdout)
    assert [(d.base, d.size, d.irq) for d in devices] == [
        (0x10001000 + i * 0x1000, 0x200, i + 1) for i in range(4)
    ]


def test_probe_proxied_memory_over_tcp(default_server):
    shared = probe_json(default_server.url("unix"))
    assert probe_json(default_server.url("tcp"), "--memory", "proxied") == shared


def io(url: str, device: int, *commands: str, memory: str | None = None):
    args = ["io", url, "--device", str(device)]
    if memory:
        args += ["--memory", memory]
    for command in commands:
        args += ["-c", command]
    return viowire(*args)


@pytest.mark.parametrize(("scheme", "memory"), [("unix", None), ("tcp", "proxied")])
def test_io_write_read_flush(default_server, scheme, memory):
    result = io(
        default_server.url(scheme),
        1,
        "write -P 0xab 0 64K",
        "read -P 0xab 0 64K",
        "flush",
        memory=memory,
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == "wrote 65536/65536 bytes at offset 0"
    assert lines[1].startswith("64K bytes, 1 ops; ")
    assert lines[2] == "read 65536/65536 bytes at offset 0"
    assert lines[3].startswith("64K bytes, 1 ops; ")
    assert lines[4].startswith("flush done; ")
    assert len(lines) == 5


def test_io_pattern_mismatch_exits_1(default_server):
    result = io(default_server.url("unix"), 0, "write -P 0xab 4K 4K", "read -P 0xcd 4K 4K", "flush")
    assert result.returncode == 1
    assert "Pattern verification failed at offset 4096, 4096 bytes" in result.stdout
    assert "(read 0xab, expected 0xcd)" in result.stdout
    assert "flush done" not in result.stdout  # the commands stop at the first failure
    no_traceback(result)


def test_io_pattern_zero_is_a_pattern(default_server):
    result = io(
        default_server.url("unix"), 1, "write -P 0xab 0 4K", "write -P 0 0 4K", "read -P 0 0 4K"
    )
    assert result.returncode == 0, result.stdout


@pytest.mark.parametrize(
    ("device", "command", "message"),
    [
        (2, "flush", "device 2 at 0x10003000 is virtio-rng, not virtio-blk"),
        (9, "flush", "device 9: the platform has devices 0..3"),
        (1, "erase 0 4K", "unknown command 'erase': use read, write or flush"),
        (1, "read -P 0x100 0 4K", "pattern 0x100 does not fit in a byte"),
        (1, "read 64M 4K", "beyond the end of the disk"),
    ],
)
def test_io_errors_are_one_clear_line(default_server, device, command, message):
    result = io(default_server.url("unix"), device, command)
    assert result.returncode == 1
    assert message in result.stderr
    assert result.stderr.startswith("viowire io: ")
    no_traceback(result)


def test_client_errors_name_the_url(tmp_path):
    missing = f"unix://{tmp_path}/nobody.sock"
    result = viowire("probe", missing)
    assert result.returncode == 1
    assert f"viowire probe: {missing}: " in result.stderr
    no_traceback(result)
    result = viowire("probe", "http://localhost:7000")
    assert result.returncode == 1
    assert "use tcp://HOST:PORT or unix:///PATH" in result.stderr
    no_traceback(result)


def test_serve_device_specs(tmp_path):
    sock = tmp_path / "s.sock"
    args = ["--listen", f"unix://{sock}", "--device", "blk,size=1M", "--device", "rng"]
    with serve(*args) as served:
        assert served.lines[:2] == [
            "device blk  v2 at 0x10001000 irq 1",
            "device rng  v2 at 0x10002000 irq 2",
        ]
        devices = probe_json(served.url("unix"))
    assert [(d["name"], d["version"]) for d in devices] == [("virtio-blk", 2), ("virtio-rng", 2)]
    assert devices[0]["config"]["capacity"] == (1 << 20) // 512


def test_serve_readme_config_file(tmp_path):
    """The README's TOML platform, with a disk image of its own next to it (grown to the size
    the file gives)."""
    toml = re.search(r"```toml\n(.*?)```", README.read_text(), re.S).group(1)
    (tmp_path / "platform.toml").write_text(toml)
    with open(tmp_path / "disk.img", "wb") as image:
        image.truncate(2 << 20)
    sock = tmp_path / "s.sock"
    args = ["--config", "platform.toml", "--listen", f"unix://{sock}", "--device", "rng,version=1"]
    with serve(*args, cwd=tmp_path) as served:
        devices = probe_json(served.url("unix"))
        result = io(served.url("unix"), 1, "write -P 0x5a 1M 4K", "flush")
        assert result.returncode == 0, result.stderr
    assert [(d["base"], d["irq"], d["name"], d["version"]) for d in devices] == [
        (0x10001000, 1, "virtio-blk", 1),
        (0x10002000, 2, "virtio-blk", 2),
        (0x10003000, 3, "virtio-rng", 2),
        (0x10004000, 4, "virtio-rng", 1),  # --device adds to the file's devices
    ]
    assert devices[0]["config"]["capacity"] == CAPACITY_64M
    assert devices[1]["config"]["capacity"] == CAPACITY_64M
    with open(tmp_path / "disk.img", "rb") as image:
        image.seek(1 << 20)
        assert image.read(4096) == b"\x5a" * 4096


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--device", "bogus"], "device 'bogus': unknown type 'bogus': give one of blk, rng"),
        (["--device", "blk,size=12Q"], "unknown suffix 'Q'"),
        (["--device", "blk,size=1M,version=3"], "version '3' must be 1 (legacy) or 2"),
        (["--device", "blk"], "a RAM disk needs size=<bytes>"),
        (["--device", "blk,path=missing.img"], "missing.img does not exist"),
        (["--config", "nothere.toml"], "config nothere.toml: "),
    ],
)
def test_serve_bad_platform_fails_fast(tmp_path, args, message):
    sock = tmp_path / "s.sock"
    result = viowire("serve", "--listen", f"unix://{sock}", *args, cwd=tmp_path, timeout=10)
    assert result.returncode == 2  # bad input, as argparse's
    assert result.stderr.startswith("viowire serve: ")
    assert message in result.stderr
    no_traceback(result)
    assert not sock.exists()  # it never listened
    assert not (tmp_path / "missing.img").exists()


def test_serve_sigterm_stops_cleanly(tmp_path):
    sock = tmp_path / "s.sock"
    with serve("--listen", f"unix://{sock}", "--listen", "tcp://127.0.0.1:0") as served:
        assert sock.is_socket()
        assert viowire("probe", served.url("tcp")).returncode == 0
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(timeout=10) == 0
        assert served.proc.stderr.read() == ""
    assert not sock.exists()


def test_demo_through_the_console_script():
    assert CONSOLE_SCRIPT.exists(), f"{CONSOLE_SCRIPT}: pip install -e . makes it"
    result = subprocess.run(
        [str(CONSOLE_SCRIPT), "demo"],
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "DRIVER_OK" in result.stdout
    assert "verified" in result.stdout
    assert "demo: every device went through probe, I/O and teardown" in result.stdout
    # Every device's I/O took interrupts, and the count says so (the last one included).
    taken = re.findall(r"interrupts taken: (\d+)", result.stdout)
    assert len(taken) == 4 and all(int(n) >= 1 for n in taken), taken
    no_traceback(result)


# What building the parser (every `viowire` process does) and serving must not import: the
# verbs' implementations are imported by the verb that runs, the metrics library at a scrape.
NOT_FOR_THE_PARSER = (
    "viowire.client.connection", "viowire.perf.suite", "viowire.conform.runner",
    "viowire.trace.show", "viowire.load.latency", "prometheus_client",
)  # fmt: skip
NOT_FOR_SERVING = ("viowire.client.connection", "viowire.perf.suite", "prometheus_client")


def test_the_parser_and_a_server_import_only_what_they_use():
    script = (
        "import sys\n"
        "from viowire import cli\n"
        "cli.build_parser()\n"
        "print(*sys.modules)\n"
        "from viowire.server.app import Server\n"
        "from viowire.server.platform import PlatformSpec\n"
        "Server(PlatformSpec.default())\n"
        "print(*sys.modules)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=RUN_TIMEOUT
    )
    assert done.returncode == 0, done.stderr
    parser, serving = (set(line.split()) for line in done.stdout.splitlines())
    assert "viowire.cli" in parser and "viowire.server.app" in serving  # the lists are real
    assert parser.isdisjoint(NOT_FOR_THE_PARSER), parser & set(NOT_FOR_THE_PARSER)
    assert serving.isdisjoint(NOT_FOR_SERVING), serving & set(NOT_FOR_SERVING)
