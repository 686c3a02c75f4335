"""A driver for any virtio device type: whoever writes a device drives it without transport code.

:class:`GenericDriver` runs the probe flow of :class:`~viowire.client.drivers.base.VirtioDriver`
(negotiation, status handshake, unwinding) for a device type given by the caller or taken from
the device, sets up its queues, and offers what every device type is driven with:

* **requests** (:meth:`GenericDriver.request`): one chain, device-readable buffers then
  device-writable ones, in guest RAM allocated for it and freed after; its completion is awaited
  and many may be in flight at once, completing in any order (Linux's ``virtqueue_add_sgs``
  with a token, ``virtqueue_get_buf``);
* **receive queues** (:meth:`GenericDriver.post`, :meth:`GenericDriver.receive`): empty
  device-writable buffers kept posted, and what the device fills, in the order it returns them,
  each buffer posted again as soon as it is read (virtio-net's receiveq, virtio-console's input);
* **config space** (:meth:`GenericDriver.config_read`, :meth:`GenericDriver.config`,
  :meth:`GenericDriver.watch_config`): fields by offset and width, decoded by the device type's
  ``config_layout``, and watched across config-change interrupts;
* **detach** (:meth:`~viowire.client.drivers.base.VirtioDriver.detach`): reset, queues deleted,
  every buffer freed.

The blk and rng drivers are subclasses: they declare ``device_id``, ``feature_table``,
``queue_names`` and ``config_layout`` as class attributes and add their own requests (blk keeps
its own request path: plain stores into a reused DMA slot, no buffer allocated per request).

Driving a device written with :mod:`viowire.device`, with no driver of its own (``Hello``:
queue 1 answers requests, queue 0 is a receive queue)::

    from viowire.client.connection import connect
    from viowire.client.drivers.generic import GenericDriver
    from mydevices import Hello  # the device class: its id, queues and config layout

    async with await connect("unix:///tmp/viowire.sock") as conn:
        info = next(d for d in await conn.platform() if d.device_id == Hello.device_id)
        drv = await GenericDriver.attach(await conn.attach(info), device_type=Hello)
        written, data = await drv.request(1, out=b"hello", in_sizes=5)  # one chain
        await drv.post(0, size=2048, count=8)  # buffers the device fills when it likes
        async for message in drv.receive(0):  # in the order filled, each re-posted
            if message == b"bye":
                break
        print(await drv.config())  # {"field": value}, by Hello.config_layout
        await drv.detach()

Without the class, give what it would: ``device_id=``, ``queues=``, ``config_layout=``.
"""

from __future__ import annotations

import asyncio
import collections
import logging
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar, NamedTuple

from viowire.client.drivers.base import VirtioDriver
from viowire.client.errors import ConfigUnstableError, QueueDeletedError, QueueFullError
from viowire.client.mmio import CONFIG_RETRIES, VirtioMmioDevice
from viowire.client.slots import Slots
from viowire.client.virtqueue import Allocator, Virtqueue, maybe_await
from viowire.virtio.config import ConfigField
from viowire.virtio.constants import Reg

if TYPE_CHECKING:
    from viowire.device import Device

log = logging.getLogger(__name__)

SPARE_MIN, SPARE_MAX = 256, 64 * 1024
"""Request buffers of these sizes (rounded up to a power of two) are reused, not freed."""
SPARE_KEEP = 64
"""Spare request buffers kept per size class; more are freed."""

ConfigCallback = Callable[["GenericDriver"], object]


class Used(NamedTuple):
    """A request's completion: ``written`` is used.len (§2.7.8), ``data`` the whole
    device-writable area, its buffers laid end to end.

    Only the first ``written`` bytes are the device's to vouch for (:attr:`valid`); the rest is
    what the buffer held before: zeros, for the buffer :meth:`GenericDriver.request` allocates.
    Some device types write past used.len all the same (virtio-blk's status byte of a failed
    read), which is why all of it is there.
    """

    written: int
    data: bytes

    @property
    def valid(self) -> bytes:
        """The bytes the device says it wrote."""
        return self.data[: self.written]


