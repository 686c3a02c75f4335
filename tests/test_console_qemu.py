"""QEMU's virtio-serial (hw/char/virtio-serial-bus.c) as the oracle: viowire's console driver
and conform's console checks meet the reference device over qtest, as they meet viowire's."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile

import pytest
from qemu import _stop, _wait_for_socket, microvm_qtest_command, needs_qemu

from viowire.client.drivers.console import ConsoleDriver
from viowire.client.qtest import connect_qtest
from viowire.conform.checks import console
from viowire.conform.model import Options, Target
from viowire.conform.runner import run_suite
from viowire.virtio.constants import DeviceId

TIMEOUT = 20.0


@contextlib.asynccontextmanager
async def qemu_with_a_console(tmp_path, *, legacy: bool):
    """microvm with one virtio-serial device: a virtconsole 'hvc' and a virtserialport
    'org.example.agent', both on null chardevs."""
    sock_dir = tempfile.mkdtemp(prefix="vw-qtest-")
    socket_path = os.path.join(sock_dir, "qtest.sock")
    devices = [
        "-device", "virtio-serial-device",
        "-chardev", "null,id=c0", "-device", "virtconsole,chardev=c0,name=hvc",
        "-chardev", "null,id=c1", "-device", "virtserialport,chardev=c1,name=org.example.agent",
    ]  # fmt: skip
    command = microvm_qtest_command(socket_path, devices, legacy=legacy)
    stderr_path = tmp_path / "qemu.stderr"
    with open(stderr_path, "wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *command, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )  # fmt: skip
    try:
        await _wait_for_socket(process, socket_path, stderr_path)
        yield f"qtest+unix://{socket_path}"
    finally:
        await _stop(process)
        shutil.rmtree(sock_dir, ignore_errors=True)


@needs_qemu
@pytest.mark.parametrize("legacy", [True, False], ids=["v1", "v2"])
async def test_console_driver_on_qemus_virtio_serial(tmp_path, legacy):
    async with (
        qemu_with_a_console(tmp_path, legacy=legacy) as url,
        await connect_qtest(url) as conn,
    ):
        info = next(d for d in await conn.platform() if d.device_id == DeviceId.CONSOLE)
        async with asyncio.timeout(TIMEOUT):
            drv = await ConsoleDriver.attach(await conn.attach(info))
            assert drv.multiport and drv.max_nr_ports == 31  # QEMU's default max_ports
            hvc, agent = await drv.port("hvc"), await drv.port("org.example.agent")
            await hvc.wait_host(True)  # PORT_OPEN(1): QEMU's null chardev is connected
        assert (hvc.id, hvc.console, agent.id, agent.console) == (0, True, 1, False)
        # QEMU's PORT_NAME ends with a NUL, which the driver drops as Linux does
        assert agent.name == "org.example.agent"
        async with asyncio.timeout(TIMEOUT):
            await hvc.write(b"to QEMU's null chardev\n")  # taken and completed
            await drv.emergency_write("!")
        assert drv.control_errors == 0
        await drv.detach()


@needs_qemu
@pytest.mark.parametrize("legacy", [True, False], ids=["v1", "v2"])
async def test_conform_console_checks_pass_on_qemu(tmp_path, legacy):
    async with (
        qemu_with_a_console(tmp_path, legacy=legacy) as url,
        await connect_qtest(url) as conn,
    ):
        devices = await conn.platform()
        index = next(i for i, d in enumerate(devices) if d.device_id == DeviceId.CONSOLE)
        target = Target(conn, conn.ram.memory, conn.ram, devices)
        options = Options(access_timeout=5.0, io_timeout=5.0)
        results = await asyncio.wait_for(
            run_suite(target, devices=[index], options=options, checks=console.CHECKS), TIMEOUT
        )
    verdicts = {r.id: (r.verdict.name, r.detail) for r in results}
    assert {id_: v for id_, (v, _) in verdicts.items()} == {
        "console.config": "PASS",
        "console.multiport-handshake": "PASS",
        "console.port-names": "PASS",
    }, verdicts
    assert "port 0 'hvc', port 1 'org.example.agent'" in verdicts["console.port-names"][1]
