"""Drive QEMU's own virtio-mmio devices through its qtest socket (``qemu-system-* -qtest``).

qtest is QEMU's device-test protocol: one text line per command (``readl 0xfeb00e00``), exactly
one reply line per command (``OK 0x...``, ``FAIL ...``, ``ERR ...``), and, once interrupts are
intercepted, asynchronous ``IRQ raise N`` / ``IRQ lower N`` lines anywhere in the stream. Over it
this client *is* the guest: register accesses are qtest reads and writes, guest RAM is read and
written with ``b64read``/``b64write``, and the interrupt lines are the ``IRQ`` lines. So QEMU's
devices can be driven by viowire's driver exactly as viowire's own devices are, and the two can be
compared (``tests/test_qemu_oracle.py``).

Layers, as elsewhere in viowire: :class:`QtestParser` is the sans-IO line parser;
:class:`QtestBus` is the ``asyncio.Protocol`` that owns it and is the ``RegisterBus``;
:class:`QtestMemory` and :class:`QtestRAM` are the guest RAM window this client manages;
:class:`QtestConnection` has the surface of :class:`~viowire.client.connection.Connection`.

The guest must not run: with no kernel, QEMU's firmware halts, and only qtest touches devices
and memory. QEMU parses qtest arguments with assertions, so a malformed command kills it; every
command here is built from checked integers.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import logging
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

from viowire.client.connection import ConnectionClosed, DeviceInfo
from viowire.client.discover import discover
from viowire.client.guest import RangeAllocator
from viowire.client.mmio import VirtioMmioDevice
from viowire.virtio.constants import DEFAULT_WINDOW_SIZE, PAGE_SIZE
from viowire.virtio.memory import GuestMemory, Region

log = logging.getLogger("viowire.client.qtest")

COMMAND_TIMEOUT = 10.0  # seconds for QEMU to answer one command
CONNECT_TIMEOUT = 10.0
MAX_LINE = 1 << 20  # longest line accepted from QEMU; b64read replies stay far below it
TRANSFER_CHUNK = 64 * 1024  # bytes of guest RAM per b64read/b64write command
ZERO_FILL_MIN = 64  # zero runs at least this long go as one `memset` instead of b64write

# QEMU's x86 microvm (7.2, ioapic2=off): eight virtio-mmio slots of 0x200 bytes from 0xfeb00000,
# filled from the top (the first -device gets slot 7). Slot i raises GSI 16 + i when the machine
# has ACPI (the default), 5 + i with acpi=off. ioapic2=on (the default) gives 24 slots instead,
# wired to a second IOAPIC: start QEMU with ioapic2=off, the layout measured here.
MICROVM_MMIO_BASE = 0xFEB0_0000
MICROVM_MMIO_SLOTS = 8


def microvm_slots(*, acpi: bool = True) -> tuple[tuple[int, int, int], ...]:
    """``(base, size, irq)`` of microvm's eight virtio-mmio slots (``-M microvm,ioapic2=off``)."""
    first_irq = 16 if acpi else 5
    return tuple(
        (MICROVM_MMIO_BASE + DEFAULT_WINDOW_SIZE * i, DEFAULT_WINDOW_SIZE, first_irq + i)
        for i in range(MICROVM_MMIO_SLOTS)
    )


QEMU_MICROVM_SLOTS = microvm_slots()
# The part of guest RAM this client manages: well inside `-m 64M`, clear of the low memory the
# firmware uses. Rings and DMA buffers are allocated from it.
QTEST_RAM_BASE = 16 << 20
QTEST_RAM_SIZE = 32 << 20

_WIDTH_SUFFIX = {1: "b", 2: "w", 4: "l", 8: "q"}


# -- errors ---------------------------------------------------------------------------------------


class QtestError(Exception):
    """Base class of qtest failures."""


class QtestCommandError(QtestError):
    """QEMU answered a command with FAIL or ERR (an unknown command, a missing device...)."""

    def __init__(self, command: str, reply: str) -> None:
        self.command = command
        self.reply = reply
        super().__init__(f"qtest command {command!r} failed: {reply}")


class QtestProtocolError(QtestError):
    """The peer sent something that is not qtest: the stream cannot be trusted any more."""


class QtestClosed(ConnectionClosed):
    """The qtest connection is gone (QEMU exited, or it stopped answering and was dropped)."""


