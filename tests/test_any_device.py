"""conform and load on device types of users' own, through what the type declares.

examples/loopback.py's Loopback (a transmitted message needs a buffer posted on its receive
queue) and tests/plugins' EchoDevice (request/response) declare a sample request: every check
runs on them, I/O included. ``Quiet`` declares none: the checks that need no I/O run, the I/O
ones are not applicable. Devices that break what their type declares FAIL. ``viowire load
--workload`` drives them with a function of the user's. Real servers on real sockets; every wait
bounded.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import struct
from pathlib import Path

import pytest
from cli_run import viowire
from servers import running_server, url_of

from viowire import cli, load
from viowire.client.connection import connect
from viowire.conform.checks import CHECKS
from viowire.conform.report import format_checks
from viowire.conform.runner import Options, Result, Target, Verdict, run_suite
from viowire.device import (
    ConfigField,
    DescriptorChain,
    Device,
    GuestMemory,
    Queue,
    SampleRequest,
)
from viowire.load.workload import Workload
from viowire.options import UsageError
from viowire.server.platform import DeviceSpec, PlatformSpec

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
LOOPBACK = "examples.loopback:Loopback"
ECHO = "echo_device:EchoDevice"
FAST = Options(access_timeout=1.0, io_timeout=1.0, check_timeout=10.0)
RUN_TIMEOUT = 30.0
IO_CHECKS = {c.id for c in CHECKS if c.io and c.devices is None}  # the I/O of any type


@pytest.fixture(autouse=True)
def users_modules(monkeypatch):
    """The example and the plugin are importable as a user's modules are: from sys.path."""
    monkeypatch.syspath_prepend(str(ROOT))
    monkeypatch.syspath_prepend(str(PLUGINS))


class Quiet(Device):
    """A user's type that declares no sample request: two queues whose buffers it keeps."""

    device_id = 0x7F20
    type_name = "quiet"
    num_queues = 2
    config_layout = (ConfigField("word", 0, 4, None),)

    def config_space(self) -> bytes:
        return struct.pack("<I", 0x51E7)

    def queue_notify(self, queue: Queue) -> None:
        pass  # buffers stay with the device: no request of its ever completes


class LazyEcho(Device):
    """Declares that an answer has at least 4 bytes, and answers with none."""

    device_id = 0x7F21
    type_name = "lazy-echo"
    sample_request = SampleRequest(readable=b"ping", writable=64, min_written=4)

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        return 0


class BadStatus(Device):
    """Declares status 0 in the last writable byte, and writes 1 there."""

    device_id = 0x7F22
    type_name = "bad-status"
    sample_request = SampleRequest(readable=b"op", writable=(8, 1), status=0)

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        return await chain.write(bytes(8) + b"\x01")


def platform(*specs: str) -> PlatformSpec:
    return PlatformSpec([DeviceSpec.parse(spec) for spec in specs])


async def conform(tmp_path, *specs: str, memory: str = "shared") -> dict[str, dict[str, Result]]:
    """Every check on every device of a server of ``specs``: results by device, then check."""
    scheme = "unix" if memory == "shared" else "tcp"
    async with (
        running_server(tmp_path, platform(*specs)) as server,
        await connect(url_of(server, scheme), memory=memory, irq_status=False) as conn,
    ):
        target = Target(conn, conn.ram.memory, conn.ram, await conn.platform())
        results = await asyncio.wait_for(run_suite(target, options=FAST), RUN_TIMEOUT)
    by_device: dict[str, dict[str, Result]] = {}
    for result in results:
        by_device.setdefault(result.device, {})[result.id] = result
    return by_device


def fails(results: dict[str, Result]) -> dict[str, str]:
    return {id_: r.detail for id_, r in results.items() if r.verdict == Verdict.FAIL}


def not_applicable(results: dict[str, Result]) -> set[str]:
    return {id_ for id_, r in results.items() if "not applicable" in r.detail}


# -- conform: every check on the types that declare a sample request ------------------------------


@pytest.mark.parametrize(
    ("spec", "memory"),
    [
        (LOOPBACK, "shared"),
        (LOOPBACK, "proxied"),
        (f"{LOOPBACK},version=1,latency=1ms", "shared"),
        (ECHO, "shared"),
        (f"{ECHO},version=1,prefix=>>", "proxied"),
    ],
)
async def test_a_declared_type_passes_every_check_io_included(tmp_path, spec, memory):
    (results,) = (await conform(tmp_path, spec, memory=memory)).values()
    assert not fails(results), fails(results)
    assert len(results) == len(CHECKS)
    for result in results.values():  # every verdict is one its check allows
        assert result.verdict == Verdict.SKIP or result.verdict in result.expected, result
    assert not not_applicable(results)
    version = 1 if "version=1" in spec else 2
    skipped = {id_ for id_ in IO_CHECKS if results[id_].verdict == Verdict.SKIP}
    assert skipped == {c.id for c in CHECKS if c.id in IO_CHECKS and version not in c.versions}
    seen = {id_: r.verdict for id_, r in results.items()}
    for id_ in ("io.requests", "io.indirect", "irq.ack-exact", "driver.linux-flow"):
        assert seen[id_] == Verdict.PASS, results[id_]
    assert seen["reset.in-flight"] == seen["reset.ring-indices"] == Verdict.PASS
    assert seen["ring.desc-loop"] == Verdict.WEDGED
    assert seen["mmio.width.status-byte"] == seen["mmio.undefined-offsets"] == Verdict.REJECT
    assert seen["config.widths"] == Verdict.PASS  # the type declares its config layout
    assert seen["init.flow" if version == 2 else "init.flow-legacy"] == Verdict.PASS
    name = spec.split(":")[1].split(",")[0].lower().removesuffix("device")
    assert next(iter(results.values())).device.startswith(f"{name}@0x10001000 v{version}")


