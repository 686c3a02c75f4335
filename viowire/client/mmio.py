"""The virtio-mmio transport, driver side: Linux's ``virtio_mmio.c`` ops table as async methods.

Device drivers (``viowire.client.drivers``) call only these operations and never touch a register
themselves. Registers are reached through a :class:`RegisterBus` (the connection to the server);
the rings live in guest memory that this client owns. Writes are posted (queued in order, no round
trip) except the InterruptACK, which waits until the device has applied it: only then is every
completion that raised the interrupt visible in the used rings, and any later one re-raises it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from viowire import polling
from viowire.client.errors import (
    BadQueueSizeError,
    ConfigUnstableError,
    DeviceNeedsResetError,
    FeaturesRefusedError,
    MissingVersion1Error,
    NoDeviceError,
    PfnTooLargeError,
    QueueInUseError,
    QueueMemoryError,
    QueueResetError,
    QueueUnavailableError,
    ResetTimeoutError,
    UnsupportedVersionError,
    WrongMagicError,
)
from viowire.client.notify import DriverChannel
from viowire.client.virtqueue import Allocator, Virtqueue, maybe_await
from viowire.virtio.constants import (
    CONFIG_OFFSET,
    DEFAULT_WINDOW_SIZE,
    MAGIC_VALUE,
    MAX_QUEUE_SIZE,
    PAGE_SIZE,
    Feature,
    Interrupt,
    Reg,
    Status,
    device_name,
)
from viowire.virtio.memory import GuestMemory

log = logging.getLogger(__name__)

CONFIG_RETRIES = 16  # generation changes tolerated while reading one config field
RESET_TIMEOUT = 1.0  # seconds to wait for Status to read 0 after a reset
INTERRUPT_BACKLOG = 256  # statuses kept for a slow interrupts() reader before the oldest drop

# Posted writes whose order against a notification does not matter: the rest must have been
# applied before a kick may take the (unordered) notification channel.
_UNORDERED = frozenset((Reg.INTERRUPT_ACK, Reg.QUEUE_NOTIFY))
_VRING = int(Interrupt.VRING)

ConfigCallback = Callable[["VirtioMmioDevice"], object]
VqCallback = Callable[[Virtqueue], object]


class RegisterBus(Protocol):
    """The device's register window, as the connection to the server provides it."""

    async def mmio_read(self, addr: int, width: int) -> int: ...

    async def mmio_write(
        self, addr: int, width: int, value: int, *, posted: bool = True
    ) -> None: ...

    def set_irq_handler(self, irq: int, handler: Callable[[bool], None] | None) -> None: ...


class InterruptSubscription:
    """``async for status in dev.interrupts()``: every handled InterruptStatus, in order.

    Registered when created, so nothing is missed before the first ``__anext__``. Ends when the
    device's queues are deleted or on :meth:`close`; a reader that falls ``INTERRUPT_BACKLOG``
    behind loses the oldest statuses (counted in ``dropped``) rather than growing without bound.
    """

    def __init__(self, device: VirtioMmioDevice) -> None:
        self._device = device
        self._queue: asyncio.Queue[int | None] = asyncio.Queue(INTERRUPT_BACKLOG)
        self.dropped = 0

    def _put(self, item: int | None) -> None:
        if self._queue.full():
            self._queue.get_nowait()
            self.dropped += 1
        self._queue.put_nowait(item)

    def __aiter__(self) -> InterruptSubscription:
        return self

    async def __anext__(self) -> int:
        item = await self._queue.get()
        if item is None:
            raise StopAsyncIteration
        return item

    def close(self) -> None:
        """Stop receiving; a pending ``__anext__`` ends the iteration."""
        if self in self._device._subscribers:
            self._device._subscribers.discard(self)
            self._put(None)

    async def __aenter__(self) -> InterruptSubscription:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()


def is_ring_size(num: int) -> bool:
    """A split ring's size is a power of two in 1..32768."""
    return 0 < num <= MAX_QUEUE_SIZE and not num & (num - 1)