@dataclass(frozen=True)
class ConfigSnapshot:
    """The config space after a change: ``generation`` is ConfigGeneration (0 on a legacy
    device, which has none), ``fields`` the fields of the type's ``config_layout``."""

    generation: int
    fields: dict[str, int]


class DmaBuffer:
    """One block of guest RAM for a request, freed exactly once: by its owner, or, if the owner
    was cancelled while the device held it, when the device gives it back (``lent``)."""

    __slots__ = ("_allocator", "_freed", "gpa", "lent", "size")

    def __init__(self, allocator: Allocator, size: int) -> None:
        self._allocator = allocator
        self.gpa = allocator.alloc(size, 16)
        self.size = size
        self.lent = False
        self._freed = False

    def free(self) -> None:
        if not self._freed:
            self._freed = True
            self._allocator.free(self.gpa)

    def free_unless_lent(self) -> None:
        if not self.lent:
            self.free()


class _Signal:
    """Wakes every task waiting on it at the next :meth:`fire`; a waiter may be cancelled
    without cancelling the others (they share one future, shielded)."""

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[None] | None = None

    def fire(self) -> None:
        future, self._future = self._future, None
        if future is not None and not future.done():
            future.set_result(None)

    async def wait(self) -> None:
        if self._future is None:
            self._future = asyncio.get_running_loop().create_future()
        await asyncio.shield(self._future)


