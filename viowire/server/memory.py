"""The server's view of one session's guest RAM: mapped (memfd / named shm) or proxied.

A device never knows which one it has: both are :class:`~viowire.virtio.memory.GuestMemory`.
"""

from __future__ import annotations

import asyncio
import contextlib
import mmap
import os
import re
import stat
from collections.abc import Awaitable, Callable, Sequence

from viowire.virtio.memory import GuestMemory, GuestMemoryError, MappedGuestMemory, Region

SHM_NAME = re.compile(r"viowire-[A-Za-z0-9._-]{1,200}")
PROXY_TIMEOUT = 10.0


def map_fd(fd: int, size: int, offset: int) -> mmap.mmap:
    """Map ``size`` bytes of a client's memory file; the caller closes ``fd`` afterwards."""
    if size <= 0 or offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
        raise GuestMemoryError(
            f"region size {size:#x} must be positive and offset {offset:#x} page-aligned"
        )
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode):
        raise GuestMemoryError("guest RAM descriptor is not a memory file")
    if info.st_size < offset + size:
        raise GuestMemoryError(
            f"guest RAM file holds {info.st_size:#x} bytes, fewer than offset+size "
            f"{offset + size:#x}"
        )
    return mmap.mmap(fd, size, offset=offset)


def open_shm(name: str, size: int, offset: int) -> mmap.mmap:
    """Map a named segment that a same-host client created under /dev/shm."""
    if not SHM_NAME.fullmatch(name):
        raise GuestMemoryError(f"shared-memory name {name!r} must look like 'viowire-…'")
    try:
        fd = os.open(os.path.join("/dev/shm", name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise GuestMemoryError(f"cannot open shared-memory segment {name!r}: {exc}") from exc
    try:
        return map_fd(fd, size, offset)
    finally:
        os.close(fd)


class ProxiedGuestMemory(GuestMemory):
    """Guest RAM that lives in the client; every access is a MEM_READ / MEM_WRITE exchange.

    ``read_remote`` sends one MEM_READ with all ranges and returns the concatenated bytes;
    ``write_remote`` sends one posted MEM_WRITE. Frames on the session are ordered, so a posted
    write is applied by the client before any later frame (a used.idx, an interrupt) is seen.
    """

    def __init__(
        self,
        read_remote: Callable[[Sequence[tuple[int, int]]], Awaitable[bytes]],
        write_remote: Callable[[Sequence[tuple[int, int]], bytes], None],
    ) -> None:
        self._regions: list[Region] = []
        self._read_remote = read_remote
        self._write_remote = write_remote

    @property
    def regions(self) -> Sequence[Region]:
        return self._regions

    def add_region(self, gpa: int, size: int) -> Region:
        region = Region(gpa, size)
        for other in self._regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise GuestMemoryError(f"region {gpa:#x}+{size:#x} overlaps {other.gpa:#x}")
        self._regions.append(region)
        return region

    def remove_region(self, gpa: int) -> None:
        self._regions[:] = [r for r in self._regions if r.gpa != gpa]

    async def readv(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        for gpa, length in ranges:
            self.check(gpa, length)
        try:
            data = await asyncio.wait_for(self._read_remote(ranges), PROXY_TIMEOUT)
        except TimeoutError as exc:
            raise GuestMemoryError("the client did not answer a guest-memory read") from exc
        if len(data) != sum(length for _, length in ranges):
            raise GuestMemoryError("the client answered a guest-memory read with the wrong size")
        out, pos = [], 0
        for _, length in ranges:
            out.append(data[pos : pos + length])
            pos += length
        return out

    async def writev(self, segments: Sequence[tuple[int, bytes]]) -> None:
        for gpa, data in segments:
            self.check(gpa, len(data))
        ranges = [(gpa, len(data)) for gpa, data in segments]
        self._write_remote(ranges, b"".join(data for _, data in segments))


class SessionMappings:
    """The mmaps behind a session's MappedGuestMemory, so they can be closed with the session."""

    def __init__(self) -> None:
        self.memory = MappedGuestMemory()
        self._maps: list[mmap.mmap] = []

    def add(self, gpa: int, mapping: mmap.mmap) -> None:
        try:
            self.memory.add_region(gpa, mapping)
        except GuestMemoryError:
            mapping.close()
            raise
        self._maps.append(mapping)

    def close(self) -> None:
        self.memory.close()
        for mapping in self._maps:
            # A view still alive somewhere keeps the mapping; the GC unmaps it later.
            with contextlib.suppress(BufferError):
                mapping.close()
        self._maps.clear()
