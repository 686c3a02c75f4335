"""The generic driver (viowire.client.drivers.generic) against the real server on real sockets.

It drives the server's blk and rng devices with raw chains, and a device written here with the
device API (viowire.device): ``Loopback`` holds requests until told to let them go (out-of-order
completion) and holds the driver's receive buffers until a message arrives for them.

The server gets the device through its platform description: a ``PlatformSpec`` subclass
whose ``build()`` (which every session calls for its own devices) adds a slot for it after the
usual devices, so no registry is patched.
"""

from __future__ import annotations

import asyncio
import collections
import os
import struct
import sys
import textwrap
import types
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import pytest
from servers import running_server, small_platform, url_of

from viowire.client.connection import connect
from viowire.client.drivers import generic
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.generic import GenericDriver
from viowire.client.errors import (
    DeviceNeedsResetError,
    QueueDeletedError,
    WrongDeviceTypeError,
)
from viowire.device import ChainError, DescriptorChain, Device, Queue, StaleQueueError
from viowire.server.app import Server
from viowire.server.mmio import MmioDevice
from viowire.server.platform import Platform, PlatformSpec, Slot
from viowire.virtio.blk import BLK_CONFIG, BlkStatus, BlkType
from viowire.virtio.config import ConfigField
from viowire.virtio.constants import DeviceId, Feature

TIMEOUT = 5.0
SECTOR = 512
RX, TX = 0, 1


# -- a device that holds requests and receive buffers --------------------------------------------
class Loopback(Device):
    """Two queues, as a network card's: the device takes the driver's empty buffers from the
    receiveq (0) when notified and holds them until a message arrives for one; requests on the
    transmitq (1) are one op byte and an argument:

    - ``S`` payload: deliver the payload into the next receive buffer; answers its length (u32);
    - ``H`` key: hold this request until ``R`` key; answers the key;
    - ``R`` key: let the held request ``key`` complete; answers the key.

    Config space, u32 each: ``delivered`` (messages written to the receiveq; each one is a
    config change), ``held`` (requests being held now), ``buffers`` (receive buffers held now).
    """

    device_id = 0x7F10
    type_name = "loopback"
    num_queues = 2
    queue_num_max = 16
    config_layout = (
        ConfigField("delivered", 0, 4, None),
        ConfigField("held", 4, 4, None),
        ConfigField("buffers", 8, 4, None),
    )

    def __init__(self) -> None:
        super().__init__()
        self.inbox: asyncio.Queue[bytes] = asyncio.Queue()
        self.buffers: collections.deque[DescriptorChain] = collections.deque()
        self.buffers_came = asyncio.Event()
        self.gates: dict[bytes, asyncio.Event] = {}
        self.delivered = 0
        self.held = 0
        self._tasks: set[asyncio.Task[None]] = set()
        self._pump: asyncio.Task[None] | None = None

    def config_space(self) -> bytes:
        return struct.pack("<III", self.delivered, self.held, len(self.buffers))

    def _spawn(self, coro) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def queue_notify(self, queue: Queue) -> None:
        if queue.index == RX:
            self._spawn(self._take_buffers(queue))
        else:
            queue.serve()

    async def _take_buffers(self, rx: Queue) -> None:
        """Hold every buffer the driver has made available."""
        while (chain := await rx.pop()) is not None:
            self.buffers.append(chain)
            self.buffers_came.set()

    async def _deliver(self) -> None:
        """Each message into the next buffer held, as soon as there is one."""
        rx = self.queue(RX)
        while True:
            data = await self.inbox.get()
            while True:
                while not self.buffers:
                    self.buffers_came.clear()
                    await self.buffers_came.wait()
                chain = self.buffers.popleft()
                try:
                    written = await chain.write(data)
                except StaleQueueError:
                    continue  # a buffer from before a queue reset
                break
            rx.complete(chain, written)
            self.delivered += 1
            self.on_config_change()

    async def handle(self, queue: int, chain: DescriptorChain, memory) -> int:
        request = await chain.read()
        op, arg = request[:1], request[1:]
        if op == b"S":
            self.inbox.put_nowait(arg)
            if self._pump is None:
                self._pump = self._spawn(self._deliver())
            return await chain.write(struct.pack("<I", len(arg)))
        gate = self.gates.setdefault(arg, asyncio.Event())
        if op == b"R":
            gate.set()
        elif op == b"H":
            self.held += 1
            try:
                await gate.wait()  # a request that waits: it runs as its own task
            finally:
                self.held -= 1
        else:
            raise ChainError(f"loopback: unknown op {op!r}")
        return await chain.write(arg)

    def queue_reset(self, index: int) -> None:
        if index == RX:
            self.buffers.clear()  # the driver's again

    def reset(self) -> None:
        self.close()
        self.inbox = asyncio.Queue()
        self.buffers.clear()
        self.gates.clear()

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        self._pump = None


