"""virtio-console (§5.3) on the device API: ports whose host side is a backend of
:mod:`viowire.server.chardev` (echo, a pseudo-terminal, a program, a socket), as QEMU's
virtio-serial ports are chardevs.

The guest (the driver: ``viowire console``, :class:`~viowire.client.drivers.console.
ConsoleDriver`, or Linux's hvc0) reads what the backend writes and writes what the backend
reads. Port 0 is a console port; ``ports=`` adds generic ports 1, 2, ... and offers MULTIPORT.

* **Receive queues** hold the driver's buffers (the device API's held-buffers way): a port's
  pump takes a buffer, then reads at most that many bytes from its backend, writes them in and
  completes the buffer. With no buffer posted the backend is not read at all, so the program or
  peer on the host side waits (back pressure): console data is never dropped and nothing piles
  up in the server.
* **Transmit queues** are served through :meth:`ConsoleDevice.handle`, in order per port (a
  lock taken before the request's first wait), each chain completed once its bytes are in the
  backend. As QEMU does, what a guest writes to a port whose host side is not connected is
  discarded.
* **Control queues** (MULTIPORT negotiated): the handshake of QEMU's virtio-serial-bus.c.
  DEVICE_READY(1) -> DEVICE_ADD per port; PORT_READY(1) -> CONSOLE_PORT (console ports),
  PORT_NAME (named ports), PORT_OPEN(1) (host side connected); the driver's PORT_OPEN is kept as
  the port's guest side state. Messages to the driver wait in a bounded outbox for buffers on
  the control receiveq. Malformed control messages (short, unknown port, unknown event) are
  logged and ignored, as QEMU does; a chain with device-writable buffers on a transmit queue
  is malformed and the device needs a reset.
* **Config**: cols and rows (SIZE), max_nr_ports (MULTIPORT), emerg_wr (EMERG_WRITE): a write
  of emerg_wr sends its low byte to port 0's backend, at any time. :meth:`resize` changes the
  size and tells the driver (a configuration change notification; with MULTIPORT, RESIZE for
  each console port too).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
from dataclasses import dataclass, field

from viowire.device import (
    ChainError,
    DescriptorChain,
    Device,
    GuestMemory,
    Option,
    Queue,
    SampleRequest,
    StaleQueueError,
    parse_bool,
)
from viowire.server import chardev
from viowire.virtio.console import (
    CONFIG,
    CONSOLE_CONFIG,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    DEVICE_ID,
    EMERG_WR_OFFSET,
    MAX_NAME,
    RECEIVEQ0,
    TRANSMITQ0,
    ConsoleFeature,
    ControlEvent,
    ControlMessage,
    name_message,
    num_queues,
    port_of_queue,
    receiveq,
    resize_message,
)

log = logging.getLogger("viowire.console")

MAX_PORTS = 64
"""The most ports a device offers (max_nr_ports): 2 queues each, plus the control pair."""
CHUNK = 64 * 1024
"""Bytes of a transmitted chain read from guest memory at a time."""
CONTROL_MAX = 4096
"""The longest control message the device reads; a longer one is cut (and logged)."""
EMERG_BACKLOG = 4096
"""Emergency-write characters waiting for port 0's backend before more are dropped."""


@dataclass(frozen=True)
class PortSpec:
    """One port as the options give it."""

    name: str
    backend: str
    console: bool = False


def _parse_name(text: str) -> str:
    if len(text.encode()) > MAX_NAME or "\0" in text:
        raise ValueError(f"port name {text!r}: at most {MAX_NAME} UTF-8 bytes, no NUL")
    return text


def parse_ports(text: str) -> tuple[PortSpec, ...]:
    """``NAME:BACKEND;NAME:BACKEND``: ports 1, 2, ... (generic ports, not consoles); a ``;``
    inside shell quotes belongs to the backend."""
    ports = []
    for item in filter(None, (part.strip() for part in _split_outside_quotes(str(text)))):
        name, sep, backend = item.partition(":")
        if not sep or not name or not backend:
            raise ValueError(
                f"port {item!r}: give NAME:BACKEND, e.g. org.example.0:unix:/run/agent.sock"
            )
        ports.append(PortSpec(_parse_name(name.strip()), chardev.parse(backend.strip())))
    if len({port.name for port in ports}) != len(ports):
        raise ValueError("two ports have the same name: name each port once")
    return tuple(ports)


