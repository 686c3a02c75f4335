"""Guest memory as a device or a driver sees it: bounds-checked guest-physical address ranges.

Device code is written only against :class:`GuestMemory`; whether the bytes live in a mapping shared
with the guest (memfd, named shm segment) or are fetched over the socket (proxied mode) is the
concern of the implementation. The interface is async so that the proxied implementation can make
a round trip; the mapped implementation never suspends.
"""

from __future__ import annotations

import abc
import mmap
import threading
from collections.abc import Sequence
from dataclasses import dataclass

_FENCE = threading.Lock()


def full_barrier() -> None:
    """A store-to-load barrier (SPEC §2.7.13 step 5, reference §4.7), as far as Python allows.

    With shared memory the peer is another process, and x86 may let a store (avail.idx, an
    event index) sit in the store buffer past a later load of the other side's index: both
    sides then skip the notification and the ring stalls. Taking a lock runs a lock-prefixed
    instruction (glibc's semaphore CAS), a full fence on x86. Elsewhere (ARM) it is not; that
    would need a fence from C.
    """
    with _FENCE:
        pass


class GuestMemoryError(Exception):
    """A guest-physical range that is not entirely inside one registered region."""


@dataclass(frozen=True)
class Region:
    """A registered range of guest-physical memory."""

    gpa: int
    size: int

    @property
    def end(self) -> int:
        return self.gpa + self.size


