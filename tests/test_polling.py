"""Poll mode (``serve --poll-us``, a driver's ``poll_us``): after serving a queue the device polls
its ring for a while with the driver's notifications off, and a polling driver watches its used
ring with the device's notifications off, as vhost's busy-polling and NVMe's io_poll do.

What must hold, on the real server over a real Unix socket with shared memory: every request
completes and its data are right however requests are spaced around the polling windows (a
window that ends must turn notifications back on and catch what came meanwhile), with and
without EVENT_IDX, legacy and modern; while a window is open, the other side's notifications
are off (a request nobody kicked is served; no used-buffer notification comes); polling stops
when the work does; resets, proxied memory and disconnects are unaffected.

No assertion here depends on how fast the machine is: what a window must catch is asserted with
a window no test outlives (FOREVER_US), and the window rule's growing half, which needs events
that come soon enough, gets a limit thousands of times longer than a request takes.
"""

from __future__ import annotations

import asyncio
import contextlib
import random

import pytest
from cli_run import viowire
from servers import small_platform, url_of
from test_bad_input import (
    BLK,
    BLK_V1,
    RNG,
    RNG_V1,
    _no_server_bugs,  # noqa: F401  (autouse: no ERROR records from the server)
    device_of,
    until,
)

from viowire import polling
from viowire.client.connection import connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.server.app import Server
from viowire.virtio.constants import Feature

POLL_US = 300
FOREVER_US = 600_000_000  # ten minutes: open for the whole test, however it is scheduled
EVENT_IDX = 1 << Feature.RING_EVENT_IDX


def rings_of(modern: int, legacy: int):
    """Parametrize ``base, exclude``: a modern device with and without EVENT_IDX, a legacy one."""
    return pytest.mark.parametrize(
        ("base", "exclude"),
        [(modern, 0), (modern, EVENT_IDX), (legacy, 0)],
        ids=["v2-event-idx", "v2-flags", "v1"],
    )


@contextlib.asynccontextmanager
async def polling_at(tmp_path, poll_us: int):
    server = Server(small_platform(), poll_us=poll_us)
    await server.start(["tcp://127.0.0.1:0", f"unix://{tmp_path}/poll.sock"])
    try:
        yield server
    finally:
        await server.close()


@pytest.fixture
async def polling_server(tmp_path):
    async with polling_at(tmp_path, POLL_US) as server:
        yield server


async def polled_disk(conn, base: int, *, poll_us: int = POLL_US, exclude: int = 0):
    info = next(d for d in await conn.platform() if d.base == base)
    dev = await conn.attach(info)
    dev.poll_us = poll_us
    return await BlockDriver.attach(dev, exclude_features=exclude)


async def spaced_io(blk: BlockDriver, count: int, seed: int) -> None:
    """Writes then read-backs, one at a time and a few at once, with pauses shorter than, about
    as long as and longer than a polling window."""
    rng = random.Random(seed)
    pauses = (0, 0, 50e-6, POLL_US * 1e-6, 2 * POLL_US * 1e-6, 0.003)
    for i in range(count):
        block = bytes([i % 251]) * 4096
        await asyncio.wait_for(blk.write((i % 64) * 4096, block), 5)
        if i % 7 == 0:
            reads = [blk.read((j % 64) * 4096, 4096) for j in range(i - 3, i + 1) if j >= 0]
            assert (await asyncio.wait_for(asyncio.gather(*reads), 5))[-1] == block
        else:
            assert await asyncio.wait_for(blk.read((i % 64) * 4096, 4096), 5) == block
        await asyncio.sleep(rng.choice(pauses))


@rings_of(BLK, BLK_V1)
@pytest.mark.parametrize("client_polls", [True, False], ids=["both-poll", "server-polls"])
async def test_requests_complete_however_they_are_spaced(
    polling_server, base, exclude, client_polls
):
    async with await connect(url_of(polling_server, "unix")) as conn:
        blk = await polled_disk(conn, base, poll_us=POLL_US if client_polls else 0, exclude=exclude)
        await spaced_io(blk, 300, seed=base ^ exclude)
        for i in range(100):  # back to back: served inside the windows
            assert await asyncio.wait_for(blk.read((i % 64) * 4096, 4096), 5)
        device = device_of(polling_server, conn, base)
        await until(lambda: not device.polling, "the device to stop polling once idle")
        await until(lambda: blk.dev._poll_deadline is None, "the driver to stop polling")
        # Idle now, notifications back on in both directions: a lone request still completes.
        await asyncio.sleep(0.05)
        await asyncio.wait_for(blk.write(0, b"z" * 512), 5)
        assert await asyncio.wait_for(blk.read(0, 512), 5) == b"z" * 512
        await blk.detach()


