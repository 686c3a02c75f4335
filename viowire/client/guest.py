"""Guest RAM: the client is the guest, so it owns the memory that rings and buffers live in.

Three backings, one per memory mode of the session:
- ``memfd``: an anonymous memory file whose descriptor is passed to the server (Unix sockets);
- ``shm``: a named segment under /dev/shm that a same-host server opens by name (TCP on one host);
- ``anon``: private memory that the server reaches only through MEM_READ/MEM_WRITE (proxied).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import mmap
import os
import secrets
from dataclasses import dataclass

from viowire.client.virtqueue import Allocator
from viowire.virtio.memory import MappedGuestMemory

DEFAULT_RAM_BASE = 0x8000_0000  # where boards put DRAM; keeps legacy PFNs within 32 bits
DEFAULT_RAM_SIZE = 64 << 20
SHM_DIR = "/dev/shm"
SHM_PREFIX = "viowire-"


class GuestRAMFull(MemoryError):
    """No free block of guest RAM is large enough; free buffers or start with a larger --ram."""


class RangeAllocator:
    """First-fit allocation of guest-physical ranges, for rings and DMA buffers.

    It only hands out addresses; whoever owns the memory zeroes it (GuestRAM does, locally; a
    driver whose guest RAM is remote writes zeroes through its GuestMemory).
    """

    def __init__(self, base: int, size: int) -> None:
        self.base = base
        self.size = size
        self._free: list[tuple[int, int]] = [(base, size)]  # sorted (start, length)
        self._used: dict[int, tuple[int, int]] = {}  # gpa -> (block start, block length)

    def alloc(self, size: int, align: int = 16) -> int:
        """Return the guest-physical address of ``size`` bytes aligned to ``align``."""
        if size <= 0 or align <= 0 or align & (align - 1):
            raise ValueError(f"bad allocation: size {size}, align {align} (a power of two)")
        for i, (start, length) in enumerate(self._free):
            gpa = (start + align - 1) & ~(align - 1)
            if gpa + size <= start + length:
                self._take(i, start, length, gpa, size)
                return gpa
        raise GuestRAMFull(
            f"guest RAM ({self.size >> 20} MiB at {self.base:#x}) has no free {size} bytes"
        )

    def _take(self, i: int, start: int, length: int, gpa: int, size: int) -> None:
        end = gpa + size
        rest = [(s, n) for s, n in ((start, gpa - start), (end, start + length - end)) if n > 0]
        self._free[i : i + 1] = rest
        self._used[gpa] = (gpa, size)

    def free(self, gpa: int) -> None:
        """Give a block back; neighbouring free blocks merge."""
        start, length = self._used.pop(gpa)
        i = bisect.bisect(self._free, (start, length))
        self._free.insert(i, (start, length))
        if i + 1 < len(self._free) and start + length == self._free[i + 1][0]:
            length += self._free.pop(i + 1)[1]
            self._free[i] = (start, length)
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == start:
            prev = self._free.pop(i - 1)
            self._free[i - 1] = (prev[0], prev[1] + length)

    @property
    def free_bytes(self) -> int:
        return sum(length for _, length in self._free)


@dataclass(slots=True)
class DmaSlot:
    """One block of a :class:`DmaPool`: ``prefix`` bytes at ``gpa``, then ``capacity`` data
    bytes at ``data``."""

    gpa: int
    data: int
    capacity: int


class DmaPool:
    """A driver's request buffers, allocated on first use and then reused.

    Each request takes a slot (a block of guest RAM holding ``prefix`` bytes for its header and
    status, then its data) and gives it back once the device has returned the chain. Slots are
    allocated lazily, so an idle device holds no buffers, and kept for the next request, so
    a busy one makes no allocator calls and zeroes nothing: the driver writes every byte the
    device reads. Data areas are a power of two of at least ``min_data`` bytes; a slot too small
    for a request is replaced by a larger one. At most ``keep`` idle slots are kept; when guest
    RAM runs short the idle ones are freed before giving up.
    """

    def __init__(
        self, allocator: Allocator, *, prefix: int = 0, keep: int = 32, min_data: int = 4096
    ) -> None:
        self.allocator = allocator
        self.prefix = (prefix + 63) & ~63  # data starts on a cache line
        self.keep = keep
        self.min_data = min_data
        self._idle: list[DmaSlot] = []
        self._closed = False

    def take(self, data_len: int) -> DmaSlot:
        """A slot with room for ``data_len`` bytes; a MemoryError if guest RAM has none."""
        idle = self._idle
        if idle:
            slot = idle.pop()
            if slot.capacity >= data_len:
                return slot
            self.allocator.free(slot.gpa)
        capacity = max(self.min_data, 1 << (data_len - 1).bit_length())
        try:
            return self._new(capacity)
        except MemoryError:
            self.trim()
            return self._new(max(data_len, 1))

    def _new(self, capacity: int) -> DmaSlot:
        gpa = self.allocator.alloc(self.prefix + capacity, 64)
        return DmaSlot(gpa, gpa + self.prefix, capacity)

    def give(self, slot: DmaSlot) -> None:
        """Take a slot back; only once the device no longer holds the chain that used it."""
        if self._closed or len(self._idle) >= self.keep:
            self.allocator.free(slot.gpa)
        else:
            self._idle.append(slot)

    def trim(self) -> None:
        """Free the idle slots (slots in use are kept and come back through give)."""
        while self._idle:
            self.allocator.free(self._idle.pop().gpa)

    def close(self) -> None:
        """Free the idle slots, and each slot in use as it comes back."""
        self._closed = True
        self.trim()

    @property
    def idle(self) -> int:
        return len(self._idle)


class GuestRAM:
    """One region of guest RAM that this process owns, with an allocator for rings and buffers."""

    def __init__(
        self,
        size: int = DEFAULT_RAM_SIZE,
        base: int = DEFAULT_RAM_BASE,
        backing: str = "memfd",
        *,
        shm_prefix: str = SHM_PREFIX,
    ) -> None:
        """``shm_prefix``: how a ``shm`` segment's name starts (a server maps only the names its
        session gave out: viowire.samehost.segment_prefix).
        """
        if size <= 0 or size % mmap.PAGESIZE:
            raise ValueError(
                f"guest RAM size {size:#x} must be a positive multiple of the page size"
            )
        self.base = base
        self.size = size
        self.backing = backing
        self.fd: int | None = None
        self.shm_name = ""
        self._map = self._create_mapping(size, backing, shm_prefix)
        self.memory = MappedGuestMemory()
        self.memory.add_region(base, self._map)
        self.allocator = RangeAllocator(base, size)

    def _create_mapping(self, size: int, backing: str, shm_prefix: str) -> mmap.mmap:
        if backing == "anon":
            return mmap.mmap(-1, size)
        if backing == "memfd":
            # Sealable, so the server can forbid shrinking: an access past the end of a shrunk
            # mapping is SIGBUS, and the server refuses memfds it cannot protect itself from.
            flags = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
            self.fd = os.memfd_create("viowire-guest-ram", flags)
        elif backing == "shm":
            self.shm_name = f"{shm_prefix}{os.getpid()}-{secrets.token_hex(6)}"
            path = os.path.join(SHM_DIR, self.shm_name)
            self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        else:
            raise ValueError(f"unknown guest RAM backing {backing!r}: use memfd, shm or anon")
        os.ftruncate(self.fd, size)
        if backing == "memfd":
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return mmap.mmap(self.fd, size)

    def unlink_shm(self) -> None:
        """Remove the segment's name once the server has mapped it, so nothing leaks on a crash."""
        if self.shm_name:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(os.path.join(SHM_DIR, self.shm_name))
            self.shm_name = ""

    def alloc(self, size: int, align: int = 16) -> int:
        """Return the guest-physical address of ``size`` zeroed bytes aligned to ``align``."""
        gpa = self.allocator.alloc(size, align)
        self.memory.view(gpa, size)[:] = bytes(size)
        return gpa

    def free(self, gpa: int) -> None:
        self.allocator.free(gpa)

    @property
    def free_bytes(self) -> int:
        return self.allocator.free_bytes

    def close(self) -> None:
        self.unlink_shm()
        self.memory.close()
        self._map.close()
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None
