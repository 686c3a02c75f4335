"""One client connection: the sans-IO session core (viowire.protocol.session) and codec driven
by an asyncio.Protocol.

Every session owns its own platform instance (devices, register files) and its own guest memory,
so nothing a client sends can reach another session's devices or memory. Bad input gets an ERROR
reply and one log line; only a frame that breaks the framing itself ends the connection.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import itertools
import logging
import mmap
import os
import socket
import struct
from collections.abc import Callable, Sequence

from viowire.awaited import AwaitedRequests
from viowire.fdsocket import FdSocketTransport, SidecarReader, is_seqpacket_socket
from viowire.protocol import messages as m
from viowire.protocol.codec import (
    DecodeError,
    body_fields,
    decode_body,
    encode,
    frame_packer,
    named,
    pack_mem_read,
    pack_mem_write,
)
from viowire.protocol.events import Answer, Closing, PostedAnswer, Request, Stray
from viowire.protocol.events import Event as SessionEvent
from viowire.protocol.framing import Frame, FrameError, FrameReader
from viowire.protocol.handshake import (
    HandshakeError,
    ServerHandshake,
    ServerState,
    may_prove_same_host,
)
from viowire.protocol.hostid import host_id
from viowire.protocol.outstanding import Outstanding
from viowire.protocol.requests import server_read_ids, server_write_ids
from viowire.protocol.session import BrokenStream, SessionCore
from viowire.samehost import ShmProof, peer_uid, segment_prefix, trusted_uid
from viowire.server.limits import Budget, LimitExceeded, RamAccount
from viowire.server.memory import (
    PROXY_TIMEOUT,
    ProxiedGuestMemory,
    SessionMappings,
    map_fd,
    open_shm,
)
from viowire.server.metrics import SERVER
from viowire.server.notify import ChannelError, NotifyChannel, adopt_socket
from viowire.server.platform import Platform, PlatformSpec, Slot
from viowire.tls import channel_binding
from viowire.trace import recorder as wiretrace
from viowire.trace.format import End, Event
from viowire.virtio.constants import Reg
from viowire.virtio.memory import GuestMemory, GuestMemoryError

log = logging.getLogger("viowire.server")

MMIO_WIDTHS = (1, 2, 4, 8)
HELLO_TIMEOUT = 10.0
MAX_QUEUED_FDS = 8
SLICE_FRAMES = 16  # frames of one session answered before the others get the event loop
SLICES_PER_TURN = 16  # slices of sessions with more to answer, per turn of the event loop
MAX_NOTIFY_CHANNELS = 256  # a descriptor each; past this a device notifies on the connection
SERVER_FEATURES = (
    m.ProtoFeature.POSTED_WRITES
    | m.ProtoFeature.MEMORY_PROXIED
    | m.ProtoFeature.MEMORY_SHM
    | m.ProtoFeature.IRQ_STATUS
)
_KIND_FEATURES = {
    m.MemoryKind.PROXIED: m.ProtoFeature.MEMORY_PROXIED,
    m.MemoryKind.MEMFD: m.ProtoFeature.MEMORY_MEMFD,
    m.MemoryKind.SHM: m.ProtoFeature.MEMORY_SHM,
}
_session_ids = itertools.count(1)
# Plain ints for the per-frame work: IntFlag/IntEnum arithmetic builds a new enum member on
# every `&` (about a microsecond each), and frames carry plain ints anyway.
_REPLY = int(m.Flags.REPLY)
_POSTED = int(m.Flags.POSTED)
_ERROR = int(m.MsgType.ERROR)
_QUEUE_NOTIFY = int(Reg.QUEUE_NOTIFY)
_MEM_READ_REPLY = int(m.MsgType.MEM_READ_REPLY)
_POSTED_WRITES = int(m.ProtoFeature.POSTED_WRITES)
_MEM_READ = "MemRead"  # the label of our MEM_READs
_RANGE_BYTES = 12  # a Range on the wire
_MEM_WRITE_OVERHEAD = m.HEADER_SIZE + 4  # header and range count
_SIDECAR_TYPES = frozenset((int(m.MsgType.MEM_REGISTER), int(m.MsgType.NOTIFY_CHANNEL)))
_WIDTH_MASKS = {width: (1 << 8 * width) - 1 for width in MMIO_WIDTHS}


# Register accesses skip the message objects: fields straight from the body, replies packed
# straight into a frame (the same bytes encode() makes; tests/test_codec.py checks).
_MMIO_READ_FIELDS = named(body_fields(m.MsgType.MMIO_READ), ("addr", "width"))
_MMIO_WRITE_FIELDS = named(body_fields(m.MsgType.MMIO_WRITE), ("addr", "width", "value"))
_READ_REPLY_FRAME = named(frame_packer(m.MsgType.MMIO_READ_REPLY), ("value",))
_OK_FRAME = named(frame_packer(m.MsgType.OK), ())


_TEARDOWNS: set[asyncio.Task] = set()


class ProtocolFault(Exception):
    """A request that gets an ERROR reply; ``code`` is an ErrorCode."""

    def __init__(self, code: m.ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code


class Turns:
    """The sessions of a server that have frames left after a slice, served round-robin: at most
    :data:`SLICES_PER_TURN` slices per turn of the event loop, however many sessions flood. A
    session with little to say is served as its data arrives, so it waits for one short turn at
    most, not for a slice of every flooding session."""

    def __init__(self) -> None:
        self._waiting: collections.deque[ServerSession] = collections.deque()
        self._scheduled = False

    def add(self, session: ServerSession, loop: asyncio.AbstractEventLoop) -> None:
        self._waiting.append(session)
        if not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._turn, loop)

    def _turn(self, loop: asyncio.AbstractEventLoop) -> None:
        self._scheduled = False
        waiting = self._waiting
        for _ in range(min(len(waiting), SLICES_PER_TURN)):
            waiting.popleft()._serve_slice()  # which may add it again, at the end
        if waiting and not self._scheduled:
            self._scheduled = True
            loop.call_soon(self._turn, loop)


class ServerSession(asyncio.Protocol):
    """The server end of one connection."""

    def __init__(
        self,
        spec: PlatformSpec,
        *,
        fd_passing: bool = False,
        allow_shm: bool = True,
        name: str = "viowire",
        poll_us: int = 0,
        token: bytes | None = None,
        budget: Budget | None = None,
        turns: Turns | None = None,
    ) -> None:
        """``token``: the shared secret every client must prove in AUTH before anything else
        (viowire.auth); None lets a client in after HELLO. ``budget``: the server's account of
        its limits (viowire.server.limits), shared by its sessions; default: one of its own.
        ``turns``: the server's round-robin of sessions with frames waiting (:class:`Turns`)."""
        self.session_id = next(_session_ids) | (os.getpid() << 32)
        self.spec = spec
        self.fd_passing = fd_passing
        self.allow_shm = allow_shm
        self.name = name
        self.poll_us = poll_us
        self.transport: asyncio.BaseTransport | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self.platform: Platform | None = None
        self.features = 0
        self.max_frame = m.DEFAULT_MAX_FRAME
        self.max_inflight = m.DEFAULT_MAX_INFLIGHT
        # Our MEM_READs to a proxied client awaiting replies (at most max_inflight; more wait),
        # ids with bit 31 clear; a reply past its timeout fails the read with TimeoutError.
        reads: Outstanding = Outstanding(server_read_ids(), self.max_inflight, PROXY_TIMEOUT)
        self.outstanding = AwaitedRequests(asyncio.get_running_loop(), reads, _timed_out)
        # Posted MEM_WRITEs are not remembered: their ids (bit 31 set) tell an ERROR answering
        # one apart from the rest.
        self._write_ids = server_write_ids()
        self._write_id = self._write_ids.next
        # What the client's bytes are: requests, answers to our MEM_READs and MEM_WRITEs.
        self.core = SessionCore(reads, posted=self._write_ids)
        self.memory: GuestMemory | None = None
        self._mappings = SessionMappings()
        self._proxied: ProxiedGuestMemory | None = None
        self._fds: list[int] = []
        self._channels: dict[int, NotifyChannel] = {}  # device base -> its notification channel
        self._sidecar: SidecarReader | None = None
        self._sidecar_frames = FrameReader()
        self._go_native = False  # after the HELLO reply: move to the loop's own transport
        self._out: list[bytes] = []
        self._writes_ranges: list[tuple[int, int]] = []  # posted MEM_WRITEs being gathered
        self._writes_data: list[bytes] = []
        self._writes_size = 0
        self._flush_pending = False
        self._peer = "?"
        self._closed = False
        self._hello_timer: asyncio.TimerHandle | None = None
        self._backlog: collections.deque[SessionEvent] = collections.deque()  # not acted on yet
        self._slice_scheduled = False
        self._paused: set[str] = set()  # why reading is paused (see _pause)
        self._fatal: BrokenStream | None = None  # answer the backlog, then close with this
        self.token = token
        self.handshake = ServerHandshake(token)
        self._handshaking = True  # until the handshake is OPEN: each request is checked by it
        self._shm_proof: ShmProof | None = None
        self.trace: wiretrace.Stream | None = None  # --trace: what this connection carries
        self.budget = budget or Budget()
        self.turns = turns or Turns()
        self._charged_handshake = False
        self._charged_session = False
        self._charged_devices = 0  # devices taken from the budget
        self._ram = RamAccount(self.budget)  # what its RAM disks have written
        self._mapped = 0  # bytes of shared guest memory mapped

    # -- asyncio.Protocol ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport
        # The same connection, now on the loop's own transport (the session may be open, or wait
        # for AUTH, or have refused it): a second handshake timer would keep the session alive
        # for HELLO_TIMEOUT after the connection is gone.
        if self._loop is not None:
            if self._closed:
                transport.close()
            elif self._paused:
                transport.pause_reading()
            self._flush()
            return
        self._loop = asyncio.get_running_loop()
        peer = transport.get_extra_info("peername")
        self._peer = f"{peer[0]}:{peer[1]}" if isinstance(peer, tuple) else (peer or "unix")
        log.info("session %x: connected from %s", self.session_id, self._peer)
        if (recorder := wiretrace.active()) is not None:
            self.trace = recorder.stream(End.SERVER, self.session_id, self._peer)
        try:
            self.budget.take_handshake()
        except LimitExceeded as exc:
            self._fail_connection(m.ErrorCode.LIMIT_EXCEEDED, str(exc))
            return
        self._charged_handshake = True
        # A peer that never completes the handshake (a port scanner, a half-sent frame, a client
        # without the token) is dropped.
        self._hello_timer = self._loop.call_later(HELLO_TIMEOUT, self._hello_timed_out)

    def _hello_timed_out(self) -> None:
        if self.platform is None and not self._closed:
            what = "AUTH" if self.handshake.awaiting_auth else "HELLO"
            self._fail_connection(
                m.ErrorCode.BAD_STATE, f"no {what} within {HELLO_TIMEOUT:g} s of connecting"
            )

    def fds_received(self, fds: list[int]) -> None:
        """Descriptors from SCM_RIGHTS; each MEM_REGISTER of kind MEMFD takes the oldest."""
        self._fds.extend(fds)
        while len(self._fds) > MAX_QUEUED_FDS:  # a peer sending fds nobody asked for
            os.close(self._fds.pop(0))

    def data_received(self, data: bytes) -> None:
        if self.trace is not None:
            self.trace.received(data)
        self._read_frames(data)
        if len(self._backlog) >= SLICE_FRAMES and self.core.buffered:
            # More than a slice in one read: a pipelining peer. It waits for its turn behind
            # the others (Turns) instead of taking a slice now: when 200 peers start to flood
            # in the same turn of the loop, that turn serves SLICES_PER_TURN slices, not 200.
            self._wait_turn()
            return
        self._schedule_slice()

    def _wait_turn(self) -> None:
        """Stop reading until the frames at hand are answered, a slice a turn (:class:`Turns`);
        while the peer does not read its replies, resume_writing serves them instead."""
        self._pause("backlog")
        if not self._slice_scheduled and "writing" not in self._paused:
            self._slice_scheduled = True
            self.turns.add(self, self._loop)

    def _read_frames(self, data: bytes) -> None:
        """Cut at most a slice's worth of frames into the backlog; the rest of the read waits,
        unparsed, in the reader."""
        if self._fatal is not None:
            return
        try:
            room = max(SLICE_FRAMES - len(self._backlog), 0)
            events = self.core.receive_data(data, room)
        except BrokenStream as exc:
            # The frames complete before the bad header are answered, in order; then it closes.
            SERVER.frames_in += len(exc.events)
            self._backlog.extend(exc.events)
            self._fatal = exc
            self._pause("fatal")
            return
        SERVER.frames_in += len(events)
        self._backlog.extend(events)

    def _schedule_slice(self) -> None:
        # Nothing is answered while the peer does not read its replies: a pipelining peer
        # that never reads costs what it sent before its socket filled, then nothing.
        if not self._slice_scheduled and "writing" not in self._paused:
            self._serve_slice()

    def _serve_slice(self) -> None:
        """Answer at most :data:`SLICE_FRAMES` frames, then let the event loop serve the other
        sessions before the next slice: a peer that pipelines thousands of requests in one read
        delays nobody by more than a slice; the rest waits its turn (:class:`Turns`). Reading
        from this peer stops while frames it sent wait, so what it can make the server hold
        stays bounded."""
        self._slice_scheduled = False
        self._read_frames(b"")
        backlog = self._backlog
        # The replies of a slice leave in one write at its end: no flush callback per frame.
        scheduled, self._flush_pending = self._flush_pending, True
        try:
            while backlog and not self._closed:
                self._dispatch(backlog.popleft())
        finally:
            self._flush_pending = scheduled
        self._flush()
        if self._closed:
            backlog.clear()
            return
        self._read_frames(b"")
        if backlog:
            self._wait_turn()
            return
        if self._fatal is not None:
            self._fail_connection(self._fatal.code, str(self._fatal))
            return
        self._resume("backlog")
        if self._go_native:
            self._switch_to_native()

    def connection_lost(self, exc: Exception | None) -> None:
        self._closed = True
        self._credit_budget()
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        if self.trace is not None:
            self.trace.closed()
        self._drop_shm_proof()
        self.outstanding.close(GuestMemoryError("the client disconnected"))
        self.core.close()
        for fd in self._fds:
            os.close(fd)
        self._fds.clear()
        for base in list(self._channels):
            self._detach_channel(base)
        if self._sidecar is not None:
            self._sidecar.close()
        log.info("session %x: closed", self.session_id)
        # Keep a reference: the loop holds tasks weakly, and an unmapped region must not linger.
        task = asyncio.get_running_loop().create_task(self._teardown())
        _TEARDOWNS.add(task)
        task.add_done_callback(_TEARDOWNS.discard)

    def _credit_budget(self) -> None:
        # At once, not after the teardown: a client that reconnects right away finds the room.
        self._give_handshake()
        if self._charged_session:
            self._charged_session = False
            self.budget.give_session()
        self.budget.give_devices(self._charged_devices)
        self._charged_devices = 0
        self._ram.close()

    def _give_handshake(self) -> None:
        if self._charged_handshake:
            self._charged_handshake = False
            self.budget.give_handshake()

    async def _teardown(self) -> None:
        if self.platform is not None:
            for slot in self.platform.slots:
                slot.device.memory = None
            await self.platform.aclose()
        self._mappings.close()

    def pause_writing(self) -> None:
        # The client is not reading its replies: stop reading its requests until it does.
        self._pause("writing")

    def resume_writing(self) -> None:
        self._resume("writing")
        if self._backlog:
            self._schedule_slice()

    def _pause(self, reason: str) -> None:
        """Stop reading this session's connection and sidecar (the other sessions go on) until
        every reason given is resumed: its write buffer above the high-water mark ("writing"),
        a backlog of frames not answered yet ("backlog"), a framing error ("fatal")."""
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.pause_reading()
            if self._sidecar is not None:
                self._sidecar.pause()
        self._paused.add(reason)

    def _resume(self, reason: str) -> None:
        if reason not in self._paused:
            return
        self._paused.discard(reason)
        if not self._paused and self.transport is not None and not self._closed:
            self.transport.resume_reading()
            if self._sidecar is not None:
                self._sidecar.resume()

    # -- output --------------------------------------------------------------------------------
    def send(self, msg: object, request_id: int = 0, flags: int = 0) -> None:
        """Queue a frame; frames leave in order, gathered into one write per loop turn."""
        if not self._closed:
            self._send_frame(encode(msg, request_id, flags))

    def _send_frame(self, frame: bytes) -> None:
        if self._closed:
            return
        if self._writes_size:
            self._take_writes()  # they were queued before this frame: they leave before it
        self._out.append(frame)
        self._flush_soon()

    def _flush_soon(self) -> None:
        """What is queued leaves at the end of this loop turn, in one write."""
        if not self._flush_pending:
            self._flush_pending = True
            (self._loop or asyncio.get_running_loop()).call_soon(self._flush)

    def _flush(self) -> None:
        self._flush_pending = False
        if self._writes_size and not self._closed:
            self._take_writes()
        if self._out and not self._closed and self.transport is not None:
            out, self._out = self._out, []
            SERVER.frames_out += len(out)
            data = b"".join(out) if len(out) > 1 else out[0]
            if self.trace is not None:
                self.trace.sent(data)
            self.transport.write(data)

    def _reply_error(self, frame: Frame, code: m.ErrorCode, message: str) -> None:
        log.warning("session %x: %s: %s", self.session_id, code.name, message)
        SERVER.error(code)
        self.send(m.Error(code=code, message=message), frame.request_id, _REPLY)

    def _fail_connection(self, code: m.ErrorCode, message: str) -> None:
        log.warning("session %x: %s: %s; closing", self.session_id, code.name, message)
        SERVER.error(code)
        self.send(m.Error(code=code, message=message + "; closing the connection"), 0, 0)
        self._flush()
        if self.transport is not None:  # else connection_made closes it once it arrives
            self.transport.close()
        self._closed = True

    # -- dispatch ------------------------------------------------------------------------------
    def _dispatch(self, event: SessionEvent) -> None:
        if self._closed:
            return
        if event.__class__ is not Request:
            self._on_answer(event)
            return
        frame = event.frame
        msg_type = frame.type
        entry = _HANDLERS.get(msg_type)
        if entry is None:
            self._reply_error(
                frame, m.ErrorCode.UNKNOWN_TYPE, f"unknown message type {msg_type:#x}"
            )
            return
        if self._handshaking:
            try:
                self.handshake.check_request(msg_type)
            except HandshakeError as exc:
                self._handshake_refused(frame, exc)
                return
            self._handshaking = self.handshake.state is not ServerState.OPEN
            if not self._handshaking:
                self.core.open()
        if frame.flags & _POSTED and not self.features & _POSTED_WRITES:
            self._reply_error(
                frame,
                m.ErrorCode.UNSUPPORTED,
                f"message type {msg_type:#x} is POSTED, but this session did not negotiate "
                "POSTED_WRITES: not applied (send it without POSTED)",
            )
            return
        fields, handler = entry
        try:
            if fields is None:
                args = (decode_body(msg_type, frame.body),)
            else:
                try:
                    args = fields(frame.body)
                except struct.error:
                    decode_body(msg_type, frame.body)  # raises the DecodeError naming the sizes
                    raise
            handler(self, frame, *args)
        except DecodeError as exc:
            self._reply_error(frame, exc.code, str(exc))
        except ProtocolFault as exc:
            self._reply_error(frame, exc.code, str(exc))
        except Exception as exc:  # a server bug must not take the other sessions down
            log.exception("session %x: internal error on type %#x", self.session_id, msg_type)
            self._reply_error(frame, m.ErrorCode.INTERNAL, f"internal error: {exc}")

    def _answer(self, frame: Frame, msg: object) -> None:
        if not frame.flags & _POSTED:
            self.send(msg, frame.request_id, _REPLY)

    def _on_hello(self, frame: Frame, msg: m.Hello) -> None:
        offered = SERVER_FEATURES & ~m.ProtoFeature.MEMORY_SHM
        if self.fd_passing:
            offered |= (
                m.ProtoFeature.MEMORY_MEMFD
                | m.ProtoFeature.NOTIFY_CHANNEL
                | m.ProtoFeature.FD_SIDECAR
            )
            if self.allow_shm and trusted_uid(peer_uid(self.transport)):
                # The kernel vouches for a Unix peer: same host, and our user (or root).
                offered |= m.ProtoFeature.MEMORY_SHM
        try:
            negotiated = self.handshake.receive_hello(msg, offered)
        except HandshakeError as exc:
            raise ProtocolFault(exc.code, str(exc)) from None
        self.features = negotiated.features
        awaiting_auth = self.handshake.awaiting_auth
        if self.allow_shm and not self.fd_passing and may_prove_same_host(msg, host_id()):
            try:
                self._shm_proof = ShmProof()
            except OSError as exc:  # no /dev/shm, or it is full: the session goes on without
                log.info("session %x: no same-host proof file (%s)", self.session_id, exc)
        self.max_frame = negotiated.max_frame
        self.core.settle(negotiated)
        if self.features & m.ProtoFeature.FD_SIDECAR and not self._adopt_sidecar():
            self.features &= ~m.ProtoFeature.FD_SIDECAR
        while self._fds:  # HELLO carries no descriptor but the sidecar: never pair one later
            os.close(self._fds.pop())
        log.info(
            "session %x: HELLO from %r, features %#x%s",
            self.session_id,
            msg.name,
            self.features,
            ", awaiting the token" if awaiting_auth else "",
        )
        self.max_inflight = negotiated.max_inflight
        if not awaiting_auth and not self._open(frame):
            return
        reply = self.handshake.hello_reply(
            dataclasses.replace(negotiated, features=self.features),
            session_id=self.session_id,
            host_id=host_id(),
            name=self.name,
            shm_proof=self._shm_proof.name if self._shm_proof is not None else "",
        )
        self.send(reply, frame.request_id, _REPLY)

    def _open(self, frame: Frame) -> bool:
        """The session is established: only now are its devices built, if the budget has room
        for them; else ``frame`` (HELLO or AUTH) is refused and the connection closes."""
        if self._hello_timer is not None:
            self._hello_timer.cancel()
        self._give_handshake()
        try:
            self.budget.take_session()
        except LimitExceeded as exc:
            self._refuse(frame, m.ErrorCode.LIMIT_EXCEEDED, str(exc))
            return False
        self._charged_session = True
        platform = self.spec.build(name_prefix=f"session {self.session_id:x} ")
        try:
            self.budget.take_devices(len(platform.slots))
        except LimitExceeded as exc:
            _later(self._loop.create_task(platform.aclose()))
            self._refuse(frame, m.ErrorCode.LIMIT_EXCEEDED, str(exc))
            return False
        self._charged_devices = len(platform.slots)
        self.platform = platform
        for slot in self.platform.slots:
            slot.device.on_irq = self._irq_sender(slot)
            slot.device.posted_ack = bool(self.features & m.ProtoFeature.IRQ_STATUS)
            if self.poll_us:  # idle devices keep the class default: a smaller dict each
                slot.device.poll_us = self.poll_us
            if hasattr(slot.device.backend, "ram_account"):  # a RAM disk: charged as it fills
                slot.device.backend.ram_account = self._ram
        return True

    def _on_auth(self, frame: Frame, msg: m.Auth) -> None:
        proof = self._shm_proof
        try:
            secret = proof.secret if proof is not None else None
            reply = self.handshake.receive_auth(msg, secret, channel_binding(self.transport))
        except HandshakeError as exc:
            if not exc.fatal:
                raise ProtocolFault(exc.code, str(exc)) from None
            self._handshake_refused(frame, exc)
            return
        self.features |= reply.features & m.ProtoFeature.MEMORY_SHM
        reply = dataclasses.replace(reply, features=self.features)
        self._drop_shm_proof()
        if self.platform is None and not self._open(frame):
            return
        log.info("session %x: AUTH accepted, features %#x", self.session_id, self.features)
        self.send(reply, frame.request_id, _REPLY)

    def _handshake_refused(self, frame: Frame, exc: HandshakeError) -> None:
        """A request out of the handshake's order, or a wrong token: ERROR, and where it is
        fatal (authentication) the connection closes."""
        if exc.fatal:
            self._refuse(frame, exc.code, str(exc))
        else:
            self._reply_error(frame, exc.code, str(exc))

    def _refuse(self, frame: Frame, code: m.ErrorCode, message: str) -> None:
        """ERROR ``code`` as the reply to ``frame``, then the connection closes."""
        log.warning("session %x: %s from %s: %s", self.session_id, code.name, self._peer, message)
        error = m.Error(code=code, message=message + "; closing the connection")
        self.send(error, frame.request_id, _REPLY)
        self._flush()
        if self.transport is not None:  # else (moving to the native transport) it closes there
            self.transport.close()
        self._closed = True

    def _drop_shm_proof(self) -> None:
        if self._shm_proof is not None:
            self._shm_proof.remove()
            self._shm_proof = None

    # -- the descriptor sidecar -------------------------------------------------------------------
    def _adopt_sidecar(self) -> bool:
        """Take the socket that came with HELLO as the sidecar; False (and it is closed) if
        there is none or it is not AF_UNIX SOCK_SEQPACKET: the session then goes on without."""
        if not self._fds:
            return False
        fd = self._fds.pop(0)
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            os.close(fd)
            return False
        if not is_seqpacket_socket(sock):
            sock.close()
            return False
        self._sidecar = SidecarReader(self._loop, sock, self._sidecar_packet, self.max_frame)
        self._go_native = isinstance(self.transport, FdSocketTransport)
        return True

    def _sidecar_packet(self, data: bytes | None, fds: list[int]) -> None:
        """A frame from the sidecar, answered on the connection like any other."""
        if data is None:
            self._sidecar = None  # ended; descriptors cannot arrive any more
            return
        self.fds_received(fds)
        if self.trace is not None:
            self.trace.record(Event.SIDECAR_RECEIVED, data)
        try:
            frames = self._sidecar_frames.feed(data, SLICE_FRAMES)
            if self._sidecar_frames.buffered:  # a packet is whole frames: no waiting for more
                raise FrameError(
                    m.ErrorCode.MALFORMED_FRAME,
                    f"a packet ends inside a frame or holds more than {SLICE_FRAMES} frames "
                    "(descriptor frames go one a packet)",
                )
        except FrameError as exc:
            self._fail_connection(exc.code, f"sidecar: {exc}")
            return
        for frame in frames:
            if frame.type in _SIDECAR_TYPES:
                self._dispatch(self.core.event(frame))
            else:  # anything else has the connection, with its back-pressure
                self._reply_error(
                    frame,
                    m.ErrorCode.BAD_STATE,
                    f"message type {frame.type:#x} does not carry descriptors: send it on the "
                    "connection, not the sidecar",
                )
        self._flush()

    def _switch_to_native(self) -> None:
        """Nothing but frames will arrive on the connection now: let the event loop's own
        transport (uvloop's, in C) carry it. Frames queued meanwhile wait in ``_out``."""
        self._go_native = False
        sock = self.transport.detach()
        if sock is None:
            return  # replies still queued: stay on the Python transport, which works as well
        self.transport = None
        task = self._loop.create_task(self._adopt_native(sock))
        _TEARDOWNS.add(task)
        task.add_done_callback(_TEARDOWNS.discard)

    async def _adopt_native(self, sock: socket.socket) -> None:
        try:
            await self._loop.connect_accepted_socket(lambda: self, sock)
        except Exception as exc:  # the session cannot go on without a transport
            log.warning("session %x: no native transport (%s); closing", self.session_id, exc)
            sock.close()
            self.connection_lost(exc)

    def _irq_sender(self, slot: Slot):
        irq, device = slot.irq, slot.device

        def on_irq(level: bool) -> None:
            self.send(m.Irq(irq=irq, level=int(level), status=device.interrupt_status))

        return on_irq

    def _locate(self, addr: int, width: int):
        if width not in _WIDTH_MASKS:
            raise ProtocolFault(m.ErrorCode.BAD_WIDTH, f"access width {width} is not 1, 2, 4 or 8")
        found = self.platform.lookup(addr)
        if found is None or found[1] + width > found[0].size:
            raise ProtocolFault(m.ErrorCode.BUS_ERROR, f"no device at physical address {addr:#x}")
        return found

    def _on_mmio_read(self, frame: Frame, addr: int, width: int) -> None:
        slot, offset = self._locate(addr, width)
        value = slot.device.read(offset, width)
        if not frame.flags & _POSTED:
            self._send_frame(_READ_REPLY_FRAME(frame.request_id, _REPLY, value))

    def _on_mmio_write(self, frame: Frame, addr: int, width: int, value: int) -> None:
        slot, offset = self._locate(addr, width)
        slot.device.write(offset, width, value & _WIDTH_MASKS[width])
        if not frame.flags & _POSTED:
            self._send_frame(_OK_FRAME(frame.request_id, _REPLY))

    def _on_platform_query(self, frame: Frame, msg: m.PlatformQuery) -> None:
        slots = self.platform.slots
        # 12 bytes of frame header, 12 of PLATFORM_INFO fields, 28 a device entry.
        fits = (self.max_frame - 24) // 28
        chosen = slots[msg.first : msg.first + min(msg.max_count, fits)]
        devices = tuple(
            (
                s.base,
                s.size,
                s.irq,
                s.device.version,
                s.device.backend.device_id,
                s.device.vendor_id,
            )
            for s in chosen
        )
        self._answer(frame, m.PlatformInfo(total=len(slots), first=msg.first, devices=devices))

    # -- guest memory --------------------------------------------------------------------------
    def _on_mem_register(self, frame: Frame, msg: m.MemRegister) -> None:
        # A MEMFD registration uses up the oldest queued descriptor even when it is refused, so
        # the client's next registration is matched with the descriptor it sends along.
        fd = self._fds.pop(0) if msg.kind == m.MemoryKind.MEMFD and self._fds else None
        try:
            self._register_memory(msg, fd)
        finally:
            if fd is not None:
                os.close(fd)
        log.info(
            "session %x: guest RAM %#x+%#x (%s)",
            self.session_id,
            msg.gpa,
            msg.size,
            m.MemoryKind(msg.kind).name,
        )
        self._answer(frame, m.Ok())

    def _register_memory(self, msg: m.MemRegister, fd: int | None) -> None:
        kind = msg.kind
        feature = _KIND_FEATURES.get(kind)
        if feature is None:
            raise ProtocolFault(m.ErrorCode.UNSUPPORTED, f"unknown memory kind {kind}")
        if not self.features & feature:
            raise ProtocolFault(
                m.ErrorCode.UNSUPPORTED,
                f"memory kind {m.MemoryKind(kind).name} needs {feature.name}, which this session "
                "did not negotiate",
            )
        window = self._window_overlapping(msg.gpa, msg.size)
        if window is not None:
            raise ProtocolFault(
                m.ErrorCode.MEMORY_FAULT,
                f"region {msg.gpa:#x}+{msg.size:#x} overlaps the device window at "
                f"{window.base:#x}+{window.size:#x}: guest RAM and device windows share one "
                "physical address space (PLATFORM_INFO lists the windows)",
            )
        region_count = len(self.memory.regions) if self.memory is not None else 0
        try:
            self.budget.check_regions(region_count)
        except LimitExceeded as exc:
            raise ProtocolFault(m.ErrorCode.LIMIT_EXCEEDED, str(exc)) from None
        try:
            if kind == m.MemoryKind.PROXIED:
                self._use_memory(self._proxy()).add_region(msg.gpa, msg.size)
            elif kind == m.MemoryKind.MEMFD:
                if fd is None:
                    raise ProtocolFault(
                        m.ErrorCode.MEMORY_FAULT,
                        "MEM_REGISTER of kind MEMFD came without a file descriptor (send it with "
                        "SCM_RIGHTS on the same frame, over a Unix socket)",
                    )
                self._add_mapping(msg.gpa, map_fd(fd, msg.size, msg.offset, sealed=True))
            else:
                prefix = segment_prefix(self.session_id)
                self._add_mapping(msg.gpa, open_shm(msg.name, msg.size, msg.offset, prefix))
        except (GuestMemoryError, OSError, ValueError, OverflowError) as exc:
            raise ProtocolFault(m.ErrorCode.MEMORY_FAULT, str(exc)) from None

    def _window_overlapping(self, gpa: int, size: int) -> Slot | None:
        end = gpa + max(size, 1)
        for slot in self.platform.slots:
            if slot.base < end and gpa < slot.base + slot.size:
                return slot
        return None

    def _add_mapping(self, gpa: int, mapping: mmap.mmap) -> None:
        # The session commits to shared memory only once a mapping exists: a refused
        # registration must leave the session as it was.
        try:
            self.budget.check_mapped(self._mapped, len(mapping))
            self._use_memory(self._mappings.memory)
        except LimitExceeded as exc:
            mapping.close()
            raise ProtocolFault(m.ErrorCode.LIMIT_EXCEEDED, str(exc)) from None
        except ProtocolFault:
            mapping.close()
            raise
        self._mappings.add(gpa, mapping)
        self._mapped += len(mapping)

    def _use_memory(self, memory: GuestMemory) -> GuestMemory:
        if self.memory is not None and self.memory is not memory:
            raise ProtocolFault(
                m.ErrorCode.UNSUPPORTED, "a session uses one memory mode: shared or proxied"
            )
        if self.memory is None:
            self.memory = memory
            for slot in self.platform.slots:
                slot.device.memory = memory
        return memory

    def _proxy(self) -> ProxiedGuestMemory:
        if self._proxied is None:
            self._proxied = ProxiedGuestMemory(
                self._read_remote, self._write_remote, max_frame=self.max_frame
            )
        return self._proxied

    def _on_mem_unregister(self, frame: Frame, msg: m.MemUnregister) -> None:
        if self.memory is None or all(r.gpa != msg.gpa for r in self.memory.regions):
            raise ProtocolFault(m.ErrorCode.MEMORY_FAULT, f"no region starts at {msg.gpa:#x}")
        if self.memory is not self._proxied:  # refused before anything changes
            raise ProtocolFault(
                m.ErrorCode.UNSUPPORTED, "shared regions stay mapped until the session ends"
            )
        # Devices might still hold addresses in it: reset them, as a board would on unplug.
        for slot in self.platform.slots:
            slot.device.reset()
        self._proxied.remove_region(msg.gpa)
        self._answer(frame, m.Ok())

    # -- notification channels ------------------------------------------------------------------
    def _on_notify_channel(self, frame: Frame, msg: m.NotifyChannel) -> None:
        # An attach uses up the oldest queued descriptor even when it is refused (as MEMFD).
        fd = self._fds.pop(0) if msg.attach and self._fds else None
        try:
            slot = self._channel_slot(msg)
            if msg.attach:
                self._attach_channel(slot, fd)
                fd = None  # the channel owns it
            else:
                self._detach_channel(slot.base)
        finally:
            if fd is not None:
                os.close(fd)
        self._answer(frame, m.Ok())

    def _channel_slot(self, msg: m.NotifyChannel) -> Slot:
        if not self.features & m.ProtoFeature.NOTIFY_CHANNEL:
            raise ProtocolFault(
                m.ErrorCode.UNSUPPORTED,
                "NOTIFY_CHANNEL was not negotiated (it needs a Unix socket): notify with "
                "QueueNotify writes",
            )
        found = self.platform.lookup(msg.base)
        if found is None or found[1] != 0:
            raise ProtocolFault(m.ErrorCode.BUS_ERROR, f"no device window starts at {msg.base:#x}")
        return found[0]

    def _attach_channel(self, slot: Slot, fd: int | None) -> None:
        if fd is None:
            raise ProtocolFault(
                m.ErrorCode.BAD_MESSAGE,
                "NOTIFY_CHANNEL with attach=1 came without a descriptor (send the socket with "
                "SCM_RIGHTS on the same frame)",
            )
        if self.memory is None or self.memory is self._proxied:
            # Used-ring updates ride the connection as MEM_WRITE frames there, and a datagram
            # could overtake them: the driver would find nothing and wait forever.
            raise ProtocolFault(
                m.ErrorCode.UNSUPPORTED,
                "a notification channel needs shared guest memory: register a memfd first",
            )
        if slot.base not in self._channels and len(self._channels) >= MAX_NOTIFY_CHANNELS:
            raise ProtocolFault(
                m.ErrorCode.UNSUPPORTED,
                f"at most {MAX_NOTIFY_CHANNELS} notification channels a session: notify the "
                "other devices with QueueNotify writes",
            )
        try:
            sock = adopt_socket(fd)
        except (ChannelError, OSError) as exc:
            raise ProtocolFault(m.ErrorCode.BAD_MESSAGE, str(exc)) from None
        self._detach_channel(slot.base)
        device = slot.device

        def on_kick(value: int) -> None:
            device.write(_QUEUE_NOTIFY, 4, value)

        def on_lost() -> None:
            if self._channels.get(slot.base) is channel:
                self._detach_channel(slot.base)

        channel = NotifyChannel(self._loop, sock, on_kick, on_lost)
        self._channels[slot.base] = channel
        device.set_used_notifier(channel.used)

    def _detach_channel(self, base: int) -> None:
        channel = self._channels.pop(base, None)
        if channel is None:
            return
        channel.close()
        found = self.platform.lookup(base) if self.platform is not None else None
        if found is not None and not self._closed:
            found[0].device.set_used_notifier(None)

    async def _read_remote(self, ranges: Sequence[tuple[int, int]], timeout: float) -> bytes:
        if self._closed:
            raise GuestMemoryError("the client disconnected")
        # At most the client's max_inflight MEM_READs await replies; the rest wait their turn
        # (thousands of proxied queues could otherwise each have one out).
        outstanding = self.outstanding
        opened = outstanding.open_now(_MEM_READ, timeout)
        request_id, future = opened or await outstanding.open(_MEM_READ, timeout)
        try:
            if self._closed:  # closing (a fatal error) while it waited for the window
                raise GuestMemoryError("the client disconnected")
            self._send_frame(pack_mem_read(ranges, request_id))
            return await future
        finally:
            outstanding.release(request_id)

    def _write_remote(self, ranges: Sequence[tuple[int, int]], data: bytes) -> None:
        """A posted MEM_WRITE. Writes in a row become one frame (a request's data, then the
        used ring's elements and index): decoding and encoding a frame each was a tenth of a
        proxied request's work. Any other frame, or the flush, sends them first, in order."""
        if self._closed:
            return
        size = _RANGE_BYTES * len(ranges) + len(data)
        if self._writes_size and self._writes_size + size > self.max_frame - _MEM_WRITE_OVERHEAD:
            self._take_writes()
        self._writes_ranges += ranges
        self._writes_data.append(data)
        self._writes_size += size
        self._flush_soon()

    def _take_writes(self) -> None:
        """The gathered MEM_WRITEs into the output, as one frame."""
        ranges, data = self._writes_ranges, b"".join(self._writes_data)
        self._writes_ranges, self._writes_data, self._writes_size = [], [], 0
        # Posted only where the client agreed to POSTED_WRITES; else it answers OK to each.
        flags = _POSTED if self.features & _POSTED_WRITES else 0
        request_id = self._write_id()
        self._out.append(pack_mem_write(ranges, data, request_id, flags))

    def _memory_write_failed(self, frame: Frame) -> None:
        """The client refused a MEM_WRITE: data, a status byte or a used-ring entry the devices
        believe is in guest memory is not. No device of the session can tell which of its
        requests it was (one frame gathers the writes of several, and a used ring and status
        byte may be in it), so each running device enters DEVICE_NEEDS_RESET and its driver
        learns of it through a configuration change interrupt."""
        if self.platform is None:
            return
        reason = (
            f"the client refused guest-memory write {frame.request_id:#x}: {_error_text(frame)}"
        )
        for slot in self.platform.slots:
            if slot.device.status:
                slot.device.fail(reason)

    def _on_answer(self, event: SessionEvent) -> None:
        """An answer from the client: to a MEM_READ of ours, to a posted MEM_WRITE, to nothing
        awaited (logged if an ERROR), or its fatal ERROR before it closes."""
        kind, frame = event.__class__, event.frame
        if kind is PostedAnswer:
            if frame.type == _ERROR:
                self._memory_write_failed(frame)
            return
        if kind is Closing:
            log.warning(
                "session %x: the client is closing: %s", self.session_id, _error_text(frame)
            )
            AwaitedRequests.fail(event.failed, GuestMemoryError(f"client: {_error_text(frame)}"))
            return
        future = event.what[1] if kind is Answer else None
        if future is None or future.done():
            if frame.type == _ERROR:
                log.warning(
                    "session %x: client reported an error for request %d (%s)",
                    self.session_id,
                    frame.request_id,
                    event.why.value if kind is Stray else "given up",
                )
            return
        if frame.type == _MEM_READ_REPLY:  # the body is the data: nothing to decode
            future.set_result(frame.body)
            return
        try:
            msg = decode_body(frame.type, frame.body)
        except DecodeError as exc:
            future.set_exception(GuestMemoryError(f"bad reply from the client: {exc}"))
            return
        if isinstance(msg, m.MemReadReply):
            future.set_result(msg.data)
        elif isinstance(msg, m.Error):
            future.set_exception(GuestMemoryError(f"client: {msg.message}"))
        else:
            future.set_exception(GuestMemoryError(f"unexpected reply {type(msg).__name__}"))


