"""Drive any vhost-user back-end (qemu-storage-daemon, virtiofsd, ``viowire vhost-user``, a
user's own) with viowire's drivers: the ``vhost-user+unix:///PATH?type=blk`` target.

vhost-user has no register window. The client is the front-end QEMU would be: guest RAM is a
memfd whose memory table goes to the back-end, rings live in it, notifications are kick
eventfds and interrupts call eventfds, watched by the event loop. The drivers are written
against :class:`~viowire.client.mmio.VirtioMmioDevice`'s operations (Linux's
``virtio_config_ops``); :class:`VhostUserDevice` implements each of them with vhost-user
messages instead of registers, and inherits the rest (virtqueues, interrupt subscriptions,
polling) unchanged:

=====================  ==================================================================
operation              vhost-user
=====================  ==================================================================
probe                  the device type comes from the URL (vhost-user has no device ID)
features               GET_FEATURES at connect; SET_FEATURES when FEATURES_OK is set
status                 kept here (the back-end has no status byte to read)
config read / write    GET_CONFIG from offset 0 (libvhost-user ignores the offset) / SET_CONFIG
queue setup            SET_VRING_NUM, BASE, ADDR, CALL, KICK, ENABLE (QueueNumMax: ``queue-size``)
queue delete           SET_VRING_ENABLE 0, GET_VRING_BASE (stops the ring)
notify                 a write to the ring's kick eventfd
interrupt              the ring's call eventfd becomes readable: that ring's used buffers
reset                  RESET_DEVICE if offered, else GET_VRING_BASE on every started ring
=====================  ==================================================================

There is no configuration-change interrupt (a back-end sends CONFIG_CHANGE_MSG on the back-end
channel, which this front-end does not open) and no DEVICE_NEEDS_RESET: a back-end that gives up
closes the connection, and every request in flight then fails with ConnectionError.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import parse_qs, urlsplit

from viowire import registry
from viowire.client.connection import ConnectionClosed, DeviceInfo
from viowire.client.errors import (
    BadQueueSizeError,
    DeviceNeedsResetError,
    MissingVersion1Error,
    QueueInUseError,
    QueueUnavailableError,
    VirtioError,
)
from viowire.client.guest import DEFAULT_RAM_BASE, DEFAULT_RAM_SIZE, GuestRAM
from viowire.client.mmio import VirtioMmioDevice, is_ring_size
from viowire.client.virtqueue import Virtqueue
from viowire.vhost_user import protocol as p
from viowire.vhost_user.cli import BACKEND_TYPES
from viowire.vhost_user.frontend import Frontend, memory_table
from viowire.virtio.constants import (
    DEFAULT_WINDOW_SIZE,
    DEVICE_NAMES,
    Feature,
    Interrupt,
    Reg,
    Status,
    device_name,
)

log = logging.getLogger("viowire.client.vhost_user")

SCHEME = "vhost-user+unix"
DEFAULT_QUEUE_SIZE = 256
"""Ring size when the URL gives no ``queue-size``: vhost-user has no QueueNumMax, the front-end
chooses (QEMU's vhost-user-blk default since 8.0; libvhost-user takes up to 1024)."""
CONNECT_TIMEOUT = 10.0
FRONTEND_PROTOCOL_FEATURES = sum(
    1 << bit
    for bit in (
        p.ProtocolFeature.MQ,
        p.ProtocolFeature.REPLY_ACK,
        p.ProtocolFeature.CONFIG,
        p.ProtocolFeature.RESET_DEVICE,
    )
)
"""The protocol features this front-end implements; the rest of an offer is declined."""
_PROTOCOL_FEATURES = 1 << p.PROTOCOL_FEATURES_BIT
VHOST_F_LOG_ALL = 26
VHOST_BITS = _PROTOCOL_FEATURES | 1 << VHOST_F_LOG_ALL
"""Bits of the vhost-user feature word that are not device features (dirty-page logging,
protocol features): never shown to drivers."""
_VRING = int(Interrupt.VRING)


class VhostUserError(VirtioError):
    """The back-end cannot be driven as asked (no CONFIG protocol feature, a refused message)."""


def parse_url(url: str) -> tuple[str, int, int]:
    """``vhost-user+unix:///PATH?type=TYPE[&queue-size=N]``: (path, device ID, queue size).

    TYPE is a viowire device type (``blk``, ``rng``, a user's), a virtio name
    (``virtio-blk``), QEMU's vhost-user.json name (``block``), or a device ID number.
    """
    parts = urlsplit(url)
    path = parts.netloc + parts.path
    if parts.scheme != SCHEME or not path:
        raise ValueError(
            f"{url!r}: a vhost-user back-end is addressed as {SCHEME}:///PATH?type=TYPE, "
            "e.g. vhost-user+unix:///tmp/blk.sock?type=blk"
        )
    query = parse_qs(parts.query)
    unknown = set(query) - {"type", "queue-size"}
    if unknown:
        option = sorted(unknown)[0]
        raise ValueError(f"{url!r}: unknown option {option!r}: use type= and queue-size=")
    types = query.get("type")
    if not types:
        raise ValueError(
            f"{url!r}: vhost-user does not say which device a back-end is: add ?type=TYPE "
            "(blk, rng, net, ... or the device ID), as its --print-capabilities or the "
            "vhost-user.json file that installs it says"
        )
    size = DEFAULT_QUEUE_SIZE
    if "queue-size" in query:
        text = query["queue-size"][-1]
        if not text.isdigit() or not is_ring_size(int(text)):
            raise ValueError(f"{url!r}: queue-size={text}: give a power of two in 1..32768")
        size = int(text)
    return path, device_id_of(types[-1]), size


def device_id_of(name: str) -> int:
    """The device ID a type name stands for (see :func:`parse_url`)."""
    if name.isdigit():
        return int(name)
    for device_id, qemu_name in BACKEND_TYPES.items():
        if name == qemu_name:
            return device_id
    for device_id, virtio_name in DEVICE_NAMES.items():
        if name == virtio_name:
            return int(device_id)
    try:
        return registry.lookup(name, "type=").device_id
    except Exception as exc:
        raise ValueError(
            f"type={name}: not a device type known here ({exc}); give the device ID instead, "
            "e.g. type=2 for a block device"
        ) from None


class SharedGuestRAM(GuestRAM):
    """The client's guest RAM in a memfd, with the memory table that describes it."""

    def __init__(self, size: int = DEFAULT_RAM_SIZE, base: int = DEFAULT_RAM_BASE) -> None:
        super().__init__(size, base, "memfd")

    def regions(self, splits: tuple[int, ...] = ()) -> list[dict]:
        return memory_table(self.base, self.size, splits)


@dataclass
class StartedRing:
    """A ring the back-end serves: its eventfds, and whether its error eventfd fired."""

    kick: int
    call: int
    err: int
    failed: bool = False

    def close(self) -> None:
        for fd in (self.kick, self.call, self.err):
            with contextlib.suppress(OSError):
                os.close(fd)


class VhostUserConnection:
    """One vhost-user back-end as the client sees a viowire server: a platform of one device
    (``--device 0``), guest RAM, ``attach()`` and ``close()``; and the device-level operations
    in vhost-user messages, which :class:`VhostUserDevice` (the drivers' transport) and
    viowire conform's register vocabulary (:mod:`viowire.conform.vhost_user`) both use. Make
    one with :func:`connect_vhost_user`."""

    memory_mode = "memfd"
    same_host = True
    session_id = 0
    posted_errors: list[Exception] = []  # never filled: nothing is posted
    server_name = "vhost-user back-end"

    def __init__(
        self, frontend: Frontend, url: str, path: str, device_id: int, queue_size: int
    ) -> None:
        self.frontend = frontend
        self.endpoint = url
        self.path = path
        self.device_id = device_id
        self.queue_size = queue_size
        self.ram: SharedGuestRAM | None = frontend.ram  # type: ignore[assignment]
        self.offered = 0
        self.queue_count: int | None = None
        self.rings: dict[int, StartedRing] = {}
        self.on_lost: list[Callable[[Exception], object]] = []
        self._devices: weakref.WeakSet[VhostUserDevice] = weakref.WeakSet()
        self._aborts: list[asyncio.Task[None]] = []

    def __repr__(self) -> str:
        return f"<VhostUserConnection {self.endpoint}>"

    @property
    def closed(self) -> bool:
        return self.frontend.lost is not None or self.frontend.sock.fileno() < 0

    async def _open(self) -> None:
        """Features, protocol features, owner, ring count and the memory table, once."""
        fe = self.frontend
        self.offered = await fe.open(FRONTEND_PROTOCOL_FEATURES)
        self.queue_count = await fe.get_queue_num()
        await fe.expect_ack(await fe.set_mem_table())
        fe.watch(self._lost)

    def _lost(self, error: ConnectionError) -> None:
        """The back-end is gone: requests waiting for a used buffer would wait forever."""
        log.error("%s: %s", self.endpoint, error)
        lost = ConnectionClosed(f"{self.endpoint}: {error}")
        loop = asyncio.get_running_loop()
        self._aborts = [loop.create_task(dev.abort(lost)) for dev in list(self._devices)]
        for callback in list(self.on_lost):
            callback(lost)

    async def reconnect(self, timeout: float = CONNECT_TIMEOUT) -> None:
        """A new connection to the same back-end with the same guest RAM (what QEMU's
        ``reconnect=`` does): the rings are forgotten, the memory table sent again."""
        for index in list(self.rings):
            self._forget(index)
        old = self.frontend
        old._on_lost = None
        old._unwatch()
        old.sock.close()
        assert self.ram is not None
        self.frontend = await _connect(self.path, self.ram, timeout)
        await self._open()

    # -- the device's operations in messages ------------------------------------------------------
    def has(self, protocol_feature: int) -> bool:
        return self.frontend.has_protocol_feature(protocol_feature)

    async def set_features(self, features: int) -> bool:
        """SET_FEATURES (VHOST_USER_F_PROTOCOL_FEATURES acknowledged back if offered, as QEMU
        does); False if the back-end refused them (REPLY_ACK)."""
        try:
            await self.frontend.set_features(features | self.offered & _PROTOCOL_FEATURES)
        except ConnectionError as exc:
            if self.frontend.lost is not None:
                raise
            log.warning("%s: SET_FEATURES %#x refused: %s", self.endpoint, features, exc)
            return False
        return True

    async def start_ring(
        self,
        index: int,
        num: int,
        addresses: tuple[int, int, int],
        on_call: Callable[[int], None],
        on_error: Callable[[int], None] | None = None,
    ) -> StartedRing:
        """Start ring ``index`` with fresh kick, call and error eventfds; ``on_call(index)``
        runs each time the back-end signals the call eventfd (drained first), ``on_error``
        once it signals the error eventfd (it gave up on the ring as broken)."""
        flags = os.EFD_NONBLOCK | os.EFD_CLOEXEC
        ring = StartedRing(os.eventfd(0, flags), os.eventfd(0, flags), os.eventfd(0, flags))
        self.rings[index] = ring
        loop = asyncio.get_running_loop()
        loop.add_reader(ring.call, self._called, index, ring, on_call)
        loop.add_reader(ring.err, self._errored, index, ring, on_error)
        try:
            await self.frontend.program_ring(
                index, num, addresses, ring.kick, ring.call, err=ring.err
            )
        except BaseException:
            self._forget(index)
            raise
        return ring

    def _called(self, index: int, ring: StartedRing, on_call: Callable[[int], None]) -> None:
        try:
            os.eventfd_read(ring.call)
        except OSError:  # BlockingIOError: nothing to read after all
            return
        on_call(index)

    def _errored(
        self, index: int, ring: StartedRing, on_error: Callable[[int], None] | None
    ) -> None:
        try:
            os.eventfd_read(ring.err)
        except OSError:
            return
        asyncio.get_running_loop().remove_reader(ring.err)
        log.warning("%s: the back-end signalled an error on ring %d", self.endpoint, index)
        ring.failed = True
        if on_error is not None:
            on_error(index)

    def kick(self, index: int) -> None:
        ring = self.rings.get(index)
        if ring is not None:
            os.eventfd_write(ring.kick, 1)

    def ring_failed(self, index: int) -> bool:
        """Whether the back-end signalled ring ``index``'s error eventfd (it stopped the ring
        as unusable: vhost-user's counterpart of DEVICE_NEEDS_RESET)."""
        ring = self.rings.get(index)
        return ring is not None and ring.failed

    async def stop_ring(self, index: int) -> None:
        """SET_VRING_ENABLE 0 and GET_VRING_BASE: once answered, the ring is no longer used."""
        if index not in self.rings:
            return
        try:
            if self.frontend.lost is None:
                await self.frontend.stop_ring(index)
        finally:
            self._forget(index)

    def _forget(self, index: int) -> None:
        ring = self.rings.pop(index, None)
        if ring is None:
            return
        with contextlib.suppress(RuntimeError):
            loop = asyncio.get_running_loop()
            loop.remove_reader(ring.call)
            loop.remove_reader(ring.err)
        ring.close()

    async def reset_device(self) -> None:
        """RESET_DEVICE where the back-end offers it, else every started ring stopped with
        GET_VRING_BASE (what QEMU does to stop a vhost-user device)."""
        if self.has(p.ProtocolFeature.RESET_DEVICE):
            await self.frontend.reset_device()
            for index in list(self.rings):
                self._forget(index)
        else:
            for index in list(self.rings):
                await self.stop_ring(index)

    async def config_read(self, offset: int, length: int) -> bytes:
        """GET_CONFIG from offset 0: libvhost-user's back-ends (qemu-storage-daemon) ignore the
        offset and copy from the start, and QEMU itself always reads the whole space."""
        self._need_config()
        data = await self.frontend.get_config(0, offset + length)
        return data[offset:]

    async def config_write(self, offset: int, data: bytes) -> bool:
        """SET_CONFIG; False if the back-end refused it (REPLY_ACK)."""
        self._need_config()
        try:
            await self.frontend.set_config(offset, bytes(data))
        except ConnectionError:
            if self.frontend.lost is not None:
                raise
            return False
        return True

    def _need_config(self) -> None:
        if not self.has(p.ProtocolFeature.CONFIG):
            raise VhostUserError(
                self.endpoint,
                "the back-end does not offer VHOST_USER_PROTOCOL_F_CONFIG: its configuration "
                "space cannot be read or written over vhost-user",
            )

    # -- as the client's other targets ------------------------------------------------------------
    async def platform(self) -> list[DeviceInfo]:
        """The back-end's one device: no window, no interrupt line (both shown as 0)."""
        return [DeviceInfo(0, DEFAULT_WINDOW_SIZE, 0, 2, self.device_id, 0)]

    async def attach(self, info: DeviceInfo, *, bus: object = None) -> VhostUserDevice:
        """The transport for the back-end's device (``bus`` is ignored: no registers)."""
        if self.ram is None or self.closed:
            raise ConnectionClosed(f"{self.endpoint} is closed")
        dev = VhostUserDevice(self, self.ram)
        self._devices.add(dev)
        return dev

    async def close(self) -> None:
        """Disconnect (the back-end then resets its device) and free guest RAM."""
        for index in list(self.rings):
            self._forget(index)
        self.frontend.close()
        self.ram = None

    async def __aenter__(self) -> VhostUserConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


class VhostUserDevice(VirtioMmioDevice):
    """The transport operations over vhost-user messages (see the module docstring)."""

    transport = "vhost-user"

    def __init__(self, conn: VhostUserConnection, ram: SharedGuestRAM) -> None:
        super().__init__(
            conn,  # type: ignore[arg-type] - never used as a register bus (every op is ours)
            0,
            0,
            ram.memory,
            ram,
            name=f"{device_name(conn.device_id)}@{conn.path}",
        )
        self.conn = conn
        self.queue_num_max = conn.queue_size
        self._features_sent = False

    # -- probe and status -----------------------------------------------------------------------
    async def probe(self) -> None:
        """The device type given with the URL; version 2 (a vhost-user ring is modern)."""
        self.version = 2
        self.device_id = self.conn.device_id
        self.vendor_id = 0

    async def get_status(self) -> int:
        return self.status

    async def set_status(self, status: int) -> None:
        """FEATURES_OK sends SET_FEATURES: a back-end that refuses them (REPLY_ACK) leaves the
        bit clear, as a device refusing FEATURES_OK does."""
        if status == 0:
            raise ValueError("writing status 0 resets the device: call reset()")
        if status & Status.FEATURES_OK and not self._features_sent:
            if await self.conn.set_features(self.negotiated_features):
                self._features_sent = True
            else:
                status &= ~Status.FEATURES_OK
        self.status = status

    async def reset(self) -> None:
        await self.conn.reset_device()
        self.status = 0
        self.needs_reset = False
        self.negotiated_features = 0
        self._features_sent = False

    # -- features ---------------------------------------------------------------------------------
    async def get_features(self) -> int:
        """The back-end's offer without the vhost-user bits (30, VHOST_USER_F_PROTOCOL_FEATURES,
        and 26, VHOST_F_LOG_ALL), which are not device features."""
        return self.conn.offered & ~VHOST_BITS

    async def finalize_features(self, features: int) -> None:
        if not features >> Feature.VERSION_1 & 1:
            raise MissingVersion1Error(self.name)
        self.negotiated_features = features
        self._features_sent = False

    # -- configuration space ----------------------------------------------------------------------
    async def generation(self) -> int:
        return 0  # vhost-user has no generation counter (nor config-change interrupts)

    async def _config_get(self, offset: int, length: int) -> bytes:
        return await self.conn.config_read(offset, length)

    async def config_write(self, offset: int, data: bytes) -> None:
        self._check_config(offset, len(data))
        if not await self.conn.config_write(offset, data):
            log.warning("%s: SET_CONFIG of %d bytes at %d refused", self.name, len(data), offset)

    # -- virtqueues -------------------------------------------------------------------------------
    async def queue_num_max_of(self, index: int) -> int:
        """The ring size this front-end uses, for each ring the back-end has (GET_QUEUE_NUM;
        without MQ the count is unknown: one ring shown)."""
        count = self.conn.queue_count or 1
        return self.queue_num_max if index < count else 0

    async def setup_vq(
        self,
        index: int,
        num_wanted: int | None = None,
        callback: Callable[[Virtqueue], object] | None = None,
        *,
        name: str = "",
    ) -> Virtqueue:
        """Lay out queue ``index`` in guest RAM and start it on the back-end."""
        count = self.conn.queue_count
        if count is not None and index >= count:
            raise QueueUnavailableError(self.name, index)
        if index in self.conn.rings:
            raise QueueInUseError(self.name, index, Reg.QUEUE_READY, 1)
        num = self.queue_num_max
        if num_wanted is not None:
            if not is_ring_size(num_wanted):
                raise BadQueueSizeError(self.name, index, num_wanted, None)
            num = min(num, num_wanted)
        vq = await self._create_vq(index, num, callback, name)
        try:
            a = vq.addresses
            addresses = (a.desc, a.avail, a.used)
            await self.conn.start_ring(index, vq.num, addresses, self._on_call, self._on_error)
        except BaseException:
            vq.free_rings()
            raise
        self.vqs[index] = vq
        return vq

    async def _deactivate(self, index: int) -> None:
        await self.conn.stop_ring(index)

    async def reset_vq(self, vq: Virtqueue, num_wanted: int | None = None) -> Virtqueue:
        """One ring stopped (GET_VRING_BASE) and started again on a fresh ring: what a
        virtqueue reset is in vhost-user (it has no VIRTIO_F_RING_RESET of its own)."""
        self.vqs.pop(vq.index, None)
        try:
            await self._deactivate(vq.index)
        finally:
            await vq.detach_all()
            vq.free_rings()
        return await self.setup_vq(vq.index, num_wanted or vq.num, vq.callback, name=vq.name)

    # -- notifications and interrupts ------------------------------------------------------------
    async def notify(self, vq: Virtqueue) -> None:
        self.conn.kick(vq.index)

    def _attach_irq(self) -> None:
        self._irq_attached = True

    def _detach_irq(self) -> None:
        self._irq_attached = False
        for subscription in list(self._subscribers):
            subscription.close()

    def _on_call(self, index: int) -> None:
        """The back-end signalled ring ``index``'s call eventfd: take its used buffers here
        when nothing else holds the queue, else in a task (vring_interrupt)."""
        vq = self.vqs.get(index)
        if vq is None:
            return
        self._completion_came()
        if vq.can_collect_now():
            vq.collect_now()
        elif vq.index not in self._poll_tasks:
            task = self._loop().create_task(vq.interrupt())
            self._poll_tasks[vq.index] = task
            task.add_done_callback(lambda _t, i=vq.index: self._poll_tasks.pop(i, None))
        for subscription in list(self._subscribers):
            subscription._put(_VRING)

    def _on_error(self, index: int) -> None:
        """The back-end gave up on ring ``index``: DEVICE_NEEDS_RESET, as far as the driver
        can tell (requests on it fail; reinitialise() recovers)."""
        self.needs_reset = True
        vq = self.vqs.get(index)
        if vq is not None:
            error = DeviceNeedsResetError(self.name, self.status | Status.DEVICE_NEEDS_RESET)
            self._loop().create_task(vq.fail(error))

    async def vm_interrupt(self) -> int:
        return 0  # no InterruptStatus: each ring's call eventfd says which ring it is


async def connect_vhost_user(
    url: str, *, ram_size: int = DEFAULT_RAM_SIZE, connect_timeout: float = CONNECT_TIMEOUT
) -> VhostUserConnection:
    """Connect to the back-end of ``url`` (see :func:`parse_url`) and send what every device
    needs first: protocol features, SET_OWNER, the memory table of a fresh memfd guest RAM."""
    path, device_id, queue_size = parse_url(url)
    ram = SharedGuestRAM(ram_size)
    try:
        frontend = await _connect(path, ram, connect_timeout)
    except BaseException:
        ram.close()
        raise
    conn = VhostUserConnection(frontend, url, path, device_id, queue_size)
    try:
        await conn._open()
    except BaseException:
        await conn.close()
        raise
    return conn


async def _connect(path: str, ram: SharedGuestRAM, connect_timeout: float) -> Frontend:
    """Connect, retrying while the back-end starts (its socket not there or not listening)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout
    while True:
        try:
            return await Frontend.connect(path, ram=ram)
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            if loop.time() >= deadline:
                raise ConnectionClosed(
                    f"nothing accepts connections on {path} after {connect_timeout:g} s "
                    f"({exc.strerror}); is the vhost-user back-end running?"
                ) from exc
            await asyncio.sleep(0.05)