class Hello(Device):
    """The device of the generic driver module's example: a request on queue 1 comes back as
    it was, and then ``bye`` arrives on queue 0, a receive queue."""

    device_id = 0x7F00
    num_queues = 2
    config_layout = (ConfigField("greeted", 0, 4, None),)

    def __init__(self) -> None:
        super().__init__()
        self.greeted = 0
        self._tasks: set[asyncio.Task[None]] = set()

    def config_space(self) -> bytes:
        return struct.pack("<I", self.greeted)

    def queue_notify(self, queue: Queue) -> None:
        if queue.index == 1:
            queue.serve()  # queue 0's buffers wait in the ring until there is something to say

    async def handle(self, queue: int, chain: DescriptorChain, memory) -> int:
        self.greeted += 1
        task = asyncio.get_running_loop().create_task(self._say_bye(self.queue(0)))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return await chain.write(await chain.read())

    async def _say_bye(self, rx: Queue) -> None:
        chain = await rx.get()
        rx.complete(chain, await chain.write(b"bye"))

    def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


@dataclass
class WithDevices(PlatformSpec):
    """A platform description plus devices built from classes, in the slots after the rest."""

    classes: list[type[Device]] = field(default_factory=list)

    def build(self, name_prefix: str = "") -> Platform:
        slots = list(super().build(name_prefix).slots)
        for cls in self.classes:
            base = self.base + len(slots) * self.stride
            name = f"{name_prefix}virtio-mmio@{base:#x}"
            device = MmioDevice(cls(), 2, name=name)
            slots.append(Slot(base, self.window, self.first_irq + len(slots), device))
        return Platform(slots)


@pytest.fixture
async def server(tmp_path) -> AsyncIterator[Server]:
    spec = WithDevices(small_platform().devices, classes=[Loopback, Hello])
    async with running_server(tmp_path, spec) as srv:
        yield srv


async def open_device(conn, device_id: int, version: int = 2):
    infos = await conn.platform()
    info = next(d for d in infos if d.device_id == device_id and d.version == version)
    return await conn.attach(info)


def device_of(server, conn, device_id: int) -> Device:
    """The server-side device instance of this connection's session."""
    session = next(s for s in server.sessions if s.session_id == conn.session_id)
    return next(
        s.device.backend for s in session.platform.slots if s.device.backend.device_id == device_id
    )


async def wait_until(predicate) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not predicate():
            await asyncio.sleep(0.001)


async def wait_for_field(drv: GenericDriver, name: str, value: int) -> None:
    """Until the device's config field ``name`` reads ``value`` (read through the driver)."""
    async with asyncio.timeout(TIMEOUT):
        while await drv.config_field(name) != value:
            await asyncio.sleep(0.001)


def blk_header(kind: int, sector: int) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


async def test_the_module_example_runs(server, capsys, monkeypatch):
    """The example in the generic driver's docstring, run as written (but for the socket),
    with this module's Hello as the user's ``mydevices.Hello``."""
    monkeypatch.setitem(sys.modules, "mydevices", types.SimpleNamespace(Hello=Hello))
    doc = generic.__doc__
    start = doc.index("::\n") + 3
    end = doc.index("\n\n", doc.index("detach()", start))
    code = textwrap.dedent(doc[start:end])
    code = code.replace("unix:///tmp/viowire.sock", url_of(server, "unix"))
    namespace: dict = {}
    exec("async def example():\n" + textwrap.indent(code, "    "), namespace)
    await asyncio.wait_for(namespace["example"](), TIMEOUT)
    assert capsys.readouterr().out == "{'greeted': 1}\n"  # the request, and only it


