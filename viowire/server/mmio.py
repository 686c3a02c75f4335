"""The virtio-mmio register window of one device, Version 1 (legacy) and Version 2 (§4.2).

One :class:`MmioDevice` per device window: a register file (reference §1.3, §2.4, §2.5 applied
exactly, every guest mistake logged and survived) and, mixed in from
:mod:`viowire.server.service`, the queue engine that serves the rings a QueueNotify points at.
Register accesses are synchronous, so a reset is complete before the next access is answered
(reference §8.2).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from viowire.device import Device
from viowire.server.metrics import queue_stats, type_stats
from viowire.server.service import QueuePass, QueueService
from viowire.server.virtqueue import (
    RingError,
    SplitVirtqueue,
    is_power_of_2,
)
from viowire.virtio.constants import (
    CONFIG_OFFSET,
    MAGIC_VALUE,
    VENDOR_ID_VIOWIRE,
    Feature,
    Interrupt,
    Reg,
    Status,
    device_name,
    feature_names,
)
from viowire.virtio.memory import GuestMemory

log = logging.getLogger("viowire.device")

TRANSPORT_FEATURES = (1 << Feature.RING_INDIRECT_DESC) | (1 << Feature.RING_EVENT_IDX)
"""Ring features offered by both versions; v2 adds VERSION_1, v1 adds ANY_LAYOUT."""

_WORD = 0xFFFF_FFFF
_LEGACY_NAMES = {
    Reg.DEVICE_FEATURES: "HOST_FEATURES",
    Reg.DEVICE_FEATURES_SEL: "HOST_FEATURES_SEL",
    Reg.DRIVER_FEATURES: "GUEST_FEATURES",
    Reg.DRIVER_FEATURES_SEL: "GUEST_FEATURES_SEL",
}


_FAILED, _DRIVER_OK, _FEATURES_OK = (
    int(Status.FAILED),
    int(Status.DRIVER_OK),
    int(Status.FEATURES_OK),
)
_VRING_IRQ, _CONFIG_IRQ = int(Interrupt.VRING), int(Interrupt.CONFIG)


class MmioDevice(QueueService):
    """A virtio-mmio device: register window + queue processing for one backend.

    The session glue sets :attr:`memory` once the client has registered guest RAM and
    :attr:`on_irq`, which is called with the new level of the interrupt line whenever
    InterruptStatus goes from 0 to non-zero or back.
    """

    # Set (a notification channel): used-buffer notifications go here, each one, and the line,
    # which IRQ frames report, follows the configuration-change bit alone. A class attribute
    # until set, as the rarely used state is: an idle device's dict stays small.
    used_notifier: Callable[[], None] | None = None

    def __init__(
        self,
        backend: Device,
        version: int,
        *,
        vendor_id: int = VENDOR_ID_VIOWIRE,
        name: str = "",
    ) -> None:
        if version not in (1, 2):
            raise ValueError(f"virtio-mmio version {version} is not 1 (legacy) or 2")
        self.backend = backend
        self.version = version
        self.vendor_id = vendor_id
        self.name = name or device_name(backend.device_id)
        self.memory: GuestMemory | None = None
        self.on_irq: Callable[[bool], None] | None = None
        # The driver takes InterruptStatus from the raise frame and posts its ACK (IRQ_STATUS).
        self.posted_ack = False
        self._owed = 0  # notifications made while their bit was set, since the last raise
        self.queues = [SplitVirtqueue(i, backend.queue_num_max) for i in range(backend.num_queues)]
        for queue in self.queues:
            queue.legacy = version == 1
            queue.stats = queue_stats(backend, queue.index)
        # Modern devices offer per-queue reset (virtio 1.2 §2.6.1); legacy has no QueueReset.
        extra = (
            (1 << Feature.VERSION_1 | 1 << Feature.RING_RESET)
            if version == 2
            else (1 << Feature.ANY_LAYOUT)
        )
        self.device_features = backend.device_features(version) | TRANSPORT_FEATURES | extra
        self._config_generation = 0
        self._interrupt_status = 0
        self._tasks: dict[int, QueuePass] = {}  # queue index -> its pass, while one runs
        self._rerun: dict[int, bool] = {}
        self._guest_page_size = 0
        self._readers, self._writers = _REGISTER_TABLES[version]
        backend.on_config_change = self.config_changed
        backend.name = self.name
        backend.transport = self
        self._clear_state()

    # -- introspection --------------------------------------------------------------------------
    @property
    def status(self) -> int:
        return self._status

    @property
    def interrupt_status(self) -> int:
        return self._interrupt_status

    @property
    def driver_features(self) -> int:
        """The feature bits the driver wrote (legacy: masked to the offer)."""
        return self._driver_features

    @property
    def negotiated_features(self) -> int:
        """Features in force: legacy takes the driver's word as written, modern after
        FEATURES_OK was accepted."""
        if self.version == 1 or self._status & Status.FEATURES_OK:
            return self._driver_features
        return 0

    @property
    def config_generation(self) -> int:
        return self._config_generation

    @property
    def broken(self) -> bool:
        """A ring error was seen: notifications are ignored until the driver resets."""
        return self._broken

    # -- register access ------------------------------------------------------------------------
    def read(self, offset: int, width: int) -> int:
        """A driver read of ``width`` bytes at ``offset`` in the window; 0 for any misuse."""
        try:
            if offset >= CONFIG_OFFSET:
                value = self.backend.config_read(offset - CONFIG_OFFSET, width)
                return value & ((1 << 8 * width) - 1)
            if width != 4 or offset % 4:
                self._guest_error(f"{width}-byte read at {offset:#x}: registers are aligned u32")
                return 0
            handler = self._readers.get(offset)
            if handler is None:
                self._guest_error(self._misuse("read", offset))
                return 0
            return handler(self) & _WORD
        except Exception:
            log.exception("%s: internal error reading offset %#x", self.name, offset)
            return 0

    def write(self, offset: int, width: int, value: int) -> None:
        """A driver write; invalid ones are logged and dropped, never raised."""
        try:
            if offset >= CONFIG_OFFSET:
                mask = (1 << 8 * width) - 1
                self.backend.config_write(offset - CONFIG_OFFSET, value & mask, width)
                return
            if width != 4 or offset % 4:
                self._guest_error(f"{width}-byte write at {offset:#x}: registers are aligned u32")
                return
            handler = self._writers.get(offset)
            if handler is None:
                self._guest_error(self._misuse("write", offset))
                return
            handler(self, value & _WORD)
        except Exception:
            log.exception("%s: internal error writing %#x at offset %#x", self.name, value, offset)

    # -- logging --------------------------------------------------------------------------------
    def _guest_error(self, message: str) -> None:
        log.warning("%s: %s", self.name, message)

    def _reg_name(self, offset: int) -> str:
        if self.version == 1 and offset in _LEGACY_NAMES:
            return _LEGACY_NAMES[offset]
        try:
            return Reg(offset).name
        except ValueError:
            return f"offset {offset:#05x}"

    def _misuse(self, access: str, offset: int) -> str:
        name = self._reg_name(offset)
        if access == "read" and offset in self._writers:
            return f"read of write-only register {name}"
        if access == "write" and offset in self._readers:
            return f"write to read-only register {name} ignored"
        if offset in Reg._value2member_map_:
            return f"{access} of {name}, which a version {self.version} device does not have"
        return f"{access} of reserved {name}"

    # -- features -------------------------------------------------------------------------------
    def _read_device_features(self) -> int:
        sel = self._device_features_sel
        if self.version == 1 and sel != 0:
            return 0  # legacy devices have one feature word; word 1 (VERSION_1) must read 0
        return (self.device_features >> (32 * sel)) & _WORD if sel < 2 else 0

    def _write_driver_features(self, value: int) -> None:
        sel = self._driver_features_sel
        if self.version == 1:
            self._write_legacy_guest_features(sel, value)
        elif self._status & Status.FEATURES_OK:
            self._guest_error("DRIVER_FEATURES written after FEATURES_OK: ignored")
        elif sel >= 2:
            if value:
                self._guest_error(f"DRIVER_FEATURES word {sel} ({value:#x}) ignored: no such bits")
        else:
            shift = 32 * sel
            self._driver_features &= ~(_WORD << shift)
            self._driver_features |= value << shift

    def _write_legacy_guest_features(self, sel: int, value: int) -> None:
        if sel != 0:
            return  # silently: current Linux writes word 1 first even to legacy devices
        if self._status & _DRIVER_OK:
            self._guest_error("GUEST_FEATURES written after DRIVER_OK: ignored")
            return
        unoffered = value & ~self.device_features
        if unoffered:
            names = feature_names(unoffered, self.backend.feature_bits)
            self._guest_error(f"GUEST_FEATURES accepts bits not offered ({names}): dropped")
        self._driver_features = value & self.device_features

    def _feature_problem(self) -> str | None:
        unoffered = self._driver_features & ~self.device_features
        if unoffered:
            names = feature_names(unoffered, self.backend.feature_bits)
            return f"driver accepted features that were not offered: {names}"
        if not self._driver_features >> Feature.VERSION_1 & 1:
            return "driver did not accept VERSION_1"
        return None

    def _has(self, bit: int) -> bool:
        return bool(self.negotiated_features >> bit & 1)

    # -- status and reset -----------------------------------------------------------------------
    def _write_status(self, value: int) -> None:
        value &= 0xFF
        if value == 0:
            self.reset()
            return
        old = self._status
        # DEVICE_NEEDS_RESET is the device's to set and only a reset clears it.
        new = (value & ~Status.DEVICE_NEEDS_RESET) | (old & Status.DEVICE_NEEDS_RESET)
        if self.version == 2 and new & ~old & Status.FEATURES_OK:
            problem = self._feature_problem()
            if problem is not None:
                self._guest_error(f"FEATURES_OK refused: {problem}")
                new &= ~Status.FEATURES_OK
        if self.version == 2 and new & ~old & Status.DRIVER_OK and not new & Status.FEATURES_OK:
            self._guest_error("DRIVER_OK without FEATURES_OK: queues will not be processed")
        self._status = int(new)
        if new & ~old & _DRIVER_OK:
            self._wake_waiters()

    def reset(self) -> None:
        """Device reset (Status = 0, §2.4), complete on return; also used for hot-unplug."""
        for queue in self.queues:
            queue.reset()
        self._cancel_requests()
        self._clear_state()
        try:
            self.backend.reset()
        except Exception:
            log.exception("%s: backend reset failed", self.name)

    def _clear_state(self) -> None:
        self._status = 0
        self._device_features_sel = 0
        self._driver_features_sel = 0
        self._driver_features = 0
        self._queue_sel = 0
        self._shm_sel = 0
        # GuestPageSize survives Status=0: Linux's probe writes it *before* the core resets the
        # device (as QEMU, which keeps it in the transport, not the virtio device).
        self._broken = False
        self._rerun.clear()
        self._owed = 0
        self._forget_pass()
        self._set_interrupt_status(0)

    def fail(self, reason: str) -> None:
        """Enter DEVICE_NEEDS_RESET for a cause outside the device (a guest-memory write the
        client refused): what the device told its driver may not have arrived."""
        if not self._status & Status.DEVICE_NEEDS_RESET:
            self._fail(reason)

    def _fail(self, reason: str) -> None:
        """Enter DEVICE_NEEDS_RESET (§2.1.2): one log line, stop processing until reset, and
        tell a modern driver through a configuration change notification."""
        log.warning("%s: %s; device needs reset", self.name, reason)
        type_stats(self.backend).failures += 1
        self._broken = True
        self._cancel_requests()
        self._status = int(self._status | Status.DEVICE_NEEDS_RESET)
        if self._has(Feature.VERSION_1) and self._status & Status.DRIVER_OK:
            self._config_generation = (self._config_generation + 1) & _WORD
            self._raise_interrupt(Interrupt.CONFIG)

    # -- interrupts -----------------------------------------------------------------------------
    def _set_interrupt_status(self, value: int, *, quiet_drop: bool = False) -> None:
        old, self._interrupt_status = self._interrupt_status, value
        if self.used_notifier is not None:  # the line is the config bit's alone
            old, value = old & _CONFIG_IRQ, value & _CONFIG_IRQ
        if bool(old) == bool(value) or self.on_irq is None:
            return
        if value:
            self._owed = 0  # the driver hears of everything up to here
        elif quiet_drop:
            return
        try:
            self.on_irq(bool(value))
        except Exception:
            log.exception("%s: on_irq(%s) failed", self.name, bool(value))

    def _raise_interrupt(self, bits: int) -> None:
        # A notification whose bit is already set adds no edge; remember it, so an ACK that
        # clears the bit before the driver could have seen it raises the line again.
        self._owed |= bits & self._interrupt_status
        self._set_interrupt_status(self._interrupt_status | bits)

    def set_used_notifier(self, notifier: Callable[[], None] | None) -> None:
        """Send used-buffer notifications to ``notifier`` (a notification channel), or back on
        the line with None. Back on the line, a bit 0 still set is announced (a raise frame):
        the driver may not have heard of it, and without an edge it never would."""
        was_channel = self.used_notifier is not None
        self.used_notifier = notifier
        status = self._interrupt_status
        if was_channel and notifier is None and status & _VRING_IRQ and not status & _CONFIG_IRQ:
            self._owed = 0
            if self.on_irq is not None:
                try:
                    self.on_irq(True)
                except Exception:
                    log.exception("%s: on_irq(True) failed", self.name)

    def _notify_used(self, index: int) -> None:
        """A used-buffer notification for queue ``index`` (§2.7.7 decided one is due): on the
        notification channel if there is one, which needs no edge and no ACK to signal again,
        else the line. virtio-mmio has one line for every queue; vhost-user has one eventfd
        per queue, hence the index."""
        self.queues[index].stats.interrupts += 1
        notifier = self.used_notifier
        if notifier is None:
            self._raise_interrupt(_VRING_IRQ)
            return
        # Bit 0 for the register. Each notification is its own datagram, so none is owed: the
        # driver's (late) ACK clears the bit, and a newer notification has its datagram.
        self._set_interrupt_status(self._interrupt_status | _VRING_IRQ)
        notifier()

    def _write_interrupt_ack(self, value: int) -> None:
        if self.used_notifier is not None and not value & _CONFIG_IRQ:
            # Bit 0 with a channel: each notification went out as a datagram and the line is
            # the config bit's, so an ACK of bit 0 only clears it (no config raise is owed).
            self._set_interrupt_status(self._interrupt_status & ~value)
            return
        if not self.posted_ack:
            self._set_interrupt_status(self._interrupt_status & ~value)
            return
        # The driver ACKs what its raise frames told it. Anything else it has not heard of: a
        # bit set while the line was already high (a config change during a VRING interrupt)
        # or a notification owed for a bit it cleared. Those go out in a fresh raise frame, or
        # the line would stay high with no new edge and the device fall silent for good.
        unseen = (self._owed & value) | (self._interrupt_status & ~value)
        self._owed = 0
        self._set_interrupt_status(0, quiet_drop=True)
        if unseen:
            self._raise_interrupt(unseen)

    def config_changed(self) -> None:
        """The backend changed its config space: new generation, and once the driver is up a
        configuration change notification (QEMU also sets bit 0; bit 1 alone is enough)."""
        self._config_generation = (self._config_generation + 1) & _WORD
        type_stats(self.backend).config_changes += 1
        if self._status & _DRIVER_OK:
            self._raise_interrupt(Interrupt.CONFIG)

    # -- queue registers ------------------------------------------------------------------------
    def _selected_queue(self) -> SplitVirtqueue | None:
        sel = self._queue_sel
        return self.queues[sel] if sel < len(self.queues) else None

    def _read_queue_num_max(self) -> int:
        queue = self._selected_queue()
        return queue.num_max if queue is not None else 0

    def _queue_for_write(self, reg: str) -> SplitVirtqueue | None:
        """The selected queue if the driver may program it now; otherwise log and None."""
        queue = self._selected_queue()
        if queue is None:
            self._guest_error(f"{reg} write for queue {self._queue_sel}, which does not exist")
        elif queue.ready:
            self._guest_error(f"{reg} write while queue {queue.index} is live: ignored")
        else:
            return queue
        return None

    def _write_queue_num(self, value: int) -> None:
        queue = self._queue_for_write("QUEUE_NUM")
        if queue is None:
            return
        if not 0 < value <= queue.num_max:
            self._guest_error(f"QUEUE_NUM {value} ignored: QUEUE_NUM_MAX is {queue.num_max}")
            return
        queue.num = value  # a non-power of 2 is refused when the queue is enabled

    def _write_queue_addr(self, reg: Reg, attr: str, shift: int, value: int) -> None:
        queue = self._queue_for_write(reg.name)
        if queue is not None:
            old = getattr(queue, attr)
            setattr(queue, attr, (old & ~(_WORD << shift)) | (value << shift))

    def _write_queue_ready(self, value: int) -> None:
        queue = self._selected_queue()
        if queue is None:
            self._guest_error(f"QUEUE_READY write for queue {self._queue_sel}: no such queue")
        elif not value:
            self._stop_queue(queue, queue.stop)
        elif not queue.ready:
            self._enable_queue(queue)

    def _write_queue_reset(self, value: int) -> None:
        """Virtqueue reset (§2.6.1, §4.2.2): the selected queue only, synchronously, so
        QueueReset already reads 0 again (reset done) together with QueueReady 0."""
        if not self._has(Feature.RING_RESET):
            self._guest_error("QUEUE_RESET written but VIRTIO_F_RING_RESET not negotiated: ignored")
            return
        queue = self._selected_queue()
        if queue is None:
            self._guest_error(f"QUEUE_RESET for queue {self._queue_sel}, which does not exist")
        elif value != 1:
            self._guest_error(f"QUEUE_RESET {value:#x} ignored: only 1 starts a reset")
        else:
            self._stop_queue(queue, queue.reset)  # indices forgotten, size back to QueueNumMax
            self._rerun.pop(queue.index, None)
            self._forget_pass(queue.index)

    def _write_guest_page_size(self, value: int) -> None:
        if not is_power_of_2(value):
            self._guest_error(f"GUEST_PAGE_SIZE {value:#x} is not a power of 2: ignored")
            return
        self._guest_page_size = value

    def _write_queue_align(self, value: int) -> None:
        queue = self._queue_for_write("QUEUE_ALIGN")
        if queue is None:
            return
        if not is_power_of_2(value):
            self._guest_error(f"QUEUE_ALIGN {value:#x} is not a power of 2: ignored")
            return
        queue.align = value

    def _write_queue_pfn(self, value: int) -> None:
        if value == 0:  # the driver stops using this queue only (QEMU resets the whole device)
            queue = self._selected_queue()
            if queue is None:
                self._guest_error(f"QUEUE_PFN write for queue {self._queue_sel}: no such queue")
            else:
                self._stop_queue(queue, queue.stop)
            return
        queue = self._queue_for_write("QUEUE_PFN")
        if queue is not None:
            queue.set_legacy_pfn(value, self._guest_page_size, queue.align)
            self._enable_queue(queue)

    def _enable_queue(self, queue: SplitVirtqueue) -> None:
        """QueueReady=1 / QueuePFN≠0: validate now (again at every run, as memory may change)."""
        queue.ready = True
        try:
            if self.version == 1 and self._guest_page_size == 0:
                raise RingError("QUEUE_PFN written before GUEST_PAGE_SIZE")
            queue.check_size()
            if self.memory is not None:
                queue.check_layout(self.memory)
        except RingError as exc:
            self._fail(f"queue {queue.index}: {exc}")
            return
        self._wake_waiters()

    def _stop_queue(self, queue: SplitVirtqueue, stop: Callable[[], None]) -> None:
        """QueueReady=0, QueuePFN=0 or QueueReset: the ring is the driver's again; the device
        lets go of what it took from it."""
        stop()
        self._cancel_requests(queue.index)
        try:
            self.backend.queue_reset(queue.index)
        except Exception:
            log.exception("%s: queue_reset(%d) failed", self.name, queue.index)

    # -- queue processing -----------------------------------------------------------------------
    def _write_queue_notify(self, value: int) -> None:
        index = value & 0xFFFF  # with NOTIFICATION_DATA the high half is not the index
        if index >= len(self.queues):
            self._guest_error(f"QUEUE_NOTIFY for queue {index}, which does not exist")
        elif self._broken:
            pass  # the error was logged once when the device broke
        elif not self.queues[index].ready:
            self._guest_error(f"QUEUE_NOTIFY for queue {index}, which is not ready")
        elif (blocked := self._processing_blocked()) is not None:
            self._guest_error(f"QUEUE_NOTIFY for queue {index} {blocked}: ignored")
        else:
            queue = self.queues[index]
            queue.stats.notifications += 1
            if self.poll_us:
                self._kick_came(index)
            self._schedule(queue)

    def _processing_blocked(self) -> str | None:
        """Why queues may not be served now, or None. Modern devices consume buffers only after
        DRIVER_OK (§2.1); legacy drivers kick during probe, so a legacy device serves any
        configured queue (reference §2.3)."""
        status = self._status  # plain ints: IntFlag `&` builds an enum member each time
        if status & _FAILED:
            return "after the driver set FAILED"
        if self.version == 2 and not status & _DRIVER_OK:
            return "before DRIVER_OK"
        if self.version == 2 and not status & _FEATURES_OK:
            return "without FEATURES_OK"
        return None


# -- register dispatch ----------------------------------------------------------------------------
# One table per Version, shared by every device (a per-device table of closures cost ~5 KB each
# and 100,000 idle devices must fit in one process): handlers take the device first.
Reader = Callable[[MmioDevice], int]
Writer = Callable[[MmioDevice, int], None]


def _selected(dev: MmioDevice, attr: str) -> int:
    queue = dev._selected_queue()
    return int(getattr(queue, attr)) if queue is not None else 0


def _method(name: str) -> Callable:
    """Call the device's method by name, so subclasses and test doubles can override it."""

    def call(dev: MmioDevice, *value: int) -> int | None:
        return getattr(dev, name)(*value)

    return call


