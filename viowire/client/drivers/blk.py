"""virtio-blk (SPEC §5.2): a block device with concurrent reads and writes in 512-byte sectors.

Each request is one chain: a 16-byte device-readable header, the data (readable for a write,
writable for a read), and a 1-byte device-writable status. Large transfers are split into requests
that respect the device's ``seg_max``/``size_max`` and go out together, so the device sees many
requests in flight at once.

The limits are Linux's block queue limits: ``seg_max`` is max_segments, ``size_max`` is
max_segment_size, and ``max_request`` caps a request as max_sectors_kb does. A device may refuse
a request past ``seg_max * size_max`` (viowire's device answers IOERR), so
:meth:`BlockDriver.read` and :meth:`BlockDriver.write` never send one: a transfer of any length
is split, as qemu-io's ``read`` and ``write`` of any length just work.
"""

from __future__ import annotations

import asyncio
from functools import partial

from viowire.client.drivers.base import bits
from viowire.client.drivers.generic import GenericDriver
from viowire.client.errors import ReadOnlyError, RequestError, VirtioError
from viowire.client.guest import DmaPool
from viowire.client.mmio import VirtioMmioDevice
from viowire.client.slots import Slots
from viowire.virtio.blk import (
    BLK_CONFIG,
    BLK_ID_BYTES,
    BLK_REQ_HEADER_SIZE,
    BLK_SECTOR_SIZE,
    REQUEST_HEADER,
    BlkFeature,
    BlkStatus,
    BlkType,
)
from viowire.virtio.constants import (
    DeviceId,
)
from viowire.virtio.memory import MappedGuestMemory

MAX_REQUEST = 128 * 1024  # bytes of data per request, before the device's own limits
QUEUE_DEPTH = 32  # requests in flight; bounds the DMA buffers taken from guest RAM

_HEADER = REQUEST_HEADER
_STATUS_UNSET = 0xFF  # a device that never writes the status byte is caught, not read as OK
_STATUS_BYTE = bytes([_STATUS_UNSET])


