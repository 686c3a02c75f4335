"""A 16-byte identity of this kernel, so two peers can tell they share a host (and /dev/shm)."""

from __future__ import annotations

import functools
import uuid


@functools.cache
def host_id() -> bytes:
    """The kernel boot id; all zeros where it cannot be read (peers are then never 'same host')."""
    try:
        with open("/proc/sys/kernel/random/boot_id") as f:
            return uuid.UUID(f.read().strip()).bytes
    except (OSError, ValueError):
        return bytes(16)
