"""The server's view of one session's guest RAM: mapped (memfd / named shm) or proxied.

A device never knows which one it has: both are :class:`~viowire.virtio.memory.GuestMemory`.
"""

from __future__ import annotations

import contextlib
import fcntl
import mmap
import os
import re
import stat
from collections.abc import Awaitable, Callable, Sequence

from viowire.protocol.messages import DEFAULT_MAX_FRAME, HEADER_SIZE
from viowire.server.metrics import SERVER
from viowire.virtio.memory import GuestMemory, GuestMemoryError, MappedGuestMemory, Region

SHM_NAME = re.compile(r"viowire-[A-Za-z0-9._-]{1,200}")
PROXY_TIMEOUT = 10.0
_RANGE_SIZE = 12  # one Range on the wire: u64 gpa, u32 length
_COUNT_SIZE = 4  # the u32 count before the ranges


def map_fd(fd: int, size: int, offset: int, *, sealed: bool = False) -> mmap.mmap:
    """Map ``size`` bytes of a client's memory file; the caller closes ``fd`` afterwards.

    ``sealed``: refuse a file that cannot be sealed against shrinking (a memfd must be).
    """
    if size <= 0 or offset < 0 or offset % mmap.ALLOCATIONGRANULARITY:
        raise GuestMemoryError(
            f"region size {size:#x} must be positive and offset {offset:#x} page-aligned"
        )
    _seal_against_shrinking(fd)
    if sealed and not _seals(fd) & fcntl.F_SEAL_SHRINK:
        raise GuestMemoryError(
            "the guest RAM memfd cannot be sealed against shrinking, and a shrunk mapping would "
            "crash the server: create it with MFD_ALLOW_SEALING (or seal it with F_SEAL_SHRINK)"
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


def _seal_against_shrinking(fd: int) -> None:
    """Forbid shrinking a memfd once it is mapped here: an access past the end of a shrunk file
    is SIGBUS, which would kill the whole server. Only a memfd created with MFD_ALLOW_SEALING can
    be sealed; others (and named shm segments, which never can) are mapped as before."""
    with contextlib.suppress(OSError):  # EPERM: sealing not allowed; EINVAL: not a memfd
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)


def _seals(fd: int) -> int:
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:  # not a memfd
        return 0


