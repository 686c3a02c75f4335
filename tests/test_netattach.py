"""``viowire net-attach``: a server's virtio-net device as a local Linux interface.

The headline: a server in network namespace S (on its veth address, TCP), and in namespaces C1
and C2 ``viowire net-attach tcp://S:PORT --device 0 --tap vw0``; vw0 gets 10.204.0.11/24 and
10.204.0.12/24 (the overlay, unreachable from the root namespace), and C1 pings C2 through the
two virtio-net devices and the server's switch: 100 pings, none lost.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys

import pytest
from cli_run import run, viowire
from netns import Topology, require_netns, stderr_of, stop

VIOWIRE = [sys.executable, "-m", "viowire"]
SUBNET = "10.203.42"  # the namespaces' veths, on a bridge with .1 in the root namespace
OVERLAY = "10.204.0"  # vw0 in C1 and C2: carried by viowire only
PORT = 7000
READY = r"^vw0: (\S+) mtu (\d+) link (up|down), on "


def server_argv(address: str, *devices: str) -> list[str]:
    # A namespace's address is not loopback: a test network of its own, so no token.
    argv = [*VIOWIRE, "serve", "--listen", f"tcp://{address}:{PORT}", "--insecure"]
    for spec in devices:
        argv += ["--device", spec]
    return argv


def attach_argv(address: str, device: int = 0) -> list[str]:
    return [*VIOWIRE, "net-attach", f"tcp://{address}:{PORT}", "--device", str(device),
            "--tap", "vw0"]  # fmt: skip


@pytest.fixture
def topo():
    require_netns("ping")
    with Topology(["server", "c1", "c2"], SUBNET, unreachable=[f"{OVERLAY}.0/24"]) as topology:
        yield topology


def test_two_namespaces_ping_each_other_through_net_attach(topo):
    server = topo.ips["server"]
    topo.start("server", server_argv(server, "net,link=lan"), r"^listening on tcp://")
    macs = {}
    for i, name in enumerate(("c1", "c2"), 1):
        _, ready = topo.start(name, attach_argv(server), READY)
        macs[name] = ready.group(1)
        topo.ip(name, "addr", "add", f"{OVERLAY}.1{i}/24", "dev", "vw0")
    # SAFETY: the overlay's addresses are unreachable from the root namespace
    topo.check_routes([f"{OVERLAY}.11", f"{OVERLAY}.12"])
    assert macs["c1"] != macs["c2"]  # each session's device has a MAC of its own

    ping = topo.run("c1", ["ping", "-q", "-c", "100", "-i", "0.01", "-w", "10", f"{OVERLAY}.12"])
    print(ping.stdout)
    loss = re.search(r"(\d+) received, ([\d.]+)% packet loss", ping.stdout)
    assert loss and loss.group(1) == "100" and float(loss.group(2)) == 0.0, ping.stdout
    assert re.search(r"rtt min/avg/max/mdev = [\d./]+ ms", ping.stdout), ping.stdout


def test_the_interface_has_the_devices_mac_and_mtu_and_goes_away_on_sigterm(topo):
    server = topo.ips["server"]
    mac = "02:76:77:aa:bb:cc"
    topo.start("server", server_argv(server, "rng", f"net,mac={mac},mtu=1400"), r"^listening on")
    proc, ready = topo.start("c1", attach_argv(server, 1), READY)
    assert ready.groups() == (mac, "1400", "up")
    shown = topo.ip("c1", "link", "show", "vw0").stdout
    assert f"link/ether {mac}" in shown and "mtu 1400" in shown and "LOWER_UP" in shown
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=10) == 0, stderr_of(proc)
    assert topo.ip("c1", "link", "show", "vw0", check=False).returncode != 0  # removed
    stop(proc)


@pytest.mark.parametrize(
    "device, words", [("0", "is virtio-rng, not virtio-net"), ("5", "has devices 0..1")]
)
def test_a_device_that_is_not_net_is_refused_with_the_list(device, words, tmp_path):
    from cli_run import serve

    with serve("--listen", f"unix://{tmp_path}/s.sock", "--device", "rng", "--device", "net") as s:
        result = viowire("net-attach", s.url("unix"), "--device", device, "--tap", "vwnever0")
    assert result.returncode == 2, result.stderr
    assert words in result.stderr and "Traceback" not in result.stderr


def test_without_cap_net_admin_it_says_what_to_do_before_connecting():
    if subprocess.run(["setpriv", "--version"], capture_output=True).returncode != 0:
        pytest.skip("util-linux's setpriv is not installed")
    result = run(
        ["setpriv", "--bounding-set=-net_admin", "--inh-caps=-all", *VIOWIRE, "net-attach",
         "unix:///nonexistent/viowire.sock", "--tap", "vwnocap0"],
    )  # fmt: skip
    assert result.returncode == 1, result.stderr
    assert "tap vwnocap0: creating or opening a TAP needs CAP_NET_ADMIN" in result.stderr
    assert "nonexistent" not in result.stderr  # the TAP first: the server was not tried