class GuestMemory(abc.ABC):
    """What a device may do with guest RAM. Every range is checked against the regions first."""

    @property
    @abc.abstractmethod
    def regions(self) -> Sequence[Region]: ...

    def check(self, gpa: int, length: int) -> Region:
        """Return the region holding ``[gpa, gpa+length)`` or raise :class:`GuestMemoryError`.

        Guest values are unbounded Python ints: a 64-bit address plus a 32-bit length never wraps,
        so a range that pokes past the end of a region is caught here, not as a short slice.
        """
        if gpa < 0 or length < 0:
            raise GuestMemoryError(f"negative guest range {gpa:#x}+{length:#x}")
        end = gpa + length
        for region in self.regions:
            if region.gpa <= gpa and end <= region.gpa + region.size:
                return region
        raise GuestMemoryError(f"guest range {gpa:#x}..{end:#x} is outside registered guest memory")

    @abc.abstractmethod
    async def readv(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        """Read several ``(gpa, length)`` ranges; one exchange where the memory is remote."""

    @abc.abstractmethod
    async def writev(self, segments: Sequence[tuple[int, bytes]]) -> None:
        """Write several ``(gpa, data)`` segments, in order; one exchange where remote."""

    async def read(self, gpa: int, length: int) -> bytes:
        return (await self.readv([(gpa, length)]))[0]

    async def write(self, gpa: int, data: bytes) -> None:
        await self.writev([(gpa, data)])

    async def read_u16(self, gpa: int) -> int:
        return int.from_bytes(await self.read(gpa, 2), "little")

    async def write_u16(self, gpa: int, value: int) -> None:
        """Store a 16-bit ring index; a single 16-bit store where the memory is shared."""
        await self.write(gpa, (value & 0xFFFF).to_bytes(2, "little"))


class MappedGuestMemory(GuestMemory):
    """Guest memory that this process can address directly: mmap'd memfd/shm, or a bytearray.

    Ring indexes that the other side reads concurrently go through a ``memoryview.cast('H')``
    element access, a single 16-bit load or store; ``struct.pack_into`` can tear them.

    One region is the common case (a client registers its RAM once): while there is exactly one,
    its bounds and views are kept in plain attributes, so a bounds check is two comparisons and a
    sum. With any other number of regions ``_end`` is -1, which no non-negative range fits, and
    every access takes the general path.
    """

    def __init__(self) -> None:
        self._regions: list[Region] = []
        self._views: list[memoryview] = []
        self._u16: list[memoryview | None] = []
        self._keep: list[object] = []
        self._reindex()

    def _reindex(self) -> None:
        """Refresh the single-region fast path after the region list changed."""
        if len(self._regions) == 1 and self._regions[0].gpa >= 0:
            self._start, self._end = self._regions[0].gpa, self._regions[0].end
            self._view0: memoryview | None = self._views[0]
            self._u16_0: memoryview | None = self._u16[0]
        else:
            self._start, self._end = 0, -1
            self._view0 = self._u16_0 = None

    @property
    def regions(self) -> Sequence[Region]:
        return self._regions

    def add_region(
        self, gpa: int, buffer: bytearray | mmap.mmap | memoryview, owner: object = None
    ) -> Region:
        """Map ``buffer`` at guest-physical ``gpa``. Regions must not overlap."""
        view = memoryview(buffer).cast("B")
        region = Region(gpa, len(view))
        for other in self._regions:
            if region.gpa < other.end and other.gpa < region.end:
                raise GuestMemoryError(
                    f"region {gpa:#x}+{region.size:#x} overlaps {other.gpa:#x}+{other.size:#x}"
                )
        self._regions.append(region)
        self._views.append(view)
        self._u16.append(view[: len(view) & ~1].cast("H") if gpa % 2 == 0 else None)
        self._keep.append(owner if owner is not None else buffer)
        self._reindex()
        return region

    def close(self) -> None:
        """Release the views; the caller closes the mappings behind them."""
        self._regions.clear()
        self._reindex()  # drop the fast path's references before releasing the views
        for view in self._u16:
            if view is not None:
                view.release()
        for view in self._views:
            view.release()
        self._views.clear()
        self._u16.clear()
        self._keep.clear()

    def single_region(self) -> tuple[int, int, memoryview] | None:
        """``(start, end, view)`` while there is exactly one region, else None: for hot loops
        that check ``start <= gpa and gpa + length <= end`` themselves and then read ``view`` at
        ``gpa - start`` (the view is released by :meth:`close`; do not keep it)."""
        if self._view0 is None:
            return None
        return self._start, self._end, self._view0

    def check(self, gpa: int, length: int) -> Region:
        if self._start <= gpa and length >= 0 and gpa + length <= self._end:
            return self._regions[0]
        return GuestMemory.check(self, gpa, length)

    def _locate(self, gpa: int, length: int) -> tuple[int, int]:
        start = self._start
        if start <= gpa and length >= 0 and gpa + length <= self._end:
            return 0, gpa - start
        region = GuestMemory.check(self, gpa, length)
        return self._regions.index(region), gpa - region.gpa

    def view(self, gpa: int, length: int) -> memoryview:
        """A writable view of ``[gpa, gpa+length)``, bounds-checked."""
        start = self._start
        if start <= gpa and length >= 0 and gpa + length <= self._end:
            offset = gpa - start
            return self._view0[offset : offset + length]
        index, offset = self._locate(gpa, length)
        return self._views[index][offset : offset + length]

    def load_u16(self, gpa: int) -> int:
        offset = gpa - self._start
        if self._u16_0 is not None and offset >= 0 and gpa + 2 <= self._end and not offset & 1:
            return self._u16_0[offset >> 1]
        index, offset = self._locate(gpa, 2)
        u16 = self._u16[index]
        if u16 is not None and offset % 2 == 0:
            return u16[offset >> 1]
        return int.from_bytes(self._views[index][offset : offset + 2], "little")

    def store_u16(self, gpa: int, value: int) -> None:
        offset = gpa - self._start
        if self._u16_0 is not None and offset >= 0 and gpa + 2 <= self._end and not offset & 1:
            self._u16_0[offset >> 1] = value & 0xFFFF
            return
        index, offset = self._locate(gpa, 2)
        u16 = self._u16[index]
        if u16 is not None and offset % 2 == 0:
            u16[offset >> 1] = value & 0xFFFF
        else:
            self._views[index][offset : offset + 2] = (value & 0xFFFF).to_bytes(2, "little")

    def read_sync(self, gpa: int, length: int) -> bytes:
        return bytes(self.view(gpa, length))

    def write_sync(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = data

    async def readv(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        start, end, view0 = self._start, self._end, self._view0
        out = []
        for gpa, length in ranges:
            if start <= gpa and length >= 0 and gpa + length <= end:
                offset = gpa - start
                out.append(view0[offset : offset + length].tobytes())
            else:
                out.append(bytes(self.view(gpa, length)))
        return out

    async def writev(self, segments: Sequence[tuple[int, bytes]]) -> None:
        # Check every segment before writing any, so a bad list writes nothing.
        start, end = self._start, self._end
        inside = True  # all in the single region: write through its view directly
        for gpa, data in segments:
            if not (start <= gpa and gpa + len(data) <= end):
                self.check(gpa, len(data))
                inside = False
        if inside:
            view0 = self._view0
            for gpa, data in segments:
                offset = gpa - start
                view0[offset : offset + len(data)] = data
            return
        view = self.view
        for gpa, data in segments:
            view(gpa, len(data))[:] = data

    async def read_u16(self, gpa: int) -> int:
        return self.load_u16(gpa)

    async def write_u16(self, gpa: int, value: int) -> None:
        self.store_u16(gpa, value)