def open_shm(name: str, size: int, offset: int, prefix: str) -> mmap.mmap:
    """Map a named segment that a same-host client created under /dev/shm for this session:
    its name starts with ``prefix`` (viowire.samehost.segment_prefix), so a client can name
    neither another session's segment nor any other file there."""
    if not SHM_NAME.fullmatch(name) or not name.startswith(prefix):
        raise GuestMemoryError(
            f"shared-memory name {name!r} is not one of this session's: it must look like "
            f"'{prefix}…'"
        )
    try:
        fd = os.open(os.path.join("/dev/shm", name), os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        raise GuestMemoryError(f"cannot open shared-memory segment {name!r}: {exc}") from exc
    try:
        _check_private(fd, name)
        return map_fd(fd, size, offset)
    finally:
        os.close(fd)


def _check_private(fd: int, name: str) -> None:
    """A segment another user could open is one another user could shrink (a SIGBUS here):
    only the server's own user's segments, closed to everyone else, are mapped."""
    info = os.fstat(fd)
    if info.st_uid != os.geteuid() or info.st_mode & 0o077:
        raise GuestMemoryError(
            f"shared-memory segment {name!r} must belong to the server's user and be closed to "
            f"others (mode 0600); it is uid {info.st_uid}, mode {info.st_mode & 0o777:o}"
        )


class ProxiedGuestMemory(GuestMemory):
    """Guest RAM that lives in the client; every access is a MEM_READ / MEM_WRITE exchange.

    ``read_remote(ranges, timeout)`` sends one MEM_READ with all ranges and returns the
    concatenated bytes, or raises TimeoutError once ``timeout`` seconds pass without an answer
    (a timer on the reply's future: ``asyncio.wait_for`` would cost a task per read);
    ``write_remote`` sends one posted MEM_WRITE. Frames on the session are ordered, so a posted
    write is applied by the client before any later frame (a used.idx, an interrupt) is seen.
    """

    def __init__(
        self,
        read_remote: Callable[[Sequence[tuple[int, int]], float], Awaitable[bytes]],
        write_remote: Callable[[Sequence[tuple[int, int]], bytes], None],
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self._regions: list[Region] = []
        self._read_remote = read_remote
        self._write_remote = write_remote
        self.max_frame = max_frame

    @property
    def regions(self) -> Sequence[Region]:
        return self._regions

    def add_region(self, gpa: int, size: int) -> Region:
        if size <= 0 or gpa < 0 or gpa + size > 1 << 64:
            # Every address in it must fit a MEM_READ / MEM_WRITE range (u64).
            raise GuestMemoryError(f"region {gpa:#x}+{size:#x} is empty or ends past 2^64")
        region = Region(gpa, size)
        for other in self._regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise GuestMemoryError(f"region {gpa:#x}+{size:#x} overlaps {other.gpa:#x}")
        self._regions.append(region)
        return region

    def remove_region(self, gpa: int) -> None:
        self._regions[:] = [r for r in self._regions if r.gpa != gpa]

    def batches(self, ranges: Sequence[tuple[int, int]]) -> list[list[tuple[int, int]]]:
        """``ranges`` cut into batches whose MEM_READ, MEM_READ_REPLY and MEM_WRITE frames all fit
        the session's max_frame; a range too large for one frame is split across several."""
        room = self.max_frame - HEADER_SIZE - _COUNT_SIZE
        batches: list[list[tuple[int, int]]] = [[]]
        used = 0
        for gpa, length in ranges:
            while True:
                free = room - used - _RANGE_SIZE
                if free < min(length, 1):
                    batches.append([])
                    used = 0
                    continue
                take = min(length, free)
                batches[-1].append((gpa, take))
                used += _RANGE_SIZE + take
                gpa, length = gpa + take, length - take
                if not length:
                    break
        return batches

    async def readv(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        for gpa, length in ranges:
            self.check(gpa, length)
        chunks = []
        for batch in self.batches(ranges):
            try:
                chunk = await self._read_remote(batch, PROXY_TIMEOUT)
            except TimeoutError as exc:
                raise GuestMemoryError("the client did not answer a guest-memory read") from exc
            if len(chunk) != sum(length for _, length in batch):
                raise GuestMemoryError(
                    "the client answered a guest-memory read with the wrong size"
                )
            chunks.append(chunk)
            SERVER.proxied_read += len(chunk)
        data = b"".join(chunks)  # one batch, the usual case: no copy
        out, pos = [], 0
        for _, length in ranges:
            out.append(data[pos : pos + length])
            pos += length
        return out

    async def writev(self, segments: Sequence[tuple[int, bytes]]) -> None:
        for gpa, data in segments:
            self.check(gpa, len(data))
        ranges = [(gpa, len(data)) for gpa, data in segments]
        blob = b"".join(data for _, data in segments)
        SERVER.proxied_written += len(blob)
        pos = 0
        for batch in self.batches(ranges):
            size = sum(length for _, length in batch)
            self._write_remote(batch, blob[pos : pos + size])
            pos += size


class SessionMappings:
    """The mmaps behind a session's MappedGuestMemory, so they can be closed with the session."""

    def __init__(self) -> None:
        self.memory = MappedGuestMemory()
        self._maps: list[mmap.mmap] = []

    def add(self, gpa: int, mapping: mmap.mmap) -> None:
        try:
            self.memory.add_region(gpa, mapping)
        except GuestMemoryError as exc:
            message = str(exc)
        else:
            self._maps.append(mapping)
            return
        # Only now, with the exception (and the failed call's view of the mapping in its
        # traceback) gone, can the mapping be closed.
        mapping.close()
        raise GuestMemoryError(message)

    def close(self) -> None:
        self.memory.close()
        for mapping in self._maps:
            # A view still alive somewhere keeps the mapping; the GC unmaps it later.
            with contextlib.suppress(BufferError):
                mapping.close()
        self._maps.clear()