# -- the sans-IO line parser ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class QtestReply:
    """The reply line to one command: ``OK [value]``, or ``FAIL ...``/``ERR ...``."""

    ok: bool
    text: str

    @property
    def words(self) -> list[str]:
        return self.text.split()


@dataclass(frozen=True, slots=True)
class QtestIrq:
    """An asynchronous interrupt line change: ``IRQ raise N`` or ``IRQ lower N``."""

    irq: int
    level: bool


QtestEvent = QtestReply | QtestIrq


def parse_line(line: bytes) -> QtestEvent:
    """One line from QEMU (without its newline) as an event; anything else is a protocol error."""
    try:
        text = line.decode("ascii").rstrip("\r")
    except UnicodeDecodeError:
        raise QtestProtocolError(f"non-ASCII line from qtest: {line[:80]!r}") from None
    words = text.split()
    if not words:
        raise QtestProtocolError("empty line from qtest")
    if words[0] == "IRQ":
        if len(words) != 3 or words[1] not in ("raise", "lower") or not words[2].isdigit():
            raise QtestProtocolError(f"malformed interrupt line from qtest: {text!r}")
        return QtestIrq(int(words[2]), words[1] == "raise")
    if words[0] == "OK":
        return QtestReply(True, text)
    if words[0] in ("FAIL", "ERR"):
        return QtestReply(False, text)
    raise QtestProtocolError(f"unexpected line from qtest (is this a qtest socket?): {text[:80]!r}")


class QtestParser:
    """Feed bytes as they arrive, get whole-line events back; copes with split and joined reads."""

    def __init__(self, max_line: int = MAX_LINE) -> None:
        self.max_line = max_line
        self._buffer = bytearray()

    def feed(self, data: bytes) -> list[QtestEvent]:
        self._buffer += data
        events = []
        start = 0
        while (end := self._buffer.find(b"\n", start)) >= 0:
            events.append(parse_line(bytes(self._buffer[start:end])))
            start = end + 1
        del self._buffer[:start]
        if len(self._buffer) > self.max_line:
            raise QtestProtocolError(f"qtest line longer than {self.max_line} bytes")
        return events


# -- the bus --------------------------------------------------------------------------------------


