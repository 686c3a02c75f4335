"""viowire conform on a vhost-user back-end: the checks' register vocabulary as vhost-user
messages.

The checks drive a device by hand through virtio-mmio registers (:class:`~viowire.conform.dut.
Dut`). A vhost-user back-end has no register window, so the checks that judge the window
itself (access widths, reserved offsets, QueueNumMax, InterruptStatus...) are skipped as not
applicable (:attr:`~viowire.conform.model.Check.window`). The others judge what the back-end
does with rings, features, configuration and resets; for them :class:`VhostUserRegisters`
turns each register access into what a front-end sends, through the same
:class:`~viowire.client.vhost_user.VhostUserConnection` operations the drivers' transport uses:

* Status: kept here; FEATURES_OK sends SET_FEATURES (a refusal by REPLY_ACK leaves it clear);
  0 resets (RESET_DEVICE, else GET_VRING_BASE on every started ring). DEVICE_NEEDS_RESET reads
  set once the back-end signalled a ring's error eventfd, or closed the connection (what a
  libvhost-user back-end does with a broken ring): vhost-user's two ways of saying it; either
  also sets InterruptStatus bit 1, its configuration change notification. The next reset
  then reconnects with the same guest RAM if needed, as QEMU's ``reconnect=`` would.
* The queue registers: collected per queue; QueueReady 1 starts the ring (SET_VRING_NUM, BASE,
  ADDR, CALL, ERR, KICK, ENABLE), 0 stops it (GET_VRING_BASE); QueueNumMax is the front-end's
  ring size, as vhost-user has none.
* QueueNotify writes the ring's kick eventfd; a call eventfd sets InterruptStatus bit 0 and
  raises the line until acknowledged.
* Config reads and writes are GET_CONFIG and SET_CONFIG; ConfigGeneration reads 0.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass

from viowire.client.connection import DeviceInfo
from viowire.client.vhost_user import VHOST_BITS, VhostUserConnection, VhostUserDevice
from viowire.virtio.constants import CONFIG_OFFSET, MAGIC_VALUE, Interrupt, Reg, Status

log = logging.getLogger("viowire.conform")

_LOW_HIGH = {
    Reg.QUEUE_DESC_LOW: ("desc", 0),
    Reg.QUEUE_DESC_HIGH: ("desc", 32),
    Reg.QUEUE_AVAIL_LOW: ("avail", 0),
    Reg.QUEUE_AVAIL_HIGH: ("avail", 32),
    Reg.QUEUE_USED_LOW: ("used", 0),
    Reg.QUEUE_USED_HIGH: ("used", 32),
}


@dataclass
class _Queue:
    num: int = 0
    desc: int = 0
    avail: int = 0
    used: int = 0


class VhostUserRegisters:
    """The ``RegisterBus`` the checks drive, for the one device of a vhost-user back-end."""

    window = False  # no register window: the checks of the window itself do not apply

    def __init__(self, conn: VhostUserConnection) -> None:
        self.conn = conn
        self._handler: Callable[[bool], None] | None = None
        self._forget_state()
        conn.on_lost.append(self._failed)

    def _forget_state(self) -> None:
        self.status = 0
        self.isr = 0
        self.device_features_sel = 0
        self.driver_features_sel = 0
        self.driver_features = 0
        self.queue_sel = 0
        self.queues: dict[int, _Queue] = {}
        self._features_sent = False

    @property
    def closed(self) -> bool:
        return False  # a lost back-end shows as DEVICE_NEEDS_RESET; the next reset reconnects

    def device_for(self, info: DeviceInfo) -> VhostUserDevice:
        """The drivers' own transport for the device (driver.linux-flow)."""
        assert self.conn.ram is not None
        dev = VhostUserDevice(self.conn, self.conn.ram)
        self.conn._devices.add(dev)
        return dev

    # -- RegisterBus ------------------------------------------------------------------------------
    def set_irq_handler(self, irq: int, handler: Callable[[bool], None] | None) -> None:
        self._handler = handler

    async def mmio_read(self, addr: int, width: int) -> int:
        if addr >= CONFIG_OFFSET:
            data = await self.conn.config_read(addr - CONFIG_OFFSET, width)
            return int.from_bytes(data, "little")
        return await self._read(addr)

    async def mmio_write(self, addr: int, width: int, value: int, *, posted: bool = True) -> None:
        if addr >= CONFIG_OFFSET:
            await self.conn.config_write(addr - CONFIG_OFFSET, value.to_bytes(width, "little"))
            return
        await self._write(addr, value)

    # -- registers --------------------------------------------------------------------------------
    async def _read(self, reg: int) -> int:
        conn = self.conn
        if reg == Reg.MAGIC_VALUE:
            return MAGIC_VALUE
        if reg == Reg.VERSION:
            return 2
        if reg == Reg.DEVICE_ID:
            return conn.device_id
        if reg == Reg.DEVICE_FEATURES:
            offered = conn.offered & ~VHOST_BITS
            return (
                offered >> 32 * self.device_features_sel & 0xFFFF_FFFF
                if (self.device_features_sel < 2)
                else 0
            )
        if reg == Reg.QUEUE_NUM_MAX:
            return conn.queue_size if self.queue_sel < (conn.queue_count or 1) else 0
        if reg == Reg.QUEUE_READY:
            return int(self.queue_sel in conn.rings)
        if reg == Reg.INTERRUPT_STATUS:
            return self.isr
        if reg == Reg.STATUS:
            return self.status | (Status.DEVICE_NEEDS_RESET if self._needs_reset() else 0)
        return 0  # VendorID, ConfigGeneration, and what the checks that run never read

    def _needs_reset(self) -> bool:
        if self.conn.closed:
            return True
        return any(self.conn.ring_failed(index) for index in list(self.conn.rings))

    async def _write(self, reg: int, value: int) -> None:
        if reg == Reg.STATUS:
            await self._set_status(value)
        elif reg == Reg.DEVICE_FEATURES_SEL:
            self.device_features_sel = value
        elif reg == Reg.DRIVER_FEATURES_SEL:
            self.driver_features_sel = value
        elif reg == Reg.DRIVER_FEATURES and self.driver_features_sel < 2:
            shift = 32 * self.driver_features_sel
            self.driver_features &= ~(0xFFFF_FFFF << shift)
            self.driver_features |= value << shift
        elif reg == Reg.QUEUE_SEL:
            self.queue_sel = value
        elif reg == Reg.QUEUE_NUM:
            self._queue().num = value
        elif reg in _LOW_HIGH:
            name, shift = _LOW_HIGH[Reg(reg)]
            queue = self._queue()
            old = getattr(queue, name)
            setattr(queue, name, old & ~(0xFFFF_FFFF << shift) | value << shift)
        elif reg == Reg.QUEUE_READY:
            await self._set_ready(value)
        elif reg == Reg.QUEUE_NOTIFY:
            self.conn.kick(value)
        elif reg == Reg.INTERRUPT_ACK:
            self.isr &= ~value
            if not self.isr:
                self._line(False)

    def _queue(self) -> _Queue:
        return self.queues.setdefault(self.queue_sel, _Queue())

    async def _set_status(self, value: int) -> None:
        if value == 0:
            await self._reset()
            return
        if value & Status.FEATURES_OK and not self._features_sent:
            if await self.conn.set_features(self.driver_features):
                self._features_sent = True
            else:
                value &= ~Status.FEATURES_OK
        self.status = value & 0xFF

    async def _reset(self) -> None:
        if self.conn.closed:
            log.info("%s: reconnecting after the back-end closed the connection", self.conn.path)
            await self.conn.reconnect()
        else:
            await self.conn.reset_device()
        self._forget_state()
        self._line(False)

    async def _set_ready(self, value: int) -> None:
        index = self.queue_sel
        if not value:
            await self.conn.stop_ring(index)
        elif index not in self.conn.rings:
            q = self._queue()
            addresses = (q.desc, q.avail, q.used)
            await self.conn.start_ring(index, q.num, addresses, self._called, self._failed)

    def _called(self, index: int) -> None:
        self.isr |= Interrupt.VRING
        self._line(True)

    def _failed(self, _what: object) -> None:
        """A ring's error eventfd, or the connection lost: DEVICE_NEEDS_RESET reads set, and
        this is its configuration change notification."""
        self.isr |= Interrupt.CONFIG
        self._line(True)

    def _line(self, level: bool) -> None:
        if self._handler is not None:
            self._handler(level)


def target_bus(conn: object) -> object:
    """The bus the checks drive for a target connection: the connection itself, or for a
    vhost-user back-end the register vocabulary above."""
    if isinstance(conn, VhostUserConnection):
        return VhostUserRegisters(conn)
    return conn
