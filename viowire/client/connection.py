"""The client end of a session: the guest's bus to the server's device windows.

:func:`connect` does the handshake, picks the memory mode, registers guest RAM and returns a
:class:`Connection`. The connection is the ``RegisterBus`` the virtio-mmio transport talks to:
MMIO reads are request/response, MMIO writes are posted by default (no round trip, order kept),
interrupts arrive as IRQ line events, and in proxied mode the server's guest-memory requests are
answered here from the guest RAM this process owns.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import weakref
from collections.abc import Callable
from dataclasses import dataclass

from viowire import tls
from viowire.auth import AuthError, ClientCredentials
from viowire.awaited import AwaitedRequests
from viowire.client.guest import DEFAULT_RAM_BASE, DEFAULT_RAM_SIZE, GuestRAM
from viowire.client.mmio import VirtioMmioDevice
from viowire.client.notify import DriverChannel
from viowire.fdsocket import FdSocketTransport
from viowire.protocol import messages as m
from viowire.protocol.codec import (
    DecodeError,
    body_fields,
    decode_body,
    encode,
    frame_packer,
    named,
    pack_mem_read_reply,
    unpack_mem_read,
    unpack_mem_write,
)
from viowire.protocol.events import Answer, Closing, Request
from viowire.protocol.events import Event as SessionEvent
from viowire.protocol.framing import Frame
from viowire.protocol.handshake import ClientHandshake, HandshakeError, Negotiated
from viowire.protocol.hostid import host_id
from viowire.protocol.outstanding import Outstanding
from viowire.protocol.requests import client_ids
from viowire.protocol.session import BrokenStream, SessionCore
from viowire.samehost import read_proof, segment_prefix
from viowire.trace import recorder as wiretrace
from viowire.trace.format import End, Event
from viowire.urls import Endpoint, parse_endpoint
from viowire.virtio.constants import device_name
from viowire.virtio.memory import GuestMemoryError

log = logging.getLogger("viowire.client")

CLIENT_FEATURES = (
    m.ProtoFeature.POSTED_WRITES
    | m.ProtoFeature.MEMORY_PROXIED
    | m.ProtoFeature.MEMORY_MEMFD
    | m.ProtoFeature.MEMORY_SHM
    | m.ProtoFeature.IRQ_STATUS
    | m.ProtoFeature.NOTIFY_CHANNEL
    | m.ProtoFeature.FD_SIDECAR
)
REQUEST_TIMEOUT = 30.0
NOTIFY_CHANNELS = 64  # devices of a connection that get a notification channel (a descriptor each)
LAZY_ACK_DELAY = 0.001  # an InterruptACK nobody is waiting for rides with the next frame, or this
# Plain ints for the per-frame tests: IntFlag arithmetic costs a microsecond each.
_REPLY, _POSTED = int(m.Flags.REPLY), int(m.Flags.POSTED)
_ERROR = int(m.MsgType.ERROR)
_POSTED_WRITES, _IRQ_STATUS = int(m.ProtoFeature.POSTED_WRITES), int(m.ProtoFeature.IRQ_STATUS)
_NOTIFY_CHANNEL = int(m.ProtoFeature.NOTIFY_CHANNEL)
_FD_SIDECAR = int(m.ProtoFeature.FD_SIDECAR)
_IRQ, _MEM_READ = int(m.MsgType.IRQ), int(m.MsgType.MEM_READ)
_MEM_REQUESTS = (_MEM_READ, int(m.MsgType.MEM_WRITE))
MEMORY_MODES = ("auto", "shared", "proxied")
# Register accesses skip the message objects (the same bytes; tests/test_codec.py checks).
_READ_REPLY = int(m.MsgType.MMIO_READ_REPLY)
_READ_FRAME = named(frame_packer(m.MsgType.MMIO_READ), ("addr", "width"))
_WRITE_FRAME = named(frame_packer(m.MsgType.MMIO_WRITE), ("addr", "width", "value"))
_READ_REPLY_FIELDS = named(body_fields(m.MsgType.MMIO_READ_REPLY), ("value",))


class _Label(str):
    """A request's label that is also a mark: an MMIO_READ of :meth:`Connection.mmio_read`,
    whose future takes the bare value (``request(MmioRead(...))`` gets the message)."""


_MMIO_READ = _Label("MmioRead")


class ProtocolError(Exception):
    """The server answered a request with ERROR; ``code`` is an ErrorCode."""

    def __init__(self, code: int, message: str) -> None:
        try:
            name = m.ErrorCode(code).name
        except ValueError:
            name = f"error {code}"
        super().__init__(f"{name}: {message}")
        self.code = code


class ConnectionClosed(ConnectionError):
    """The session ended; reconnect to go on."""


@dataclass(frozen=True)
class DeviceInfo:
    """One entry of the platform table the server sends (a static platform device)."""

    base: int
    size: int
    irq: int
    version: int
    device_id: int
    vendor_id: int

    @property
    def name(self) -> str:
        return device_name(self.device_id)


def _decode_reply(frame: Frame) -> object:
    try:
        return decode_body(frame.type, frame.body)
    except DecodeError as exc:
        return m.Error(code=exc.code, message=f"undecodable reply: {exc}")


class Connection(asyncio.Protocol):
    """A session with a viowire server; use :func:`connect` to make one."""

    def __init__(self, endpoint: Endpoint) -> None:
        self.endpoint = endpoint
        self.transport: asyncio.Transport | None = None
        self.session_id = 0
        self.features = 0
        self.server_name = ""
        self.same_host = False
        self.memory_mode = ""
        self.ram: GuestRAM | None = None
        self.posted_errors: list[ProtocolError] = []
        # Cached: in Python 3.11 each get_running_loop() is a getpid() system call.
        self._loop = asyncio.get_running_loop()
        # Requests awaiting replies, at most the session's max_inflight (HELLO sets it); more
        # wait. Each has a future; one timer fails those past REQUEST_TIMEOUT.
        table: Outstanding = Outstanding(client_ids(), m.DEFAULT_MAX_INFLIGHT, REQUEST_TIMEOUT)
        self.outstanding = AwaitedRequests(self._loop, table, self._timed_out)
        self.core = SessionCore(table)  # what the server's bytes are: answers, requests, events
        self._new_id = table.ids.next  # the id of a posted request: no reply is awaited
        self._irq_handlers: dict[int, Callable[[bool], None]] = {}
        self._devices: weakref.WeakSet = weakref.WeakSet()
        self._out: list[bytes] = []
        self._flush_pending = False
        self._lazy_acks: dict[int, int] = {}  # InterruptACK address -> bits, not yet sent
        self._lazy_timer: asyncio.TimerHandle | None = None
        self.notify_channels = NOTIFY_CHANNELS
        self._channels: set[DriverChannel] = set()
        self._tasks: set[asyncio.Task] = set()  # background work of our own, kept referenced
        self._taking_back: dict[int, asyncio.Task] = {}  # device base -> its channel take-back
        self._sidecar: socket.socket | None = None  # FD_SIDECAR: where descriptors go
        self.trace: wiretrace.Stream | None = None  # --trace: what this connection carries
        if (recorder := wiretrace.active()) is not None:
            self.trace = recorder.stream(End.CLIENT, peer=str(endpoint))
        self._closed = self._loop.create_future()
        self._can_write = asyncio.Event()
        self._can_write.set()

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        if self.trace is not None:
            self.trace.received(data)
        try:
            events = self.core.receive_data(data)
        except BrokenStream as exc:
            log.error("server sent a malformed frame (%s); closing", exc)
            self.transport.close()
            return
        for event in events:
            if event.__class__ is Answer:  # the register read's path: one call less
                self._complete(event.frame, event.what)
            else:
                self._dispatch(event)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.trace is not None:
            self.trace.closed()
        error = ConnectionClosed(
            f"connection to {self.endpoint} closed" + (f": {exc}" if exc else "")
        )
        self.outstanding.close(error)
        if not self._closed.done():
            self._closed.set_result(None)
        self._can_write.set()
        self._close_channels()
        self._close_sidecar()
        # Requests waiting for a used buffer would wait forever: fail them, as a surprise
        # removal does in Linux.
        loop = asyncio.get_running_loop()
        self._aborts = [loop.create_task(dev.abort(error)) for dev in list(self._devices)]

    def pause_writing(self) -> None:
        self._can_write.clear()

    def resume_writing(self) -> None:
        self._can_write.set()

    @property
    def closed(self) -> bool:
        return self._closed.done()

    @property
    def max_inflight(self) -> int:
        """Requests that may await replies at once (as HELLO settled it); more wait."""
        return self.outstanding.table.window

    # -- requests ------------------------------------------------------------------------------
    def _send(self, msg: object, request_id: int = 0, flags: int = 0, fds: list[int] | None = None):
        """Queue a frame; frames leave in order, gathered into one write per loop turn (one
        send() for a burst of posted writes and notifies instead of one each)."""
        if self.closed:
            raise ConnectionClosed(f"connection to {self.endpoint} is closed")
        frame = encode(msg, request_id, flags)
        if fds:
            self._flush()
            if self.trace is not None:
                self.trace.sent(frame)
            self.transport.write_with_fds(frame, fds)
            return
        self._queue(frame)

    def _queue(self, frame: bytes) -> None:
        self._out.append(frame)
        if not self._flush_pending:
            self._flush_pending = True
            self._loop.call_soon(self._flush)

    def _queue_awaited(self, frame: bytes) -> None:
        """A request its sender waits on: it leaves now when nothing is queued before it (a
        loop turn sooner); frames queued after it in this turn still leave together."""
        if self._out or self._flush_pending or self._lazy_acks:
            self._queue(frame)
            return
        if self.trace is not None:
            self.trace.sent(frame)
        self.transport.write(frame)
        self._flush_pending = True  # gather what this turn queues after it
        self._loop.call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._lazy_acks:
            self._take_lazy_acks()
        if self._out and not self.closed:
            out, self._out = self._out, []
            data = b"".join(out) if len(out) > 1 else out[0]
            if self.trace is not None:
                self.trace.sent(data)
            self.transport.write(data)

    def ack_later(self, addr: int, bits: int) -> None:
        """Post an InterruptACK of ``bits`` at ``addr`` with the next frame that leaves, or
        within LAZY_ACK_DELAY: for interrupts whose delivery does not wait on the ACK (a
        notification channel's), so it costs the server no wake-up of its own."""
        self._lazy_acks[addr] = self._lazy_acks.get(addr, 0) | bits
        if self._lazy_timer is None:
            self._lazy_timer = self._loop.call_later(LAZY_ACK_DELAY, self._flush)

    def _take_lazy_acks(self) -> None:
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        acks, self._lazy_acks = self._lazy_acks, {}
        if self.closed or not self.features & _POSTED_WRITES:
            return
        for addr, bits in acks.items():
            self._out.append(_WRITE_FRAME(self._new_id(), _POSTED, addr, 4, bits))

    async def request(self, msg: object, *, fds: list[int] | None = None) -> object:
        """Send a request and await its reply; an ERROR reply raises :class:`ProtocolError`."""
        if self.closed:
            raise ConnectionClosed(f"connection to {self.endpoint} is closed")
        label = type(msg).__name__
        request_id, future = self.outstanding.open_now(label) or await self.outstanding.open(label)
        try:
            if fds and self._sidecar is not None:
                await self._send_on_sidecar(encode(msg, request_id, 0), fds)
            else:
                self._send(msg, request_id, 0, fds)
            return await future
        finally:
            self.outstanding.release(request_id)

    def _timed_out(self, label: str) -> Exception:
        return ConnectionClosed(
            f"{self.endpoint} did not answer {label} within {REQUEST_TIMEOUT} s"
        )

    async def _send_on_sidecar(self, frame: bytes, fds: list[int]) -> None:
        """One packet with its descriptors. The reply comes on the connection, whose earlier
        frames go first (the server applies the two in any order)."""
        self._flush()
        if self.trace is not None:
            self.trace.record(Event.SIDECAR_SENT, frame)
        sidecar = self._sidecar
        while True:
            try:
                socket.send_fds(sidecar, [frame], fds)
                return
            except BlockingIOError:
                writable = self._loop.create_future()
                self._loop.add_writer(sidecar.fileno(), writable.set_result, None)
                try:
                    await asyncio.wait_for(writable, REQUEST_TIMEOUT)
                finally:
                    self._loop.remove_writer(sidecar.fileno())

    def _close_sidecar(self) -> None:
        if self._sidecar is not None:
            self._sidecar.close()
            self._sidecar = None

    def _dispatch(self, event: SessionEvent) -> None:
        kind = event.__class__
        if kind is Answer:
            self._complete(event.frame, event.what)
            return
        frame = event.frame
        if kind is Request:
            if frame.type == _IRQ:
                self._on_irq(frame)
            elif frame.type in _MEM_REQUESTS:
                self._serve_memory(frame)
            else:
                log.warning("server sent unexpected message type %#x", frame.type)
        elif kind is Closing:
            # The server closes now: every request waiting learns why, not just that the
            # connection closed.
            error = self._posted_error(frame)
            if error is not None:
                self.outstanding.fail(event.failed, error)
        elif frame.type == _ERROR:  # a posted write failed (or its request gave up waiting)
            self._posted_error(frame)
        else:  # an answer to nothing awaited: dropped, never answered
            log.debug("%s: reply %#x to nothing awaited dropped", self.endpoint, frame.request_id)

    def _complete(self, frame: Frame, what: tuple[str, asyncio.Future]) -> None:
        label, future = what
        if frame.type == _READ_REPLY and label is _MMIO_READ:
            try:
                (value,) = _READ_REPLY_FIELDS(frame.body)
            except struct.error:
                pass  # the general path names what is wrong with it
            else:
                if not future.done():
                    future.set_result(value)
                return
        msg = _decode_reply(frame)
        if future.done():  # its sender stopped waiting
            if isinstance(msg, m.Error):
                self._posted_error(frame)
        elif isinstance(msg, m.Error):
            future.set_exception(ProtocolError(msg.code, msg.message))
        else:
            future.set_result(msg)

    def _posted_error(self, frame: Frame) -> ProtocolError | None:
        """An ERROR nobody awaits: logged, and kept in ``posted_errors``."""
        msg = _decode_reply(frame)
        if not isinstance(msg, m.Error):
            return None
        error = ProtocolError(msg.code, msg.message)
        log.warning("%s: %s", self.endpoint, error)
        self.posted_errors.append(error)
        return error

    def _on_irq(self, frame: Frame) -> None:
        msg = decode_body(frame.type, frame.body)
        handler = self._irq_handlers.get(msg.irq)
        if handler is None:
            return
        if self.features & _IRQ_STATUS and getattr(handler, "takes_status", False):
            handler(bool(msg.level), msg.status)
        else:
            handler(bool(msg.level))

    def _serve_memory(self, frame: Frame) -> None:
        """Proxied mode: the device reads or writes guest RAM through us."""
        try:
            memory = self.ram.memory
            if frame.type == _MEM_READ:
                ranges = unpack_mem_read(frame.body)
                data = b"".join([memory.read_sync(gpa, length) for gpa, length in ranges])
                self._queue(pack_mem_read_reply(data, frame.request_id, _REPLY))
                return
            self._write_ranges(*unpack_mem_write(frame.body))
            if not frame.flags & _POSTED:
                self._send(m.Ok(), frame.request_id, _REPLY)
        except (DecodeError, GuestMemoryError, AttributeError, ValueError) as exc:
            log.warning("refused a guest-memory request from the server: %s", exc)
            code = m.ErrorCode.MEMORY_FAULT
            self._send(m.Error(code=code, message=str(exc)), frame.request_id, _REPLY)

    def _write_ranges(self, ranges: list[tuple[int, int]], data: memoryview) -> None:
        memory = self.ram.memory
        if sum(length for _, length in ranges) != len(data):
            raise ValueError("MEM_WRITE data length does not match its ranges")
        for gpa, length in ranges:  # all checked before any is written
            memory.check(gpa, length)
        pos = 0
        for gpa, length in ranges:
            memory.write_sync(gpa, data[pos : pos + length])
            pos += length

    # -- the RegisterBus -----------------------------------------------------------------------
    async def mmio_read(self, addr: int, width: int) -> int:
        if self.closed:
            raise ConnectionClosed(f"connection to {self.endpoint} is closed")
        outstanding = self.outstanding
        request_id, future = outstanding.open_now(_MMIO_READ) or await outstanding.open(_MMIO_READ)
        try:
            self._queue_awaited(_READ_FRAME(request_id, 0, addr, width))
            value = await future
        finally:
            outstanding.release(request_id)
        if type(value) is not int:
            raise ProtocolError(m.ErrorCode.BAD_MESSAGE, f"MMIO_READ answered with {value}")
        return value

    async def mmio_write(self, addr: int, width: int, value: int, *, posted: bool = True) -> None:
        if posted and self.features & _POSTED_WRITES:
            if not self._can_write.is_set():
                await self._can_write.wait()
            if self.closed:
                raise ConnectionClosed(f"connection to {self.endpoint} is closed")
            self._queue(_WRITE_FRAME(self._new_id(), _POSTED, addr, width, value))
        else:
            await self.request(m.MmioWrite(addr=addr, width=width, value=value))

    def set_irq_handler(self, irq: int, handler: Callable[[bool], None] | None) -> None:
        if handler is None:
            self._irq_handlers.pop(irq, None)
        else:
            self._irq_handlers[irq] = handler

    # -- notification channels -----------------------------------------------------------------
    def can_notify_on_channel(self) -> bool:
        """Whether a device of this session may still get a notification channel."""
        return (
            bool(self.features & _NOTIFY_CHANNEL)
            and bool(self.features & _IRQ_STATUS)
            and self.memory_mode == "shared"
            and len(self._channels) < self.notify_channels
            and not self.closed
        )

    async def open_notify_channel(self, base: int) -> DriverChannel | None:
        """A notification channel for the device window at ``base``, or None where this session
        cannot have one (see :meth:`can_notify_on_channel`, or the server refused it)."""
        if not self.can_notify_on_channel():
            return None
        if (taking_back := self._taking_back.get(base)) is not None:
            # A detach names the device, and sidecar and connection are read apart: let an
            # earlier channel's take-back finish, or it could detach this one.
            await asyncio.shield(taking_back)
        try:
            channel = DriverChannel(self._loop)
        except OSError as exc:  # out of descriptors: this device notifies on the connection
            log.info("%s: no notification channel for %#x (%s)", self.endpoint, base, exc)
            self.notify_channels = len(self._channels)
            return None
        self._channels.add(channel)
        attach = self._loop.create_task(
            self.request(m.NotifyChannel(base=base, attach=1), fds=[channel.peer.fileno()])
        )
        try:
            await asyncio.shield(attach)
        except asyncio.CancelledError:
            # The server may attach it yet: once it has answered, take it back (from a task:
            # we are cancelled), or the device would notify a socket nobody reads. Not before:
            # the sidecar and the connection are read apart, a detach could pass the attach.
            task = self._background(self._take_back(base, channel, attach))
            self._taking_back[base] = task
            task.add_done_callback(lambda _t: self._taking_back.pop(base, None))
            raise
        except ProtocolError as exc:
            log.info(
                "%s: no notification channel for %#x (%s); notifying on the connection",
                self.endpoint,
                base,
                exc,
            )
            self._forget_channel(channel)
            self.notify_channels = len(self._channels)  # the server has had enough of them
            return None
        except BaseException:
            self._forget_channel(channel)
            raise
        channel.release_peer()
        return channel

    async def close_notify_channel(self, base: int, channel: DriverChannel) -> None:
        """Detach and close ``channel``; the device notifies on the connection again."""
        self._forget_channel(channel)
        if not self.closed:
            with contextlib.suppress(ProtocolError, ConnectionClosed):
                await self.request(m.NotifyChannel(base=base, attach=0))

    async def _take_back(self, base: int, channel: DriverChannel, attach: asyncio.Task) -> None:
        with contextlib.suppress(Exception):
            await attach
        await self.close_notify_channel(base, channel)

    def _background(self, coro) -> asyncio.Task:
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def _forget_channel(self, channel: DriverChannel) -> None:
        channel.close()
        self._channels.discard(channel)

    def _close_channels(self) -> None:
        for channel in list(self._channels):
            self._forget_channel(channel)

    # -- platform ------------------------------------------------------------------------------
    async def platform(self) -> list[DeviceInfo]:
        """The server's platform table: one entry per device window."""
        devices: list[DeviceInfo] = []
        while True:  # in pages: a large platform does not fit in one frame
            reply = await self.request(m.PlatformQuery(first=len(devices), max_count=0xFFFFFFFF))
            devices += (DeviceInfo(*entry) for entry in reply.devices)
            if len(devices) >= reply.total or not reply.devices:
                return devices

    async def attach(self, info: DeviceInfo, *, bus: object = None) -> VirtioMmioDevice:
        """A virtio-mmio transport for ``info``, bound to this connection and its guest RAM.

        ``bus`` wraps this connection (a TracingBus, say) and must forward to it.
        """
        dev = VirtioMmioDevice(
            bus or self, info.base, info.irq, self.ram.memory, self.ram, size=info.size
        )
        self._devices.add(dev)
        return dev

    # -- lifecycle -----------------------------------------------------------------------------
    async def close(self) -> None:
        if self.transport is not None and not self.closed:
            self._flush()
            self.transport.close()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._closed), 5)
        self._close_channels()
        self._close_sidecar()
        if self._lazy_timer is not None:
            self._lazy_timer.cancel()
            self._lazy_timer = None
        if self.ram is not None:
            self.ram.close()
            self.ram = None

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def connect(
    url: str,
    *,
    memory: str = "auto",
    ram_size: int = DEFAULT_RAM_SIZE,
    ram_base: int = DEFAULT_RAM_BASE,
    name: str = "viowire-client",
    irq_status: bool = True,
    credentials: ClientCredentials | None = None,
) -> Connection:
    """Connect to a server, shake hands (and authenticate) and register guest RAM.

    ``credentials``: the token and TLS files to prove ourselves with (default: from the
    environment, ``ClientCredentials.from_env``: VIOWIRE_TOKEN, VIOWIRE_TOKEN_FILE,
    VIOWIRE_TLS_CA, VIOWIRE_TLS_CERT, VIOWIRE_TLS_KEY); ``url`` may be ``tls://HOST:PORT``.

    ``irq_status``: take InterruptStatus from the raise frame and post the ACK (fewer round
    trips); off, the line is reported exactly as the register behaves (a conformance judge).

    ``memory``: ``shared`` (memfd over a Unix socket, a named segment to a same-host TCP peer),
    ``proxied`` (the server reaches guest RAM through this connection), or ``auto`` (shared where
    the server can map it, else proxied).
    """
    if memory not in MEMORY_MODES:
        raise ValueError(f"memory mode {memory!r}: use one of {', '.join(MEMORY_MODES)}")
    endpoint = parse_endpoint(url, tls=True)
    features = CLIENT_FEATURES if irq_status else CLIENT_FEATURES & ~m.ProtoFeature.IRQ_STATUS
    if credentials is None:
        credentials = ClientCredentials.from_env()
    conn = await _open(endpoint, _hello(name, features), credentials, memory != "proxied")
    try:
        await _register_memory(conn, memory, ram_size, ram_base)
    except BaseException:
        await conn.close()
        raise
    return conn


