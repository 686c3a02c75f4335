"""A vhost-user front-end in Python: guest RAM in a memfd, rings in it, messages on a socket.

It does what QEMU's vhost-user front-end does for one device (see
../shared/reference/linux-guest.md for the order QEMU 7.2 sends things in), plus whatever a
test wants to send by hand (:meth:`Frontend.send` takes any bytes and descriptors). The rings
are written as a driver writes them, by :class:`~viowire.virtio.mock.RingBuilder` over the
memfd, so the back-end's ring code is driven through real shared memory and eventfds.

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
from dataclasses import dataclass

from viowire.vhost_user import protocol as p
from viowire.vhost_user.server import recv_message_part
from viowire.virtio.memory import MappedGuestMemory
from viowire.virtio.mock import GuestRam, RingBuilder

RAM_GPA = 0x10_0000
USER_OFFSET = 0x7F00_0000_0000
TIMEOUT = 5.0


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
        cuts = [0, *sorted(splits), self.size]
        return [
            {
                "guest_phys_addr": self.gpa + start,
                "memory_size": end - start,
                "userspace_addr": USER_OFFSET + self.gpa + start,
                "mmap_offset": start,
            }
            for start, end in itertools.pairwise(cuts)
        ]

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

    def __init__(self, sock: socket.socket, ram: MemfdRam) -> None:
        self.sock = sock
        self.ram = ram
        self.rings: dict[int, FrontendRing] = {}
        self.features = 0
        self.protocol_features = 0
        self._decoder = p.Decoder()

    @classmethod
    async def connect(
        cls, path: str, ram_size: int = 1 << 20, *, ram: MemfdRam | None = None
    ) -> Frontend:
        """A new connection with new guest RAM, or with ``ram`` (a reconnect: the guest's RAM
        and rings live on while the back-end restarts)."""
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
        self.sock.close()
        for ring in self.rings.values():
            ring.close()
        self.rings.clear()
        self.ram.close()

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
        offered = await self.get_u64(p.Request.GET_FEATURES)
        if offered >> p.PROTOCOL_FEATURES_BIT & 1:
            protocol = await self.get_u64(p.Request.GET_PROTOCOL_FEATURES)
            self.protocol_features = protocol
            await self.request(p.Request.SET_PROTOCOL_FEATURES, value=protocol)
        await self.request(p.Request.SET_OWNER)
        self.features = offered if features is None else features
        await self.expect_ack(await self.set_u64(p.Request.SET_FEATURES, self.features))
        await self.set_mem_table()
        return self.features

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
                    "desc_user_addr": USER_OFFSET + ring.desc,
                    "used_user_addr": USER_OFFSET + ring.used,
                    "avail_user_addr": USER_OFFSET + ring.avail,
                    "log_guest_addr": 0,
                },
            ),
            (p.Request.SET_VRING_CALL, (call,), {"value": index}),
            (p.Request.SET_VRING_KICK, (kick,), {"value": index}),
            (p.Request.SET_VRING_ENABLE, (), {"index": index, "num": 1}),
        ]
        for request, fds, fields in steps:
            answer = await self.request(request, fds, need_reply=ack, **fields)
            if answer is not None:
                await self.expect_ack(answer.parse().value)
        return started

    async def stop_ring(self, index: int) -> int:
        """SET_VRING_ENABLE 0, then GET_VRING_BASE: the next available index to serve."""
        await self.request(p.Request.SET_VRING_ENABLE, index=index, num=0)
        answer = await self.request(p.Request.GET_VRING_BASE, index=index, num=0)
        return answer.parse().num

    async def get_config(self, offset: int, size: int) -> bytes:
        request = {"offset": offset, "size": size, "flags": 0, "payload": bytes(size)}
        answer = await self.request(p.Request.GET_CONFIG, payload=p.Config.build(request))
        return answer.parse().payload
