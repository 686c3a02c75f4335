"""The front-end's memory table as the back-end maps it (SET_MEM_TABLE, ADD/REM_MEM_REG).

Each region is a file (a memfd) mapped here, known by three addresses: its guest-physical
address (descriptors carry those), the front-end's virtual address ``userspace_addr`` (ring
addresses carry those: SET_VRING_ADDR) and its offset in the file. Devices see the regions as
one :class:`~viowire.virtio.memory.MappedGuestMemory` by guest-physical address, the same class
viowire's server gives them for a client's memfd: the ring layer and the devices do not know
which transport they serve.

The :class:`MappedGuestMemory` object lives as long as the connection: a new table is mapped in
full first (a bad one changes nothing), then swapped into it, so requests in flight see the new
table.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
from dataclasses import dataclass

from viowire.server.memory import map_fd
from viowire.virtio.memory import GuestMemoryError, MappedGuestMemory

log = logging.getLogger("viowire.vhost_user")

MAX_MEM_SLOTS = 32
"""Regions the back-end maps at once (GET_MAX_MEM_SLOTS): QEMU needs a handful."""
_ADDRESS_LIMIT = 1 << 64


@dataclass(frozen=True)
class RegionSpec:
    """A region as a message describes it."""

    guest_phys_addr: int
    memory_size: int
    userspace_addr: int
    mmap_offset: int

    def describe(self) -> str:
        return (
            f"GPA {self.guest_phys_addr:#x}+{self.memory_size:#x} at user address "
            f"{self.userspace_addr:#x}, offset {self.mmap_offset:#x}"
        )


@dataclass
class MappedRegion:
    spec: RegionSpec
    mapping: mmap.mmap


def _check_spec(spec: RegionSpec) -> None:
    if spec.memory_size <= 0:
        raise GuestMemoryError(f"region {spec.describe()}: size is 0")
    for name, start in (("guest", spec.guest_phys_addr), ("user", spec.userspace_addr)):
        if start + spec.memory_size > _ADDRESS_LIMIT:
            raise GuestMemoryError(f"region {spec.describe()}: {name} range ends past 2^64")


def _overlap(a: RegionSpec, b: RegionSpec) -> str | None:
    for name, x, y in (
        ("guest", a.guest_phys_addr, b.guest_phys_addr),
        ("user", a.userspace_addr, b.userspace_addr),
    ):
        if x < y + b.memory_size and y < x + a.memory_size:
            return f"region {a.describe()} overlaps {b.describe()} in {name} addresses"
    return None


class MemoryTable:
    """The regions mapped for one connection, and address translation."""

    def __init__(self) -> None:
        self.memory = MappedGuestMemory()
        self._regions: list[MappedRegion] = []

    @property
    def regions(self) -> list[RegionSpec]:
        return [region.spec for region in self._regions]

    def __len__(self) -> int:
        return len(self._regions)

    def replace(self, specs: list[RegionSpec], fds: list[int]) -> None:
        """SET_MEM_TABLE: the whole table, one descriptor per region. On any error the old
        table stays, and GuestMemoryError says why. The caller closes ``fds``."""
        if len(specs) != len(fds):
            raise GuestMemoryError(f"{len(specs)} regions came with {len(fds)} descriptors")
        new = self._map_all(specs, fds, keep=[])
        self._swap(new)

    def add(self, spec: RegionSpec, fd: int) -> None:
        """ADD_MEM_REG: one more region; refused if it overlaps one mapped already."""
        if len(self._regions) >= MAX_MEM_SLOTS:
            raise GuestMemoryError(f"all {MAX_MEM_SLOTS} memory slots are in use")
        new = self._map_all([spec], [fd], keep=self._regions)
        self._swap(self._regions + new)

    def remove(self, spec: RegionSpec) -> None:
        """REM_MEM_REG: the region with the same guest address, user address and size."""
        for region in self._regions:
            old = region.spec
            if (old.guest_phys_addr, old.userspace_addr, old.memory_size) == (
                spec.guest_phys_addr,
                spec.userspace_addr,
                spec.memory_size,
            ):
                self._swap([r for r in self._regions if r is not region])
                return
        raise GuestMemoryError(f"no region {spec.describe()} to remove")

    def _map_all(
        self, specs: list[RegionSpec], fds: list[int], keep: list[MappedRegion]
    ) -> list[MappedRegion]:
        """Check and map every region, or none (the mappings made are closed on error)."""
        checked: list[RegionSpec] = [region.spec for region in keep]
        for spec in specs:
            _check_spec(spec)
            for other in checked:
                problem = _overlap(spec, other)
                if problem:
                    raise GuestMemoryError(problem)
            checked.append(spec)
        mapped: list[MappedRegion] = []
        try:
            for spec, fd in zip(specs, fds, strict=True):
                try:
                    mapping = map_fd(fd, spec.memory_size, spec.mmap_offset, sealed=True)
                except (OSError, ValueError, OverflowError) as exc:
                    raise GuestMemoryError(
                        f"region {spec.describe()}: cannot map it: {exc}"
                    ) from None
                except GuestMemoryError as exc:
                    raise GuestMemoryError(f"region {spec.describe()}: {exc}") from None
                mapped.append(MappedRegion(spec, mapping))
        except BaseException:
            for region in mapped:
                region.mapping.close()
            raise
        return mapped

    def _swap(self, regions: list[MappedRegion]) -> None:
        """Make ``regions`` the table: the same memory object, new views; mappings no longer
        in it are closed."""
        kept = {id(region) for region in regions}
        dropped = [region for region in self._regions if id(region) not in kept]
        self.memory.close()  # releases every view, so the dropped mappings can close
        for region in regions:
            self.memory.add_region(region.spec.guest_phys_addr, region.mapping)
        self._regions = regions
        for region in dropped:
            with contextlib.suppress(BufferError):  # a view alive elsewhere: the GC unmaps
                region.mapping.close()

    def to_guest(self, user_addr: int) -> int:
        """The guest-physical address of front-end virtual address ``user_addr``
        (ring addresses: SET_VRING_ADDR)."""
        for region in self._regions:
            spec = region.spec
            if spec.userspace_addr <= user_addr < spec.userspace_addr + spec.memory_size:
                return spec.guest_phys_addr + (user_addr - spec.userspace_addr)
        raise GuestMemoryError(f"user address {user_addr:#x} is in no region of the memory table")

    def close(self) -> None:
        self._swap([])


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        with contextlib.suppress(OSError):
            os.close(fd)