def _hello(name: str, features: int) -> object:
    return m.Hello(
        magic=m.HELLO_MAGIC,
        version=m.PROTOCOL_VERSION,
        reserved=0,
        features=features,
        max_frame=m.DEFAULT_MAX_FRAME,
        max_inflight=m.DEFAULT_MAX_INFLIGHT,
        host_id=host_id(),
        name=name,
    )


async def _open(
    endpoint: Endpoint, hello: object, credentials: ClientCredentials, want_shm: bool
) -> Connection:
    """Connect, shake hands and authenticate; the connection is returned with its session
    established."""
    loop = asyncio.get_running_loop()
    conn = Connection(endpoint)
    if endpoint.inet:
        context = None
        if endpoint.scheme == "tls":
            context = tls.client_context(
                credentials.tls_ca, credentials.tls_cert, credentials.tls_key
            )
        await loop.create_connection(
            lambda: conn,
            endpoint.host,
            endpoint.port,
            ssl=context,
            server_hostname=endpoint.host if context else None,
            ssl_handshake_timeout=REQUEST_TIMEOUT if context else None,
        )
        sock = conn.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        handshake = ClientHandshake(hello, str(endpoint))
        try:
            _accept_hello(conn, handshake, await conn.request(hello))
            await _authenticate(conn, handshake, credentials, want_shm)
        except ConnectionClosed as exc:
            await conn.close()
            if context is not None and not credentials.tls_cert and conn.session_id == 0:
                # TLS 1.3 servers refuse a missing client certificate after the handshake.
                raise ConnectionClosed(
                    f"{exc} (before HELLO_REPLY: if the server requires a client certificate, "
                    "give --tls-cert FILE and --tls-key FILE)"
                ) from None
            raise
        except BaseException:
            await conn.close()
            raise
        return conn
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, endpoint.path)
        handshake = ClientHandshake(hello, str(endpoint))
        await _unix_handshake(conn, sock, handshake)
    except BaseException:
        if conn.transport is None:
            sock.close()
            conn._close_sidecar()
        else:
            await conn.close()
        raise
    try:
        await _authenticate(conn, handshake, credentials, want_shm)
    except BaseException:
        await conn.close()
        raise
    return conn