# -- blk and rng, driven with raw chains ---------------------------------------------------------
@pytest.mark.parametrize("memory", ["shared", "proxied"])
@pytest.mark.parametrize("version", [1, 2], ids=["legacy", "modern"])
async def test_generic_driver_writes_and_reads_back_a_disk(server, version, memory):
    """virtio-blk requests laid out by hand (§5.2.6): a write, a read of the same sectors, a
    read past the end; then the blk driver reads what the generic one wrote."""
    payload = os.urandom(8 * SECTOR)
    async with await connect(url_of(server, "unix"), memory=memory) as conn:
        dev = await open_device(conn, DeviceId.BLOCK, version)
        async with asyncio.timeout(TIMEOUT):
            drv = await GenericDriver.attach(dev, config_layout=BLK_CONFIG)
            assert drv.device_id == DeviceId.BLOCK  # taken from the device
            capacity = (await drv.config())["capacity"]
            assert capacity == (4 << 20) // SECTOR
            written, status = await drv.request(0, [blk_header(BlkType.OUT, 3), payload], 1)
            assert (written, status) == (1, bytes([BlkStatus.OK]))
            used = await drv.request(0, blk_header(BlkType.IN, 3), [len(payload), 1])
            assert used.data == payload + bytes([BlkStatus.OK])
            assert used.written == len(payload) + 1
            beyond = await drv.request(0, blk_header(BlkType.IN, capacity), [SECTOR, 1])
            assert beyond.data[-1] == BlkStatus.IOERR
            await drv.detach()
            blk = await BlockDriver.attach(await open_device(conn, DeviceId.BLOCK, version))
            assert await blk.read(3 * SECTOR, len(payload)) == payload
            await blk.detach()


async def test_generic_driver_reads_entropy_many_requests_at_once(server):
    async with await connect(url_of(server, "unix")) as conn:
        free = conn.ram.free_bytes
        dev = await open_device(conn, DeviceId.ENTROPY)
        async with asyncio.timeout(TIMEOUT):
            drv = await GenericDriver.attach(dev, device_id=DeviceId.ENTROPY)
            results = await asyncio.gather(*(drv.request(0, in_sizes=[16, 48]) for _ in range(100)))
            assert all(used.written == 64 for used in results)
            assert len({used.data for used in results}) == 100  # random, and each its own buffer
            await drv.detach()
        assert conn.ram.free_bytes == free  # every request's buffer, and the ring, given back


async def test_a_driver_for_another_type_is_refused(server):
    async with await connect(url_of(server, "unix")) as conn:
        dev = await open_device(conn, DeviceId.ENTROPY)
        with pytest.raises(WrongDeviceTypeError, match="attach the matching driver"):
            await asyncio.wait_for(GenericDriver.attach(dev, device_id=DeviceId.BLOCK), TIMEOUT)


async def test_features_are_the_callers_choice(server):
    async with await connect(url_of(server, "unix")) as conn:
        dev = await open_device(conn, DeviceId.BLOCK)
        async with asyncio.timeout(TIMEOUT):
            plain = await GenericDriver.attach(dev, config_layout=BLK_CONFIG)
            assert not plain.negotiated_features & BlockDriver.feature_table
            assert set(await plain.config()) == {"capacity"}  # the other fields need features
            await plain.detach()
            drv = await GenericDriver.attach(
                dev,
                features=BlockDriver.feature_table,
                exclude_features=1 << Feature.RING_EVENT_IDX,
                config_layout=BLK_CONFIG,
            )
            assert drv.negotiated_features & BlockDriver.feature_table
            assert not drv.has_feature(Feature.RING_EVENT_IDX)
            assert {"capacity", "size_max", "seg_max"} <= set(await drv.config())
            await drv.detach()


# -- the loopback device: out of order, held buffers, config ------------------------------------
async def attach_loopback(conn, **opts) -> GenericDriver:
    dev = await open_device(conn, Loopback.device_id)
    return await asyncio.wait_for(GenericDriver.attach(dev, device_type=Loopback, **opts), TIMEOUT)


@pytest.mark.parametrize("memory", ["shared", "proxied"])
async def test_requests_complete_in_the_order_the_device_returns_them(server, memory):
    """Three requests held by the device, released last first: the client sees each complete
    while the ones submitted before it are still in flight."""
    async with await connect(url_of(server, "unix"), memory=memory) as conn:
        drv = await attach_loopback(conn)
        keys = [b"1", b"2", b"3"]
        holds = {k: asyncio.create_task(drv.request(TX, b"H" + k, 1)) for k in keys}
        order: list[bytes] = []
        for key, task in holds.items():
            task.add_done_callback(lambda _t, k=key: order.append(k))
        await wait_until(lambda: device_of(server, conn, Loopback.device_id).held == 3)
        assert await drv.config_field("held") == 3
        async with asyncio.timeout(TIMEOUT):
            for i, key in reversed(list(enumerate(keys))):
                assert (await drv.request(TX, b"R" + key, 1)).valid == key
                assert (await holds[key]).valid == key
                assert not any(holds[k].done() for k in keys[:i])
        assert order == [b"3", b"2", b"1"]
        await drv.detach()


