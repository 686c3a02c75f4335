"""The vhost-user back-end of one device: the state a front-end programs, and its rings.

:class:`VhostUserDevice` is to vhost-user what :class:`~viowire.server.mmio.MmioDevice` is to
virtio-mmio: the transport half, with the queue engine (:class:`~viowire.server.service.
QueueService`) mixed in. Devices get the same things from both: ``queue_handle(i)``,
``negotiated_features``, ``on_config_change``, chains whose memory is a
:class:`~viowire.virtio.memory.MappedGuestMemory` by guest-physical address. Only where the
driver's actions come from differs: messages on a Unix socket instead of register writes, a
kick eventfd instead of QueueNotify, a call eventfd instead of the interrupt line.

Ring states follow vhost-user.rst "Ring states": a ring is *started* by SET_VRING_KICK (once
its addresses are known) and *stopped* by GET_VRING_BASE; SET_VRING_ENABLE enables it (rings
start enabled when VHOST_USER_F_PROTOCOL_FEATURES was not negotiated). A disabled ring takes no
new chains, but the requests it has in flight still complete; GET_VRING_BASE lets them finish
(for :data:`DRAIN_TIMEOUT` at most) before it answers with the next available index.

Bad input never ends the process: a message that breaks the framing ends the connection
(:class:`~viowire.vhost_user.protocol.ProtocolError`), one whose content cannot be applied is
refused with a log line (and a non-zero REPLY_ACK) and changes nothing, and a ring the driver
breaks stops with its error eventfd signalled until the front-end programs it again.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Awaitable, Callable

from viowire.device import Device
from viowire.server.mmio import TRANSPORT_FEATURES
from viowire.server.service import QueueService
from viowire.server.virtqueue import RingError, SplitVirtqueue
from viowire.vhost_user import protocol as p
from viowire.vhost_user.memory import MAX_MEM_SLOTS, MemoryTable, RegionSpec, close_fds
from viowire.virtio.constants import Feature, device_name, feature_names
from viowire.virtio.memory import GuestMemoryError
from viowire.virtio.ring import MAX_QUEUE_SIZE, USED_IDX, valid_queue_size

log = logging.getLogger("viowire.vhost_user")

DRAIN_TIMEOUT = 5.0
"""Seconds GET_VRING_BASE waits for the ring's requests in flight before it abandons them."""

PROTOCOL_FEATURES = 1 << p.PROTOCOL_FEATURES_BIT
OFFERED_PROTOCOL_FEATURES = sum(
    1 << bit
    for bit in (
        p.ProtocolFeature.MQ,
        p.ProtocolFeature.REPLY_ACK,
        p.ProtocolFeature.CONFIG,
        p.ProtocolFeature.RESET_DEVICE,
        p.ProtocolFeature.CONFIGURE_MEM_SLOTS,
    )
)
_EVENT = (1).to_bytes(8, "little")


class RequestError(Exception):
    """A well-formed message that cannot be applied: refused, logged, nothing changed."""


class Vring:
    """What the front-end programmed for one ring, beside the ring layer's SplitVirtqueue."""

    __slots__ = ("addr", "base", "call", "enabled", "err", "kick", "started")

    def __init__(self) -> None:
        self.kick: int | None = None
        self.call: int | None = None
        self.err: int | None = None
        self.addr = None  # the SET_VRING_ADDR payload (front-end virtual addresses)
        self.base = 0  # SET_VRING_BASE: the next available index to read
        self.enabled = False
        self.started = False