async def test_the_loopback_is_driven_through_its_receive_queue(tmp_path):
    (results,) = (await conform(tmp_path, LOOPBACK)).values()
    # transmitted messages complete only as receive buffers take them: 1 + 2 x 16 of them here
    assert results["io.requests"].detail.startswith("1 + 2 x 16 requests on a ring of 16")
    assert "a request on queue 1 (0 bytes written)" in results["driver.linux-flow"].detail


# -- conform: a type that declares none, and devices that break their declaration ---------------


async def test_a_type_without_sample_request_gets_the_transport_checks(tmp_path):
    (results,) = (await conform(tmp_path, "test_any_device:Quiet")).values()
    assert not fails(results), fails(results)
    io_v2 = {c.id for c in CHECKS if c.id in IO_CHECKS and 2 in c.versions}
    assert not_applicable(results) == io_v2
    for id_ in io_v2:
        assert "test_any_device:Quiet declares no sample_request" in results[id_].detail
    seen = {id_: r.verdict for id_, r in results.items()}
    assert seen["init.flow"] == seen["status.state-machine"] == seen["reset.storm"] == Verdict.PASS
    assert seen["reset.clears-state"] == seen["config.widths"] == Verdict.PASS
    assert seen["mmio.shm-absent"] == Verdict.PASS  # a Device type has no shared memory
    assert seen["queue.nonexistent-sel"] == seen["mmio.read-only-writes"] == Verdict.REJECT
    ran = {id_ for id_, r in results.items() if r.verdict != Verdict.SKIP}
    assert ran == {c.id for c in CHECKS if 2 in c.versions and not c.io and c.devices is None}


async def test_devices_that_break_what_their_type_declares_fail(tmp_path):
    by_device = await conform(tmp_path, "test_any_device:LazyEcho", "test_any_device:BadStatus")
    lazy, bad = by_device.values()
    assert "gets at least 4 byte(s) written" in fails(lazy)["io.requests"]
    assert "used.len 0, below the 4" in fails(lazy)["driver.linux-flow"]
    assert "status byte 0x1 for head 0, expected 0x0" in fails(bad)["io.requests"]
    assert "status byte 0x1, expected 0x0" in fails(bad)["driver.linux-flow"]
    for results in (lazy, bad):
        assert results["mmio.magic"].verdict == results["init.flow"].verdict == Verdict.PASS


def test_conform_on_the_example_from_the_command_line():
    result = viowire("conform", "--device", LOOPBACK, "--json", cwd=ROOT)
    assert result.returncode == 0, result.stderr
    rows = {row["id"]: row for row in json.loads(result.stdout)}
    assert {row["device"] for row in rows.values()} == {"loopback@0x10001000 v2"}
    assert not [row for row in rows.values() if row["verdict"] == "FAIL"]
    assert rows["io.requests"]["verdict"] == rows["driver.linux-flow"]["verdict"] == "PASS"


def test_conform_exits_0_when_the_io_checks_are_not_applicable(capsys):
    assert cli.main(["conform", "--device", "test_any_device:Quiet", "--only", "io.*"]) == 0
    out = capsys.readouterr().out
    assert "io.requests" in out and "not applicable" in out
    assert "0 FAIL" in out.splitlines()[-1]


def test_the_catalogue_shows_which_checks_need_io():
    rows = {line.split()[0]: line for line in format_checks(CHECKS).splitlines()[1:]}
    assert " I/O " in rows["io.requests"] and " I/O " in rows["ring.desc-loop"]
    assert " blk " in rows["io.blk-status"] and " all " in rows["mmio.magic"]


def test_a_sample_request_is_checked_when_declared():
    sample = SampleRequest(queue=1, readable=b"hi", writable=(0, 8, 1), receive_queue=0)
    assert (sample.readable_buffers, sample.writable_sizes) == ((b"hi",), (8, 1))
    for bad, why in [
        ({}, "give readable= bytes or writable= sizes"),
        ({"readable": b"x", "status": 0}, "a status byte needs a writable buffer"),
        ({"writable": 4, "min_written": 5}, "min_written 5 is not within the 4 writable bytes"),
        ({"writable": (4, -1)}, "cannot be negative"),
        ({"writable": 4, "receive_queue": 0}, "receive_queue must be another queue"),
    ]:
        with pytest.raises(ValueError, match=why):
            SampleRequest(**bad)


