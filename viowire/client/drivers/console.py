"""virtio-console (SPEC §5.3): the guest's end of a console device's ports, as Linux's
drivers/char/virtio_console.c is (hvc0 and /dev/vportNpM).

The driver negotiates SIZE, MULTIPORT and EMERG_WRITE when offered. Without MULTIPORT there is
one port, 0, a console. With it the driver runs the control handshake: it posts buffers on the
control receiveq and sends DEVICE_READY(1); for each DEVICE_ADD it sets the port up (receive
buffers posted) and answers PORT_READY(1); CONSOLE_PORT makes a port a console, which the driver
opens at once (PORT_OPEN(1), as the spec requires); PORT_NAME names it; the device's PORT_OPEN
says whether the host side is connected; RESIZE gives a console port's size::

    drv = await ConsoleDriver.attach(dev)
    port = await drv.port(0)                    # or by name: await drv.port("org.example.0")
    await port.write(b"ls\\n")
    print(await port.read(4096))                # what the host side wrote; b"" once it left
    await drv.emergency_write("!")              # emerg_wr, with EMERG_WRITE

A port's receive buffers are posted again only once :meth:`ConsolePort.read` has taken their
bytes, so a reader that stops stops the device from reading its backend (back pressure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from typing import Any

from viowire.client.drivers.generic import GenericDriver
from viowire.client.mmio import VirtioMmioDevice
from viowire.virtio.console import (
    BAD_ID,
    CONSOLE_CONFIG,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    DEVICE_ID,
    EMERG_WR_OFFSET,
    ConsoleFeature,
    ControlEvent,
    ControlMessage,
    decode_name,
    decode_resize,
    queue_names,
    receiveq,
    transmitq,
)

log = logging.getLogger(__name__)

BUFFER_SIZE = 4096  # Linux posts PAGE_SIZE buffers on every receive queue
RX_BUFFERS = 16
CONTROL_BUFFERS = 32
MAX_PORTS = 512
"""max_nr_ports above this is refused (a device cannot make the driver set up unbounded
queues)."""
WRITE_CHUNK = 4096


class ConsolePort:
    """One port: ``read()``/``write()``/``drain()`` as an asyncio stream, ``open()``/``close()``
    (PORT_OPEN, with MULTIPORT), ``name``, ``console``, ``host_connected`` and ``size``."""

    def __init__(self, driver: ConsoleDriver, port_id: int) -> None:
        self.driver = driver
        self.id = port_id
        self.name = ""
        self.console = False
        self.host_connected = not driver.multiport  # without MULTIPORT nobody says otherwise
        self.guest_connected = not driver.multiport
        self.size: tuple[int, int] | None = None  # (cols, rows) from RESIZE
        self.removed = False
        self._incoming: AsyncIterator[bytes] | None = None
        self._leftover = b""
        self._read_lock = asyncio.Lock()
        self._write_lock = asyncio.Lock()
        self._changed = asyncio.Event()

    def __repr__(self) -> str:
        kind = "console" if self.console else "port"
        return f"<{kind} {self.id}{' ' + repr(self.name) if self.name else ''}>"

    async def _setup(self) -> None:
        queue = receiveq(self.id)
        await self.driver.post(queue, BUFFER_SIZE, min(RX_BUFFERS, self.driver.vqs[queue].num))
        self._incoming = self.driver.receive(queue)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes (all of the next buffer if n < 0) the host side wrote; waits for
        some; b"" once the port is removed or the driver detached."""
        async with self._read_lock:
            if not self._leftover:
                if self._incoming is None:
                    return b""
                try:
                    self._leftover = await anext(self._incoming)
                except StopAsyncIteration:
                    self._incoming = None
                    return b""
            if n < 0:
                n = len(self._leftover)
            data, self._leftover = self._leftover[:n], self._leftover[n:]
            return data

    async def write(self, data: bytes) -> None:
        """Send ``data`` to the host side; returns once the device has taken all of it (as
        Linux's hvc waits for the transmitq's buffer to be used)."""
        async with self._write_lock:
            queue = transmitq(self.id)
            for at in range(0, len(data), WRITE_CHUNK):
                await self.driver.request(queue, out=bytes(data[at : at + WRITE_CHUNK]))

    async def drain(self) -> None:
        """Writes are complete when :meth:`write` returns: nothing to wait for."""

    async def open(self) -> None:
        """PORT_OPEN(1): the guest side is open (a program opened /dev/vportNpM)."""
        await self._set_open(True)

    async def close(self) -> None:
        """PORT_OPEN(0): the guest side is closed; the device holds what it reads meanwhile."""
        await self._set_open(False)

    async def _set_open(self, value: bool) -> None:
        self.guest_connected = value
        if self.driver.multiport:
            await self.driver.send_control(self.id, ControlEvent.PORT_OPEN, int(value))

    async def wait_host(self, connected: bool = True) -> None:
        """Wait until the host side is connected (or, ``connected=False``, gone)."""
        while self.host_connected != connected:
            self._changed.clear()
            await self._changed.wait()

    def _notify(self) -> None:
        self._changed.set()


