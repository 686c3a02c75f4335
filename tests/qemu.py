"""A real QEMU (x86 microvm) with virtio-mmio devices and a qtest socket, for tests.

The machine has no kernel: its firmware halts, and the test is the guest, over qtest. Tests that
need QEMU carry ``needs_qemu`` and are skipped only when qemu-system-x86_64 is not installed.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest

QEMU_BINARY = "qemu-system-x86_64"
QEMU = shutil.which(QEMU_BINARY)
needs_qemu = pytest.mark.skipif(
    QEMU is None,
    reason=f"{QEMU_BINARY} is not installed (Debian/Ubuntu: apt-get install qemu-system-x86)",
)

STARTUP_TIMEOUT = 10.0  # seconds for the qtest socket to appear
STOP_TIMEOUT = 5.0
IMAGE_SIZE = 8 << 20

# Where the devices land: microvm fills its eight slots from the top, in -device order.
BLK_SLOT = (0xFEB0_0E00, 0x200, 23)  # slot 7, GSI 16 + 7 (microvm with ACPI)
RNG_SLOT = (0xFEB0_0C00, 0x200, 22)  # slot 6


def microvm_qtest_command(socket_path: str, devices: list[str], *, legacy: bool) -> list[str]:
    """microvm with qtest on a Unix socket and ``devices`` (QEMU arguments), its virtio-mmio
    transports legacy (QEMU 7.2's default) or modern."""
    command = [
        QEMU or QEMU_BINARY,
        "-M", "microvm,ioapic2=off",
        "-qtest", f"unix:{socket_path},server=on,wait=off",
        "-qtest-log", "/dev/null",
        "-display", "none",
        "-nodefaults",
        "-m", "64M",
        *devices,
    ]  # fmt: skip
    if not legacy:
        command += ["-global", "virtio-mmio.force-legacy=false"]
    return command


def qemu_command(socket_path: str, image: str, *, legacy: bool) -> list[str]:
    """The command line of the issue: microvm, qtest on a Unix socket, one blk and one rng."""
    devices = [
        "-drive", f"if=none,id=d0,file={image},format=raw",
        "-device", "virtio-blk-device,drive=d0",
        "-device", "virtio-rng-device",
    ]  # fmt: skip
    return microvm_qtest_command(socket_path, devices, legacy=legacy)


@dataclass
class QemuMachine:
    process: asyncio.subprocess.Process
    socket_path: str
    image: Path
    legacy: bool

    @property
    def url(self) -> str:
        return f"qtest+unix://{self.socket_path}"

    @property
    def version(self) -> int:
        return 1 if self.legacy else 2


@contextlib.asynccontextmanager
async def running_qemu(
    tmp_path: Path,
    *,
    legacy: bool = True,
    image_size: int = IMAGE_SIZE,
    image_data: bytes = b"",
) -> AsyncIterator[QemuMachine]:
    """Start QEMU on a fresh raw image (``image_data`` at its start), yield, then stop it."""
    image = tmp_path / "disk.img"
    with open(image, "wb") as f:
        f.write(image_data)
        f.truncate(image_size)
    # The socket lives in a short directory of its own: Unix socket paths are limited to 107
    # bytes, and pytest's tmp_path can be longer.
    sock_dir = tempfile.mkdtemp(prefix="vw-qtest-")
    socket_path = os.path.join(sock_dir, "qtest.sock")
    stderr_path = tmp_path / "qemu.stderr"
    with open(stderr_path, "wb") as stderr:
        process = await asyncio.create_subprocess_exec(
            *qemu_command(socket_path, str(image), legacy=legacy),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=stderr,
        )
    try:
        await _wait_for_socket(process, socket_path, stderr_path)
        yield QemuMachine(process, socket_path, image, legacy)
    finally:
        await _stop(process)
        shutil.rmtree(sock_dir, ignore_errors=True)


async def _wait_for_socket(
    process: asyncio.subprocess.Process, socket_path: str, stderr_path: Path
) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + STARTUP_TIMEOUT
    while not os.path.exists(socket_path):
        if process.returncode is not None:
            raise RuntimeError(
                f"QEMU exited with status {process.returncode} before creating its qtest "
                f"socket: {stderr_path.read_text(errors='replace').strip()}"
            )
        if loop.time() > deadline:
            raise TimeoutError(f"QEMU did not create {socket_path} within {STARTUP_TIMEOUT} s")
        await asyncio.sleep(0.01)


async def _stop(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
        try:
            await asyncio.wait_for(process.wait(), STOP_TIMEOUT)
        except TimeoutError:
            process.kill()
            await process.wait()