async def _authenticate(
    conn: Connection, handshake: ClientHandshake, credentials: ClientCredentials, want_shm: bool
) -> None:
    """AUTH, where the server requires a token or offers named memory for a same-host proof;
    then the session is open."""
    name = handshake.shm_proof
    proof = read_proof(name) if want_shm and name else None
    binding = tls.channel_binding(conn.transport)
    request = handshake.auth_request(credentials.token, proof, binding=binding)
    if request is None:
        conn.core.open()
        return
    try:
        answer = await conn.request(request)
    except ProtocolError as exc:
        if exc.code == m.ErrorCode.AUTH_FAILED:
            raise AuthError(f"{conn.endpoint} refused us: {exc}") from None
        raise
    try:
        conn.features = handshake.receive_auth_reply(answer)
    except HandshakeError as exc:
        raise ProtocolError(exc.code, str(exc)) from None
    conn.core.open()


async def _unix_handshake(
    conn: Connection, sock: socket.socket, handshake: ClientHandshake
) -> None:
    """HELLO with a sidecar (FD_SIDECAR): descriptors will ride a SOCK_SEQPACKET socketpair, so
    the stream carries none after HELLO and can use the loop's own transport (uvloop's, in C;
    asyncio transports cannot receive descriptors). A server without the feature gets the
    stream on our descriptor-passing transport instead."""
    loop = asyncio.get_running_loop()
    mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    conn._sidecar = mine
    try:
        request_id, _future = conn.outstanding.open_now("Hello")  # answered right here
        frame = encode(handshake.hello, request_id, 0)
        if conn.trace is not None:
            conn.trace.sent(frame)
        # A fresh socket's buffer takes a small frame whole: this send does not block.
        socket.send_fds(sock, [frame], [theirs.fileno()])
    finally:
        theirs.close()
    try:
        events = await asyncio.wait_for(_first_events(loop, sock, conn), REQUEST_TIMEOUT)
    finally:
        conn.outstanding.release(request_id)
    reply, rest = events[0].frame, events[1:]
    msg = decode_body(reply.type, reply.body)
    if reply.request_id != request_id and not isinstance(msg, m.Error):
        raise ProtocolError(m.ErrorCode.BAD_MESSAGE, f"unexpected reply to HELLO: {msg}")
    _accept_hello(conn, handshake, msg)
    if conn.features & _FD_SIDECAR:
        mine.setblocking(False)
        await loop.create_unix_connection(lambda: conn, sock=sock)
    else:
        conn._close_sidecar()
        FdSocketTransport(loop, sock, conn)
        await asyncio.sleep(0)  # let connection_made run
    for event in rest:
        conn._dispatch(event)


