"""viowire conform's virtio-net checks (viowire/conform/net.py) against viowire's own net device,
from the command line and in process, and against devices that break the rules they check."""

from __future__ import annotations

import json

import pytest
from cli_run import viowire
from test_any_device import ROOT, conform, fails

from viowire.conform.model import Verdict
from viowire.server.devices.net import NetDevice
from viowire.virtio.net import Ack

NET_CHECKS = ("net.header-size", "net.mrg-rxbuf", "net.ctrl-commands")


class AcksAnything(NetDevice):
    """Says VIRTIO_NET_OK to every command, however bad."""

    type_name = ""

    async def _command(self, cls: int, command: int, data: bytes) -> Ack:
        return Ack.OK


class TwelveBytesAlways(NetDevice):
    """A 12-byte header even to a legacy driver without MRG_RXBUF (§5.1.6 says 10)."""

    type_name = ""

    @property
    def header_size(self) -> int:
        return 12


def test_net_checks_pass_from_the_command_line():
    result = viowire(
        "conform",
        "--device",
        "net",
        "--device",
        "net,version=1",
        "--only",
        "net.*",
        "--json",
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    verdicts = {(row["device"], row["id"]): row["verdict"] for row in rows}
    devices = {"virtio-net@0x10001000 v2", "virtio-net@0x10002000 v1"}
    assert verdicts == {(d, c): "PASS" for d in devices for c in NET_CHECKS}


@pytest.mark.parametrize("memory", ["shared", "proxied"])
async def test_every_check_on_two_net_devices(tmp_path, memory):
    results = await conform(tmp_path, "net", "net,version=1,queues=2", memory=memory)
    for device, checks in results.items():
        assert not fails(checks), (device, fails(checks))
        for id_ in NET_CHECKS:
            assert checks[id_].verdict == Verdict.PASS, checks[id_]
    legacy = results["virtio-net@0x10002000 v1"]["net.header-size"].detail
    assert "10 bytes, 12 bytes with MRG_RXBUF" in legacy


async def test_a_lone_net_device_skips_the_receive_checks_and_says_why(tmp_path):
    (checks,) = (await conform(tmp_path, "net")).values()
    for id_ in ("net.header-size", "net.mrg-rxbuf"):
        assert checks[id_].verdict == Verdict.SKIP
        assert "second net device on the same link" in checks[id_].detail
    assert checks["net.ctrl-commands"].verdict == Verdict.PASS


@pytest.mark.parametrize(
    "cls, check, words",
    [
        (AcksAnything, "net.ctrl-commands", "an unknown class: ack 0x0, expected ERR"),
        (TwelveBytesAlways, "net.header-size", "expected 224, the 10-byte header"),
    ],
)
async def test_the_checks_catch_a_device_that_breaks_the_rule(tmp_path, cls, check, words):
    spec = f"test_net_conform:{cls.__name__}"
    results = await conform(tmp_path, f"{spec},version=1", spec)
    legacy = results["virtio-net@0x10001000 v1"]
    assert legacy[check].verdict == Verdict.FAIL
    assert words in legacy[check].detail