class ConsoleDriver(GenericDriver):
    """A virtio-console device: :attr:`ports` by number, :meth:`port` by number or name,
    :attr:`size`, :meth:`resizes` and :meth:`emergency_write`."""

    device_id = DEVICE_ID
    feature_table = (
        1 << ConsoleFeature.SIZE | 1 << ConsoleFeature.MULTIPORT | 1 << ConsoleFeature.EMERG_WRITE
    )
    config_layout = CONSOLE_CONFIG

    def __init__(self, dev: VirtioMmioDevice, **opts: Any) -> None:
        super().__init__(dev, **opts)
        self.max_nr_ports = 1
        self.ports: dict[int, ConsolePort] = {}
        self.size: tuple[int, int] | None = None
        """(cols, rows) of port 0 from the config space, with SIZE."""
        self.control_errors = 0
        self._control_task: asyncio.Task[None] | None = None
        self._control_lock = asyncio.Lock()
        self._ports_changed = asyncio.Event()
        self._resizes: asyncio.Queue[tuple[int, int, int]] = asyncio.Queue(maxsize=64)

    @property
    def multiport(self) -> bool:
        return self.has_feature(ConsoleFeature.MULTIPORT)

    async def setup(self) -> None:
        if self.multiport:
            self.max_nr_ports = await self.config_read(4, 4)
            if not 1 <= self.max_nr_ports <= MAX_PORTS:
                raise ValueError(
                    f"{self.dev.name}: max_nr_ports {self.max_nr_ports} is not within "
                    f"1..{MAX_PORTS}"
                )
        names = queue_names(self.max_nr_ports, self.multiport)
        self._sizes, self._names = [None] * len(names), names
        await self._read_size()
        await super().setup()

    async def _read_size(self) -> None:
        if self.has_feature(ConsoleFeature.SIZE):
            self.size = (await self.config_read(0, 2), await self.config_read(2, 2))

    async def config_changed(self) -> None:
        if self.needs_reset:
            return  # the change is DEVICE_NEEDS_RESET, not a new size
        before = self.size
        await self._read_size()
        if self.size != before and self.size is not None:
            self._resized(0, *self.size)
        await super().config_changed()

    async def device_ready(self) -> None:
        if self._receivers:  # a reinitialise: GenericDriver posts the buffers again
            await super().device_ready()
        if not self.multiport:
            if 0 not in self.ports:
                port = self.ports[0] = ConsolePort(self, 0)
                port.console = True
                await port._setup()
            self._ports_changed.set()
            return
        for port in self.ports.values():  # a reinitialise: the handshake starts over
            port.console = port.guest_connected = port.host_connected = False
        if CONTROL_RECEIVEQ not in self._receivers:
            count = min(CONTROL_BUFFERS, self.vqs[CONTROL_RECEIVEQ].num)
            await self.post(CONTROL_RECEIVEQ, BUFFER_SIZE, count)
        if self._control_task is None or self._control_task.done():
            self._control_task = asyncio.get_running_loop().create_task(self._control_loop())
        await self.send_control(BAD_ID, ControlEvent.DEVICE_READY, 1)  # id unused: Linux's

    async def post(self, queue: int, size: int, count: int) -> None:
        """Receive queues keep the buffers posted first (the driver's own when it sets a port
        up, or a tool's before): posting there again changes nothing, so tools that post on
        any type's receive queue (``viowire conform``) drive a console too."""
        if queue in self._receivers:
            return
        await super().post(queue, size, count)

    # -- ports ----------------------------------------------------------------------------------
    async def port(self, key: int | str) -> ConsolePort:
        """Port number ``key``, or the port named ``key``, waiting until the device has added
        it (bound the wait with asyncio.timeout)."""
        while True:
            found = self.find_port(key)
            if found is not None:
                return found
            self._ports_changed.clear()
            await self._ports_changed.wait()

    def find_port(self, key: int | str) -> ConsolePort | None:
        if isinstance(key, int):
            return self.ports.get(key)
        return next((p for p in self.ports.values() if p.name == key), None)

    async def resizes(self) -> AsyncIterator[tuple[int, int, int]]:
        """``async for port, cols, rows in drv.resizes()``: size changes (RESIZE, or port 0's
        config space with SIZE); the oldest are dropped if nobody reads."""
        while not self._detached:
            yield await self._resizes.get()

    def _resized(self, port: int, cols: int, rows: int) -> None:
        if self._resizes.full():
            self._resizes.get_nowait()
        self._resizes.put_nowait((port, cols, rows))

    async def emergency_write(self, ch: str | bytes | int) -> None:
        """One character through emerg_wr (EMERG_WRITE): the device sends it to port 0's host
        side, with no queue involved."""
        if not self.has_feature(ConsoleFeature.EMERG_WRITE):
            raise ValueError(f"{self.dev.name}: the device does not offer EMERG_WRITE")
        value = ch if isinstance(ch, int) else (ch.encode() if isinstance(ch, str) else ch)[0]
        await self.config_write(EMERG_WR_OFFSET, value, 4)

    # -- control queues -------------------------------------------------------------------------
    async def send_control(self, port: int, event: int, value: int) -> None:
        """One control message on the control transmitq, awaited."""
        async with self._control_lock:  # in order, as Linux sends them under a lock
            await self.request(CONTROL_TRANSMITQ, out=ControlMessage(port, event, value).encode())

    async def _control_loop(self) -> None:
        try:
            async for data in self.receive(CONTROL_RECEIVEQ):
                try:
                    await self._handle_control(ControlMessage.decode(data))
                except ValueError as exc:
                    self.control_errors += 1
                    log.warning("%s: control message ignored: %s", self.dev.name, exc)
        except Exception as exc:  # the device needs a reset, or we detached
            log.debug("%s: control receiveq ended: %r", self.dev.name, exc)

    async def _handle_control(self, msg: ControlMessage) -> None:
        """Linux's handle_control_message: a message for an unknown port other than
        DEVICE_ADD is dropped."""
        port = self.ports.get(msg.id)
        if msg.event == ControlEvent.DEVICE_ADD:
            return await self._add_port(msg.id, port)
        if port is None:
            raise ValueError(f"{msg}: no port {msg.id}")
        if msg.event == ControlEvent.DEVICE_REMOVE:
            port.host_connected = False
            port.removed = True
            del self.ports[msg.id]
        elif msg.event == ControlEvent.CONSOLE_PORT:
            if msg.value and not port.console:
                port.console = True
                await port.open()  # §5.3.6.2.2: MUST answer PORT_OPEN(1)
        elif msg.event == ControlEvent.RESIZE:
            if port.console:
                port.size = decode_resize(msg.payload)
                self._resized(port.id, *port.size)
        elif msg.event == ControlEvent.PORT_OPEN:
            port.host_connected = bool(msg.value)
        elif msg.event == ControlEvent.PORT_NAME:
            if not port.name:  # Linux names a port once
                port.name = decode_name(msg.payload)
        else:
            raise ValueError(f"{msg}: not an event a device sends")
        port._notify()
        self._ports_changed.set()
        return None

    async def _add_port(self, port_id: int, port: ConsolePort | None) -> None:
        if port is not None:  # Linux: "already added", and PORT_READY again
            await self.send_control(port_id, ControlEvent.PORT_READY, 1)
            return
        if port_id >= self.max_nr_ports:
            raise ValueError(
                f"DEVICE_ADD of port {port_id}, beyond max_nr_ports {self.max_nr_ports}"
            )
        port = ConsolePort(self, port_id)
        await port._setup()
        self.ports[port_id] = port
        await self.send_control(port_id, ControlEvent.PORT_READY, 1)
        self._ports_changed.set()

    async def detach(self) -> None:
        if self._control_task is not None:
            self._control_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._control_task
        await super().detach()