def _split_outside_quotes(text: str, sep: str = ";") -> list[str]:
    """``text`` cut at each ``sep`` that no shell quote encloses (``exec:sh -c 'a; b'``)."""
    parts, start, quote = [], 0, ""
    for i, ch in enumerate(text):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == sep:
            parts.append(text[start:i])
            start = i + 1
    return [*parts, text[start:]]


def _parse_max_ports(text: object) -> int:
    value = int(str(text).strip(), 0)
    if not 1 <= value <= MAX_PORTS:
        raise ValueError(f"{value} is not within 1..{MAX_PORTS}")
    return value


def _parse_size(text: object) -> int:
    value = int(str(text).strip(), 0)
    if not 0 <= value <= 0xFFFF:
        raise ValueError(f"{value} is not within 0..65535 (a le16 field)")
    return value


@dataclass
class Port:
    """A port's state on the device's side."""

    id: int
    name: str
    backend: str
    console: bool
    chardev: chardev.Chardev
    opened: asyncio.Event = field(default_factory=asyncio.Event)  # open() was tried
    open_task: asyncio.Task[None] | None = None
    host_connected: bool = False
    guest_connected: bool = False  # the driver's PORT_OPEN (always, without MULTIPORT)
    ready: bool = False  # the driver's PORT_READY(1) came
    pump: asyncio.Task[None] | None = None
    pending: bytes = b""  # read from the backend, not yet in a guest buffer
    tx_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    rx_bytes: int = 0
    rx_buffers: int = 0  # receive buffers filled
    tx_bytes: int = 0