@pytest.mark.parametrize("memory", ["shared", "proxied"])
async def test_receive_yields_what_the_device_fills_and_reposts(server, memory):
    """Four buffers posted, twenty messages: every buffer goes back to the device after it is
    read, and the messages come in the order sent."""
    async with await connect(url_of(server, "unix"), memory=memory) as conn:
        drv = await attach_loopback(conn)
        await asyncio.wait_for(drv.post(RX, size=64, count=4), TIMEOUT)
        messages = [f"message {i}".encode() for i in range(20)]
        received = []
        async with asyncio.timeout(TIMEOUT):
            stream = drv.receive(RX)
            for message in messages:
                written, answer = await drv.request(TX, b"S" + message, 4)
                assert written == 4 and struct.unpack("<I", answer) == (len(message),)
                received.append(await anext(stream))
        assert received == messages
        await drv.detach()


async def test_a_receive_buffer_waits_as_long_as_the_device_holds_it(server):
    """The device holds both buffers and nothing arrives while nothing is sent; a late message
    still finds a buffer."""
    async with await connect(url_of(server, "unix")) as conn:
        drv = await attach_loopback(conn)
        await asyncio.wait_for(drv.post(RX, size=16, count=2), TIMEOUT)
        stream = drv.receive(RX)
        first = asyncio.ensure_future(anext(stream))
        await wait_for_field(drv, "buffers", 2)
        assert not first.done() and drv.vqs[RX].in_flight == 2
        await asyncio.wait_for(drv.request(TX, b"Slate", 4), TIMEOUT)
        assert await asyncio.wait_for(first, TIMEOUT) == b"late"
        await drv.detach()


async def test_config_changes_are_watched(server):
    async with await connect(url_of(server, "unix")) as conn:
        drv = await attach_loopback(conn)
        seen = []
        drv.on_config_change(lambda d: seen.append(d))
        await asyncio.wait_for(drv.post(RX, size=16, count=4), TIMEOUT)
        await wait_for_field(drv, "buffers", 4)
        assert await drv.config() == {"delivered": 0, "held": 0, "buffers": 4}
        watch = drv.watch_config()
        async with asyncio.timeout(TIMEOUT):
            for i in range(3):
                await drv.request(TX, b"S%d" % i, 4)
                await anext(drv.receive(RX))
            snapshot = await anext(watch)
            while snapshot.fields["delivered"] < 3:
                snapshot = await anext(watch)
        assert snapshot.fields == {"delivered": 3, "held": 0, "buffers": 4}
        assert snapshot.generation == await drv.dev.generation()
        assert seen and seen[0] is drv
        await drv.detach()
        with pytest.raises(StopAsyncIteration):
            await asyncio.wait_for(anext(watch), TIMEOUT)


async def test_receive_buffers_survive_a_queue_reset(server):
    """The buffers go to the new ring; one filled before the reset and not read yet keeps its
    message, and goes to the device once read."""
    async with await connect(url_of(server, "unix")) as conn:
        drv = await attach_loopback(conn)
        assert drv.has_feature(Feature.RING_RESET)
        async with asyncio.timeout(TIMEOUT):
            await drv.post(RX, size=32, count=4)
            stream = drv.receive(RX)
            await drv.request(TX, b"Sbefore", 4)
            assert await anext(stream) == b"before"
            await drv.request(TX, b"Sunread", 4)
            await wait_until(lambda: drv.vqs[RX].in_flight == 3)  # returned, not read
            old = drv.vqs[RX]
            await drv.reset_vq(RX, 8)
            assert drv.vqs[RX] is not old and drv.vqs[RX].num == 8
            assert drv.vqs[RX].in_flight == 3
            assert await anext(stream) == b"unread"
            assert drv.vqs[RX].in_flight == 4
            for word in (b"after", b"again", b"more", b"still", b"five"):
                await drv.request(TX, b"S" + word, 4)
                assert await anext(stream) == word
        await drv.detach()


