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

With INFLIGHT_SHMFD each ring records the heads it takes and returns in the front-end's inflight
buffer (:mod:`viowire.vhost_user.inflight`), and a ring that starts with a used buffer resubmits
those still in flight first. With BACKEND_REQ a config change of the device goes to the
front-end as CONFIG_CHANGE_MSG on the channel SET_BACKEND_REQ_FD gave.

Bad input never ends the process: a message that breaks the framing ends the connection
(:class:`~viowire.vhost_user.protocol.ProtocolError`), one whose content cannot be applied is
refused with a log line (and a non-zero REPLY_ACK) and changes nothing, and a ring the driver
breaks stops with its error eventfd signalled until the front-end programs it again.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import mmap
import os
import socket
from collections import deque
from collections.abc import Awaitable, Callable

from viowire.device import Device
from viowire.server.memory import map_fd
from viowire.server.mmio import TRANSPORT_FEATURES
from viowire.server.service import QueueService
from viowire.server.virtqueue import RingError
from viowire.vhost_user import inflight
from viowire.vhost_user import protocol as p
from viowire.vhost_user.inflight import InflightError, InflightRegion, InflightVirtqueue
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
        p.ProtocolFeature.BACKEND_REQ,
        p.ProtocolFeature.INFLIGHT_SHMFD,
    )
)
MAX_INFLIGHT_BUFFER = 64 << 20
"""The largest inflight buffer GET_INFLIGHT_FD creates (QEMU asks for ~16 KiB per queue of
1024 entries; 256 queues of 32768 would be 128 MiB of tracking nobody needs)."""
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
        self.queues = [InflightVirtqueue(i, MAX_QUEUE_SIZE) for i in range(backend.num_queues)]
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
        self.backend_channel: socket.socket | None = None  # SET_BACKEND_REQ_FD
        self._inflight: mmap.mmap | None = None  # SET/GET_INFLIGHT_FD's buffer, mapped
        self._inflight_views: list[memoryview] = []
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
            p.Request.SET_BACKEND_REQ_FD: self._set_backend_req_fd,
            p.Request.GET_INFLIGHT_FD: self._get_inflight_fd,
            p.Request.SET_INFLIGHT_FD: self._set_inflight_fd,
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
        """The device changed its config space: CONFIG_CHANGE_MSG on the back-end channel, so
        the front-end reads it again (GET_CONFIG) and tells the driver. Sent without
        NEED_REPLY: the back-end never waits for the front-end, and a front-end that does not
        read its channel costs a log line, never a stalled device."""
        channel = self.backend_channel
        if channel is None or not self._negotiated(p.ProtocolFeature.CONFIG):
            missing = "no back-end channel" if channel is None else "CONFIG not negotiated"
            log.info("%s: config space changed (not announced: %s)", self.name, missing)
            return
        message = p.encode(p.BackendRequest.CONFIG_CHANGE_MSG)
        try:
            sent = channel.send(message)
        except BlockingIOError:
            log.warning(
                "%s: config change not announced: the front-end does not read its back-end channel",
                self.name,
            )
            return
        except OSError as exc:
            log.warning("%s: back-end channel failed (%s): closed", self.name, exc)
            self._close_backend_channel()
            return
        if sent != len(message):  # half a header would break the channel's framing for good
            log.warning("%s: back-end channel took %d of 12 bytes: closed", self.name, sent)
            self._close_backend_channel()
            return
        log.info("%s: config space changed: announced to the front-end", self.name)

    def _negotiated(self, feature: p.ProtocolFeature) -> bool:
        return bool(self.protocol_features >> feature & 1)

    # -- messages -------------------------------------------------------------------------------
    async def handle(self, message: p.Message) -> bytes | p.Reply | None:
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
        queue.used_idx = self.table.memory.load_u16(queue.used_addr + USED_IDX)
        queue.last_avail_idx = vring.base
        self._resume_inflight(index)
        queue.signalled_used_valid = False
        vring.started = True
        self._refresh(index)

    def _resume_inflight(self, index: int) -> None:
        """With an inflight buffer, the ring resumes after what it took: the heads still in
        flight are resubmitted first, and the next new one is at used.idx + their number (as
        SET_VRING_BASE says after a clean stop; after a crash it says used.idx)."""
        queue = self.queues[index]
        region = queue.inflight
        if region is None:
            return
        if queue.num > region.queue_size:
            # QEMU 7.2 on virtio-mmio asks for a buffer of its queue-size property (128 by
            # default) while the guest may choose rings of up to 1024: track nothing rather
            # than write past the buffer, and say how to get the tracking.
            log.warning(
                "%s: ring %d has %d entries, the inflight buffer tracks %d: requests in flight "
                "on it will not survive a reconnect (give the front-end queue-size=%d)",
                self.name,
                index,
                queue.num,
                region.queue_size,
                queue.num,
            )
            queue.inflight = None
            return
        fresh = region.version == 0
        try:
            heads = region.recover(queue.num, queue.used_idx)
        except InflightError as exc:
            raise RequestError(f"ring {index}: inflight buffer: {exc}") from None
        if fresh:
            return
        queue.last_avail_idx = (queue.used_idx + len(heads)) & 0xFFFF
        queue.resubmit = deque(heads)
        if heads:
            log.info(
                "%s: ring %d: %d requests in flight resubmitted (heads %s)",
                self.name,
                index,
                len(heads),
                ", ".join(map(str, heads[:8])) + (", ..." if len(heads) > 8 else ""),
            )

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

    # the back-end channel
    def _set_backend_req_fd(self, message: p.Message) -> None:
        if not self._negotiated(p.ProtocolFeature.BACKEND_REQ):
            raise RequestError("the BACKEND_REQ protocol feature was not negotiated")
        if len(message.fds) != 1:
            raise RequestError(f"came with {len(message.fds)} descriptors, not 1")
        fd = message.fds.pop()
        try:
            channel = socket.socket(fileno=fd)
        except OSError as exc:
            os.close(fd)
            raise RequestError(f"the descriptor is not a socket: {exc}") from None
        if channel.family != socket.AF_UNIX or channel.type != socket.SOCK_STREAM:
            channel.close()
            raise RequestError("the descriptor is not a Unix stream socket")
        channel.setblocking(False)
        self._close_backend_channel()
        self.backend_channel = channel

    def _close_backend_channel(self) -> None:
        if self.backend_channel is not None:
            self.backend_channel.close()
            self.backend_channel = None

    # inflight tracking
    def _get_inflight_fd(self, message: p.Message) -> bytes | p.Reply:
        """A new, zeroed buffer for ``num_queues`` rings of ``queue_size``; a reply of size 0
        and no descriptor says no (the front-end then runs without one)."""
        ask = message.parse()
        try:
            if not self._negotiated(p.ProtocolFeature.INFLIGHT_SHMFD):
                raise RequestError("the INFLIGHT_SHMFD protocol feature was not negotiated")
            self._check_rings_stopped()
            size = self._inflight_size(ask.num_queues, ask.queue_size)
            fd, mapping = _new_inflight_buffer(size)
        except RequestError as exc:
            log.warning("%s: GET_INFLIGHT_FD refused: %s", self.name, exc)
            none = {"mmap_size": 0, "mmap_offset": 0, "num_queues": 0, "queue_size": 0}
            return p.reply(message, p.Inflight.build(none))
        self._use_inflight(mapping, ask.num_queues, ask.queue_size)
        answer = {
            "mmap_size": size,
            "mmap_offset": 0,
            "num_queues": ask.num_queues,
            "queue_size": ask.queue_size,
        }
        return p.Reply(p.reply(message, p.Inflight.build(answer)), [fd])

    def _set_inflight_fd(self, message: p.Message) -> None:
        """The buffer back after a reconnect: mapped, and read when each ring starts."""
        given = message.parse()
        if not self._negotiated(p.ProtocolFeature.INFLIGHT_SHMFD):
            raise RequestError("the INFLIGHT_SHMFD protocol feature was not negotiated")
        if len(message.fds) != 1:
            raise RequestError(f"came with {len(message.fds)} descriptors, not 1")
        self._check_rings_stopped()
        size = self._inflight_size(given.num_queues, given.queue_size)
        if given.mmap_size != size:
            raise RequestError(
                f"{given.mmap_size} bytes for {given.num_queues} queues of {given.queue_size}: "
                f"this back-end's buffer for them is {size} bytes"
            )
        try:
            mapping = map_fd(message.fds[0], size, given.mmap_offset, sealed=True)
        except (OSError, ValueError, OverflowError, GuestMemoryError) as exc:
            raise RequestError(f"the inflight buffer cannot be mapped: {exc}") from None
        self._use_inflight(mapping, given.num_queues, given.queue_size)

    def _inflight_size(self, num_queues: int, queue_size: int) -> int:
        try:
            size = inflight.buffer_size(num_queues, queue_size)
        except InflightError as exc:
            raise RequestError(str(exc)) from None
        if size > MAX_INFLIGHT_BUFFER:
            raise RequestError(
                f"{num_queues} queues of {queue_size} need {size} bytes of inflight buffer "
                f"(at most {MAX_INFLIGHT_BUFFER})"
            )
        return size

    def _check_rings_stopped(self) -> None:
        started = [index for index, vring in enumerate(self.vrings) if vring.started]
        if started:
            raise RequestError(f"rings {started} are started: stop them first (GET_VRING_BASE)")

    def _use_inflight(self, mapping: mmap.mmap, num_queues: int, queue_size: int) -> None:
        self._drop_inflight()
        region_size = inflight.queue_region_size(queue_size)
        whole = memoryview(mapping)
        self._inflight, self._inflight_views = mapping, [whole]
        for index, queue in enumerate(self.queues[:num_queues]):
            view = whole[index * region_size : (index + 1) * region_size]
            self._inflight_views.append(view)
            queue.inflight = InflightRegion(view, queue_size)

    def _drop_inflight(self) -> None:
        for queue in self.queues:
            queue.inflight = None
            queue.resubmit = deque()
        for view in reversed(self._inflight_views):
            view.release()
        self._inflight_views = []
        if self._inflight is not None:
            self._inflight.close()
            self._inflight = None

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
        self._drop_inflight()  # a reset device has nothing in flight: the next buffer is new
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
        self._drop_inflight()  # the front-end keeps it: SET_INFLIGHT_FD brings it back
        self._close_backend_channel()
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


def _new_inflight_buffer(size: int) -> tuple[int, mmap.mmap]:
    """A zeroed memfd of ``size`` bytes, sealed against resizing (the front-end holds it and
    could otherwise shrink it under the mapping), and its mapping."""
    fd = os.memfd_create("viowire-inflight", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        os.ftruncate(fd, size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        return fd, mmap.mmap(fd, size)
    except OSError as exc:
        os.close(fd)
        raise RequestError(f"cannot create a {size}-byte inflight buffer: {exc}") from None