def _error_text(frame: Frame) -> str:
    try:
        return decode_body(frame.type, frame.body).message
    except DecodeError as exc:
        return f"an undecodable error message ({exc})"


def _later(task: asyncio.Task) -> None:
    # Keep a reference: the loop holds tasks weakly.
    _TEARDOWNS.add(task)
    task.add_done_callback(_TEARDOWNS.discard)


def _timed_out(_label: str) -> TimeoutError:
    return TimeoutError()  # ProxiedGuestMemory says what it was


# type byte -> (fields, handler): ``fields`` unpacks the body into the handler's arguments, or is
# None and the handler gets the decoded message object.
_HANDLERS: dict[int, tuple[Callable[[bytes], tuple] | None, Callable[..., None]]] = {
    int(m.MsgType.HELLO): (None, ServerSession._on_hello),
    int(m.MsgType.AUTH): (None, ServerSession._on_auth),
    int(m.MsgType.MMIO_READ): (_MMIO_READ_FIELDS, ServerSession._on_mmio_read),
    int(m.MsgType.MMIO_WRITE): (_MMIO_WRITE_FIELDS, ServerSession._on_mmio_write),
    int(m.MsgType.PLATFORM_QUERY): (None, ServerSession._on_platform_query),
    int(m.MsgType.MEM_REGISTER): (None, ServerSession._on_mem_register),
    int(m.MsgType.MEM_UNREGISTER): (None, ServerSession._on_mem_unregister),
    int(m.MsgType.NOTIFY_CHANNEL): (None, ServerSession._on_notify_channel),
}
