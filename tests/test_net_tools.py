"""``viowire probe`` and ``viowire demo`` with net devices, against real servers: probe decodes
a net device's config space (mac, status, mtu, and max_virtqueue_pairs when MQ is offered) by
its config_layout; demo exchanges frames between a device and a peer on its link."""

from __future__ import annotations

import asyncio

from servers import running_server, url_of

from viowire.client.inspect import describe_platform, format_text
from viowire.demo import demo
from viowire.server.devices.net import NetDevice
from viowire.server.platform import DeviceSpec, PlatformSpec

NET = 1  # §5: virtio-net's device ID
TIMEOUT = 20.0


def spec(*texts: str) -> PlatformSpec:
    return PlatformSpec([DeviceSpec.parse(text) for text in texts])


async def test_probe_decodes_a_net_config(tmp_path):
    platform = spec(
        "net,mac=02:00:00:00:00:2a,mtu=9000,version=1",
        "net,link=b",
        "net,queues=2",  # offers MQ: max_virtqueue_pairs is then valid (§5.1.4)
    )
    async with running_server(tmp_path, platform) as server:
        async with asyncio.timeout(TIMEOUT):
            devices = await describe_platform(url_of(server, "unix"))
    assert [d["device_id"] for d in devices] == [NET] * 3
    fixed, auto, mq = devices
    assert "MAC" in fixed["features"] and "STATUS" in fixed["features"]
    # receiveq0, transmitq0, controlq (CTRL_VQ is offered)
    assert fixed["queues"] == [{"index": i, "num_max": 256} for i in range(3)]
    # JSON keeps the little-endian integers: the MAC's first octet is the lowest byte
    assert fixed["config"] == {"mac": 0x2A_00_00_00_00_02, "status": 1, "mtu": 9000}
    assert set(auto["config"]) == {"mac", "status", "mtu"}  # no MQ: no max_virtqueue_pairs
    assert mq["config"]["max_virtqueue_pairs"] == 2 and "MQ" in mq["features"]

    text = format_text(devices)
    assert "\tConfig mac: 02:00:00:00:00:2a\n" in text
    assert text.count("\tConfig status: 0x1 (LINK_UP)\n") == 3
    assert "\tConfig mtu: 9000\n" in text and "\tConfig max_virtqueue_pairs: 2\n" in text
    assert text.count("\tConfig mac: 02:76:77:") == 2  # the server's own MACs


async def test_demo_exchanges_frames_with_a_peer_on_the_link(capsys):
    platform = spec("net", "net,version=1,mac=02:00:00:00:00:09", "rng")
    async with asyncio.timeout(TIMEOUT):
        assert await demo(platform) == 0
    out = capsys.readouterr().out
    assert out.count("-- I/O: MAC ") == 2
    # MRG_RXBUF is negotiated: 12 bytes for the legacy device too (§5.1.6.1)
    assert out.count("12-byte virtio_net_hdr") == 2
    assert out.count("   peer: the same slot in a second session") == 2
    assert out.count("broadcast 60 bytes: the peer received it") == 2
    assert "its unicast reply:" in out  # the peer has a MAC of its own
    assert "its broadcast reply:" in out  # mac= gives the peer the same MAC: no unicast
    assert out.count(", verified") == 2 and "MISMATCH" not in out
    assert "demo: every device went through probe, I/O and teardown" in out


async def test_demo_fails_when_the_peer_hears_nothing(capsys, monkeypatch):
    """The link loses every frame: the demo says the device failed, within its bound."""
    monkeypatch.setattr(NetDevice, "_deliver", lambda self, frame: None)
    monkeypatch.setattr("viowire.demo.FRAME_TIMEOUT", 0.2)
    async with asyncio.timeout(TIMEOUT):
        assert await demo(spec("net")) == 1
    assert "demo: 1 device(s) failed" in capsys.readouterr().out