@rings_of(RNG, RNG_V1)
async def test_a_polling_device_serves_what_nobody_kicked(tmp_path, base, exclude):
    """While its window is open the device watches the avail ring: a request the driver makes
    available without a notification is served all the same (against a device that did not
    poll, it would wait forever)."""
    async with (
        polling_at(tmp_path, FOREVER_US) as server,
        await connect(url_of(server, "unix")) as conn,
    ):
        info = next(d for d in await conn.platform() if d.base == base)
        rng = await EntropyDriver.attach(await conn.attach(info), exclude_features=exclude)
        await rng.read(16)  # kicked: served, and the device polls from then on
        device = device_of(server, conn, base)
        await until(lambda: device.polling, "the device to poll after serving its queue")
        channel = rng.dev._channel
        kicks = channel.kicks
        buffer = conn.ram.alloc(16)
        for _ in range(20):
            done = asyncio.get_running_loop().create_future()
            await rng.vq.add([], [(buffer, 16)], token=done)  # made available, never kicked
            assert await asyncio.wait_for(done, 5) == 16
        assert channel.kicks == kicks
        conn.ram.free(buffer)
        await rng.detach()
        assert not device.polling  # the reset ended the window


@rings_of(RNG, RNG_V1)
async def test_a_polling_device_tells_the_driver_not_to_kick(tmp_path, base, exclude):
    """While its window is open the device holds avail_event one behind the last index it has
    seen (VIRTQ_USED_F_NO_NOTIFY without EVENT_IDX), so a driver that makes two requests
    available and asks whether to kick sends nothing; the device finds them all the same."""
    async with (
        polling_at(tmp_path, FOREVER_US) as server,
        await connect(url_of(server, "unix")) as conn,
    ):
        info = next(d for d in await conn.platform() if d.base == base)
        rng = await EntropyDriver.attach(await conn.attach(info), exclude_features=exclude)
        await rng.read(16)  # kicked: served, and the device polls from then on
        device = device_of(server, conn, base)
        channel = rng.dev._channel
        buffers = [conn.ram.alloc(16) for _ in range(2)]
        for _ in range(5):
            await until(lambda: device.polling, "the device to poll after serving its queue")
            kicks = channel.kicks
            done = [asyncio.get_running_loop().create_future() for _ in buffers]
            for buffer, future in zip(buffers, done, strict=True):
                await rng.vq.add([], [(buffer, 16)], token=future)
            await rng.vq.kick()  # the driver's own test of avail_event / the flags
            assert channel.kicks == kicks
            assert await asyncio.wait_for(asyncio.gather(*done), 5) == [16, 16]
        for buffer in buffers:
            conn.ram.free(buffer)
        await rng.detach()


@rings_of(BLK, BLK_V1)
async def test_a_polling_driver_is_not_notified(server, base, exclude):
    """While its window is open the driver watches the used ring and has told the device not to
    notify (used_event one behind last_used with EVENT_IDX, VIRTQ_AVAIL_F_NO_INTERRUPT without,
    §2.7.10): requests complete, and no used-buffer notification comes, however they are timed.

    The window opens on a ring that has been used already: the device notifies the first used
    buffer after a reset whatever used_event says, which would hide a driver that only seemed to
    suppress them (used_event = last_used: notified once per window)."""
    async with await connect(url_of(server, "unix")) as conn:
        blk = await polled_disk(conn, base, poll_us=FOREVER_US, exclude=exclude)
        dev = blk.dev
        dev._poll_window = 0.0  # none yet: the first request is notified (and opens the channel)
        await asyncio.wait_for(blk.write(0, b"n" * 4096), 5)
        channel = dev._channel
        assert channel is not None and channel.used == 1
        dev._poll_window = FOREVER_US / 1e6  # from now on a window no request outlives
        for i in range(20):
            block = bytes([i]) * 4096
            await asyncio.wait_for(blk.write((i % 8) * 4096, block), 5)
            assert await asyncio.wait_for(blk.read((i % 8) * 4096, 4096), 5) == block
        assert channel.used == 1, f"{channel.used - 1} used-buffer notifications while polling"
        await blk.detach()


