"""Server memory per idle device, and the bare floor it is compared with.

A server process is started with a platform of N idle virtio-rng devices (a generated TOML
file) and one client session, which makes the server build that session's instance of the
platform (every device's register file and queues); the server's RSS is read from
``/proc/PID/status``. The same is done with one device, and the difference divided by N - 1 is
the memory each idle device costs: the platform description, the instance ``validate()`` builds
and drops at start-up (whatever of it the allocator keeps), and the session's instance.

The bare floor (``python -m viowire.perf.memory --bare N``) is the least a Python server could
hold per device: one ``__slots__`` object with the virtio-mmio register state and one with the
state of its queue.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path


def rss_kib(pid: int | str = "self") -> int:
    """Resident set size of a process, in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise LookupError(f"no VmRSS for process {pid}")


def write_config(path: Path, devices: int, kind: str = "rng") -> Path:
    """A TOML platform of ``devices`` devices of one kind, alternately Version 1 and 2."""
    entries = [f'[[device]]\ntype = "{kind}"\nversion = {1 + i % 2}\n' for i in range(devices)]
    path.write_text("\n".join(entries))
    return path


class _BareQueue:
    __slots__ = ("avail", "desc", "last_avail", "num", "ready", "used", "used_idx")

    def __init__(self) -> None:
        self.num = 256
        self.ready = 1
        self.desc = 0x8000_0000 + 0x1000
        self.avail = 0x8000_0000 + 0x2000
        self.used = 0x8000_0000 + 0x3000
        self.last_avail = 0
        self.used_idx = 0


class _BareDevice:
    __slots__ = (
        "base",
        "config_generation",
        "device_features",
        "driver_features",
        "features_sel",
        "interrupt_status",
        "irq",
        "queue_sel",
        "queues",
        "status",
    )

    def __init__(self, index: int) -> None:
        self.base = 0x1000_1000 + 0x1000 * index
        self.irq = 1 + index
        self.status = 0xF
        self.device_features = 0x1_3000_0000 + index
        self.driver_features = 0x1_3000_0000 + index
        self.features_sel = 0
        self.interrupt_status = 0
        self.config_generation = 0
        self.queue_sel = 0
        self.queues = [_BareQueue()]


def bare_bytes_per_device(devices: int) -> float:
    """RSS growth per bare register-file object, in this process."""
    before = rss_kib()
    held = [_BareDevice(i) for i in range(devices)]
    after = rss_kib()
    del held
    return (after - before) * 1024 / devices


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="bare per-device memory floor")
    parser.add_argument("--bare", type=int, required=True, metavar="N")
    args = parser.parse_args(argv)
    print(f"{bare_bytes_per_device(args.bare):.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
