"""``--device net,tap=IFNAME``: a virtio-net device's frames reach a real TAP interface of the
server's host, whose kernel answers ARP and ping. The server runs in this process; the TAP it
creates (down, no address) is moved into a network namespace of the test before any traffic,
and is given an address of a subnet that is unreachable from the root namespace."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys

import pytest
from netns import Topology, ip, require_netns, tag
from packets import arp_reply_of, arp_request, echo_request, icmp_of
from servers import running_server, url_of

from viowire.client.connection import connect
from viowire.client.drivers.net import NetDriver
from viowire.server import link as links
from viowire.server import tap as taps
from viowire.server.platform import DeviceSpec, PlatformError, PlatformSpec
from viowire.tap import check_ifname

TIMEOUT = 5.0
NET = 1
SUBNET = "10.203.41"
KERNEL_IP, DEVICE_IP = f"{SUBNET}.1", f"{SUBNET}.2"


@pytest.mark.parametrize(
    "name, words",
    [("", "1..15"), ("a" * 16, "1..15"), ("a/b", "may not contain"), ("a:1", "may not contain")],
)
def test_interface_names_linux_refuses_are_refused(name, words):
    with pytest.raises(ValueError, match=words):
        check_ifname(name)
    with pytest.raises(PlatformError, match=words):
        DeviceSpec.parse(f"net,tap={name}")


def test_serve_without_cap_net_admin_says_what_to_do(tmp_path):
    """A process without CAP_NET_ADMIN is told at startup, before it serves anything."""
    if subprocess.run(["setpriv", "--version"], capture_output=True).returncode != 0:
        pytest.skip("util-linux's setpriv is not installed")
    command = [
        "setpriv", "--bounding-set=-net_admin", "--inh-caps=-all", sys.executable, "-m",
        "viowire", "serve", "--listen", f"unix://{tmp_path}/s.sock", "--device",
        f"net,tap=vwnocap{tag()[:4]}",
    ]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, timeout=30)
    assert result.returncode == 2, result.stderr
    assert "CAP_NET_ADMIN" in result.stderr and "ip tuntap add" in result.stderr
    assert "Traceback" not in result.stderr


@contextlib.asynccontextmanager
async def tap_device(tmp_path, topo: Topology, spec: str):
    """A server with one net device ``spec`` and a client's driver on it; the device's TAP is
    moved into ``topo``'s namespace "host" (with KERNEL_IP on it, up)."""
    ifname = spec.split("tap=")[1].split(",")[0]
    async with (
        running_server(tmp_path, PlatformSpec([DeviceSpec.parse(spec)])) as server,
        await connect(url_of(server, "unix")) as conn,
    ):
        info = next(d for d in await conn.platform() if d.device_id == NET)
        drv = await NetDriver.attach(await conn.attach(info))
        await drv.config()  # a round trip: the device has plugged in, the TAP is open
        assert taps.port(ifname) is not None
        await move_tap(topo, ifname)
        try:
            yield drv, taps.port(ifname)
        finally:
            await drv.detach()


async def move_tap(topo: Topology, ifname: str) -> None:
    ns = topo.ns["host"]
    ip("link", "set", ifname, "netns", ns)
    topo.run("host", ["sysctl", "-qw", f"net.ipv6.conf.{ifname}.disable_ipv6=1"], check=True)
    topo.ip("host", "addr", "add", f"{KERNEL_IP}/24", "dev", ifname)
    topo.ip("host", "link", "set", ifname, "up")
    topo.check_routes([KERNEL_IP, DEVICE_IP])  # unreachable from the root namespace


async def ping(topo: Topology, size: int) -> asyncio.subprocess.Process:
    """One ping of ``size`` payload bytes from the namespace to the device's address."""
    argv = ["ping", "-c", "1", "-W", "1", "-s", str(size), DEVICE_IP]
    return await asyncio.create_subprocess_exec(
        *topo.cmd("host", argv), stdout=asyncio.subprocess.DEVNULL
    )


async def next_matching(drv: NetDriver, parse):
    async with asyncio.timeout(TIMEOUT):
        async for frame in drv.frames():
            found = parse(frame)
            if found is not None:
                return found
    raise AssertionError("the frames ended")


