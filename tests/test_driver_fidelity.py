"""Driver fidelity against the real server: config change, queue reset, DEVICE_NEEDS_RESET
recovery, interrupt suppression and 16-bit index wraparound."""

from __future__ import annotations

import asyncio

import pytest
from servers import url_of

from viowire.client.connection import connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.client.errors import DeviceNeedsResetError, QueueDeletedError, QueueResetError
from viowire.virtio.constants import Feature, Interrupt, Status


def session_of(server, conn):
    return next(s for s in server.sessions if s.session_id == conn.session_id)


async def attach(conn, index, driver=BlockDriver, **opts):
    return await driver.attach(await conn.attach((await conn.platform())[index]), **opts)


async def wait_until(predicate, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.001)


@pytest.mark.parametrize("index", [0, 1], ids=["v1", "v2"])
async def test_config_change_reaches_the_driver(server, index):
    """Resize a disk on the server: the driver's config callback sees the new capacity."""
    async with await connect(url_of(server, "unix")) as conn:
        blk = await attach(conn, index)
        seen = []
        blk.dev.on_config_change(lambda dev: seen.append(dev.config_changes))
        generation = await blk.dev.generation()
        session_of(server, conn).platform.slots[index].device.backend.resize(8 << 20)
        await wait_until(lambda: blk.capacity == (8 << 20) // 512)
        assert seen
        if index == 1:  # only modern devices have ConfigGeneration
            assert await blk.dev.generation() != generation
        await blk.write((8 << 20) - 512, b"e" * 512)  # the new end of the disk works
        await blk.detach()


async def test_queue_reset_keeps_the_disk_and_changes_the_ring(server):
    async with await connect(url_of(server, "unix")) as conn:
        blk = await attach(conn, 1)
        assert blk.has_feature(Feature.RING_RESET)
        await blk.write(0, b"q" * 4096)
        old = blk.vq
        await blk.reset_queue(num=16)
        assert blk.vq is not old and blk.vq.num == 16
        assert await blk.read(0, 4096) == b"q" * 4096
        await blk.write(4096, b"r" * 4096)
        await blk.detach()


async def test_queue_reset_fails_requests_in_flight(server):
    """Requests posted but not yet completed when the queue resets fail with a clear error."""
    async with await connect(url_of(server, "unix"), memory="proxied") as conn:
        blk = await attach(conn, 1)
        pending = [asyncio.create_task(blk.write(i * 512, b"p" * 512)) for i in range(32)]
        await asyncio.sleep(0)
        await blk.reset_queue()
        results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 5)
        assert all(r is None or isinstance(r, QueueDeletedError) for r in results)
        await blk.write(0, b"x" * 512)
        await blk.detach()


async def test_queue_reset_needs_the_feature(server):
    async with await connect(url_of(server, "unix")) as conn:
        blk = await attach(conn, 0)  # legacy: no RING_RESET
        with pytest.raises(QueueResetError, match="RING_RESET"):
            await blk.reset_queue()
        await blk.detach()


async def test_device_needs_reset_is_reported_and_recovered(server):
    """A ring the device cannot use (a head index out of range) wedges it: the driver is told
    through the config interrupt, requests fail, and reinitialise() brings it back."""
    async with await connect(url_of(server, "unix")) as conn:
        blk = await attach(conn, 1)
        vq = blk.vq
        memory = conn.ram.memory
        a = vq.addresses
        # Publish a head that does not exist, as a buggy driver would.
        idx = await memory.read_u16(a.avail_idx)
        await memory.write_u16(a.avail_slot_addr(idx), vq.num + 7)
        await memory.write_u16(a.avail_idx, idx + 1)
        await conn.mmio_write(blk.dev.base + 0x50, 4, vq.index)
        await wait_until(lambda: blk.needs_reset)
        assert await blk.dev.get_status() & Status.DEVICE_NEEDS_RESET
        with pytest.raises(DeviceNeedsResetError):
            await asyncio.wait_for(blk.write(0, b"w" * 512), 5)
        await blk.reinitialise()
        assert not blk.needs_reset
        await blk.write(0, b"ok" * 256)
        assert await blk.read(0, 512) == b"ok" * 256
        await blk.detach()


@pytest.mark.parametrize(
    "channels, memory",
    [(64, "shared"), (0, "shared"), (0, "proxied")],
    ids=["channel", "irq-frames", "proxied"],
)
@pytest.mark.parametrize("event_idx", [True, False], ids=["event_idx", "flags"])
async def test_no_interrupt_suppression(server, event_idx, channels, memory):
    """With callbacks disabled the device completes buffers without interrupting, whether
    used-buffer notifications come as IRQ frames or on the notification channel, and whether
    the device reads used_event (or avail.flags) in place or with its next refill (proxied)."""
    exclude = 0 if event_idx else 1 << Feature.RING_EVENT_IDX
    async with await connect(url_of(server, "unix"), memory=memory) as conn:
        conn.notify_channels = channels
        rng = await attach(conn, 3, EntropyDriver, exclude_features=exclude)
        assert rng.has_feature(Feature.RING_EVENT_IDX) == event_idx
        assert len(await rng.read(16)) == 16
        assert (rng.dev._channel is not None) == bool(channels)
        interrupts = rng.dev.interrupts()
        vq = rng.vq
        await vq.disable_cb()
        buffer = conn.ram.alloc(32)
        await vq.add([], [(buffer, 32)], token="quiet")
        await vq.kick()
        got = None
        async with asyncio.timeout(5):
            while got is None:
                got = await vq.get_buf()
                await asyncio.sleep(0.001)
        assert got[0] == "quiet" and interrupts._queue.empty()
        await vq.enable_cb()
        assert len(await rng.read(16)) == 16
        async with asyncio.timeout(5):
            assert await anext(interrupts) & Interrupt.VRING
        interrupts.close()
        conn.ram.free(buffer)
        await rng.detach()


async def test_index_wraparound_past_65536_requests(server):
    """More than 65,536 requests through one queue: both sides wrap their 16-bit indexes."""
    async with await connect(url_of(server, "unix")) as conn:
        rng = await attach(conn, 3, EntropyDriver)
        total, depth = 65_600, 64

        async def worker(n: int) -> int:
            for _ in range(n):
                assert len(await rng._request(8)) == 8
            return n

        done = await asyncio.wait_for(
            asyncio.gather(*(worker(total // depth) for _ in range(depth))), 120
        )
        assert sum(done) >= 65_536
        assert rng.vq._avail_idx == sum(done) & 0xFFFF
        await rng.detach()


@pytest.mark.parametrize("irq_status", [True, False], ids=["irq_status", "exact"])
async def test_config_change_during_io_loses_nothing(server, irq_status):
    """A config interrupt raised while the line is high with VRING: both reach the driver, and
    the device keeps interrupting afterwards (a lost bit would leave the line high for good)."""
    async with await connect(url_of(server, "unix"), irq_status=irq_status) as conn:
        blk = await attach(conn, 1)
        device = session_of(server, conn).platform.slots[1].device
        for round_ in range(20):
            writes = [asyncio.create_task(blk.write(i * 512, b"c" * 512)) for i in range(16)]
            await asyncio.sleep(0)
            device.backend.resize((4 << 20) + (round_ + 1) * 512)
            await asyncio.wait_for(asyncio.gather(*writes), 5)
        await wait_until(lambda: blk.capacity == ((4 << 20) + 20 * 512) // 512)
        assert await asyncio.wait_for(blk.read(0, 512), 5) == b"c" * 512
        await blk.detach()