async def test_a_polling_driver_against_a_server_that_does_not_poll(server):
    async with await connect(url_of(server, "unix")) as conn:
        blk = await polled_disk(conn, BLK)
        await spaced_io(blk, 100, seed=7)
        await blk.detach()


async def test_reset_and_queue_reset_while_polling(polling_server):
    async with await connect(url_of(polling_server, "unix")) as conn:
        blk = await polled_disk(conn, BLK)
        await blk.write(0, b"r" * 4096)
        await blk.reset_queue(num=32)  # inside the polling window
        assert await blk.read(0, 4096) == b"r" * 4096
        await blk.reinitialise()  # a device reset, polling or not
        assert await blk.read(0, 4096) == b"r" * 4096
        await spaced_io(blk, 30, seed=3)
        await blk.detach()


async def test_proxied_sessions_are_served_without_polling(polling_server):
    async with await connect(url_of(polling_server, "tcp"), memory="proxied") as conn:
        blk = await polled_disk(conn, BLK)
        await spaced_io(blk, 30, seed=5)
        assert not device_of(polling_server, conn, BLK).polling
        await blk.detach()


async def test_a_driver_gone_mid_window_leaves_nothing_running(polling_server):
    for _ in range(5):
        conn = await connect(url_of(polling_server, "unix"))
        blk = await polled_disk(conn, BLK)
        await blk.write(0, b"g" * 4096)
        await conn.close()  # the device is polling its ring right now
    await until(lambda: not polling_server.sessions, "the sessions to end")
    async with await connect(url_of(polling_server, "unix")) as conn:
        blk = await polled_disk(conn, BLK)
        await spaced_io(blk, 20, seed=9)
        await blk.detach()


async def test_closing_the_connection_ends_the_drivers_window(server):
    """Guest RAM goes with the connection: a driver still polling its used ring must stop, not
    read unmapped memory in a callback whose exception only asyncio's log would see."""
    conn = await connect(url_of(server, "unix"))
    blk = await polled_disk(conn, BLK, poll_us=FOREVER_US)
    await asyncio.wait_for(blk.write(0, b"c" * 4096), 5)
    assert blk.dev._poll_deadline is not None  # the window is open
    await conn.close()
    await until(lambda: blk.dev._poll_deadline is None, "the driver's window to end")


def test_serve_refuses_a_negative_poll_window():
    result = viowire("serve", "--poll-us", "-1", "--listen", "tcp://127.0.0.1:0")
    assert result.returncode == 1
    assert "poll_us -1" in result.stderr


async def test_a_full_ring_is_served_while_polling(polling_server):
    """Submitters waiting for room cannot be served inline: the poller hands their queue to
    vring_interrupt in a task, instead of skipping it until the window ends."""
    async with await connect(url_of(polling_server, "unix")) as conn:
        blk = await polled_disk(conn, BLK)
        await blk.reset_queue(num=4)  # one request at a time: the rest wait for room
        blocks = [bytes([i]) * 4096 for i in range(16)]
        await asyncio.wait_for(
            asyncio.gather(*(blk.write(i * 4096, b) for i, b in enumerate(blocks))), 10
        )
        got = await asyncio.wait_for(
            asyncio.gather(*(blk.read(i * 4096, 4096) for i in range(16))), 10
        )
        assert got == blocks
        await blk.detach()


async def test_without_irq_status_polling_still_completes(polling_server):
    """A driver that reads InterruptStatus (no IRQ_STATUS): the window's end must not post an
    ACK that clears a bit the driver has yet to read."""
    conn = await connect(url_of(polling_server, "unix"), irq_status=False)
    try:
        blk = await polled_disk(conn, BLK)
        await spaced_io(blk, 60, seed=11)
        await blk.detach()
    finally:
        await conn.close()


async def test_a_queue_with_a_callback_keeps_its_notifications(polling_server):
    async with await connect(url_of(polling_server, "unix")) as conn:
        info = next(d for d in await conn.platform() if d.base == RNG)
        dev = await conn.attach(info)
        dev.poll_us = POLL_US
        rng = await EntropyDriver.attach(dev)
        await rng.read(16)
        called = asyncio.Event()
        rng.vq.callback = lambda vq: called.set()
        buffer = conn.ram.alloc(16)
        await rng.vq.add([], [(buffer, 16)], token="cb")
        await rng.vq.kick()
        await asyncio.wait_for(called.wait(), 5)
        assert (await rng.vq.get_buf())[0] == "cb"
        conn.ram.free(buffer)
        await rng.detach()