class QtestBus(asyncio.Protocol):
    """The qtest socket as viowire's ``RegisterBus``, plus guest-RAM transfers.

    qtest is strictly request/response, so commands go one at a time (an ``asyncio.Lock``, which
    is FIFO: commands reach QEMU in the order they were issued, posted writes included, and
    posted writes are simply awaited). ``IRQ`` lines are dispatched to the handlers as they
    arrive, before the reply that follows them, so an interrupt a write caused is seen first.
    Every wait is bounded by ``timeout``; a QEMU that stops answering is disconnected, because a
    late reply would be taken for the answer to the next command.
    """

    def __init__(self, path: str, *, timeout: float = COMMAND_TIMEOUT) -> None:
        self.path = path
        self.timeout = timeout
        self.transport: asyncio.Transport | None = None
        self.irq_levels: dict[int, bool] = {}  # last level QEMU reported for each line
        self.commands = 0  # sent so far; a cost measure for tests and benchmarks
        self.on_lost: list[Callable[[Exception], object]] = []
        self._parser = QtestParser()
        self._waiting: deque[asyncio.Future[QtestReply]] = deque()
        self._lock = asyncio.Lock()
        self._irq_handlers: dict[int, Callable[[bool], None]] = {}
        self._error: str | None = None  # why the bus is unusable, once it is
        self._closed = asyncio.get_running_loop().create_future()

    def __repr__(self) -> str:
        return f"<QtestBus {self.endpoint} commands={self.commands}>"

    @property
    def endpoint(self) -> str:
        return f"qtest+unix://{self.path}"

    @property
    def closed(self) -> bool:
        return self._closed.done()

    # -- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        try:
            events = self._parser.feed(data)
        except QtestProtocolError as exc:
            self._abandon(f"{exc}; closing")
            return
        for event in events:
            if isinstance(event, QtestIrq):
                self._on_irq(event)
            elif self._waiting:
                future = self._waiting.popleft()
                if not future.done():
                    future.set_result(event)
            else:
                self._abandon(f"reply {event.text[:80]!r} to no command; closing")
                return

    def connection_lost(self, exc: Exception | None) -> None:
        if self._error is None:
            self._error = f"qtest connection to {self.path} closed (did QEMU exit?)" + (
                f": {exc}" if exc else ""
            )
        error = QtestClosed(self._error)
        self._fail_waiting(error)
        if not self._closed.done():
            self._closed.set_result(None)
        for callback in list(self.on_lost):
            try:
                callback(error)
            except Exception:
                log.exception("%s: connection-lost callback failed", self.endpoint)

    def _fail_waiting(self, error: Exception) -> None:
        while self._waiting:
            future = self._waiting.popleft()
            if not future.done():
                future.set_exception(error)
                future.exception()  # an abandoned (cancelled) command never retrieves it

    def _abandon(self, reason: str) -> None:
        """The stream is out of step or not qtest: fail everything and drop the connection."""
        log.error("%s: %s", self.endpoint, reason)
        if self._error is None:
            self._error = f"{self.endpoint}: {reason}"
        self._fail_waiting(QtestClosed(self._error))
        if self.transport is not None:
            self.transport.close()

    # -- commands -----------------------------------------------------------------------------
    async def command(self, line: str) -> QtestReply:
        """Send one command line and return its OK reply; FAIL/ERR raise QtestCommandError."""
        if "\n" in line or not line.isascii():
            raise ValueError(f"qtest command must be one ASCII line: {line!r}")
        async with self._lock:
            if self._error is not None or self.transport is None:
                raise QtestClosed(self._error or f"{self.endpoint} is not connected")
            future: asyncio.Future[QtestReply] = asyncio.get_running_loop().create_future()
            self._waiting.append(future)
            self.transport.write(line.encode("ascii") + b"\n")
            self.commands += 1
            try:
                # Shielded: if the caller is cancelled, the future stays queued and swallows
                # the reply when it comes, so replies and commands stay paired.
                reply = await asyncio.wait_for(asyncio.shield(future), self.timeout)
            except TimeoutError:
                self._abandon(f"no reply to {line[:60]!r} within {self.timeout:g} s")
                raise QtestClosed(self._error) from None
        if not reply.ok:
            raise QtestCommandError(line, reply.text)
        return reply

    async def load(self, addr: int, width: int) -> int:
        """One ``width``-byte little-endian access (readb/w/l/q) at guest-physical ``addr``."""
        suffix = _suffix(width)
        _check_address(addr, width)
        reply = await self.command(f"read{suffix} {addr:#x}")
        return _reply_int(reply) & ((1 << 8 * width) - 1)

    async def store(self, addr: int, width: int, value: int) -> None:
        """One ``width``-byte access (writeb/w/l/q); the value is masked to the width."""
        suffix = _suffix(width)
        _check_address(addr, width)
        await self.command(f"write{suffix} {addr:#x} {value & ((1 << 8 * width) - 1):#x}")

    async def read_memory(self, addr: int, length: int) -> bytes:
        """``length`` bytes at ``addr``, in ``b64read`` commands of at most TRANSFER_CHUNK."""
        _check_address(addr, length)
        out = bytearray()
        for at in range(0, length, TRANSFER_CHUNK):
            n = min(TRANSFER_CHUNK, length - at)
            reply = await self.command(f"b64read {addr + at:#x} {n:#x}")
            words = reply.words
            try:
                data = base64.b64decode(words[1], validate=True) if len(words) == 2 else b""
            except binascii.Error:
                data = b""
            if len(data) != n:
                self._abandon(f"b64read of {n} bytes returned {len(data)}")
                raise QtestClosed(self._error)
            out += data
        return bytes(out)

    async def write_memory(self, addr: int, data: bytes) -> None:
        """Write ``data`` at ``addr``: ``memset`` for a long zero run, else ``b64write`` chunks."""
        _check_address(addr, len(data))
        if len(data) >= ZERO_FILL_MIN and data.count(0) == len(data):
            await self.command(f"memset {addr:#x} {len(data):#x} 0")
            return
        view = memoryview(data)
        for at in range(0, len(data), TRANSFER_CHUNK):
            chunk = view[at : at + TRANSFER_CHUNK]
            encoded = base64.b64encode(chunk).decode("ascii")
            await self.command(f"b64write {addr + at:#x} {len(chunk):#x} {encoded}")

    # -- the RegisterBus ----------------------------------------------------------------------
    async def mmio_read(self, addr: int, width: int) -> int:
        return await self.load(addr, width)

    async def mmio_write(self, addr: int, width: int, value: int, *, posted: bool = True) -> None:
        """qtest has no posted writes: every write is answered, and awaited, in order."""
        await self.store(addr, width, value)

    def set_irq_handler(self, irq: int, handler: Callable[[bool], None] | None) -> None:
        """Route ``IRQ raise/lower irq`` to ``handler(level)``; a line already high is replayed
        (the line is level-triggered, and a handler that joins late must still see it)."""
        if handler is None:
            self._irq_handlers.pop(irq, None)
            return
        self._irq_handlers[irq] = handler
        if self.irq_levels.get(irq):
            asyncio.get_running_loop().call_soon(self._replay_irq, irq, handler)

    def _replay_irq(self, irq: int, handler: Callable[[bool], None]) -> None:
        if self._irq_handlers.get(irq) is handler and self.irq_levels.get(irq):
            self._call_irq_handler(irq, handler, True)

    def _on_irq(self, event: QtestIrq) -> None:
        self.irq_levels[event.irq] = event.level
        handler = self._irq_handlers.get(event.irq)
        if handler is not None:
            self._call_irq_handler(event.irq, handler, event.level)

    def _call_irq_handler(self, irq: int, handler: Callable[[bool], None], level: bool) -> None:
        try:
            handler(level)
        except Exception:
            log.exception("%s: handler of IRQ %d failed", self.endpoint, irq)

    # -- lifecycle ----------------------------------------------------------------------------
    async def close(self) -> None:
        """Close the socket (QEMU keeps running) and wait, bounded, until it is closed."""
        if self.transport is not None and not self.closed:
            if self._error is None:
                self._error = f"{self.endpoint} was closed by this client"
            self.transport.close()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closed), CONNECT_TIMEOUT)