async def _first_events(
    loop: asyncio.AbstractEventLoop, sock: socket.socket, conn: Connection
) -> list:
    while True:
        data = await loop.sock_recv(sock, 65536)
        if not data:
            raise ConnectionClosed("the server closed the connection during HELLO")
        if conn.trace is not None:
            conn.trace.received(data)
        if events := conn.core.receive_data(data):
            return events


def _accept_hello(conn: Connection, handshake: ClientHandshake, reply: object) -> None:
    try:
        negotiated: Negotiated = handshake.receive_hello_reply(reply)
    except HandshakeError as exc:
        raise ProtocolError(exc.code, str(exc)) from None
    conn.core.settle(negotiated)
    conn.session_id = handshake.reply.session_id
    conn.features = negotiated.features
    conn.server_name = handshake.reply.name


async def _register_memory(conn: Connection, mode: str, size: int, base: int) -> None:
    unix = conn.endpoint.scheme == "unix"
    can_memfd = unix and conn.features & m.ProtoFeature.MEMORY_MEMFD
    can_shm = conn.features & m.ProtoFeature.MEMORY_SHM  # granted on proof only
    conn.same_host = bool(unix or can_shm)
    if mode in ("auto", "shared") and (can_memfd or can_shm):
        backing = "memfd" if can_memfd else "shm"
        try:
            await _register_shared(conn, backing, size, base)
            return
        except ProtocolError as exc:
            if mode == "shared":
                raise
            log.info("shared memory refused (%s); falling back to proxied", exc)
    elif mode == "shared":
        raise ProtocolError(
            m.ErrorCode.UNSUPPORTED,
            f"{conn.endpoint} cannot share memory with this process (it is on another host or "
            "the socket cannot pass descriptors); use --memory proxied",
        )
    conn.ram = GuestRAM(size, base, backing="anon")
    await conn.request(
        m.MemRegister(gpa=base, size=size, kind=m.MemoryKind.PROXIED, offset=0, name="")
    )
    conn.memory_mode = "proxied"


async def _register_shared(conn: Connection, backing: str, size: int, base: int) -> None:
    ram = GuestRAM(size, base, backing=backing, shm_prefix=segment_prefix(conn.session_id))
    try:
        if backing == "memfd":
            msg = m.MemRegister(gpa=base, size=size, kind=m.MemoryKind.MEMFD, offset=0, name="")
            await conn.request(msg, fds=[ram.fd])
        else:
            msg = m.MemRegister(
                gpa=base, size=size, kind=m.MemoryKind.SHM, offset=0, name=ram.shm_name
            )
            await conn.request(msg)
            ram.unlink_shm()  # both sides have it mapped; the name is no longer needed
    except BaseException:
        ram.close()
        raise
    conn.ram = ram
    conn.memory_mode = "shared"