class GenericDriver(VirtioDriver):
    """A driver for any device type; see the module docstring for an example.

    Subclasses (the blk and rng drivers) declare the type as class attributes; the keyword
    arguments of :meth:`attach` override them for one device:

    ``device_type``
        A :class:`viowire.device.Device` subclass: its ``device_id``, ``num_queues`` and
        ``config_layout`` are the defaults of the three arguments below.
    ``device_id``
        The device type to insist on (:class:`WrongDeviceTypeError` otherwise); None takes
        whatever the device is.
    ``features``
        The device-type feature bits to accept if offered (a mask; -1 accepts every bit offered).
        The ring features viowire implements are negotiated in any case; ``exclude_features``
        drops bits of either kind.
    ``queues``
        How many virtqueues, or the size wanted for each (None: the device's QueueNumMax).
    ``queue_names``
        Their names, for logs and errors.
    ``config_layout``
        The config fields :meth:`config` decodes (:class:`~viowire.virtio.config.ConfigField`).
    ``max_in_flight``
        Requests in flight per queue before :meth:`request` waits (default: the queue's size),
        which bounds the guest RAM that requests take.
    """

    queue_names: ClassVar[tuple[str, ...]] = ()  # one per queue, in order
    config_layout: tuple[ConfigField, ...] = ()  # an instance may override it

    def __init__(
        self,
        dev: VirtioMmioDevice,
        *,
        device_type: type[Device] | None = None,
        device_id: int | None = None,
        features: int | None = None,
        queues: int | Sequence[int | None] | None = None,
        queue_names: Sequence[str] | None = None,
        config_layout: Sequence[ConfigField] | None = None,
        max_in_flight: int | None = None,
        exclude_features: int = 0,
    ) -> None:
        super().__init__(dev, exclude_features=exclude_features)
        if device_type is not None:
            device_id = device_type.device_id if device_id is None else device_id
            queues = device_type.num_queues if queues is None else queues
            if config_layout is None:
                config_layout = device_type.config_layout
        if device_id is not None:
            self.device_id = device_id
        if features is not None:
            self.feature_table = features
        if config_layout is not None:
            self.config_layout = tuple(config_layout)
        if max_in_flight is not None and max_in_flight < 1:
            raise ValueError(f"max_in_flight {max_in_flight}: allow at least 1 request")
        self.max_in_flight = max_in_flight
        self._sizes, self._names = self._queue_plan(queues, queue_names)
        self.vqs: list[Virtqueue] = []
        self.vq: Virtqueue  # vqs[0], as an attribute: blk reads it on every request
        self._limits: dict[int, Slots] = {}
        self._receivers: dict[int, _Receiver] = {}
        self._config_callbacks: list[ConfigCallback] = []
        self._config_seq = 0  # config changes seen
        self._config_signal = _Signal()
        self._detached = False
        self._spare: dict[int, list[DmaBuffer]] = {}  # request buffers to reuse, by size class

    def _queue_plan(
        self, queues: int | Sequence[int | None] | None, names: Sequence[str] | None
    ) -> tuple[list[int | None], list[str]]:
        """(wanted size, name) of each queue."""
        if queues is None:
            queues = len(names) if names else len(self.queue_names) or 1
        if isinstance(queues, int):
            if queues < 0:
                raise ValueError(f"queues={queues}: give a count of 0 or more, or their sizes")
            sizes: list[int | None] = [None] * queues
        else:
            sizes = list(queues)
        if names is not None:
            if len(names) != len(sizes):
                raise ValueError(
                    f"{len(names)} queue names for {len(sizes)} queues: name each queue once"
                )
            return sizes, list(names)
        if len(self.queue_names) == len(sizes):
            return sizes, list(self.queue_names)
        return sizes, [f"queue{i}" for i in range(len(sizes))]

    async def setup(self) -> None:
        """Create the queues (subclasses read their config first, then call this)."""
        self.vqs = await self.dev.find_vqs(self._names, sizes=self._sizes)  # type: ignore[assignment]
        if self.vqs:
            self.vq = self.vqs[0]

    async def device_ready(self) -> None:
        """Post the receive buffers again on the new rings (after a reinitialise)."""
        for index, receiver in self._receivers.items():
            await receiver.start(self.vqs[index])

    def _vq(self, queue: int) -> Virtqueue:
        if not 0 <= queue < len(self.vqs):
            raise IndexError(
                f"{self.dev.name}: queue {queue}: the driver set up {len(self.vqs)} queues; "
                "ask for more with queues="
            )
        return self.vqs[queue]

    async def reset_vq(self, queue: int, num: int | None = None) -> Virtqueue:
        """Virtqueue reset (SPEC §2.6.1, needs VIRTIO_F_RING_RESET): requests in flight on it
        fail with QueueDeletedError, and a fresh ring of ``num`` entries (default: as before)
        takes its place; a receive queue's buffers are posted again."""
        vq = await self.dev.reset_vq(self._vq(queue), num)
        self.vqs[queue] = vq
        if queue == 0:
            self.vq = vq
        receiver = self._receivers.get(queue)
        if receiver is not None:
            await receiver.start(vq)
        return vq

    # -- requests -------------------------------------------------------------------------------

    def alloc(self, size: int) -> DmaBuffer:
        """A buffer of guest RAM to pass to :meth:`request` again and again (free it after)."""
        return DmaBuffer(self.dev.allocator, size)

    async def request(
        self,
        queue: int,
        out: bytes | Sequence[bytes] = (),
        in_sizes: int | Sequence[int] = (),
        *,
        buffer: DmaBuffer | None = None,
    ) -> Used:
        """Submit one chain on virtqueue ``queue`` and await its completion.

        ``out``: the device-readable buffers (bytes, or a list of them: one descriptor each);
        ``in_sizes``: the device-writable buffers' sizes (one descriptor each). They are laid
        out in one block of guest RAM, allocated here and freed once the device has returned
        the chain, or in ``buffer`` (from :meth:`alloc`, not zeroed), which must hold them all.

        Any number may be in flight (at most ``max_in_flight`` per queue, the rest wait), and
        they complete in whatever order the device returns them. Cancelled while the device
        holds the chain, the buffer is freed when the device gives it back.
        """
        outs = [out] if isinstance(out, bytes | bytearray | memoryview) else list(out)
        ins = [in_sizes] if isinstance(in_sizes, int) else list(in_sizes)
        if any(n < 0 for n in ins):
            raise ValueError(f"in_sizes {ins}: a buffer size cannot be negative")
        outs = [bytes(data) for data in outs if len(data)]
        ins = [n for n in ins if n]
        if not outs and not ins:
            raise ValueError("a chain needs at least one non-empty buffer: give out= or in_sizes=")
        vq = self._vq(queue)
        limit = self._limits.get(queue)
        if limit is None:
            limit = self._limits[queue] = Slots(self.max_in_flight or vq.num)
        if not limit.take_now():
            await limit.take()
        try:
            if buffer is not None:
                return await self._exchange(vq, buffer, outs, ins, zero=False)
            own = self._take_buffer(sum(map(len, outs)) + sum(ins))
            try:
                return await self._exchange(vq, own, outs, ins, zero=True)
            finally:
                self._give_buffer(own)
        finally:
            limit.give()

    def _take_buffer(self, size: int) -> DmaBuffer:
        """A request buffer for ``size`` bytes: a spare one of its size class, else a new one.
        Reused because a first-fit allocation over guest RAM costs more than a small request
        (a frame, an rng read) itself, once rings have left the free list in pieces."""
        if size > SPARE_MAX:
            return self.alloc(size)
        size_class = max(SPARE_MIN, 1 << (size - 1).bit_length())
        spare = self._spare.get(size_class)
        if spare:
            return spare.pop()
        try:
            return self.alloc(size_class)
        except MemoryError:
            self._free_spares()  # guest RAM is short: the spares go first
            return self.alloc(size_class)

    def _give_buffer(self, buffer: DmaBuffer) -> None:
        """A request is over: keep its buffer for the next one, unless the device still holds
        it (cancelled: freed when the device gives it back) or there are spares enough."""
        if buffer.lent:
            return
        spare = self._spare.setdefault(buffer.size, [])
        if buffer.size > SPARE_MAX or self._detached or len(spare) >= SPARE_KEEP:
            buffer.free()
        else:
            spare.append(buffer)

    def _free_spares(self) -> None:
        for spare in self._spare.values():
            while spare:
                spare.pop().free()

    async def _exchange(
        self, vq: Virtqueue, buffer: DmaBuffer, outs: list[bytes], ins: list[int], *, zero: bool
    ) -> Used:
        """Lay the chain out in ``buffer``, submit it, and read back the writable area."""
        total = sum(map(len, outs)) + sum(ins)
        if total > buffer.size:
            raise ValueError(f"the chain takes {total} bytes but the buffer has {buffer.size}")
        out_bufs, writes, at = [], [], buffer.gpa
        for data in outs:
            out_bufs.append((at, len(data)))
            writes.append((at, data))
            at += len(data)
        in_at, in_len = at, sum(ins)
        in_bufs = []
        for size in ins:
            in_bufs.append((at, size))
            at += size
        if zero and in_len:
            writes.append((in_at, bytes(in_len)))
        memory = self.dev.memory
        if writes:
            await memory.writev(writes)
        try:
            written = await vq.submit(out_bufs, in_bufs, release=buffer.free)
        except asyncio.CancelledError:
            buffer.lent = True  # submit() frees it once the device gives it back
            raise
        return Used(written, await memory.read(in_at, in_len) if in_len else b"")

    # -- receive queues -------------------------------------------------------------------------

    async def post(self, queue: int, size: int, count: int) -> None:
        """Keep ``count`` empty device-writable buffers of ``size`` bytes posted on ``queue``
        from now on: each one the device fills is posted again once :meth:`receive` has read
        it, and all of them again after a queue or device reset."""
        vq = self._vq(queue)
        if queue in self._receivers:
            raise ValueError(f"{self.dev.name}: queue {queue} has its receive buffers already")
        if size < 1 or not 1 <= count <= vq.num:
            raise ValueError(
                f"{self.dev.name}: post {count} buffers of {size} bytes: give size >= 1 and "
                f"a count of 1..{vq.num} (the queue's size)"
            )
        receiver = _Receiver(self, queue, size, count)
        self._receivers[queue] = receiver
        await receiver.start(vq)
        if receiver.error is not None:
            raise receiver.error

    async def receive(self, queue: int) -> AsyncIterator[bytes]:
        """``async for data in drv.receive(queue)``: what the device wrote into each posted
        buffer (its first used.len bytes), in the order the device returned them.

        Ends when the driver detaches; raises what stopped the queue (DEVICE_NEEDS_RESET, a
        broken ring), after the data that came before it. Several readers share the stream.
        """
        receiver = self._receivers.get(queue)
        if receiver is None:
            raise ValueError(
                f"{self.dev.name}: queue {queue} has no receive buffers: call post() first"
            )
        while (data := await receiver.next()) is not None:
            yield data

    # -- config space ---------------------------------------------------------------------------

    async def config_read(self, offset: int, width: int) -> int:
        """A little-endian config field of ``width`` (1, 2, 4 or 8) bytes, read consistently."""
        return await self.dev.config_read_int(offset, width)

    async def config_bytes(self, offset: int, length: int) -> bytes:
        """``length`` bytes of config space (byte arrays such as a MAC), read consistently."""
        return await self.dev.config_read(offset, length)

    async def config_write(self, offset: int, value: int, width: int) -> None:
        """Write a little-endian field of ``width`` bytes (the device decides what it takes)."""
        await self.dev.config_write(offset, value.to_bytes(width, "little"))

    def _fields(self) -> list[ConfigField]:
        """The layout's fields that exist with the features negotiated."""
        return [
            field
            for field in self.config_layout
            if field.feature is None or self.has_feature(field.feature)
        ]

    async def config(self) -> dict[str, int]:
        """Every field of ``config_layout`` present with the negotiated features, decoded, all
        from one config generation (re-read if the device changed it meanwhile)."""
        fields = self._fields()
        for _ in range(CONFIG_RETRIES):
            before = await self.dev.generation()
            values = {f.name: await self.config_read(f.offset, f.size) for f in fields}
            if await self.dev.generation() == before:
                return values
        end = max((f.offset + f.size for f in fields), default=0)
        raise ConfigUnstableError(self.dev.name, 0, end, CONFIG_RETRIES, Reg.CONFIG_GENERATION)

    async def config_field(self, name: str) -> int:
        """One field of ``config_layout`` by name."""
        for field in self.config_layout:
            if field.name == name:
                if field.feature is not None and not self.has_feature(field.feature):
                    raise ValueError(
                        f"{self.dev.name}: config field {name!r} needs feature bit "
                        f"{field.feature}, which was not negotiated: accept it with features="
                    )
                return await self.config_read(field.offset, field.size)
        known = ", ".join(f.name for f in self.config_layout) or "none: pass config_layout="
        raise KeyError(f"{self.dev.name}: no config field {name!r} (known: {known})")

    def on_config_change(self, callback: ConfigCallback) -> Callable[[], None]:
        """Run ``callback(driver)`` (plain or async) after each config-change interrupt, once
        the driver has taken the change in (blk's capacity); returns a function that undoes it."""
        self._config_callbacks.append(callback)
        return lambda: self._config_callbacks.remove(callback)

    async def watch_config(self) -> AsyncIterator[ConfigSnapshot]:
        """``async for snapshot in drv.watch_config()``: the config space after each change
        from now on; changes that come faster than the reader are seen once, as the latest.
        Ends when the driver detaches."""
        seen = self._config_seq
        while not self._detached:
            if self._config_seq == seen:
                await self._config_signal.wait()
                continue
            seen = self._config_seq
            generation = await self.dev.generation()
            yield ConfigSnapshot(generation, await self.config())

    async def _on_config_change(self, dev: VirtioMmioDevice) -> None:
        await super()._on_config_change(dev)
        self._config_seq += 1
        self._config_signal.fire()
        for callback in list(self._config_callbacks):
            try:
                await maybe_await(callback(self))
            except Exception:
                log.exception("%s: config-change callback %r failed", dev.name, callback)

    # -- teardown -------------------------------------------------------------------------------

    async def reinitialise(self) -> None:
        try:
            await super().reinitialise()
        except BaseException as exc:
            for receiver in self._receivers.values():
                receiver.fail(exc)
            raise

    async def detach(self) -> None:
        """Reset the device, delete the queues, free every buffer; receive and config-watch
        iterators end."""
        self._detached = True
        self._config_signal.fire()
        for receiver in self._receivers.values():
            receiver.close()
        await super().detach()

    def free_buffers(self) -> None:
        self._free_spares()
        for receiver in self._receivers.values():
            receiver.free()