class ConsoleDevice(Device):
    """A virtio-console device: port 0 is a console on backend=, ports= adds more."""

    device_id = DEVICE_ID
    type_name = "console"
    num_queues = 2  # per device: 2, or 2 per port and the control pair with MULTIPORT
    config_layout = CONSOLE_CONFIG
    feature_bits = ConsoleFeature
    driver = "viowire.client.drivers.console:ConsoleDriver"
    options = {
        "backend": Option(
            chardev.parse,
            "echo",
            f"port 0's host side: {chardev.SPECS} (echo: what the guest writes comes back)",
        ),
        "name": Option(_parse_name, "", "port 0's name (sent as PORT_NAME with MULTIPORT)"),
        "ports": Option(
            parse_ports,
            "",
            "more ports, NAME:BACKEND;NAME:BACKEND... (ports 1, 2, ...; offers MULTIPORT)",
        ),
        "multiport": Option(parse_bool, None, "offer MULTIPORT; none: on when ports= gives ports"),
        "max_ports": Option(
            _parse_max_ports, None, f"max_nr_ports, 1..{MAX_PORTS}; none: the ports given"
        ),
        "cols": Option(_parse_size, 80, "console columns (config cols, SIZE)"),
        "rows": Option(_parse_size, 24, "console rows (config rows, SIZE)"),
        "emerg_write": Option.flag(True, "offer EMERG_WRITE (emerg_wr goes to port 0)"),
    }
    # what viowire conform sends: bytes on port 0, which the echo backend sends back
    sample_request = SampleRequest(TRANSMITQ0, readable=b"conform\n", receive_queue=RECEIVEQ0)

    def __init__(
        self,
        backend: str = "echo",
        name: str = "",
        ports: tuple[PortSpec, ...] | str = "",
        multiport: bool | None = None,
        max_ports: int | None = None,
        cols: int = 80,
        rows: int = 24,
        emerg_write: bool = True,
    ) -> None:
        super().__init__()
        extra = parse_ports(ports) if isinstance(ports, str) else tuple(ports)
        specs = (PortSpec(_parse_name(name), chardev.parse(backend), console=True), *extra)
        if multiport is False and extra:
            raise ValueError("ports= needs MULTIPORT: drop multiport=off")
        self.multiport = bool(extra) if multiport is None else multiport
        self.max_ports = len(specs) if max_ports is None else max_ports
        if self.max_ports < len(specs):
            raise ValueError(f"max_ports={self.max_ports} is fewer than the {len(specs)} ports")
        if not self.multiport and self.max_ports != 1:
            raise ValueError("max_ports= needs MULTIPORT: give multiport=on")
        self.num_queues = num_queues(self.max_ports, self.multiport)  # type: ignore[misc]
        self.cols, self.rows = _parse_size(cols), _parse_size(rows)
        self.emerg_write = emerg_write
        self.ports = {
            i: Port(i, s.name, s.backend, s.console, chardev.make(s.backend))
            for i, s in enumerate(specs)
        }
        self._outbox: collections.deque[ControlMessage] = collections.deque()
        self._outbox_limit = 4 * self.max_ports + 16
        self._control_pump: asyncio.Task[None] | None = None
        self._emergency: set[asyncio.Task[None]] = set()
        self.control_errors = 0

    # -- what the device is ---------------------------------------------------------------------
    def device_features(self, version: int) -> int:
        bits = 1 << ConsoleFeature.SIZE
        if self.multiport:
            bits |= 1 << ConsoleFeature.MULTIPORT
        if self.emerg_write:
            bits |= 1 << ConsoleFeature.EMERG_WRITE
        return bits

    def config_space(self) -> bytes:
        # emerg_wr reads 0: a write is an action, not a value kept (QEMU clears it)
        return CONFIG.pack(self.cols, self.rows, self.max_ports, 0)

    def config_write(self, offset: int, data_value: int, width: int) -> None:
        if self.emerg_write and EMERG_WR_OFFSET <= offset < EMERG_WR_OFFSET + 4:
            # only the low byte is a character; 0 is none (QEMU), and a legacy driver may
            # write the field a byte at a time
            if offset == EMERG_WR_OFFSET and data_value & 0xFF:
                self._emergency_write(bytes([data_value & 0xFF]))
            return
        super().config_write(offset, data_value, width)

    @property
    def negotiated_features(self) -> int:
        return self.transport.negotiated_features if self.transport is not None else 0

    @property
    def use_multiport(self) -> bool:
        """MULTIPORT is in force: the control queues run and ports 1.. exist."""
        return bool(self.negotiated_features >> ConsoleFeature.MULTIPORT & 1)

    def resize(self, cols: int, rows: int, port: int = 0) -> None:
        """The console of ``port`` is now ``cols`` x ``rows``: port 0's size is in the config
        space (a configuration change notification tells the driver); with MULTIPORT (and
        SIZE: a driver that declined sizes gets none) the driver gets RESIZE for the port
        too, if it is a console port it made ready."""
        cols, rows = _parse_size(cols), _parse_size(rows)
        if port == 0:
            self.cols, self.rows = cols, rows
            self.on_config_change()
        target = self.ports.get(port)
        sizes = self.negotiated_features >> ConsoleFeature.SIZE & 1
        if sizes and self.use_multiport and target is not None and target.console and target.ready:
            self._send(resize_message(port, cols, rows))

    # -- host sides -----------------------------------------------------------------------------
    def _open_backends(self) -> None:
        """Open every port's backend once, in the background (the first time the driver
        needs the device)."""
        loop = asyncio.get_running_loop()
        for port in self.ports.values():
            if port.open_task is None:
                port.open_task = loop.create_task(self._open(port), name=f"{self.name} open")

    async def _open(self, port: Port) -> None:
        try:
            await port.chardev.open()
        except (OSError, ValueError) as exc:
            log.warning(
                "%s: port %d: backend %s cannot be opened (%s): what the guest writes there "
                "is discarded",
                self.name,
                port.id,
                port.backend,
                exc,
            )
        else:
            self._host_connected(port, True)
        finally:
            port.opened.set()

    def _host_connected(self, port: Port, connected: bool) -> None:
        if port.host_connected == connected:
            return
        port.host_connected = connected
        if port.ready and self.use_multiport:
            self._send(ControlMessage(port.id, ControlEvent.PORT_OPEN, int(connected)))

    def _emergency_write(self, data: bytes) -> None:
        """emerg_wr: to port 0's backend, in order, even before the driver set anything up."""
        if len(self._emergency) >= EMERG_BACKLOG:
            log.warning("%s: emergency write dropped: %d still waiting", self.name, EMERG_BACKLOG)
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._open_backends()
        task = loop.create_task(self._write_host(self.ports[0], data))
        self._emergency.add(task)
        task.add_done_callback(self._emergency.discard)

    async def _write_host(self, port: Port, data: bytes) -> bool:
        """Bytes to ``port``'s backend, after those written before; False if not connected."""
        async with port.tx_lock:
            await port.opened.wait()
            if not port.host_connected:
                return False
            await port.chardev.write(data)
            port.tx_bytes += len(data)
            return True

    # -- queues ---------------------------------------------------------------------------------
    def queue_notify(self, queue: Queue) -> None:
        self._open_backends()
        index = queue.index
        if index == CONTROL_RECEIVEQ:
            self._start_control_pump()
            return
        if index == CONTROL_TRANSMITQ:
            queue.serve()
            return
        place = port_of_queue(index)
        assert place is not None
        port_id, transmit = place
        if transmit:
            queue.serve()
        elif port_id in self.ports and (port_id == 0 or self.use_multiport):
            self._start_pump(self.ports[port_id])
        # a receive queue of a port that does not exist (or not without MULTIPORT, §5.3.2):
        # its buffers stay with the driver

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        if chain.writable_len:
            raise ChainError(
                f"console: queue {queue}: a transmit chain has {chain.writable_len} "
                "device-writable bytes (§5.3.6.1: the driver MUST NOT put them there)"
            )
        if queue == CONTROL_TRANSMITQ:
            self._control(await chain.read(0, CONTROL_MAX), chain.readable_len)
            return 0
        place = port_of_queue(queue)
        port = self.ports.get(place[0]) if place is not None else None
        if port is None or (port.id and not self.use_multiport):
            return 0  # a port that does not exist (now): discarded, as QEMU does
        async with port.tx_lock:  # taken before the first wait: chains go out in ring order
            await port.opened.wait()
            if not port.host_connected:
                return 0  # discarded, as QEMU does
            for offset in range(0, chain.readable_len, CHUNK):
                data = await chain.read(offset, CHUNK)
                await port.chardev.write(data)
                port.tx_bytes += len(data)
        return 0  # nothing written into a transmitted chain

    # -- receive: backend -> guest --------------------------------------------------------------
    def _start_pump(self, port: Port) -> None:
        if port.pump is None or port.pump.done():
            port.pump = asyncio.get_running_loop().create_task(
                self._pump(port), name=f"{self.name} port {port.id}"
            )

    async def _pump(self, port: Port) -> None:
        with contextlib.suppress(StaleQueueError):  # a reset took the buffer back
            await self._receive(port, self.queue(receiveq(port.id)))

    async def _receive(self, port: Port, rxq: Queue) -> None:
        await port.opened.wait()
        while port.host_connected or port.pending:
            chain = await rxq.get()
            if not chain.writable_len or chain.readable_len:
                rxq.fail(
                    f"console: a receive chain has {chain.readable_len} readable and "
                    f"{chain.writable_len} writable bytes (§5.3.6.1: device-writable only)"
                )
                return
            if not port.pending:
                port.pending = await port.chardev.read(chain.writable_len)
                if not port.pending:
                    self._host_connected(port, False)  # the host side has gone
                    rxq.complete(chain, 0)
                    return
            while self.use_multiport and not port.guest_connected:
                await self._guest_change.wait()  # the driver closed the port: hold the bytes
            data = port.pending[: chain.writable_len]
            rxq.complete(chain, await chain.write(data))
            port.pending = port.pending[len(data) :]
            port.rx_bytes += len(data)
            port.rx_buffers += 1

    @property
    def _guest_change(self) -> asyncio.Event:
        event = getattr(self, "_guest_event", None)
        if event is None:
            event = self._guest_event = asyncio.Event()
        return event

    # -- control: the MULTIPORT handshake -------------------------------------------------------
    def _control(self, data: bytes, length: int) -> None:
        """One message from the driver (QEMU's handle_control_message)."""
        if length > CONTROL_MAX:
            log.warning(
                "%s: control message of %d bytes read as its first %d",
                self.name,
                length,
                CONTROL_MAX,
            )
        try:
            msg = ControlMessage.decode(data)
        except ValueError as exc:
            return self._control_error(str(exc))
        if msg.event == ControlEvent.DEVICE_READY:
            if not msg.value:
                return self._control_error("the driver failed to set up the device")
            for port in self.ports.values():
                self._send(ControlMessage(port.id, ControlEvent.DEVICE_ADD, 1))
            return None
        port = self.ports.get(msg.id)
        if port is None:
            return self._control_error(f"{msg}: no port {msg.id}")
        if msg.event == ControlEvent.PORT_READY:
            return self._port_ready(port, msg.value)
        if msg.event == ControlEvent.PORT_OPEN:
            port.guest_connected = bool(msg.value)
            self._guest_change.set()
            self._guest_change.clear()
            return None
        return self._control_error(f"{msg}: not an event a driver sends")

    def _port_ready(self, port: Port, value: int) -> None:
        if not value:
            return self._control_error(f"the driver failed to set up port {port.id}")
        port.ready = True
        if port.console:
            self._send(ControlMessage(port.id, ControlEvent.CONSOLE_PORT, 1))
        if port.name:
            self._send(name_message(port.id, port.name))
        if port.host_connected:
            self._send(ControlMessage(port.id, ControlEvent.PORT_OPEN, 1))
        return None

    def _control_error(self, what: str) -> None:
        self.control_errors += 1
        log.warning("%s: control message ignored: %s", self.name, what)

    def _send(self, msg: ControlMessage) -> None:
        """A message to the driver, once it has a buffer on the control receiveq for it."""
        if not self.use_multiport:
            return
        if len(self._outbox) >= self._outbox_limit:
            log.warning(
                "%s: %s dropped: %d control messages wait for the driver's buffers",
                self.name,
                msg,
                len(self._outbox),
            )
            return
        self._outbox.append(msg)
        self._start_control_pump()

    def _start_control_pump(self) -> None:
        if self._outbox and (self._control_pump is None or self._control_pump.done()):
            self._control_pump = asyncio.get_running_loop().create_task(
                self._deliver_control(), name=f"{self.name} control"
            )

    async def _deliver_control(self) -> None:
        crq = self.queue(CONTROL_RECEIVEQ)
        with contextlib.suppress(StaleQueueError):
            while self._outbox:
                chain = await crq.get()
                data = self._outbox[0].encode()
                if chain.readable_len or chain.writable_len < len(data):
                    crq.fail(
                        f"console: control receiveq: a buffer of {chain.readable_len} readable and "
                        f"{chain.writable_len} writable bytes cannot take a {len(data)}-byte "
                        "message"
                    )
                    return
                crq.complete(chain, await chain.write(data))
                self._outbox.popleft()

    # -- lifecycle ------------------------------------------------------------------------------
    def _stop_guest_side(self) -> None:
        """The driver's state goes (reset): pumps stop, their buffers are the driver's again.
        Backends stay open and bytes read from them stay pending, for the next driver."""
        for port in self.ports.values():
            if port.pump is not None:
                port.pump.cancel()
                port.pump = None
            port.ready = port.guest_connected = False
        if self._control_pump is not None:
            self._control_pump.cancel()
            self._control_pump = None
        self._outbox.clear()

    def queue_reset(self, index: int) -> None:
        if index == CONTROL_RECEIVEQ and self._control_pump is not None:
            self._control_pump.cancel()
            self._control_pump = None
            return
        place = port_of_queue(index)
        port = self.ports.get(place[0]) if place is not None else None
        if port is not None and not place[1] and port.pump is not None:  # type: ignore[index]
            port.pump.cancel()
            port.pump = None

    def reset(self) -> None:
        self._stop_guest_side()

    def close(self) -> None:
        self._stop_guest_side()
        for task in self._emergency:
            task.cancel()
        for port in self.ports.values():
            if port.open_task is not None:
                port.open_task.cancel()
            port.chardev.close()