async def test_the_host_kernel_answers_arp_and_ping_through_the_device(tmp_path):
    require_netns()
    ifname = f"vwt{tag()}"
    with Topology(["host"], SUBNET, bridge=False) as topo:
        async with tap_device(tmp_path, topo, f"net,tap={ifname}") as (drv, tap):
            await arp_and_ping(topo, drv, tap, ifname)
        # the last device left: the TAP viowire created is gone, and so is its link
        assert taps.port(ifname) is None and f"tap:{ifname}" not in links._links
        assert topo.ip("host", "link", "show", ifname, check=False).returncode != 0


async def arp_and_ping(topo: Topology, drv: NetDriver, tap: taps.TapPort, ifname: str) -> None:
    assert tap.tap.created and tap.mtu == 1500
    await drv.send(arp_request(drv.mac, DEVICE_IP, KERNEL_IP))
    kernel_mac, who = await next_matching(drv, arp_reply_of)
    assert who == KERNEL_IP
    assert kernel_mac == bytes.fromhex(
        topo.run("host", ["cat", f"/sys/class/net/{ifname}/address"]).stdout.replace(":", "")
    )
    await drv.send(echo_request(kernel_mac, drv.mac, DEVICE_IP, KERNEL_IP, 0x77, 1, b"vw!"))
    reply = await next_matching(drv, lambda f: (r := icmp_of(f)) and r[1] == 0 and r)
    assert reply == (KERNEL_IP, 0, 0x77, 1, b"vw!")
    assert tap.rx_frames >= 2 and tap.tx_frames >= 2 and tap.oversize == 0
    assert tap.port.link.name == f"tap:{ifname}"


async def test_frames_longer_than_the_mtu_are_dropped_and_counted(tmp_path):
    """A TAP made beforehand keeps its MTU (1500); the device's is 576: the kernel's 1000-byte
    ping cannot reach the device, a 100-byte one does. The TAP stays when viowire leaves it."""
    require_netns("ping")
    ifname = f"vwt{tag()}"
    ip("tuntap", "add", "mode", "tap", "name", ifname)
    try:
        with Topology(["host"], SUBNET, bridge=False) as topo:
            async with tap_device(tmp_path, topo, f"net,tap={ifname},mtu=576") as (drv, tap):
                assert not tap.tap.created
                topo.ip(
                    "host", "neigh", "add", DEVICE_IP, "lladdr", drv.mac.hex(":"), "dev", ifname
                )
                big = await ping(topo, 1000)  # 1042 bytes on the wire: more than 18 + 576
                async with asyncio.timeout(TIMEOUT):
                    await big.wait()  # no reply (the TAP dropped the request): ping gives up
                small = await ping(topo, 100)
                request = await next_matching(drv, lambda f: (r := icmp_of(f)) and r[1] == 8 and r)
                assert len(request[4]) == 100  # the small one; the big one never came
                async with asyncio.timeout(TIMEOUT):
                    await small.wait()
                assert tap.oversize == 1
            # not ours: it stays
            assert topo.ip("host", "link", "show", ifname, check=False).returncode == 0
    finally:
        ip("link", "del", ifname, check=False)


CARRIER = """
import subprocess, sys
from viowire.tap import Tap
tap = Tap.open(sys.argv[1])
tap.set_mac(bytes.fromhex("027677123456")); tap.set_mtu(1280); tap.set_up()
for on in (False, True):
    tap.set_carrier(on)
    print(subprocess.run(["ip", "link", "show", tap.name], capture_output=True, text=True).stdout)
tap.close()
"""


def test_a_tap_takes_mac_mtu_link_and_carrier():
    """What net-attach sets on its TAP: the device's MAC and MTU, up, and the carrier following
    the device's link status (TUNSETCARRIER)."""
    require_netns()
    with Topology(["host"], SUBNET, bridge=False) as topo:
        result = topo.run("host", [sys.executable, "-c", CARRIER, "vwcarrier0"], check=True)
        down, up = result.stdout.split("\n\n")[:2]
        for shown in (down, up):
            assert "link/ether 02:76:77:12:34:56" in shown and "mtu 1280" in shown
        assert "NO-CARRIER" in down and "LOWER_UP" not in down
        assert "NO-CARRIER" not in up and "LOWER_UP" in up
        assert topo.ip("host", "link", "show", "vwcarrier0", check=False).returncode != 0