def _suffix(width: int) -> str:
    try:
        return _WIDTH_SUFFIX[width]
    except KeyError:
        raise ValueError(f"access width {width}: qtest accesses are 1, 2, 4 or 8 bytes") from None


def _check_address(addr: int, length: int) -> None:
    # QEMU asserts on what it cannot parse: refuse it here rather than kill the machine.
    if addr < 0 or length < 0 or addr + length > 1 << 64:
        raise ValueError(f"guest-physical range {addr:#x}+{length:#x} is not in 64-bit space")


def _reply_int(reply: QtestReply) -> int:
    words = reply.words
    try:
        return int(words[1], 16)
    except (IndexError, ValueError):
        raise QtestProtocolError(f"expected 'OK 0x<value>', got {reply.text!r}") from None


# -- guest RAM ------------------------------------------------------------------------------------


class QtestMemory(GuestMemory):
    """Guest RAM inside QEMU, reached through qtest: only the registered window, bounds-checked.

    Ring indices go through ``readw``/``writew`` (one 16-bit access); QEMU runs its devices and
    qtest on one thread, so every command is atomic with respect to the device.
    """

    def __init__(self, bus: QtestBus, regions: Iterable[Region]) -> None:
        self.bus = bus
        self._regions = list(regions)

    @property
    def regions(self) -> Sequence[Region]:
        return self._regions

    async def readv(self, ranges: Sequence[tuple[int, int]]) -> list[bytes]:
        for gpa, length in ranges:
            self.check(gpa, length)
        return [
            await self.bus.read_memory(gpa, length) if length else b"" for gpa, length in ranges
        ]

    async def writev(self, segments: Sequence[tuple[int, bytes]]) -> None:
        # Check every segment before writing any, so a bad list writes nothing.
        for gpa, data in segments:
            self.check(gpa, len(data))
        for gpa, data in segments:
            if data:
                await self.bus.write_memory(gpa, bytes(data))

    async def read_u16(self, gpa: int) -> int:
        self.check(gpa, 2)
        return await self.bus.load(gpa, 2)

    async def write_u16(self, gpa: int, value: int) -> None:
        self.check(gpa, 2)
        await self.bus.store(gpa, 2, value)