async def test_polling_queues_are_capped_per_process(polling_server, monkeypatch):
    import viowire.server.service as server_service

    monkeypatch.setattr(server_service, "MAX_POLLING_QUEUES", 1)
    conns = [await connect(url_of(polling_server, "unix")) for _ in range(3)]
    try:
        disks = [await polled_disk(conn, BLK) for conn in conns]
        seen = []

        async def io(blk, seed):
            for i in range(40):
                await asyncio.wait_for(blk.write((i % 8) * 4096, bytes([seed]) * 4096), 5)
                seen.append(server_service._polling[0])
                await asyncio.sleep(random.Random(seed * 100 + i).choice((0, 1e-4, 1e-3)))

        await asyncio.gather(*(io(blk, n) for n, blk in enumerate(disks)))
        assert max(seen) <= 1
        for n, blk in enumerate(disks):
            assert await blk.read(0, 4096) == bytes([n]) * 4096
        await until(lambda: server_service._polling[0] == 0, "every polling loop to end")
    finally:
        for conn in conns:
            await conn.close()


async def test_the_window_shrinks_for_sparse_requests_and_grows_for_back_to_back(tmp_path):
    """Like KVM's halt-polling: windows that find nothing halve (down to none), kicks that a
    window would have caught double it again, up to poll_us. Sparse is forced (each request
    waits until the window is over, then longer than poll_us); back to back needs one kick of
    200 to come within poll_us, 20 ms, of its pass."""
    limit_us = 20_000
    async with (
        polling_at(tmp_path, limit_us) as server,
        await connect(url_of(server, "unix")) as conn,
    ):
        blk = await polled_disk(conn, BLK, poll_us=0)  # the driver does not poll here
        device = device_of(server, conn, BLK)
        halvings = 0
        while limit_us * 1e-6 / 2**halvings >= polling.GROW_FROM:
            halvings += 1
        for i in range(halvings + 1):  # far apart: every window runs out with nothing found
            await asyncio.wait_for(blk.write(0, bytes([i]) * 512), 5)
            await until(lambda: not device.polling, "the window to run out")
            await asyncio.sleep(1.5 * limit_us * 1e-6)
        assert device._poll_mode.window(0) == 0  # polling no longer costs this queue anything
        for _ in range(200):  # back to back: kicks right after each pass
            await asyncio.wait_for(blk.read(0, 512), 5)
        assert device._poll_mode.window(0) > 0
        assert await blk.read(0, 512) == bytes([halvings]) * 512
        await blk.detach()


async def test_the_drivers_window_adapts_too(server):
    """A polling driver against a server that does not poll: a completion that comes after the
    window (the server has to be woken) but within poll_us makes it grow, and back-to-back
    requests keep it (viowire.polling, the rule both ends share; the shrinking half is
    test_the_window_rule's). The window starts far shorter than any round trip can be, and
    poll_us, 20 ms, is far longer than a request takes."""
    limit_us = 20_000
    async with await connect(url_of(server, "unix")) as conn:
        blk = await polled_disk(conn, BLK, poll_us=limit_us)
        dev = blk.dev
        await blk.write(0, b"w" * 512)
        short = polling.GROW_FROM / 1024  # as if it had shrunk already: a few nanoseconds
        dev._poll_window = short
        for _ in range(10):  # apart, so each request finds the server asleep
            await asyncio.sleep(0.002)
            await asyncio.wait_for(blk.write(0, b"w" * 512), 5)
        assert dev._poll_window > short
        grown = dev._poll_window
        for _ in range(200):
            assert await asyncio.wait_for(blk.read(0, 512), 5) == b"w" * 512
        assert 0 < dev._poll_window <= limit_us / 1e6
        assert dev._poll_window >= grown / 2
        await blk.detach()


def test_the_window_rule():
    limit = 200e-6
    assert polling.adapt(0.0, limit, 50e-6) == polling.GROW_FROM  # from none to the first step
    assert polling.adapt(40e-6, limit, 60e-6) == 80e-6  # too short: doubles
    assert polling.adapt(160e-6, limit, 190e-6) == limit  # never past the limit
    assert polling.adapt(80e-6, limit, 30e-6) == 80e-6  # long enough: stays
    assert polling.adapt(80e-6, limit, 1e-3) == 40e-6  # polling could not help: halves
    assert polling.adapt(15e-6, limit, 1e-3) == 0.0  # and a small one goes
