"""QEMU's virtio-net-device, the reference, against viowire's net driver and conform's net
checks: two of them on one QEMU hub (``-netdev hubport``, which has no host side: no frame
leaves QEMU), driven over qtest. What QEMU does differently from the spec is recorded in
docs/qemu-differences.md (D15) and asserted here."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import tempfile
import time

import pytest
from cli_run import end_group, viowire
from qemu import STARTUP_TIMEOUT, microvm_qtest_command, needs_qemu
from servers import running_server, url_of

from viowire.client.connection import connect
from viowire.client.drivers.net import NetCommandError, NetDriver
from viowire.client.qtest import connect_qtest
from viowire.server.platform import DeviceSpec, PlatformSpec

pytestmark = needs_qemu

NET_CHECKS = ("net.header-size", "net.mrg-rxbuf", "net.ctrl-commands")

BROADCAST = b"\xff" * 6
TIMEOUT = 5.0


async def next_frame(drv: NetDriver) -> bytes:
    async with asyncio.timeout(TIMEOUT):
        return await anext(drv.frames())


def qemu_with_two_nics(socket_path: str, *, legacy: bool) -> list[str]:
    devices = [
        "-netdev", "hubport,id=n0,hubid=0",
        "-netdev", "hubport,id=n1,hubid=0",
        "-device", "virtio-net-device,netdev=n0",
        "-device", "virtio-net-device,netdev=n1",
    ]  # fmt: skip
    return microvm_qtest_command(socket_path, devices, legacy=legacy)


@contextlib.contextmanager
def qemu_nics(legacy: bool):
    """QEMU with two NICs on a hub; yields its qtest URL."""
    sock_dir = tempfile.mkdtemp(prefix="vw-qnet-")
    socket_path = os.path.join(sock_dir, "qtest.sock")
    proc = subprocess.Popen(
        qemu_with_two_nics(socket_path, legacy=legacy),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not os.path.exists(socket_path):
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "QEMU did not create its qtest socket"
            time.sleep(0.01)
        yield f"qtest+unix://{socket_path}"
    finally:
        end_group(proc)
        proc.stderr.close()
        shutil.rmtree(sock_dir, ignore_errors=True)


def conform_on_qemu(legacy: bool) -> dict[tuple[str, str], dict[str, str]]:
    with qemu_nics(legacy) as url:
        result = viowire("conform", url, "--only", "net.*", "--json")
    return {(row["device"], row["id"]): row for row in json.loads(result.stdout)}


def test_legacy_qemu_passes_every_net_check():
    rows = conform_on_qemu(legacy=True)
    assert len(rows) == 2 * len(NET_CHECKS)
    assert {row["verdict"] for row in rows.values()} == {"PASS"}, rows


def test_modern_qemu_leaves_num_buffers_unset_without_mrg_rxbuf():
    """D15: §5.1.6.4 says num_buffers MUST be 1 without MRG_RXBUF; QEMU writes only the first
    10 bytes of the 12-byte header (our buffers' poison, 0xeeee, stays)."""
    rows = conform_on_qemu(legacy=False)
    verdicts = {key: row["verdict"] for key, row in rows.items()}
    for (_, check), verdict in verdicts.items():
        assert verdict == ("FAIL" if check == "net.header-size" else "PASS"), rows
    details = {row["detail"] for key, row in rows.items() if key[1] == "net.header-size"}
    assert details == {"num_buffers 61166, not 1 (5.1.6.4)"}


@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "modern"])
async def test_net_driver_drives_qemus_device(legacy):
    """The driver against the reference device: frames both ways, merged buffers joined by
    QEMU's num_buffers, the receive filter, MAC_ADDR_SET, an ERR, the link state."""
    with qemu_nics(legacy) as url:
        async with await connect_qtest(url) as conn:
            a_info, b_info = [i for i in await conn.platform() if i.device_id == 1]
            a = await NetDriver.attach(await conn.attach(a_info))
            b = await NetDriver.attach(await conn.attach(b_info), rx_buffer_size=256)
            try:
                assert a.header_size == 12 and a.ctrl_queue == 2  # MRG_RXBUF, CTRL_VQ
                hello = BROADCAST + a.mac + b"\x88\xb5hello"
                await a.send(hello)
                assert await next_frame(b) == hello
                await b.set_rx_mode(promisc=False)
                await b.set_mac("02:00:00:00:00:42")
                mine = bytes.fromhex("020000000042") + a.mac + b"\x88\xb5" + bytes(range(256)) * 5
                await a.send(bytes.fromhex("02aaaaaaaaaa") + a.mac + b"\x88\xb5filtered")
                await a.send(mine)
                assert await next_frame(b) == mine  # 1294 bytes in 256-byte buffers
                with pytest.raises(NetCommandError, match="VIRTIO_NET_ERR"):
                    await b.command(9, 9)
                async with asyncio.timeout(TIMEOUT):
                    assert await anext(b.link_events()) is True
            finally:
                await a.detach()
                await b.detach()


LENIENT = [  # (what, class, command, data): QEMU says OK, viowire ERR (D16)
    ("PROMISC with two bytes", 0, 0, b"\x01\x00"),
    ("PROMISC with the value 2", 0, 0, b"\x02"),
    ("ALLUNI without CTRL_RX_EXTRA negotiated", 0, 2, b"\x01"),
    ("MAC_ADDR_SET of a multicast address", 1, 1, bytes.fromhex("01005e000001")),
]
CTRL_RX_EXTRA = 1 << 20


async def ctrl_acks(drv: NetDriver) -> list[int]:
    acks = []
    for _, cls, cmd, data in LENIENT:
        async with asyncio.timeout(TIMEOUT):
            used = await drv.request(drv.ctrl_queue, out=[bytes([cls, cmd]), data], in_sizes=1)
        acks.append(used.data[0])
    return acks


async def test_commands_qemu_takes_and_viowire_refuses(tmp_path):
    """D16: data the spec does not allow (§5.1.6.5.1, .2) or a command of a feature not
    negotiated: QEMU acts on it, viowire answers VIRTIO_NET_ERR and changes nothing."""
    with qemu_nics(legacy=False) as url:
        async with await connect_qtest(url) as conn:
            info = next(i for i in await conn.platform() if i.device_id == 1)
            drv = await NetDriver.attach(await conn.attach(info), exclude_features=CTRL_RX_EXTRA)
            try:
                assert await ctrl_acks(drv) == [0] * len(LENIENT)
            finally:
                await drv.detach()
    async with (
        running_server(tmp_path, PlatformSpec([DeviceSpec.parse("net")])) as server,
        await connect(url_of(server, "unix")) as conn,
    ):
        info = next(i for i in await conn.platform() if i.device_id == 1)
        drv = await NetDriver.attach(await conn.attach(info), exclude_features=CTRL_RX_EXTRA)
        try:
            assert await ctrl_acks(drv) == [1] * len(LENIENT)
        finally:
            await drv.detach()