class BlockDriver(GenericDriver):
    """A virtio-blk disk: ``read``, ``write``, ``flush``, ``get_id``; offsets in bytes.

    Built on :class:`GenericDriver` for the probe, the queue, the config space and teardown;
    its requests take their own path (a reused DMA slot filled with plain stores in shared
    memory, one coroutine per request), which is blk's hot path.
    """

    device_id = DeviceId.BLOCK
    queue_names = ("requests",)
    config_layout = BLK_CONFIG
    feature_table = bits(
        BlkFeature.SIZE_MAX,
        BlkFeature.SEG_MAX,
        BlkFeature.BLK_SIZE,
        BlkFeature.RO,
        BlkFeature.FLUSH,
    )

    def __init__(
        self,
        dev: VirtioMmioDevice,
        *,
        max_request: int = MAX_REQUEST,
        queue_depth: int = QUEUE_DEPTH,
        exclude_features: int = 0,
    ) -> None:
        if max_request < BLK_SECTOR_SIZE:
            raise ValueError(
                f"max_request {max_request} is below one sector: pass at least "
                f"{BLK_SECTOR_SIZE} bytes (requests carry whole {BLK_SECTOR_SIZE}-byte sectors)"
            )
        super().__init__(dev, exclude_features=exclude_features)
        self.capacity = 0  # in 512-byte sectors
        self.size_max = 0  # bytes per data segment, 0 = no limit
        self.seg_max = 1  # data segments per request
        self.blk_size = BLK_SECTOR_SIZE
        self.read_only = False
        self.max_request = max_request
        self.queue_depth = queue_depth
        self._slots = Slots(queue_depth)
        # One slot per request in flight: header and status, then the data buffer.
        self._dma = DmaPool(dev.allocator, prefix=BLK_REQ_HEADER_SIZE + 1, keep=queue_depth)

    async def setup(self) -> None:
        await self._read_config()
        await super().setup()
        self.request_bytes = self._request_bytes()

    async def _read_config(self) -> None:
        """The fields of BLK_CONFIG (§5.2.4) that the request path needs."""
        self.capacity = await self.config_field("capacity")
        if self.has_feature(BlkFeature.SIZE_MAX):
            self.size_max = await self.config_field("size_max")
        if self.has_feature(BlkFeature.SEG_MAX):
            self.seg_max = max(1, await self.config_field("seg_max"))
        if self.has_feature(BlkFeature.BLK_SIZE):
            self.blk_size = await self.config_field("blk_size") or BLK_SECTOR_SIZE
        self.read_only = self.has_feature(BlkFeature.RO)

    def _request_bytes(self) -> int:
        """Data bytes per request: our cap, then seg_max segments of at most size_max bytes, in
        whole sectors. A chain may not be longer than the queue, indirect or not (§2.7.5.3.1),
        and the header and the status take two of its descriptors."""
        segments = min(self.seg_max, self.vq.num - 2)
        if segments < 1:
            raise VirtioError(
                self.dev.name,
                f"a virtqueue of {self.vq.num} entries leaves no descriptor for data after the "
                "header and the status (§2.7.5.3.1): use a queue of at least 4 entries",
            )
        limit = self.max_request
        if self.size_max:
            limit = min(limit, segments * self.size_max)
        limit -= limit % BLK_SECTOR_SIZE
        if limit <= 0:
            raise VirtioError(
                self.dev.name,
                f"the device allows {segments} segments of size_max {self.size_max} bytes per "
                f"request (seg_max {self.seg_max}, queue of {self.vq.num}), less than one "
                f"{BLK_SECTOR_SIZE}-byte sector: no read or write can be sent; the device must "
                f"offer size_max * seg_max of at least {BLK_SECTOR_SIZE}",
            )
        return limit

    async def reset_queue(self, num: int | None = None) -> None:
        """Virtqueue reset (SPEC §2.6.1): requests in flight fail, the disk's data stays; the
        new ring has ``num`` entries (default: as before)."""
        await self.reset_vq(0, num)
        self.request_bytes = self._request_bytes()

    def free_buffers(self) -> None:
        super().free_buffers()
        self._dma.close()

    async def config_changed(self) -> None:
        """The capacity may change at runtime (a resized backing file)."""
        self.capacity = await self.config_field("capacity")

    @property
    def size(self) -> int:
        """Capacity in bytes."""
        return self.capacity * BLK_SECTOR_SIZE

    # -- I/O ------------------------------------------------------------------------------------

    async def read(self, offset: int, length: int) -> bytes:
        """Read ``length`` bytes at ``offset`` (both multiples of 512), in parallel requests."""
        self._check_range(offset, length)
        if length <= self.request_bytes:
            if not length:
                return b""
            return await self._transfer(BlkType.IN, offset // BLK_SECTOR_SIZE, in_len=length)
        requests = self._split(offset, length)
        parts = await asyncio.gather(
            *(self._transfer(BlkType.IN, sector, in_len=n) for sector, n in requests)
        )
        return b"".join(parts)

    async def write(self, offset: int, data: bytes) -> None:
        """Write ``data`` at ``offset`` (both multiples of 512), in parallel requests."""
        if self.read_only:
            raise ReadOnlyError(self.dev.name)
        self._check_range(offset, len(data))
        if len(data) <= self.request_bytes:
            if data:
                await self._transfer(BlkType.OUT, offset // BLK_SECTOR_SIZE, out=bytes(data))
            return
        view = memoryview(data)
        start = offset // BLK_SECTOR_SIZE
        await asyncio.gather(
            *(
                self._transfer(
                    BlkType.OUT, sector, out=view[(sector - start) * 512 :][:n].tobytes()
                )
                for sector, n in self._split(offset, len(data))
            )
        )

    async def flush(self) -> None:
        """Make completed writes durable; a device without VIRTIO_BLK_F_FLUSH has no cache."""
        if self.has_feature(BlkFeature.FLUSH):
            await self._transfer(BlkType.FLUSH, 0)

    async def get_id(self) -> str:
        """The device's serial string (up to 20 ASCII bytes)."""
        raw = await self._transfer(BlkType.GET_ID, 0, in_len=BLK_ID_BYTES)
        return raw.split(b"\0", 1)[0].decode("ascii", "replace")

    def _check_range(self, offset: int, length: int) -> None:
        if offset % BLK_SECTOR_SIZE or length % BLK_SECTOR_SIZE or offset < 0:
            raise ValueError(
                f"{self.dev.name}: offset {offset} and length {length} must be non-negative "
                f"multiples of the {BLK_SECTOR_SIZE}-byte sector"
            )
        if offset + length > self.size:
            raise ValueError(
                f"{self.dev.name}: bytes {offset}..{offset + length} are beyond the end of the "
                f"disk ({self.capacity} sectors = {self.size} bytes)"
            )

    def _split(self, offset: int, length: int) -> list[tuple[int, int]]:
        """(sector, bytes) of each request."""
        step = self.request_bytes
        return [
            ((offset + at) // BLK_SECTOR_SIZE, min(step, length - at))
            for at in range(0, length, step)
        ]

    async def _transfer(
        self, kind: BlkType, sector: int, *, out: bytes = b"", in_len: int = 0
    ) -> bytes:
        """One request in a DMA slot, at most queue_depth at once; the data read back, if any."""
        slots = self._slots
        if not slots.take_now():
            await slots.take()
        try:
            data_len = len(out) or in_len
            dma = self._dma
            slot = dma.take(data_len)
            header = slot.gpa
            status = header + BLK_REQ_HEADER_SIZE
            data = slot.data
            mapped = self.dev.memory if isinstance(self.dev.memory, MappedGuestMemory) else None
            try:
                head = _HEADER.pack(kind, 0, sector) + _STATUS_BYTE
                if mapped is not None:  # shared memory: plain stores, no coroutine
                    mapped.write_sync(header, head)
                    if out:
                        mapped.write_sync(data, out)
                else:
                    await self.dev.memory.writev([(header, head)] + ([(data, out)] if out else []))
                segments = self._segments(data, data_len)
                out_bufs = [(header, BLK_REQ_HEADER_SIZE), *(segments if out else ())]
                in_bufs = [*(segments if in_len else ()), (status, 1)]
                await self.vq.submit(out_bufs, in_bufs, release=partial(dma.give, slot))
            except asyncio.CancelledError:
                raise  # submit() gives the slot back when the device returns the chain
            except BaseException:
                dma.give(slot)
                raise
            try:
                if mapped is not None:
                    result = mapped.view(status, 1)[0]
                    got = mapped.read_sync(data, in_len) if in_len else b""
                else:
                    parts = await self.dev.memory.readv(
                        [(status, 1)] + ([(data, in_len)] if in_len else [])
                    )
                    result, got = parts[0][0], parts[1] if in_len else b""
            finally:
                dma.give(slot)
            if result != BlkStatus.OK:
                raise RequestError(self.dev.name, kind, sector, data_len // BLK_SECTOR_SIZE, result)
            return got
        finally:
            slots.give()

    def _segments(self, gpa: int, length: int) -> list[tuple[int, int]]:
        """The data buffer cut into descriptors of at most size_max bytes."""
        step = self.size_max
        if not step or length <= step:
            return [(gpa, length)] if length else []
        return [(gpa + at, min(step, length - at)) for at in range(0, length, step)]
