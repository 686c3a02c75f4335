"""A real Linux guest under QEMU (microvm, TCG) for the vhost-user tests, and the processes
around it: ``viowire vhost-user`` and qemu-storage-daemon. Facts: ../shared/reference/
linux-guest.md.

The guest is the Debian kernel's vmlinux and a busybox initramfs built (and cached) by
scripts/build-test-guest; a test adds its own ``/test.sh`` as a second cpio archive appended to
the initramfs (the kernel unpacks concatenated archives in order). /init loads the virtio
modules, runs /test.sh, prints ``VIOWIRE-GUEST-EXIT <status>`` and powers off.

Every process runs in a process group of its own and is killed with it; every wait is bounded.

``python tests/guest.py bench`` compares the guest's 1 MiB O_DIRECT write+read through viowire's
vhost-user-blk with the same guest on qemu-storage-daemon's vhost-user-blk export.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BUILD_SCRIPT = REPO / "scripts" / "build-test-guest"
QEMU = "qemu-system-x86_64"
QSD = "qemu-storage-daemon"
BOOT_TIMEOUT = 90.0  # a guest run under TCG takes 5-10 s; a loaded CI machine, more
START_TIMEOUT = 15.0
RAM = "256M"
_FATAL = ("vhost start failed", "Kernel panic", "Failed to read msg header", "Failed to write msg")
"""Lines after which the run cannot succeed: stop waiting for the poweroff."""


def missing() -> str | None:
    """Why the guest cannot run here (None if it can)."""
    if shutil.which(QEMU) is None:
        return f"{QEMU} is not installed (scripts/install-test-tools installs it)"
    if not list(Path("/boot").glob("vmlinuz-*")):
        return "no kernel in /boot (scripts/install-test-tools installs linux-image-amd64)"
    if shutil.which("busybox") is None and not Path("/bin/busybox").exists():
        return "busybox is not installed (scripts/install-test-tools installs busybox-static)"
    return None


def build() -> tuple[Path, Path]:
    """The guest's vmlinux and base initramfs (built once per kernel version, then cached)."""
    result = subprocess.run(
        [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=300, check=False
    )
    if result.returncode:
        raise RuntimeError(f"scripts/build-test-guest failed: {result.stderr.strip()}")
    where = Path(result.stdout.strip().splitlines()[-1])
    return where / "vmlinux", where / "initramfs.cpio.gz"


def cpio(files: dict[str, tuple[bytes, int]]) -> bytes:
    """A newc cpio archive of ``{name: (data, mode)}`` (regular files), with its trailer."""
    out = bytearray()
    entries = [(name, data, 0o100000 | mode) for name, (data, mode) in files.items()]
    entries.append(("TRAILER!!!", b"", 0))
    for ino, (name, data, mode) in enumerate(entries, 1):
        encoded = name.encode() + b"\0"
        fields = [ino, mode, 0, 0, 1, 0, len(data), 0, 0, 0, 0, len(encoded), 0]
        out += b"070701" + b"".join(b"%08X" % value for value in fields) + encoded
        out += b"\0" * (-len(out) % 4) + data
        out += b"\0" * (-len(out) % 4)
    return bytes(out)


def tsc_khz() -> int | None:
    """The host TSC's kHz for ``tsc_early_khz=``: the guest's fast calibration fails at random
    under TCG and microvm has no fallback timer (a hang at boot)."""
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("cpu MHz"):
                return int(float(line.split(":")[1]) * 1000)
    return None


@dataclass
class GuestRun:
    output: str
    status: int | None  # the test script's exit status, None if it never finished
    wall: float

    def value(self, key: str) -> str:
        """The rest of the line ``KEY rest`` the script printed."""
        match = re.search(rf"^{re.escape(key)} (.*?)\r?$", self.output, re.MULTILINE)
        if match is None:
            raise AssertionError(f"the guest printed no {key} line:\n{self.output}")
        return match.group(1)


async def _end(proc: asyncio.subprocess.Process) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(10):
            await proc.wait()


async def run_guest(
    workdir: Path, script: str, devices: list[str], timeout: float = BOOT_TIMEOUT
) -> GuestRun:
    """Boot the guest with the QEMU ``devices`` arguments, run ``script`` as /test.sh."""
    vmlinux, initramfs = await asyncio.to_thread(build)
    initrd = workdir / "initrd.img"
    test = cpio({"test.sh": (b"#!/bin/sh\n" + script.encode(), 0o755)})
    initrd.write_bytes(initramfs.read_bytes() + test)
    append = "console=ttyS0 panic=-1 quiet tsc=reliable"
    khz = tsc_khz()
    if khz:
        append += f" tsc_early_khz={khz}"
    command = [
        QEMU,
        "-M", "microvm,memory-backend=mem",
        "-accel", "tcg", "-cpu", "max", "-smp", "1", "-m", RAM,
        "-object", f"memory-backend-memfd,id=mem,size={RAM},share=on",
        "-global", "virtio-mmio.force-legacy=false",
        "-nodefaults", "-no-user-config", "-display", "none", "-serial", "stdio", "-no-reboot",
        "-kernel", str(vmlinux), "-initrd", str(initrd), "-append", append,
        *devices,
    ]  # fmt: skip
    start = time.monotonic()
    proc = await asyncio.create_subprocess_exec(
        *command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    lines: list[str] = []
    status = None
    try:
        async with asyncio.timeout(timeout):
            while line := await proc.stdout.readline():
                text = line.decode(errors="replace").rstrip()
                lines.append(text)
                if text.startswith("VIOWIRE-GUEST-EXIT "):
                    status = int(text.split()[1])
                if any(marker in text for marker in _FATAL):
                    break
            await proc.wait()
    except TimeoutError:
        lines.append(f"[tests/guest.py: no poweroff after {timeout} s: QEMU killed]")
    finally:
        await _end(proc)
    return GuestRun("\n".join(lines), status, time.monotonic() - start)


def vhost_user_blk(
    name: str, path: str | Path, *, reconnect: int = 0, queue_size: int = 0
) -> list[str]:
    """QEMU's vhost-user-blk on socket ``path``; ``reconnect``: seconds between QEMU's attempts
    to reconnect when the back-end goes away; ``queue_size``: the rings' size QEMU tracks in
    the inflight buffer (its default, 128, is below the 1024 a guest picks on virtio-mmio)."""
    chardev = f"socket,id={name},path={path}" + (f",reconnect={reconnect}" if reconnect else "")
    device = f"vhost-user-blk,chardev={name},num-queues=1"
    if queue_size:
        device += f",queue-size={queue_size}"
    return ["-chardev", chardev, "-device", device]


def vhost_user_rng(name: str, path: str | Path) -> list[str]:
    return [
        "-chardev",
        f"socket,id={name},path={path}",
        "-device",
        f"vhost-user-rng,chardev={name}",
    ]


@contextlib.asynccontextmanager
async def process(command: list[str], ready: list[Path], log: Path) -> AsyncIterator[None]:
    """Run ``command`` (its output into ``log``) until the sockets ``ready`` exist."""
    with open(log, "wb") as out:
        proc = await asyncio.create_subprocess_exec(
            *command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        async with asyncio.timeout(START_TIMEOUT):
            while not all(path.exists() for path in ready):
                if proc.returncode is not None:
                    raise RuntimeError(f"{command[0]} exited: {log.read_text()}")
                await asyncio.sleep(0.05)
        yield
    finally:
        await _end(proc)


def viowire_vhost_user(pairs: list[tuple[Path, str]]) -> list[str]:
    args = [sys.executable, "-m", "viowire", "-v", "vhost-user"]
    for path, device in pairs:
        args += ["--socket-path", str(path), "--device", device]
    return args


def qemu_storage_daemon(path: Path, image: Path) -> list[str]:
    return [
        QSD,
        "--blockdev", f"driver=file,node-name=file,filename={image},cache.direct=off",
        "--blockdev", "driver=raw,node-name=disk,file=file",
        "--export",
        f"type=vhost-user-blk,id=export,node-name=disk,addr.type=unix,addr.path={path},"
        "writable=on",
    ]  # fmt: skip


BLK_SCRIPT = """
set -e
dd if=/dev/urandom of=/tmp/data bs=1M count=1 2>/dev/null
echo "MD5-WRITTEN $(md5sum /tmp/data | cut -d' ' -f1)"
t0=$(awk '/^now at/ {print $3; exit}' /proc/timer_list)
dd if=/tmp/data of=/dev/vda bs=1M count=1 oflag=direct conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=1M count=1 iflag=direct 2>/dev/null
t1=$(awk '/^now at/ {print $3; exit}' /proc/timer_list)
echo "MD5-READ $(md5sum /tmp/back | cut -d' ' -f1)"
echo "IO-TIME $t0 $t1"
"""


def io_seconds(run: GuestRun) -> float:
    t0, t1 = (int(x) for x in run.value("IO-TIME").split())  # ns: /proc/timer_list's "now"
    return (t1 - t0) / 1e9


async def bench(workdir: Path, rounds: int = 3) -> None:
    """The guest's 1 MiB O_DIRECT write+read: viowire's vhost-user-blk vs qemu-storage-daemon."""
    results: dict[str, list[float]] = {"viowire": [], "qemu-storage-daemon": []}
    for _ in range(rounds):
        for name in results:
            image = workdir / "disk.img"
            image.unlink(missing_ok=True)
            with open(image, "wb") as disk:
                disk.truncate(16 << 20)
            sock = workdir / "blk.sock"
            if name == "viowire":
                command = viowire_vhost_user([(sock, f"blk,path={image}")])
            else:
                command = qemu_storage_daemon(sock, image)
            async with process(command, [sock], workdir / f"{name}.log"):
                run = await run_guest(workdir, BLK_SCRIPT, vhost_user_blk("blk", sock))
            if run.status != 0:
                raise RuntimeError(f"{name}: the guest failed:\n{run.output}")
            results[name].append(io_seconds(run))
            sock.unlink(missing_ok=True)
    for name, times in results.items():
        print(f"{name:20} 1 MiB O_DIRECT write+read in the guest: best {min(times) * 1e3:.0f} ms "
              f"of {', '.join(f'{t * 1e3:.0f}' for t in times)} ms")  # fmt: skip
    ratio = min(results["viowire"]) / min(results["qemu-storage-daemon"])
    print(f"viowire / qemu-storage-daemon: {ratio:.2f}")


if __name__ == "__main__":
    import tempfile

    if sys.argv[1:] != ["bench"]:
        sys.exit("usage: python tests/guest.py bench")
    reason = missing()
    if reason:
        sys.exit(reason)
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(bench(Path(tmp)))
