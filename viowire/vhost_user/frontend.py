"""A vhost-user front-end in Python: guest RAM in a memfd, rings in it, messages on a socket.

It does what QEMU's vhost-user front-end does for one device (see
../shared/reference/linux-guest.md for the order QEMU 7.2 sends things in), plus whatever a
test wants to send by hand (:meth:`Frontend.send` takes any bytes and descriptors). Two users:

* the back-end's tests: :class:`MemfdRam` and :meth:`Frontend.start_ring` write the rings as a
  driver writes them, by :class:`~viowire.virtio.mock.RingBuilder` over the memfd, so the
  back-end's ring code is driven through real shared memory and eventfds;
* viowire's client (:mod:`viowire.client.vhost_user`, the ``vhost-user+unix://`` target): its
  own guest RAM and virtqueues, programmed with :meth:`Frontend.program_ring`.

Addresses: guest RAM is one memfd at guest-physical :data:`RAM_GPA`; the memory table may
describe it as several regions (QEMU gives microvm's RAM as two); the front-end's "virtual"
address of each region is its guest address plus :data:`USER_OFFSET`, so that a back-end that
mixed the two up would be caught.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import itertools
import mmap
import os
import socket
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from viowire.vhost_user import protocol as p
from viowire.vhost_user.server import recv_message_part
from viowire.virtio.memory import MappedGuestMemory
from viowire.virtio.mock import GuestRam, RingBuilder

RAM_GPA = 0x10_0000
USER_OFFSET = 0x7F00_0000_0000
TIMEOUT = 5.0


def memory_table(gpa: int, size: int, splits: tuple[int, ...] = ()) -> list[dict]:
    """The memory table of ``size`` bytes of guest RAM at ``gpa``, all in one memfd from its
    offset 0: one region, or one per piece cut at the offsets ``splits``."""
    cuts = [0, *sorted(splits), size]
    return [
        {
            "guest_phys_addr": gpa + start,
            "memory_size": end - start,
            "userspace_addr": USER_OFFSET + gpa + start,
            "mmap_offset": start,
        }
        for start, end in itertools.pairwise(cuts)
    ]


class SharedRam(Protocol):
    """Guest RAM a back-end can map: its memfd and its memory table."""

    fd: int

    def regions(self, splits: tuple[int, ...] = ()) -> list[dict]: ...

    def close(self) -> None: ...


class MemfdRam(GuestRam):
    """:class:`~viowire.virtio.mock.GuestRam` in a sealed memfd the back-end can map."""

    def __init__(self, size: int = 1 << 20, gpa: int = RAM_GPA) -> None:
        self.gpa = gpa
        self.size = size
        self.fd = os.memfd_create("viowire-frontend-ram", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        os.ftruncate(self.fd, size)
        fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW)
        self.buffer = mmap.mmap(self.fd, size)
        self.memory = MappedGuestMemory()
        self.memory.add_region(gpa, self.buffer)
        self._next = gpa

    def regions(self, splits: tuple[int, ...] = ()) -> list[dict]:
        """The memory table: one region, or one per piece cut at the offsets ``splits``."""
        return memory_table(self.gpa, self.size, splits)

    def close(self) -> None:
        self.memory.close()
        with contextlib.suppress(BufferError):
            self.buffer.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)


@dataclass
class FrontendRing:
    """One ring the front-end started: the driver's half, and its kick and call eventfds."""

    index: int
    ring: RingBuilder
    kick: int
    call: int

    def kick_now(self) -> None:
        """Notify the back-end; with EVENT_IDX, ask for a notification at the next used
        buffer first (used_event = the used index seen), as Linux's virtqueue_enable_cb does."""
        self.ring.set_used_event(self.ring.used_idx)
        os.eventfd_write(self.kick, 1)

    async def wait_call(self, timeout: float = TIMEOUT) -> None:
        """Wait for the back-end's used-buffer notification."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                try:
                    os.eventfd_read(self.call)
                    return
                except BlockingIOError:
                    pass
                waiter = loop.create_future()
                loop.add_reader(self.call, waiter.set_result, None)
                try:
                    await waiter
                finally:
                    loop.remove_reader(self.call)

    def close(self) -> None:
        for fd in (self.kick, self.call):
            with contextlib.suppress(OSError):
                os.close(fd)


class Frontend:
    """One connection to a vhost-user back-end."""

    def __init__(self, sock: socket.socket, ram: SharedRam) -> None:
        self.sock = sock
        self.ram = ram
        self.rings: dict[int, FrontendRing] = {}
        self.features = 0
        self.protocol_features = 0
        self.lost: ConnectionError | None = None
        self._decoder = p.Decoder()
        self._lock = asyncio.Lock()  # one request at a time: replies carry no request id
        self._on_lost: Callable[[ConnectionError], object] | None = None

    @classmethod
    async def connect(
        cls, path: str, ram_size: int = 1 << 20, *, ram: SharedRam | None = None
    ) -> Frontend:
        """Connect to the back-end listening on ``path``; guest RAM is ``ram`` (which the
        front-end then owns), else a new :class:`MemfdRam` of ``ram_size`` bytes."""
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(TIMEOUT):
                await asyncio.get_running_loop().sock_connect(sock, path)
        except BaseException:
            sock.close()
            raise
        return cls(sock, MemfdRam(ram_size) if ram is None else ram)

    async def __aenter__(self) -> Frontend:
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._unwatch()
        self._on_lost = None
        self.sock.close()
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
        self.ram.close()

    # -- the connection while idle ------------------------------------------------------------
    def watch(self, on_lost: Callable[[ConnectionError], object]) -> None:
        """Call ``on_lost`` once if the back-end closes the connection. A back-end sends
        nothing unasked on this socket (its own messages go on the back-end channel), so
        the socket becoming readable between requests means it closed it (or broke the
        protocol): nothing it holds will be completed any more."""
        self._on_lost = on_lost
        self._watch()

    def _watch(self) -> None:
        if self._on_lost is not None and self.lost is None and self.sock.fileno() >= 0:
            asyncio.get_running_loop().add_reader(self.sock, self._idle_readable)

    def _unwatch(self) -> None:
        if self.sock.fileno() >= 0:
            with contextlib.suppress(RuntimeError):  # no loop any more: nothing to remove
                asyncio.get_running_loop().remove_reader(self.sock)

    def _idle_readable(self) -> None:
        self._unwatch()
        self._lose("the back-end closed the connection (or sent a message nobody asked for)")

    def _lose(self, reason: str) -> None:
        if self.lost is None:
            self.lost = ConnectionError(reason)
            if self._on_lost is not None:
                self._on_lost(self.lost)

    # -- messages -------------------------------------------------------------------------------
    async def send(self, data: bytes, fds: list[int] | tuple[int, ...] = ()) -> None:
        """Raw bytes (a message, part of one, or garbage) with descriptors on the first byte."""
        if fds:
            sent = socket.send_fds(self.sock, [data], list(fds))
            data = data[sent:]
        if data:
            await asyncio.get_running_loop().sock_sendall(self.sock, data)

    async def receive(self, timeout: float = TIMEOUT) -> p.Message | None:
        """The back-end's next message, or None when it closed the connection."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(timeout):
            while True:
                data, fds = await recv_message_part(loop, self.sock, self._decoder.needed)
                if not data:
                    return None
                messages = self._decoder.feed(data, fds)
                if messages:
                    return messages[0]

    async def request(
        self,
        request: p.Request,
        fds: list[int] | tuple[int, ...] = (),
        *,
        need_reply: bool = False,
        payload: bytes | None = None,
        **fields,
    ) -> p.Message | None:
        """Send ``request`` (payload built from ``fields``); its reply if it has one or
        ``need_reply`` asked for an ack."""
        flags = p.VERSION | (p.Flag.NEED_REPLY if need_reply else 0)
        if payload is None:
            data = p.build(request, flags, **fields)
        else:
            data = p.encode(request, payload, flags)
        async with self._lock:
            if self.lost is not None:
                raise ConnectionError(f"{request.name}: {self.lost}")
            self._unwatch()
            try:
                return await self._exchange(request, data, fds, need_reply)
            except (ConnectionError, TimeoutError, p.ProtocolError) as exc:
                # Out of step (a late reply would answer the next request): give up on it.
                self._lose(f"{request.name}: {exc or type(exc).__name__}")
                raise ConnectionError(f"{request.name}: {self.lost}") from exc
            finally:
                self._watch()

    async def _exchange(
        self, request: p.Request, data: bytes, fds: list[int] | tuple[int, ...], need_reply: bool
    ) -> p.Message | None:
        await self.send(data, fds)
        if request in p.REPLIES or need_reply:
            try:
                answer = await self.receive()
            except ConnectionResetError:
                answer = None
            if answer is None:
                raise ConnectionError(f"the back-end closed the connection after {request.name}")
            if answer.request != request or not answer.flags & p.Flag.REPLY:
                raise ConnectionError(f"{request.name} answered with {answer.name}")
            return answer
        return None

    async def get_u64(self, request: p.Request) -> int:
        answer = await self.request(request)
        return answer.parse().value

    async def set_u64(self, request: p.Request, value: int, *, ack: bool = True) -> int | None:
        """Send a u64 message; with REPLY_ACK negotiated, wait for its ack (0: success)."""
        ack = ack and bool(self.protocol_features >> p.ProtocolFeature.REPLY_ACK & 1)
        answer = await self.request(request, need_reply=ack, value=value)
        return answer.parse().value if answer is not None else None

    # -- the flow QEMU follows --------------------------------------------------------------
    async def handshake(self, features: int | None = None) -> int:
        """Features, protocol features, owner, memory table; returns the features set."""
        offered = await self.open()
        await self.set_features(offered if features is None else features)
        await self.set_mem_table()
        return self.features

    async def open(self, protocol_mask: int = -1) -> int:
        """GET_FEATURES, the protocol features offered (within ``protocol_mask``) taken,
        SET_OWNER; returns the feature offer (VHOST_USER_F_PROTOCOL_FEATURES included)."""
        offered = await self.get_u64(p.Request.GET_FEATURES)
        if offered >> p.PROTOCOL_FEATURES_BIT & 1:
            protocol = await self.get_u64(p.Request.GET_PROTOCOL_FEATURES) & protocol_mask
            self.protocol_features = protocol
            await self.request(p.Request.SET_PROTOCOL_FEATURES, value=protocol)
        await self.request(p.Request.SET_OWNER)
        return offered

    def has_protocol_feature(self, bit: int) -> bool:
        return bool(self.protocol_features >> bit & 1)

    async def set_features(self, features: int) -> None:
        """SET_FEATURES; with REPLY_ACK, a refusal raises ConnectionError."""
        self.features = features
        await self.expect_ack(await self.set_u64(p.Request.SET_FEATURES, features))

    async def expect_ack(self, value: int | None) -> None:
        if value:
            raise ConnectionError(f"the back-end refused the message (ack {value})")

    async def set_mem_table(self, splits: tuple[int, ...] = ()) -> int | None:
        regions = self.ram.regions(splits)
        fds = [self.ram.fd] * len(regions)
        ack = bool(self.protocol_features >> p.ProtocolFeature.REPLY_ACK & 1)
        answer = await self.request(
            p.Request.SET_MEM_TABLE,
            fds,
            need_reply=ack,
            nregions=len(regions),
            padding=0,
            regions=regions,
        )
        return answer.parse().value if answer is not None else None

    async def start_ring(
        self, index: int, num: int = 64, *, base: int = 0, ring: RingBuilder | None = None
    ) -> FrontendRing:
        """Lay out a ring in guest RAM (or take ``ring``, one laid out already) and program
        it: NUM, BASE, ADDR, KICK, CALL, ENABLE."""
        ring = RingBuilder(self.ram, num) if ring is None else ring
        kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        started = FrontendRing(index, ring, kick, call)
        self.rings[index] = started
        await self.program_ring(index, num, (ring.desc, ring.avail, ring.used), kick, call, base)
        return started

    async def program_ring(
        self,
        index: int,
        num: int,
        addresses: tuple[int, int, int],
        kick: int,
        call: int,
        base: int = 0,
        *,
        err: int | None = None,
    ) -> None:
        """Start ring ``index`` of ``num`` entries whose descriptor table, available and used
        rings are at the guest-physical ``addresses``: NUM, BASE, ADDR (in front-end virtual
        addresses), CALL, ERR (if given), KICK, ENABLE, as QEMU sends them. The caller keeps
        the eventfds."""
        desc, avail, used = addresses
        ack = bool(self.protocol_features >> p.ProtocolFeature.REPLY_ACK & 1)
        steps = [
            (p.Request.SET_VRING_NUM, (), {"index": index, "num": num}),
            (p.Request.SET_VRING_BASE, (), {"index": index, "num": base}),
            (
                p.Request.SET_VRING_ADDR,
                (),
                {
                    "index": index,
                    "flags": 0,
                    "desc_user_addr": USER_OFFSET + desc,
                    "used_user_addr": USER_OFFSET + used,
                    "avail_user_addr": USER_OFFSET + avail,
                    "log_guest_addr": 0,
                },
            ),
            (p.Request.SET_VRING_CALL, (call,), {"value": index}),
            (p.Request.SET_VRING_KICK, (kick,), {"value": index}),
            (p.Request.SET_VRING_ENABLE, (), {"index": index, "num": 1}),
        ]
        if err is not None:
            steps.insert(4, (p.Request.SET_VRING_ERR, (err,), {"value": index}))
        for request, fds, fields in steps:
            answer = await self.request(request, fds, need_reply=ack, **fields)
            if answer is not None:
                await self.expect_ack(answer.parse().value)

    async def stop_ring(self, index: int) -> int:
        """SET_VRING_ENABLE 0, then GET_VRING_BASE: the next available index to serve."""
        await self.request(p.Request.SET_VRING_ENABLE, index=index, num=0)
        answer = await self.request(p.Request.GET_VRING_BASE, index=index, num=0)
        return answer.parse().num

    async def get_config(self, offset: int, size: int) -> bytes:
        """GET_CONFIG; a back-end that fails it answers with an empty payload (libvhost-user):
        ConnectionError then."""
        request = {"offset": offset, "size": size, "flags": 0, "payload": bytes(size)}
        answer = await self.request(p.Request.GET_CONFIG, payload=p.Config.build(request))
        if len(answer.payload) != p.CONFIG_HEADER_SIZE + size:
            raise ConnectionError(
                f"GET_CONFIG of {size} bytes at {offset}: the back-end answered "
                f"{len(answer.payload)} bytes (an empty answer is its way to refuse)"
            )
        return answer.parse().payload

    async def set_config(self, offset: int, data: bytes) -> None:
        """SET_CONFIG from the front-end (flags 0: VHOST_SET_CONFIG_TYPE_FRONTEND)."""
        request = {"offset": offset, "size": len(data), "flags": 0, "payload": data}
        ack = self.has_protocol_feature(p.ProtocolFeature.REPLY_ACK)
        answer = await self.request(
            p.Request.SET_CONFIG, need_reply=ack, payload=p.Config.build(request)
        )
        if answer is not None:
            await self.expect_ack(answer.parse().value)

    async def reset_device(self) -> None:
        """RESET_DEVICE (needs the RESET_DEVICE protocol feature): every ring stops."""
        ack = self.has_protocol_feature(p.ProtocolFeature.REPLY_ACK)
        answer = await self.request(p.Request.RESET_DEVICE, need_reply=ack)
        if answer is not None:
            await self.expect_ack(answer.parse().value)

    async def get_queue_num(self) -> int | None:
        """How many rings the back-end has (GET_QUEUE_NUM, with MQ), else None: unknown."""
        if not self.has_protocol_feature(p.ProtocolFeature.MQ):
            return None
        return await self.get_u64(p.Request.GET_QUEUE_NUM)