def _setter(attr: str) -> Writer:
    def write(dev: MmioDevice, value: int) -> None:
        setattr(dev, attr, value)

    return write


def _queue_addr_writer(reg: Reg, attr: str, shift: int) -> Writer:
    def write(dev: MmioDevice, value: int) -> None:
        dev._write_queue_addr(reg, attr, shift, value)

    return write


def _register_tables(version: int) -> tuple[dict[int, Reader], dict[int, Writer]]:
    readers: dict[int, Reader] = {
        Reg.MAGIC_VALUE: lambda dev: MAGIC_VALUE,
        Reg.VERSION: lambda dev: dev.version,
        Reg.DEVICE_ID: lambda dev: dev.backend.device_id,
        Reg.VENDOR_ID: lambda dev: dev.vendor_id,
        Reg.DEVICE_FEATURES: _method("_read_device_features"),
        Reg.QUEUE_NUM_MAX: _method("_read_queue_num_max"),
        Reg.INTERRUPT_STATUS: lambda dev: dev._interrupt_status,
        Reg.STATUS: lambda dev: dev._status,
    }
    writers: dict[int, Writer] = {
        Reg.DEVICE_FEATURES_SEL: _setter("_device_features_sel"),
        Reg.DRIVER_FEATURES: _method("_write_driver_features"),
        Reg.DRIVER_FEATURES_SEL: _setter("_driver_features_sel"),
        Reg.QUEUE_SEL: _setter("_queue_sel"),
        Reg.QUEUE_NUM: _method("_write_queue_num"),
        Reg.QUEUE_NOTIFY: _method("_write_queue_notify"),
        Reg.INTERRUPT_ACK: _method("_write_interrupt_ack"),
        Reg.STATUS: _method("_write_status"),
    }
    if version == 1:
        readers[Reg.QUEUE_PFN] = lambda dev: _selected(dev, "pfn")
        writers[Reg.GUEST_PAGE_SIZE] = _method("_write_guest_page_size")
        writers[Reg.QUEUE_ALIGN] = _method("_write_queue_align")
        writers[Reg.QUEUE_PFN] = _method("_write_queue_pfn")
        return readers, writers
    readers[Reg.QUEUE_READY] = lambda dev: _selected(dev, "ready")
    for reg in (Reg.SHM_LEN_LOW, Reg.SHM_LEN_HIGH, Reg.SHM_BASE_LOW, Reg.SHM_BASE_HIGH):
        readers[reg] = lambda dev: _WORD  # no shared-memory regions: length and base all ones
    readers[Reg.QUEUE_RESET] = lambda dev: 0
    readers[Reg.CONFIG_GENERATION] = lambda dev: dev._config_generation
    writers[Reg.QUEUE_READY] = _method("_write_queue_ready")
    for reg, attr, shift in (
        (Reg.QUEUE_DESC_LOW, "desc_addr", 0),
        (Reg.QUEUE_DESC_HIGH, "desc_addr", 32),
        (Reg.QUEUE_AVAIL_LOW, "avail_addr", 0),
        (Reg.QUEUE_AVAIL_HIGH, "avail_addr", 32),
        (Reg.QUEUE_USED_LOW, "used_addr", 0),
        (Reg.QUEUE_USED_HIGH, "used_addr", 32),
    ):
        writers[reg] = _queue_addr_writer(Reg(reg), attr, shift)
    writers[Reg.SHM_SEL] = _setter("_shm_sel")
    writers[Reg.QUEUE_RESET] = _method("_write_queue_reset")
    return readers, writers


_REGISTER_TABLES = {version: _register_tables(version) for version in (1, 2)}