class _Receiver:
    """The buffers kept posted on one receive queue.

    A buffer is posted (the device may hold it), ready (returned, in ``ready`` until read),
    being read, or idle (to post). A queue or device reset makes every posted buffer idle again:
    ``epoch`` tells the completions of the old ring, which are ignored, from the new ones.
    """

    def __init__(self, driver: GenericDriver, queue: int, size: int, count: int) -> None:
        self.driver = driver
        self.queue = queue
        self.size = size
        self.buffers: list[DmaBuffer] = []
        try:
            for _ in range(count):
                self.buffers.append(driver.alloc(size))
        except BaseException:
            self.free()
            raise
        self.vq: Virtqueue | None = None
        self.epoch = 0
        self.idle: list[DmaBuffer] = []
        self.reading: set[int] = set()  # id() of the buffers a reader is copying out
        self.ready: collections.deque[tuple[DmaBuffer, int]] = collections.deque()
        self.error: BaseException | None = None
        self.closed = False
        self._signal = _Signal()

    async def start(self, vq: Virtqueue) -> None:
        """A new ring (first post, queue reset, device reinitialised), which holds none of the
        buffers: post every one that is not waiting to be read."""
        self.epoch += 1
        self.vq = vq
        self.error = None
        taken = self.reading | {id(buffer) for buffer, _ in self.ready}
        self.idle = [b for b in self.buffers if id(b) not in taken]
        await self._post_idle()

    async def _post_idle(self) -> None:
        """Post the idle buffers and kick once. A queue that cannot take them now (deleted,
        full) keeps them idle for the next :meth:`start` or completion."""
        vq, epoch, added = self.vq, self.epoch, 0
        loop = asyncio.get_running_loop()
        try:
            while self.idle and not self.closed:
                buffer = self.idle[-1]
                future = loop.create_future()
                future.add_done_callback(lambda f, b=buffer, e=epoch: self._returned(b, e, f))
                await vq.add([], [(buffer.gpa, self.size)], token=future)
                self.idle.pop()
                added += 1
        except (QueueDeletedError, QueueFullError):
            pass  # posted by the next start() (a new ring) or completion (room)
        except Exception as exc:  # the ring is broken, or the device needs a reset
            if self.error is None:
                self.error = exc
                self._signal.fire()
        if added and epoch == self.epoch:
            await vq.kick()

    def _returned(self, buffer: DmaBuffer, epoch: int, future: asyncio.Future[int]) -> None:
        if epoch != self.epoch or future.cancelled():
            return  # a ring since reset: start() has made the buffer idle already
        exc = future.exception()
        if exc is None:
            self.ready.append((buffer, future.result()))
        elif not isinstance(exc, QueueDeletedError) and self.error is None:
            self.error = exc  # the device may still hold its buffers: they stay posted
        self._signal.fire()

    async def next(self) -> bytes | None:
        """The next buffer's data (posting the buffer again), or None once closed."""
        while True:
            if self.ready:
                buffer, length = self.ready.popleft()
                self.reading.add(id(buffer))
                try:
                    memory = self.driver.dev.memory
                    data = await memory.read(buffer.gpa, length) if length else b""
                finally:
                    self.reading.discard(id(buffer))
                    self.idle.append(buffer)  # read or not, it goes back to the device
                if not self.closed:
                    await self._post_idle()
                return data
            if self.closed:
                return None
            if self.error is not None:
                raise self.error
            await self._signal.wait()

    def fail(self, exc: BaseException) -> None:
        self.error = exc
        self._signal.fire()

    def close(self) -> None:
        self.closed = True
        self._signal.fire()

    def free(self) -> None:
        """Only once the device has stopped using the queue (after reset and del_vqs)."""
        for buffer in self.buffers:
            buffer.free()