class QtestRAM:
    """The window of QEMU's guest RAM that this client allocates rings and buffers from.

    The counterpart of :class:`~viowire.client.guest.GuestRAM` (``memory``, ``alloc``, ``free``),
    except that the bytes live in QEMU. ``alloc`` does not zero (zeroing is a round trip, and
    ``alloc`` is synchronous): ``Virtqueue.create`` zeroes its rings, and the drivers write every
    byte the device reads. Use :meth:`alloc_zeroed` where a zeroed block is needed.
    """

    backing = "qtest"

    def __init__(self, bus: QtestBus, base: int, size: int) -> None:
        if base < 0 or size <= 0 or base % PAGE_SIZE or size % PAGE_SIZE:
            raise ValueError(
                f"guest RAM window {base:#x}+{size:#x}: base and size must be positive "
                f"multiples of {PAGE_SIZE} bytes"
            )
        self.base = base
        self.size = size
        self.memory = QtestMemory(bus, [Region(base, size)])
        self.allocator = RangeAllocator(base, size)

    def alloc(self, size: int, align: int = 16) -> int:
        """Guest-physical address of ``size`` bytes aligned to ``align`` (contents undefined)."""
        return self.allocator.alloc(size, align)

    async def alloc_zeroed(self, size: int, align: int = 16) -> int:
        gpa = self.allocator.alloc(size, align)
        try:
            await self.memory.write(gpa, bytes(size))
        except BaseException:
            self.allocator.free(gpa)
            raise
        return gpa

    def free(self, gpa: int) -> None:
        self.allocator.free(gpa)

    @property
    def free_bytes(self) -> int:
        return self.allocator.free_bytes

    def close(self) -> None:
        """Nothing to release here: the memory is QEMU's."""


# -- the connection -------------------------------------------------------------------------------


class SlotDeclaration(Protocol):
    """A declared device window (``viowire.declarations.Declaration`` has this shape)."""

    base: int
    size: int
    irq: int


Slot = tuple[int, int, int] | SlotDeclaration


def slot_of(declaration: Slot | Sequence[int]) -> tuple[int, int, int]:
    """``(base, size, irq)`` from a tuple (a 4th element, the id, is ignored) or a declaration."""
    if isinstance(declaration, tuple | list):
        if len(declaration) not in (3, 4):
            raise ValueError(f"device declaration {declaration!r}: expected (base, size, irq)")
        base, size, irq = (int(v) for v in declaration[:3])
    else:
        base, size, irq = int(declaration.base), int(declaration.size), int(declaration.irq)
    if base < 0 or size < 0x100 or irq < 0:
        raise ValueError(
            f"device declaration {base:#x}+{size:#x} irq {irq}: the window needs at least the "
            "0x100 bytes of registers, and base and irq must not be negative"
        )
    return base, size, irq


@dataclass(frozen=True)
class DeclaredWindow:
    base: int
    size: int
    irq: int


class QtestConnection:
    """QEMU's machine as the client sees a viowire server: a platform, a bus and guest RAM.

    The same surface as :class:`~viowire.client.connection.Connection`: ``platform()``,
    ``attach()``, ``close()``, ``async with``, the RegisterBus methods, ``ram`` and
    ``memory_mode`` (``"qtest"``). Make one with :func:`connect_qtest`.
    """

    memory_mode = "qtest"

    def __init__(self, bus: QtestBus, slots: Iterable[Slot], ram: QtestRAM) -> None:
        self.bus = bus
        self.endpoint = bus.endpoint
        self.slots = [slot_of(s) for s in slots]
        self.ram: QtestRAM | None = ram
        self.session_id = 0
        self.features = 0
        self.server_name = "QEMU (qtest)"
        self.same_host = True  # a Unix socket: QEMU runs on this host
        self.posted_errors: list[Exception] = []  # never filled: qtest writes are all answered
        self._devices: weakref.WeakSet[VirtioMmioDevice] = weakref.WeakSet()
        self._aborts: list[asyncio.Task[None]] = []
        bus.on_lost.append(self._abort_devices)

    def __repr__(self) -> str:
        return f"<QtestConnection {self.endpoint} {len(self.slots)} slots>"

    @property
    def closed(self) -> bool:
        return self.bus.closed

    def _abort_devices(self, error: Exception) -> None:
        """QEMU is gone: requests waiting for a used buffer would wait forever; fail them."""
        loop = asyncio.get_running_loop()
        self._aborts = [loop.create_task(dev.abort(error)) for dev in list(self._devices)]

    # RegisterBus, so that code written against a Connection can read registers directly.
    async def mmio_read(self, addr: int, width: int) -> int:
        return await self.bus.mmio_read(addr, width)

    async def mmio_write(self, addr: int, width: int, value: int, *, posted: bool = True) -> None:
        await self.bus.mmio_write(addr, width, value, posted=posted)

    def set_irq_handler(self, irq: int, handler: Callable[[bool], None] | None) -> None:
        self.bus.set_irq_handler(irq, handler)

    async def platform(self) -> list[DeviceInfo]:
        """The declared slots that hold a device, identified by reading their registers.

        Like Linux's probe: a slot whose MagicValue is not "virt" or whose Version is not 1 or 2
        is reported in the log and left out; DeviceID 0 (an empty slot) is left out silently.
        """
        windows = [DeclaredWindow(*slot) for slot in self.slots]
        return await discover(self.bus, windows, str(self.endpoint))

    async def attach(self, info: DeviceInfo, *, bus: object = None) -> VirtioMmioDevice:
        """A virtio-mmio transport for ``info`` over qtest, with this connection's guest RAM.

        ``bus`` wraps this connection's bus (a TracingBus, say) and must forward to it.
        """
        if self.ram is None:
            raise QtestClosed(f"{self.endpoint} is closed")
        dev = VirtioMmioDevice(
            bus or self.bus, info.base, info.irq, self.ram.memory, self.ram, size=info.size
        )
        self._devices.add(dev)
        return dev

    async def close(self) -> None:
        """Disconnect; QEMU keeps running (whoever started it stops it)."""
        await self.bus.close()
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    async def __aenter__(self) -> QtestConnection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