# -- load: a workload of the user's own ------------------------------------------------------------


async def echo_round(driver, rng: random.Random) -> int:
    """One operation on an echo device, through its own driver (EchoDriver)."""
    data = rng.randbytes(rng.randrange(1, 64))
    answer = await driver.request(data)
    if answer != data:
        raise AssertionError(f"sent {data!r}, got {answer!r}")  # a verify failure
    return 2 * len(data)


echo_round.device_type = ECHO  # type: ignore[attr-defined]


async def hangs(driver, rng: random.Random) -> int:
    await asyncio.Event().wait()
    return 0


async def says_how_much_in_words(driver, rng: random.Random) -> str:
    return "lots"


NOT_A_FUNCTION = 42


def parse(*argv: str):
    import argparse

    parser = argparse.ArgumentParser(prog="viowire")
    load.add_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["load", *argv])


async def run_load(capsys, url: str, *argv: str) -> tuple[int, dict]:
    args = parse(url, *argv, "--json", "--no-progress")
    status = await asyncio.wait_for(load.run(args), RUN_TIMEOUT)
    return status, json.loads(capsys.readouterr().out)


def test_load_drives_the_example_with_its_workload():
    result = viowire(
        "load", "--device", f"{LOOPBACK},count=3", "--workload",
        "examples.loopback_load:workload", "--sessions", "2", "--depth", "4",
        "--requests", "600", "--json", "--no-progress",
        cwd=ROOT,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    s = json.loads(result.stdout)
    assert s["ok"] is True and s["errors"] == 0 and s["verify_failures"] == 0
    assert s["requests"] == s["completed"] == 600
    assert s["devices_by_kind"] == {"loopback": 6}
    assert s["ops"]["workload"]["requests"] == 600
    assert s["ops"]["workload"]["bytes"] == s["bytes"] > 600 * 2 * 5  # each way, crc + payload
    assert s["workload"] == "examples.loopback_load:workload"


async def test_a_workload_drives_only_the_type_it_names(tmp_path, capsys):
    specs = ("blk,size=1M", f"{ECHO},count=3", f"{ECHO},prefix=>,version=1")
    async with running_server(tmp_path, platform(*specs)) as server:
        url = url_of(server, "unix")
        status, s = await run_load(
            capsys, url, "--workload", "test_any_device:echo_round", "--sessions", "2",
            "--requests", "300", "--depth", "2", "--seed", "9",
        )  # fmt: skip
    assert status == 1  # the echo with a prefix answers what echo_round does not expect
    assert s["devices_by_kind"] == {"echo": 8}  # 4 echo devices in each session, no blk
    assert s["requests"] == s["completed"] == 300
    assert set(s["errors_by_kind"]) == {"verify:workload"}
    assert s["verify_failures"] == s["errors"] > 0
    assert s["devices_out"] == {}  # a wrong answer is an error, not a reason to leave
    assert re.search(r"AssertionError: sent .*, got b.>", s["error_samples"][0])  # the prefix
    fair = s["fairness"]["echo"]
    assert fair["devices"] == 8 and fair["requests_min"] > 0


async def test_a_hanging_or_broken_workload_is_counted_not_waited_for(tmp_path, capsys):
    async with running_server(tmp_path, platform(f"{ECHO},count=2")) as server:
        url = url_of(server, "unix")
        status, s = await run_load(
            capsys, url, "--workload", "test_any_device:hangs", "--sessions", "1",
            "--requests", "10", "--timeout", "0.3",
        )  # fmt: skip
        assert status == 1
        assert s["errors_by_kind"] == {"timeout": 2}
        assert s["devices_out"] == {"left the workload after timeout": 2}
        status, s = await run_load(
            capsys, url, "--workload", "test_any_device:says_how_much_in_words",
            "--sessions", "1", "--requests", "10",
        )  # fmt: skip
        assert status == 1
        assert s["errors_by_kind"] == {"TypeError": 10}
        assert "return the bytes the operation moved" in s["error_samples"][0]


def test_bad_workloads_are_refused_with_what_to_write(capsys):
    for reference, why in [
        ("nosuch_module:fn", "no module named 'nosuch_module'"),
        ("test_any_device:nope", "module test_any_device has no 'nope'"),
        ("test_any_device:NOT_A_FUNCTION", "int is not a function"),
        ("test_any_device", "give package.module:function"),
    ]:
        with pytest.raises(UsageError, match=why):
            Workload.load(reference)
    with pytest.raises(UsageError, match="--workload replaces them"):
        asyncio.run(load.run(parse("unix:///x", "--workload", "a:b", "--mix", "rng=1")))
    assert Workload.load("test_any_device:echo_round").kind == "echo"
    assert Workload.load("test_any_device:hangs").kind == "device"  # every device there is