async def test_device_needs_reset_stops_receive_until_reinitialised(server):
    """A request the device cannot parse puts it in DEVICE_NEEDS_RESET: the receive stream
    raises it; after reinitialise() the buffers are posted again and messages flow."""
    async with await connect(url_of(server, "unix")) as conn:
        drv = await attach_loopback(conn)
        async with asyncio.timeout(TIMEOUT):
            await drv.post(RX, size=32, count=4)
            stream = drv.receive(RX)
            with pytest.raises(DeviceNeedsResetError):
                await drv.request(TX, b"?", 1)
            with pytest.raises(DeviceNeedsResetError):
                await anext(stream)
            await drv.reinitialise()
            await drv.request(TX, b"Sback", 4)
            assert await anext(drv.receive(RX)) == b"back"
        await drv.detach()


async def test_detach_ends_receive_fails_requests_and_frees_everything(server):
    async with await connect(url_of(server, "unix")) as conn:
        free = conn.ram.free_bytes
        drv = await attach_loopback(conn)
        async with asyncio.timeout(TIMEOUT):
            await drv.post(RX, size=4096, count=16)
            reader = asyncio.ensure_future(anext(drv.receive(RX)))
            held = asyncio.ensure_future(drv.request(TX, b"Hforever", 8))
            await wait_until(lambda: device_of(server, conn, Loopback.device_id).held == 1)
            await drv.detach()
            with pytest.raises(StopAsyncIteration):
                await reader
            with pytest.raises(QueueDeletedError):
                await held
        assert conn.ram.free_bytes == free


async def test_a_cancelled_request_keeps_its_buffer_until_the_device_returns_it(server):
    async with await connect(url_of(server, "unix")) as conn:
        before = conn.ram.free_bytes
        drv = await attach_loopback(conn)
        free = conn.ram.free_bytes
        held = asyncio.ensure_future(drv.request(TX, b"Hk", 2))
        await wait_until(lambda: device_of(server, conn, Loopback.device_id).held == 1)
        held.cancel()
        with pytest.raises(asyncio.CancelledError):
            await held
        assert conn.ram.free_bytes < free  # the device still writes into it when released
        async with asyncio.timeout(TIMEOUT):
            await drv.request(TX, b"Rk", 2)  # its buffer is new (the held one is lent), then kept
        await wait_until(lambda: device_of(server, conn, Loopback.device_id).held == 0)
        await drv.detach()
        assert conn.ram.free_bytes == before  # the lent buffer came back once, the spare too


async def test_request_buffers_are_reused_and_their_writable_part_zeroed(server):
    """A spare buffer keeps the bytes of its last request: the next request's writable part is
    zeroed again, so what the device did not write reads as zeros, as from a fresh buffer."""
    async with await connect(url_of(server, "unix")) as conn:
        free = conn.ram.free_bytes
        drv = await attach_loopback(conn)
        after_setup = conn.ram.free_bytes
        async with asyncio.timeout(TIMEOUT):
            first = await drv.request(TX, b"Rabcdefgh", 64)
            kept = conn.ram.free_bytes
            second = await drv.request(TX, b"Rx", 64)
            assert conn.ram.free_bytes == kept < after_setup  # the same buffer, not a new one
        assert first.data[:8] == b"abcdefgh" and first.data[8:] == bytes(56)
        assert second.data[:1] == b"x" and second.data[1:] == bytes(63)
        await drv.detach()
        assert conn.ram.free_bytes == free  # spares go back at detach


async def test_bad_arguments_say_what_to_pass(server):
    async with await connect(url_of(server, "unix")) as conn:
        drv = await attach_loopback(conn)
        with pytest.raises(ValueError, match="at least one non-empty buffer"):
            await drv.request(TX)
        with pytest.raises(IndexError, match=r"set up 2 queues; ask for more with queues="):
            await drv.request(2, b"x")
        with pytest.raises(ValueError, match="call post"):
            await anext(drv.receive(RX))
        with pytest.raises(ValueError, match=r"a count of 1\.\.16"):
            await drv.post(RX, size=16, count=17)
        with pytest.raises(KeyError, match="known: delivered, held, buffers"):
            await drv.config_field("nosuch")
        await drv.detach()
    with pytest.raises(ValueError, match="name each queue once"):
        GenericDriver(None, queues=2, queue_names=["rx"])  # type: ignore[arg-type]