def parse_qtest_url(url: str) -> str:
    """The socket path of ``qtest+unix:///PATH``."""
    parts = urlsplit(url)
    path = parts.netloc + parts.path
    if parts.scheme != "qtest+unix" or not path:
        raise ValueError(
            f"{url!r}: a QEMU qtest socket is addressed as qtest+unix:///PATH (start QEMU with "
            "-qtest unix:PATH,server=on,wait=off)"
        )
    return path


async def connect_qtest(
    url: str,
    devices: Iterable[Slot] | None = None,
    *,
    ram_base: int = QTEST_RAM_BASE,
    ram_size: int = QTEST_RAM_SIZE,
    irq_intercept: str | None = "ioapic",
    timeout: float = COMMAND_TIMEOUT,
    connect_timeout: float = CONNECT_TIMEOUT,
) -> QtestConnection:
    """Connect to QEMU's qtest socket and become its guest.

    ``devices``: the virtio-mmio windows as ``(base, size, irq)`` (or declarations with those
    attributes); the default is QEMU microvm's eight slots. ``ram_base``/``ram_size``: the part
    of the machine's RAM that rings and buffers are allocated from (it must exist: QEMU's `-m`).
    ``irq_intercept``: the QOM path whose input lines become ``IRQ`` events (x86: ``ioapic``;
    None to leave interrupts alone). ``timeout`` bounds each command; ``connect_timeout`` bounds
    the wait for a QEMU that is still starting (its socket not there, or not listening yet).
    """
    path = parse_qtest_url(url)
    slots = list(QEMU_MICROVM_SLOTS if devices is None else devices)
    if irq_intercept is not None and (
        not irq_intercept or not irq_intercept.isprintable() or " " in irq_intercept
    ):
        raise ValueError(f"irq_intercept {irq_intercept!r} must be one QOM path")
    bus = QtestBus(path, timeout=timeout)
    await _open(bus, connect_timeout)
    try:
        reply = await bus.command("endianness")
        if reply.words[1:] != ["little"]:
            raise QtestError(
                f"{url}: the target is {' '.join(reply.words[1:]) or 'of unknown endianness'}; "
                "viowire's rings are little-endian, so it drives little-endian targets only"
            )
        if irq_intercept is not None:
            await bus.command(f"irq_intercept_in {irq_intercept}")
        return QtestConnection(bus, slots, QtestRAM(bus, ram_base, ram_size))
    except BaseException:
        await bus.close()
        raise


async def _open(bus: QtestBus, connect_timeout: float) -> None:
    """Connect, retrying while QEMU starts: with server=on it binds the socket (the file appears)
    a moment before it listens, and a connection in between is refused."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + connect_timeout
    while True:
        try:
            await asyncio.wait_for(
                loop.create_unix_connection(lambda: bus, bus.path), connect_timeout
            )
            return
        except (ConnectionRefusedError, FileNotFoundError) as exc:
            if loop.time() >= deadline:
                raise QtestClosed(
                    f"nothing accepts connections on {bus.path} after {connect_timeout:g} s "
                    f"({exc.strerror}); is QEMU running with "
                    f"-qtest unix:{bus.path},server=on,wait=off?"
                ) from exc
            await asyncio.sleep(0.01)