class VirtioMmioDevice:
    """One virtio-mmio device window: probe, status, features, config, queues and interrupts."""

    transport = "virtio-mmio"

    def __init__(
        self,
        bus: RegisterBus,
        base: int,
        irq: int,
        memory: GuestMemory,
        allocator: Allocator,
        *,
        size: int = DEFAULT_WINDOW_SIZE,
        name: str | None = None,
    ) -> None:
        self.bus = bus
        self.base = base
        self.irq = irq
        self.memory = memory
        self.allocator = allocator
        self.size = size
        self.name = name or f"virtio-mmio@{base:#x}"
        self.version = 0
        self.device_id = 0
        self.vendor_id = 0
        self.negotiated_features = 0  # what finalize_features wrote
        self.status = 0  # the status byte last read or written
        self.needs_reset = False
        self.config_changes = 0
        self.reset_timeout = RESET_TIMEOUT
        self.vqs: dict[int, Virtqueue] = {}
        self._config_callbacks: list[ConfigCallback] = []
        self._subscribers: set[InterruptSubscription] = set()
        self._irq_attached = False
        self._irq_level = False
        self._irq_pending = False
        self._irq_given = 0  # InterruptStatus bits delivered with raise frames, not yet handled
        self._irq_task: asyncio.Task[None] | None = None
        self._cached_loop: asyncio.AbstractEventLoop | None = None
        self._channel: DriverChannel | None = None
        self._channel_wanted = True  # try for one at the next kick
        self.poll_us = 0  # after a submit, poll the used rings this long (shared memory only)
        self._poll_deadline: float | None = None
        self._poll_window: float | None = None  # seconds; poll_us until it adapts
        self._waiting_since: float | None = None  # a wait polling did not cover, since when
        self._poll_tasks: dict[int, asyncio.Task] = {}  # queue index -> its vring_interrupt
        self._posted_seq = 0  # ordered posted writes sent
        self._synced_seq = 0  # of those, how many a later round trip proved applied

    def __repr__(self) -> str:
        kind = device_name(self.device_id) if self.device_id else "unprobed"
        return f"<VirtioMmioDevice {self.name} v{self.version} {kind} irq {self.irq}>"

    async def _read(self, reg: Reg) -> int:
        seq = self._posted_seq
        value = await self.bus.mmio_read(self.base + reg, 4)
        self._synced(seq)
        return value

    async def _write(self, reg: Reg, value: int, *, posted: bool = True) -> None:
        if not posted:
            seq = self._posted_seq
            await self.bus.mmio_write(self.base + reg, 4, value & 0xFFFF_FFFF, posted=False)
            self._synced(seq)
            return
        await self.bus.mmio_write(self.base + reg, 4, value & 0xFFFF_FFFF, posted=True)
        if reg not in _UNORDERED:
            self._posted_seq += 1  # counted once queued: a read queued earlier cannot prove it

    def _synced(self, seq: int) -> None:
        """A round trip that left after posted write ``seq`` came back: the server applies a
        session's frames in order, so that write and every earlier one have been applied."""
        if seq > self._synced_seq:
            self._synced_seq = seq

    # -- probe (virtio_mmio_probe) --------------------------------------------------------------

    async def probe(self) -> None:
        """Identify the device: MagicValue, Version 1|2, DeviceID (0 = empty slot), VendorID.

        Raises :class:`NoDeviceError` for an empty slot, having touched no other register.
        """
        magic = await self._read(Reg.MAGIC_VALUE)
        if magic != MAGIC_VALUE:
            raise WrongMagicError(self.name, magic)
        version = await self._read(Reg.VERSION)
        if version not in (1, 2):
            raise UnsupportedVersionError(self.name, version)
        device_id = await self._read(Reg.DEVICE_ID)
        if device_id == 0:
            raise NoDeviceError(self.name)
        self.version = version
        self.device_id = device_id
        self.vendor_id = await self._read(Reg.VENDOR_ID)
        if version == 1:
            await self._write(Reg.GUEST_PAGE_SIZE, PAGE_SIZE)

    @property
    def legacy(self) -> bool:
        return self.version == 1

    # -- status (vm_get_status / vm_set_status / vm_reset) --------------------------------------

    async def get_status(self) -> int:
        self.status = await self._read(Reg.STATUS) & 0xFF
        return self.status

    async def set_status(self, status: int) -> None:
        """Write the status byte; 0 is a reset and goes through :meth:`reset` (Linux BUG()s).

        Not posted: when this returns the device has applied it, so after DRIVER_OK the device
        is live (a config change from then on raises an interrupt), as with Linux's writel.
        """
        if status == 0:
            raise ValueError("writing status 0 resets the device: call reset()")
        await self._write(Reg.STATUS, status, posted=False)
        self.status = status

    async def add_status(self, bits: int) -> None:
        """virtio_add_status: read-modify-write, so the device sees a read before every write."""
        await self.set_status(await self.get_status() | bits)

    async def reset(self) -> None:
        """Write Status = 0, then poll until it reads 0 (SPEC §2.4.2), within ``reset_timeout``."""
        await self._write(Reg.STATUS, 0)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reset_timeout
        delay = 0.0005
        while (status := await self.get_status()) != 0:
            if loop.time() >= deadline:
                raise ResetTimeoutError(self.name, status, self.reset_timeout)
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.05)
        self.needs_reset = False
        self.negotiated_features = 0

    async def fail(self) -> None:
        """Status |= FAILED: the driver gave up on the device (it needs a reset to recover)."""
        await self.add_status(Status.FAILED)

    # -- features (vm_get_features / vm_finalize_features) --------------------------------------

    async def get_features(self) -> int:
        """The device's offer: 64 bits read high word first, or word 0 alone for legacy."""
        if self.legacy:
            await self._write(Reg.DEVICE_FEATURES_SEL, 0)
            return await self._read(Reg.DEVICE_FEATURES)
        await self._write(Reg.DEVICE_FEATURES_SEL, 1)
        high = await self._read(Reg.DEVICE_FEATURES)
        await self._write(Reg.DEVICE_FEATURES_SEL, 0)
        return high << 32 | await self._read(Reg.DEVICE_FEATURES)

    async def finalize_features(self, features: int) -> None:
        """Write the accepted features: DriverFeaturesSel 1 + high word, then 0 + low word.

        A version 2 device is only driven with VIRTIO_F_VERSION_1 (Linux refuses it otherwise).
        A legacy device has one word; only word 0 is written.
        """
        if not self.legacy and not features >> Feature.VERSION_1 & 1:
            raise MissingVersion1Error(self.name)
        if self.legacy:
            if features >> 32:
                raise ValueError(f"legacy devices have 32 feature bits, not {features:#x}")
        else:
            await self._write(Reg.DRIVER_FEATURES_SEL, 1)
            await self._write(Reg.DRIVER_FEATURES, features >> 32)
        await self._write(Reg.DRIVER_FEATURES_SEL, 0)
        await self._write(Reg.DRIVER_FEATURES, features)
        self.negotiated_features = features

    async def features_ok(self) -> None:
        """Status |= FEATURES_OK and read it back; clear means refused (virtio 1.x only)."""
        if not self.negotiated_features >> Feature.VERSION_1 & 1:
            return  # legacy: the device takes the features on first use
        await self.add_status(Status.FEATURES_OK)
        status = await self.get_status()
        if not status & Status.FEATURES_OK:
            raise FeaturesRefusedError(self.name, self.negotiated_features, status)

    def has_feature(self, bit: int) -> bool:
        return bool(self.negotiated_features >> bit & 1)

    # -- configuration space (vm_get / vm_set / vm_generation) ----------------------------------

    async def generation(self) -> int:
        """ConfigGeneration; legacy devices have none (constant 0, like Linux)."""
        return 0 if self.legacy else await self._read(Reg.CONFIG_GENERATION)

    async def config_read(self, offset: int, length: int) -> bytes:
        """Read config bytes consistently: generation retry (v2), or two equal reads (legacy)."""
        self._check_config(offset, length)
        if self.legacy:
            return await self._config_read_stable(offset, length)
        for _ in range(CONFIG_RETRIES):
            before = await self.generation()
            data = await self._config_get(offset, length)
            if await self.generation() == before:
                return data
        raise ConfigUnstableError(self.name, offset, length, CONFIG_RETRIES, Reg.CONFIG_GENERATION)

    async def config_read_int(self, offset: int, length: int) -> int:
        """A little-endian config field of 1, 2, 4 or 8 bytes."""
        return int.from_bytes(await self.config_read(offset, length), "little")

    async def _config_read_stable(self, offset: int, length: int) -> bytes:
        """Legacy has no generation counter: re-read until two reads agree (SPEC §2.5.4)."""
        data = await self._config_get(offset, length)
        for _ in range(CONFIG_RETRIES):
            again = await self._config_get(offset, length)
            if again == data:
                return data
            data = again
        raise ConfigUnstableError(self.name, offset, length, CONFIG_RETRIES, Reg.CONFIG)

    async def _config_get(self, offset: int, length: int) -> bytes:
        out = bytearray()
        for at, width in self._config_accesses(offset, length):
            value = await self.bus.mmio_read(self.base + CONFIG_OFFSET + at, width)
            out += value.to_bytes(width, "little")
        return bytes(out)

    async def config_write(self, offset: int, data: bytes) -> None:
        """Write config bytes with the same access widths as :meth:`config_read`."""
        self._check_config(offset, len(data))
        for at, width in self._config_accesses(offset, len(data)):
            value = int.from_bytes(data[at - offset : at - offset + width], "little")
            await self.bus.mmio_write(self.base + CONFIG_OFFSET + at, width, value)
            self._posted_seq += 1  # a kick may depend on it, as on any ordered write

    def _config_accesses(self, offset: int, length: int) -> list[tuple[int, int]]:
        """Linux's widths: legacy bytes; v2 aligned 1/2/4, and 8 as two 4s (low first).

        Other lengths (byte arrays such as a MAC) and unaligned fields go byte by byte.
        """
        if not self.legacy:
            if length in (1, 2, 4) and offset % length == 0:
                return [(offset, length)]
            if length == 8 and offset % 4 == 0:
                return [(offset, 4), (offset + 4, 4)]
        return [(offset + i, 1) for i in range(length)]

    def _check_config(self, offset: int, length: int) -> None:
        if offset < 0 or length <= 0 or offset + length > self.size - CONFIG_OFFSET:
            raise ValueError(
                f"{self.name}: config bytes {offset:#x}+{length} are outside the "
                f"{self.size - CONFIG_OFFSET}-byte configuration space"
            )

    def on_config_change(self, callback: ConfigCallback) -> Callable[[], None]:
        """Run ``callback(dev)`` (plain or async) on each config-change interrupt; returns undo."""
        self._config_callbacks.append(callback)
        return lambda: self._config_callbacks.remove(callback)

    # -- virtqueues (vm_setup_vq / vm_del_vq / vm_find_vqs / vm_del_vqs) ------------------------

    async def queue_num_max_of(self, index: int) -> int:
        """QueueNumMax of queue ``index`` (0: no such queue); QueueSel is left at 0."""
        await self._write(Reg.QUEUE_SEL, index)
        num_max = await self._read(Reg.QUEUE_NUM_MAX)
        await self._write(Reg.QUEUE_SEL, 0)
        return num_max

    async def setup_vq(
        self,
        index: int,
        num_wanted: int | None = None,
        callback: VqCallback | None = None,
        *,
        name: str = "",
    ) -> Virtqueue:
        """Create queue ``index`` with every check vm_setup_vq makes, and make it live."""
        await self._write(Reg.QUEUE_SEL, index)
        in_use = Reg.QUEUE_PFN if self.legacy else Reg.QUEUE_READY
        if value := await self._read(in_use):
            raise QueueInUseError(self.name, index, in_use, value)
        num = await self._read(Reg.QUEUE_NUM_MAX)
        if num == 0:
            raise QueueUnavailableError(self.name, index)
        if not is_ring_size(num):
            raise BadQueueSizeError(self.name, index, num, Reg.QUEUE_NUM_MAX)
        if num_wanted is not None:
            if not is_ring_size(num_wanted):
                raise BadQueueSizeError(self.name, index, num_wanted, None)
            num = min(num, num_wanted)
        vq = await self._create_vq(index, num, callback, name)
        try:
            await self._activate(vq)
        except BaseException:
            with contextlib.suppress(Exception):
                await self._deactivate(index)
            vq.free_rings()
            raise
        self.vqs[index] = vq
        return vq

    async def _create_vq(
        self, index: int, num: int, callback: VqCallback | None, name: str
    ) -> Virtqueue:
        """vring_create_virtqueue with may_reduce_num: halve the ring until it fits in RAM."""
        wanted = num
        while True:
            try:
                return await Virtqueue.create(
                    index,
                    num,
                    self.memory,
                    self.allocator,
                    "legacy" if self.legacy else "modern",
                    event_idx=self.has_feature(Feature.RING_EVENT_IDX),
                    indirect=self.has_feature(Feature.RING_INDIRECT_DESC),
                    notify=self.notify,
                    callback=callback,
                    on_publish=self._on_publish if self.poll_us else None,
                    device=self.name,
                    name=name,
                )
            except MemoryError:
                if num == 1:
                    raise QueueMemoryError(self.name, index, wanted) from None
                num //= 2

    async def _activate(self, vq: Virtqueue) -> None:
        await self._write(Reg.QUEUE_NUM, vq.num)
        addresses = vq.addresses
        if self.legacy:
            pfn = addresses.desc // PAGE_SIZE
            if pfn >> 32:
                raise PfnTooLargeError(self.name, vq.index, addresses.desc)
            await self._write(Reg.QUEUE_ALIGN, PAGE_SIZE)
            await self._write(Reg.QUEUE_PFN, pfn)
            return
        for low, gpa in (
            (Reg.QUEUE_DESC_LOW, addresses.desc),
            (Reg.QUEUE_AVAIL_LOW, addresses.avail),
            (Reg.QUEUE_USED_LOW, addresses.used),
        ):
            await self._write(low, gpa)
            await self._write(Reg(low + 4), gpa >> 32)
        await self._write(Reg.QUEUE_READY, 1)

    async def _deactivate(self, index: int) -> None:
        """Tell the device to stop using the queue: QueuePFN = 0, or QueueReady = 0 read back."""
        await self._write(Reg.QUEUE_SEL, index)
        if self.legacy:
            await self._write(Reg.QUEUE_PFN, 0)
            return
        await self._write(Reg.QUEUE_READY, 0)
        if ready := await self._read(Reg.QUEUE_READY):
            log.warning(
                "%s: virtqueue %d: QueueReady (0x044) still reads %#x after writing 0; "
                "freeing its rings anyway",
                self.name,
                index,
                ready,
            )

    async def del_vq(self, vq: Virtqueue) -> None:
        """Deactivate the queue, fail what is still in flight, and free its rings."""
        self.vqs.pop(vq.index, None)
        try:
            await self._deactivate(vq.index)
        finally:
            await vq.detach_all()
        vq.free_rings()

    async def reset_vq(self, vq: Virtqueue, num_wanted: int | None = None) -> Virtqueue:
        """Virtqueue reset (SPEC §2.6.1, needs VIRTIO_F_RING_RESET): the device forgets the
        queue, requests in flight fail with QueueDeletedError, and a fresh ring (of
        ``num_wanted`` entries, else the old size) takes its place. Returns the new queue."""
        if not self.has_feature(Feature.RING_RESET):
            raise QueueResetError(
                self.name, vq.index, "VIRTIO_F_RING_RESET was not negotiated: reset the device"
            )
        await self._write(Reg.QUEUE_SEL, vq.index)
        await self._write(Reg.QUEUE_RESET, 1)
        await self._await_queue_reset(vq.index)
        self.vqs.pop(vq.index, None)
        await vq.detach_all()
        vq.free_rings()
        return await self.setup_vq(vq.index, num_wanted or vq.num, vq.callback, name=vq.name)

    async def _await_queue_reset(self, index: int) -> None:
        """The device reads 1 while the reset runs, then 0 in QueueReset and QueueReady."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.reset_timeout
        while await self._read(Reg.QUEUE_RESET):
            if loop.time() >= deadline:
                raise QueueResetError(
                    self.name, index, f"QueueReset still reads 1 after {self.reset_timeout:g} s"
                )
            await asyncio.sleep(0.001)
        if ready := await self._read(Reg.QUEUE_READY):
            raise QueueResetError(
                self.name, index, f"QueueReady reads {ready:#x} after the reset finished"
            )

    async def find_vqs(
        self,
        names: Sequence[str | None],
        callbacks: Sequence[VqCallback | None] | None = None,
        sizes: Sequence[int | None] | None = None,
    ) -> list[Virtqueue | None]:
        """Set up one queue per name and take the interrupt line; all or nothing.

        A None name yields None and, like current Linux, consumes no queue index.
        """
        self._attach_irq()
        vqs: list[Virtqueue | None] = []
        queue_index = 0
        try:
            for i, name in enumerate(names):
                if name is None:
                    vqs.append(None)
                    continue
                callback = callbacks[i] if callbacks else None
                size = sizes[i] if sizes else None
                vqs.append(await self.setup_vq(queue_index, size, callback, name=name))
                queue_index += 1
        except BaseException:
            with contextlib.suppress(Exception):
                await self.del_vqs()
            raise
        return vqs

    async def del_vqs(self) -> None:
        """Delete every queue and release the interrupt line (ending interrupts() iterators)."""
        try:
            for vq in list(self.vqs.values()):
                await self.del_vq(vq)
        finally:
            self._detach_irq()
            await self._close_channel()

    async def notify(self, vq: Virtqueue) -> None:
        """vm_notify: a posted QueueNotify write of the queue index, or the same on the
        notification channel once every earlier ordered write is known to be applied (else the
        kick could reach the device before, say, its QueueReady)."""
        channel = self._channel
        if channel is None and self._channel_wanted:
            channel = await self._open_channel()
        if channel is not None and self._synced_seq == self._posted_seq and channel.kick(vq.index):
            return
        await self._write(Reg.QUEUE_NOTIFY, vq.index)

    async def _open_channel(self) -> DriverChannel | None:
        """Take notifications off the connection where the bus can (same host, shared memory)."""
        self._channel_wanted = False
        opener = getattr(self.bus, "open_notify_channel", None)
        if opener is None or not self._irq_attached:
            return None
        # The attach went by the sidecar, which the server reads apart from the connection: its
        # reply proves nothing about earlier posted writes, so it does not count as a sync.
        # Cancelled, the connection takes it back once attached; no second try (a take-back
        # names the device, and would detach the new one too).
        channel = await opener(self.base)
        if channel is None:
            return None
        if not self._irq_attached:  # del_vqs ran meanwhile
            await self.bus.close_notify_channel(self.base, channel)
            return None
        channel.start(self._on_used_notification)
        self._channel = channel
        return channel

    async def _close_channel(self) -> None:
        channel, self._channel = self._channel, None
        self._channel_wanted = True
        if channel is not None:
            await self.bus.close_notify_channel(self.base, channel)

    # -- polling (poll_us) ----------------------------------------------------------------------
    def _on_publish(self, vq: Virtqueue) -> None:
        """A request went out: watch the used rings for a while, with used-buffer
        notifications off, instead of sleeping until one wakes us (NVMe's io_poll, vhost's
        busy-polling on the other side). Each look is one loop turn. The window, at most
        poll_us, adapts to how soon completions come (viowire.polling). A queue with a callback
        keeps its notifications: its callback runs when they come."""
        if vq._mapped is None or vq.callback is not None:
            return
        # perf_counter, not loop.time(): uvloop's clock moves in milliseconds.
        now = time.perf_counter()
        window = self._poll_window
        if window is None:
            window = self._poll_window = self.poll_us / 1e6
        if window <= 0:
            if self._waiting_since is None:
                self._waiting_since = now  # how long until the completion says what would pay
            return
        deadline = now + window
        if self._poll_deadline is None:
            for queue in (*self.vqs.values(), vq):  # vq is not in vqs yet during setup_vq
                if queue.callback is None and queue._mapped is not None:
                    queue.suppress_interrupts()
            self._loop().call_soon(self._poll_used)
        self._poll_deadline = deadline

    def _poll_used(self) -> None:
        if self._poll_deadline is None:
            return
        if getattr(self.bus, "closed", False):  # guest RAM went with the connection
            self._poll_deadline = None
            return
        polled = [vq for vq in self.vqs.values() if vq.polling]
        now = time.perf_counter()
        if self._collect_polled(polled):
            self._waiting_since = None  # caught: the window was long enough
            self._poll_deadline = max(self._poll_deadline, now + (self._poll_window or 0.0))
        if now < self._poll_deadline and polled:
            self._loop().call_soon(self._poll_used)
            return
        ended, self._poll_deadline = self._poll_deadline, None
        late = [vq for vq in polled if vq.allow_interrupts()]
        if late:  # used as we stopped: their notification may have been skipped
            self._collect_polled(late)
        elif any(vq.in_flight for vq in polled):  # still waiting: its notification will tell
            self._waiting_since = ended - (self._poll_window or 0.0)

    def _completion_came(self) -> None:
        """A used-buffer notification (poll mode): adapt the window by how long it took."""
        since, self._waiting_since = self._waiting_since, None
        if since is not None and self.poll_us:
            waited = time.perf_counter() - since
            self._poll_window = polling.adapt(self._poll_window or 0.0, self.poll_us / 1e6, waited)

    def _collect_polled(self, queues: list[Virtqueue]) -> bool:
        """Take what the device returned on ``queues``; a queue that cannot be served inline
        now (someone holds its lock, or waits for room) gets vring_interrupt in a task."""
        found = False
        for vq in queues:
            if vq.can_collect_now():
                found = vq.collect_now() or found
            elif vq.used_pending() and vq.index not in self._poll_tasks:
                task = self._loop().create_task(vq.interrupt())
                self._poll_tasks[vq.index] = task
                task.add_done_callback(lambda _t, i=vq.index: self._poll_tasks.pop(i, None))
                found = True
        return found

    def _on_used_notification(self) -> None:
        """A used-buffer notification from the channel: InterruptStatus bit 0 without a read.
        The rings are scanned right here when no queue needs the slow path; the ACK rides with
        the next frame, as nothing waits on it (the channel signals every notification)."""
        self._completion_came()
        if self._irq_task is not None and not self._irq_task.done():
            self._on_irq_line(True, _VRING)
            return
        for vq in self.vqs.values():
            if not vq.can_collect_now():
                self._on_irq_line(True, _VRING)
                return
        for vq in list(self.vqs.values()):
            vq.collect_now()
        for subscription in list(self._subscribers):
            subscription._put(_VRING)
        self.bus.ack_later(self.base + Reg.INTERRUPT_ACK, _VRING)

    # -- interrupts (vm_interrupt) --------------------------------------------------------------

    def interrupts(self) -> InterruptSubscription:
        """Subscribe to handled interrupts: ``async for status in dev.interrupts(): ...``."""
        subscription = InterruptSubscription(self)
        self._subscribers.add(subscription)
        return subscription

    def _attach_irq(self) -> None:
        if not self._irq_attached:
            self.bus.set_irq_handler(self.irq, self._on_irq_line)
            self._irq_attached = True

    def _detach_irq(self) -> None:
        if self._irq_attached:
            self.bus.set_irq_handler(self.irq, None)
            self._irq_attached = False
            self._irq_level = False
        for subscription in list(self._subscribers):
            subscription.close()

    def _loop(self) -> asyncio.AbstractEventLoop:
        """The running loop, looked up once (each lookup is a getpid() system call in 3.11)."""
        if self._cached_loop is None:
            self._cached_loop = asyncio.get_running_loop()
        return self._cached_loop

    def _on_irq_line(self, level: bool, status: int | None = None) -> None:
        """The bus reports each line change; an assertion schedules the handler as a task.

        ``status``: InterruptStatus as the raise left the device, when the bus carries it
        (viowire's IRQ_STATUS); the handler then reads no register and posts its ACK.
        """
        self._irq_level = level
        if not level:
            return
        if status is not None:
            self._irq_given |= status
        self._irq_pending = True
        if self._irq_task is None or self._irq_task.done():
            self._irq_task = self._loop().create_task(
                self._irq_loop(), name=f"{self.name} interrupt"
            )

    # A bus that carries InterruptStatus with the raise (viowire's IRQ_STATUS) passes it to a
    # handler that says it takes it; other buses call it with the level only.
    _on_irq_line.takes_status = True  # type: ignore[attr-defined]

    async def _irq_loop(self) -> None:
        """Run vm_interrupt until the line is quiet; the line is level-triggered, so if it is
        still asserted after our ACK there are bits we have not seen yet: go round again."""
        try:
            while self._irq_pending:
                self._irq_pending = False
                if self._irq_given:
                    status, self._irq_given = self._irq_given, 0
                    await self._handle_interrupt(status, posted_ack=True)
                elif await self.vm_interrupt() and self._irq_level:
                    self._irq_pending = True
        except Exception as exc:
            log.exception("%s: interrupt handling failed; failing in-flight requests", self.name)
            await self.abort(exc)

    async def abort(self, exc: Exception) -> None:
        """Fail every request in flight, and every later one, with ``exc``.

        For when nothing will complete them (the connection is gone). The rings stay allocated
        until del_vqs: the device may still hold them.
        """
        for vq in list(self.vqs.values()):
            await vq.fail(exc)

    async def vm_interrupt(self) -> int:
        """Read InterruptStatus, ACK it (and wait for the ACK), then config change, then rings.

        Waiting for the ACK matters: once it is applied, every guest-memory write the device
        made before a later completion has reached us, so the ring scan cannot miss one.
        """
        status = await self._read(Reg.INTERRUPT_STATUS)
        if not status:
            return 0
        return await self._handle_interrupt(status, posted_ack=False)

    async def _handle_interrupt(self, status: int, *, posted_ack: bool) -> int:
        """ACK ``status``, then config change, then rings. A posted ACK is safe only where the
        device raises the line again for what it notified after the status we ACK (viowire's
        IRQ_STATUS does)."""
        await self._write(Reg.INTERRUPT_ACK, status, posted=posted_ack)
        if status & Interrupt.CONFIG:
            await self._config_changed()
        if status & Interrupt.VRING:
            self._completion_came()
            for vq in list(self.vqs.values()):
                await vq.interrupt()
        for subscription in list(self._subscribers):
            subscription._put(status)
        return status

    async def _config_changed(self) -> None:
        self.config_changes += 1
        status = await self.get_status()
        if status & Status.DEVICE_NEEDS_RESET and not self.needs_reset:
            self.needs_reset = True
            log.error("%s: device set DEVICE_NEEDS_RESET (status %#04x)", self.name, status)
            error = DeviceNeedsResetError(self.name, status)
            for vq in list(self.vqs.values()):
                await vq.fail(error)
        for callback in list(self._config_callbacks):
            try:
                await maybe_await(callback(self))
            except Exception:
                log.exception("%s: config-change callback %r failed", self.name, callback)