class VhostUserDevice(QueueService):
    """One device served to one vhost-user front-end connection: :meth:`handle` applies a
    message and returns the reply's bytes (or None); the I/O layer sends them."""

    def __init__(self, backend: Device, name: str = "") -> None:
        self.backend = backend
        self.name = name or device_name(backend.device_id)
        # The front-end chooses the ring size (QEMU's queue-size): any size a split ring allows.
        self.queues = [SplitVirtqueue(i, MAX_QUEUE_SIZE) for i in range(backend.num_queues)]
        self.vrings = [Vring() for _ in self.queues]
        self.table = MemoryTable()
        self.memory = None  # the table's memory once a table was sent
        self.device_features = (
            backend.device_features(2)
            | TRANSPORT_FEATURES
            | 1 << Feature.VERSION_1
            | PROTOCOL_FEATURES
        )
        self.acked_features = 0
        self.protocol_features = 0
        # CONFIG only for a device with a config space: QEMU warns of it for one without (rng)
        self.offered_protocol_features = OFFERED_PROTOCOL_FEATURES
        if not backend.config_space():
            self.offered_protocol_features &= ~(1 << p.ProtocolFeature.CONFIG)
        self.owner = False
        self._tasks = {}
        self._rerun = {}
        self._broken = False
        self._loop = asyncio.get_running_loop()
        backend.on_config_change = self.config_changed
        backend.name = self.name
        backend.transport = self
        self._handlers: dict[int, Callable[[p.Message], bytes | Awaitable | None]] = {
            p.Request.GET_FEATURES: self._get_features,
            p.Request.SET_FEATURES: self._set_features,
            p.Request.GET_PROTOCOL_FEATURES: self._get_protocol_features,
            p.Request.SET_PROTOCOL_FEATURES: self._set_protocol_features,
            p.Request.SET_OWNER: self._set_owner,
            p.Request.RESET_OWNER: self._reset_owner,
            p.Request.GET_QUEUE_NUM: self._get_queue_num,
            p.Request.GET_MAX_MEM_SLOTS: self._get_max_mem_slots,
            p.Request.SET_MEM_TABLE: self._set_mem_table,
            p.Request.ADD_MEM_REG: self._add_mem_reg,
            p.Request.REM_MEM_REG: self._rem_mem_reg,
            p.Request.SET_VRING_NUM: self._set_vring_num,
            p.Request.SET_VRING_ADDR: self._set_vring_addr,
            p.Request.SET_VRING_BASE: self._set_vring_base,
            p.Request.GET_VRING_BASE: self._get_vring_base,
            p.Request.SET_VRING_KICK: self._set_vring_kick,
            p.Request.SET_VRING_CALL: self._set_vring_call,
            p.Request.SET_VRING_ERR: self._set_vring_err,
            p.Request.SET_VRING_ENABLE: self._set_vring_enable,
            p.Request.GET_CONFIG: self._get_config,
            p.Request.SET_CONFIG: self._set_config,
            p.Request.RESET_DEVICE: self._reset_device,
        }

    # -- what QueueService and devices ask of a transport ---------------------------------------
    @property
    def negotiated_features(self) -> int:
        """The virtio features in force (SET_FEATURES, without vhost-user's bit 30)."""
        return self.acked_features & ~PROTOCOL_FEATURES

    def _has(self, bit: int) -> bool:
        return bool(self.acked_features >> bit & 1)

    def _processing_blocked(self) -> str | None:
        return None  # vhost-user has no device status: each ring's state says it (queue.ready)

    def _notify_used(self, index: int) -> None:
        fd = self.vrings[index].call
        if fd is not None:
            _signal(fd, f"{self.name}: ring {index}: call")

    def _fail(self, reason: str) -> None:
        """The driver broke a ring (or a device bug): stop serving until the front-end programs
        the rings again, and say so on each started ring's error eventfd."""
        log.warning("%s: %s; rings stopped until the front-end restarts them", self.name, reason)
        self._broken = True
        self._cancel_requests()
        for index, vring in enumerate(self.vrings):
            if vring.started and vring.err is not None:
                _signal(vring.err, f"{self.name}: ring {index}: err")

    def config_changed(self) -> None:
        # A config change notification needs the back-end request channel (BACKEND_REQ), which
        # this back-end does not offer: the front-end reads the new config at its next GET_CONFIG.
        log.info("%s: config space changed (not announced: no back-end channel)", self.name)

    # -- messages -------------------------------------------------------------------------------
    async def handle(self, message: p.Message) -> bytes | None:
        """Apply one message; the reply to send, if any. ProtocolError: end the connection."""
        handler = self._handlers.get(message.request)
        try:
            if handler is None:
                if message.request in p.REPLIES:
                    raise p.ProtocolError(f"{message.name} is not supported and wants a reply")
                raise RequestError(f"{message.name} is not supported")
            result = handler(message)
            if asyncio.iscoroutine(result):
                result = await result
        except RequestError as exc:
            log.warning("%s: %s refused: %s", self.name, message.name, exc)
            return self._ack(message, ok=False)
        finally:
            close_fds(message.fds)  # those a handler did not take
            message.fds = []
        if result is not None:
            return result
        return self._ack(message, ok=True)

    def _ack(self, message: p.Message, *, ok: bool) -> bytes | None:
        if message.need_reply and self.protocol_features >> p.ProtocolFeature.REPLY_ACK & 1:
            return p.reply_u64(message, 0 if ok else 1)
        return None

    def _vring(self, index: int) -> Vring:
        if not 0 <= index < len(self.vrings):
            raise RequestError(f"ring {index} does not exist ({self.name} has {len(self.vrings)})")
        return self.vrings[index]

    # features
    def _get_features(self, message: p.Message) -> bytes:
        return p.reply_u64(message, self.device_features)

    def _set_features(self, message: p.Message) -> None:
        value = message.parse().value
        unoffered = value & ~self.device_features
        if unoffered:
            names = feature_names(unoffered, self.backend.feature_bits)
            raise RequestError(f"features not offered: {names}")
        self.acked_features = value
        for index in range(len(self.vrings)):
            self._refresh(index)  # without PROTOCOL_FEATURES rings are enabled as they start

    def _get_protocol_features(self, message: p.Message) -> bytes:
        return p.reply_u64(message, self.offered_protocol_features)

    def _set_protocol_features(self, message: p.Message) -> None:
        value = message.parse().value
        unoffered = value & ~self.offered_protocol_features
        if unoffered:
            raise RequestError(f"protocol features not offered: {unoffered:#x}")
        self.protocol_features = value

    def _set_owner(self, message: p.Message) -> None:
        self.owner = True

    def _reset_owner(self, message: p.Message) -> None:
        log.info("%s: RESET_OWNER is deprecated: ignored", self.name)

    def _get_queue_num(self, message: p.Message) -> bytes:
        return p.reply_u64(message, len(self.queues))

    def _get_max_mem_slots(self, message: p.Message) -> bytes:
        return p.reply_u64(message, MAX_MEM_SLOTS)

    # memory
    def _set_mem_table(self, message: p.Message) -> None:
        if len(message.payload) < 8:
            raise p.ProtocolError(f"SET_MEM_TABLE payload of {len(message.payload)} bytes")
        nregions = int.from_bytes(message.payload[:4], "little")
        if nregions > p.MAX_REGIONS:
            raise RequestError(f"{nregions} regions (at most {p.MAX_REGIONS})")
        table = message.parse()
        specs = [_region(region) for region in table.regions]
        try:
            self.table.replace(specs, message.fds)
        except GuestMemoryError as exc:
            raise RequestError(f"memory table not changed: {exc}") from None
        self._memory_changed()

    def _add_mem_reg(self, message: p.Message) -> None:
        spec = _region(message.parse().region)
        if len(message.fds) != 1:
            raise RequestError(f"came with {len(message.fds)} descriptors, not 1")
        try:
            self.table.add(spec, message.fds[0])
        except GuestMemoryError as exc:
            raise RequestError(str(exc)) from None
        self._memory_changed()

    def _rem_mem_reg(self, message: p.Message) -> None:
        spec = _region(message.parse().region)
        try:
            self.table.remove(spec)
        except GuestMemoryError as exc:
            raise RequestError(str(exc)) from None
        self._memory_changed()

    def _memory_changed(self) -> None:
        self.memory = self.table.memory if len(self.table) else None
        for index, vring in enumerate(self.vrings):
            if vring.started:
                try:
                    self._translate(index)
                except RequestError as exc:
                    log.warning("%s: ring %d stopped: %s", self.name, index, exc)
                    self._stop(index)
                    vring.started = False
                else:
                    self._refresh(index)

    # rings
    def _set_vring_num(self, message: p.Message) -> None:
        state = message.parse()
        vring = self._vring(state.index)
        if vring.started:
            raise RequestError(f"ring {state.index} is started: stop it first (GET_VRING_BASE)")
        if not valid_queue_size(state.num):
            raise RequestError(f"ring size {state.num} is not a power of 2 <= {MAX_QUEUE_SIZE}")
        self.queues[state.index].num = state.num

    def _set_vring_addr(self, message: p.Message) -> None:
        addr = message.parse()
        vring = self._vring(addr.index)
        vring.addr = addr
        if vring.started:  # on the fly (the front-end turned logging on or off)
            self._translate(addr.index)

    def _set_vring_base(self, message: p.Message) -> None:
        state = message.parse()
        vring = self._vring(state.index)
        if vring.started:
            raise RequestError(f"ring {state.index} is started: stop it first (GET_VRING_BASE)")
        if state.num > 0xFFFF:
            raise RequestError(f"base {state.num:#x} does not fit a 16-bit ring index")
        vring.base = state.num

    async def _get_vring_base(self, message: p.Message) -> bytes:
        state = message.parse()
        vring = self._vring(state.index)
        queue = self.queues[state.index]
        if vring.started:
            queue.ready = False  # no new chains; those in flight finish
            await self._drain(state.index)
            vring.base = queue.last_avail_idx
            self._stop(state.index)
        vring.started = False
        self._unwatch_kick(state.index)
        if not any(v.started for v in self.vrings):
            self._broken = False  # every ring stopped: the front-end starts afresh
        return p.reply(message, p.VringState.build({"index": state.index, "num": vring.base}))

    def _vring_fd(self, message: p.Message) -> tuple[int, int | None]:
        """SET_VRING_KICK/CALL/ERR: the ring and the descriptor (taken from the message)."""
        value = message.parse().value
        index = value & p.VRING_INDEX_MASK
        self._vring(index)
        if value & ~(p.VRING_INDEX_MASK | p.VRING_NOFD_MASK):
            raise RequestError(f"payload {value:#x} has bits other than the ring and NOFD set")
        if value & p.VRING_NOFD_MASK:
            if message.fds:
                raise RequestError("NOFD set, yet a descriptor came with it")
            return index, None
        if len(message.fds) != 1:
            raise RequestError(f"came with {len(message.fds)} descriptors, not 1")
        fd = message.fds.pop()
        os.set_blocking(fd, False)
        return index, fd

    def _set_vring_kick(self, message: p.Message) -> None:
        index, fd = self._vring_fd(message)
        if fd is None:
            raise RequestError(f"ring {index}: polling (no kick descriptor) is not supported")
        self._unwatch_kick(index)
        try:
            self._loop.add_reader(fd, self._kicked, index, fd)
        except (OSError, ValueError) as exc:
            os.close(fd)
            raise RequestError(
                f"ring {index}: the kick descriptor cannot be watched: {exc}"
            ) from None
        vring = self.vrings[index]
        vring.kick = fd
        if vring.started:
            return  # a new kick descriptor for a running ring
        if vring.addr is None:
            raise RequestError(f"ring {index}: SET_VRING_KICK before SET_VRING_ADDR: not started")
        self._translate(index)
        queue = self.queues[index]
        queue.last_avail_idx = vring.base
        queue.used_idx = self.table.memory.load_u16(queue.used_addr + USED_IDX)
        queue.signalled_used_valid = False
        vring.started = True
        self._refresh(index)

    def _set_vring_call(self, message: p.Message) -> None:
        index, fd = self._vring_fd(message)
        vring = self.vrings[index]
        if vring.call is not None:
            os.close(vring.call)
        vring.call = fd

    def _set_vring_err(self, message: p.Message) -> None:
        index, fd = self._vring_fd(message)
        vring = self.vrings[index]
        if vring.err is not None:
            os.close(vring.err)
        vring.err = fd

    def _set_vring_enable(self, message: p.Message) -> None:
        state = message.parse()
        vring = self._vring(state.index)
        if state.num not in (0, 1):
            raise RequestError(f"ring {state.index}: enable {state.num} is not 0 or 1")
        vring.enabled = bool(state.num)
        self._refresh(state.index)

    def _translate(self, index: int) -> None:
        """Ring addresses (front-end virtual) to guest-physical, checked against the table."""
        addr, queue = self.vrings[index].addr, self.queues[index]
        try:
            queue.desc_addr = self.table.to_guest(addr.desc_user_addr)
            queue.avail_addr = self.table.to_guest(addr.avail_user_addr)
            queue.used_addr = self.table.to_guest(addr.used_user_addr)
            queue.check_layout(self.table.memory)
        except (GuestMemoryError, RingError) as exc:
            raise RequestError(f"ring {index}: {exc}") from None

    def _refresh(self, index: int) -> None:
        """queue.ready follows the ring's state: started and enabled."""
        vring, queue = self.vrings[index], self.queues[index]
        enabled = vring.enabled or not self.acked_features & PROTOCOL_FEATURES
        ready = vring.started and enabled and self.memory is not None
        if ready and not queue.ready:
            queue.ready = True
            self._wake_waiters()
            self._schedule(queue)  # buffers made available before it was enabled
        elif not ready:
            queue.ready = False

    def _kicked(self, index: int, fd: int) -> None:
        try:
            os.read(fd, 8)
        except BlockingIOError:
            return
        except OSError as exc:
            log.warning(
                "%s: ring %d: kick descriptor failed (%s): no longer watched", self.name, index, exc
            )
            self._unwatch_kick(index)
            return
        queue = self.queues[index]
        if queue.ready and not self._broken:
            self._schedule(queue)

    def _unwatch_kick(self, index: int) -> None:
        vring = self.vrings[index]
        if vring.kick is not None:
            self._loop.remove_reader(vring.kick)
            os.close(vring.kick)
            vring.kick = None

    async def _drain(self, index: int) -> None:
        """Let the ring's requests in flight finish and their completions be published."""
        try:
            async with asyncio.timeout(DRAIN_TIMEOUT):
                while True:
                    tasks = list(self._requests.get(index, ())) if self._requests else []
                    run = self._tasks.get(index)
                    if run is not None and run.task is not None:
                        tasks.append(run.task)
                    flushing = bool(self._completions) and index in self._completions
                    if not tasks and not flushing and index not in self._tasks:
                        return
                    await asyncio.gather(*tasks, asyncio.sleep(0), return_exceptions=True)
        except TimeoutError:
            log.warning(
                "%s: ring %d: %d requests still running %.0f s after the front-end stopped "
                "the ring: abandoned",
                self.name,
                index,
                self.requests_waiting(index),
                DRAIN_TIMEOUT,
            )

    def _stop(self, index: int) -> None:
        queue = self.queues[index]
        queue.stop()  # a new epoch: nothing more of the old ring reaches guest memory
        self._cancel_requests(index)
        try:
            self.backend.queue_reset(index)
        except Exception:
            log.exception("%s: queue_reset(%d) failed", self.name, index)

    # config
    def _config_allowed(self) -> None:
        if not self.protocol_features >> p.ProtocolFeature.CONFIG & 1:
            raise RequestError("the CONFIG protocol feature was not negotiated")

    def _get_config(self, message: p.Message) -> bytes:
        config = message.parse()
        try:
            self._config_allowed()
            if config.size > p.MAX_CONFIG_SIZE:
                raise RequestError(f"{config.size} bytes asked (at most {p.MAX_CONFIG_SIZE})")
            space = self.backend.config_space()
        except RequestError as exc:
            log.warning("%s: GET_CONFIG refused: %s", self.name, exc)
            empty = {"offset": config.offset, "size": 0, "flags": config.flags, "payload": b""}
            return p.reply(message, p.Config.build(empty))  # a zero size says: error
        window = space[config.offset : config.offset + config.size]
        window = window.ljust(config.size, b"\0")  # fields past the structure read as 0
        answer = {"offset": config.offset, "size": config.size, "flags": config.flags}
        return p.reply(message, p.Config.build({**answer, "payload": window}))

    def _set_config(self, message: p.Message) -> None:
        config = message.parse()
        self._config_allowed()
        if not 0 < config.size <= 8:
            raise RequestError(f"a {config.size}-byte write (config fields are 1 to 8 bytes)")
        value = int.from_bytes(config.payload, "little")
        self.backend.config_write(config.offset, value, config.size)

    def _reset_device(self, message: p.Message) -> None:
        self.reset()

    # -- lifecycle ------------------------------------------------------------------------------
    def reset(self) -> None:
        """RESET_DEVICE: every ring stopped and forgotten, features cleared, the device reset;
        the memory table and the owner stay."""
        for index in range(len(self.vrings)):
            self._stop(index)
            self._unwatch_kick(index)
            self._close_vring_fds(index)
            self.queues[index].reset()
            self.vrings[index] = Vring()
        self._cancel_requests()
        self._broken = False
        self.acked_features = 0
        try:
            self.backend.reset()
        except Exception:
            log.exception("%s: backend reset failed", self.name)

    def _close_vring_fds(self, index: int) -> None:
        vring = self.vrings[index]
        for fd in (vring.call, vring.err):
            if fd is not None:
                os.close(fd)
        vring.call = vring.err = None

    async def close(self) -> None:
        """The connection ended: stop everything, unmap the table, reset the device (its
        storage stays for the next front-end)."""
        for index in range(len(self.vrings)):
            self.queues[index].stop()
            self._unwatch_kick(index)
            self._close_vring_fds(index)
        self._cancel_requests()
        await self.aclose()
        self.memory = None
        self.table.close()
        try:
            self.backend.reset()
        except Exception:
            log.exception("%s: backend reset failed", self.name)
        self.backend.transport = None


def _region(region) -> RegionSpec:
    return RegionSpec(
        region.guest_phys_addr, region.memory_size, region.userspace_addr, region.mmap_offset
    )


def _signal(fd: int, what: str) -> None:
    try:
        os.write(fd, _EVENT)
    except BlockingIOError:
        pass  # the counter is full: the other side has a signal pending anyway
    except OSError as exc:
        log.warning("%s eventfd failed: %s", what, exc)
