"""viowire's vhost-user back-end driven by a Python front-end over real Unix sockets: guest RAM
in a memfd, rings written as a driver writes them, kick and call eventfds (no QEMU here:
tests/test_vhost_user_guest.py boots a Linux guest against it)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import struct
from collections.abc import AsyncIterator

import pytest

from viowire.server.devices import BlockBackend, RngBackend
from viowire.vhost_user import protocol as p
from viowire.vhost_user.backend import OFFERED_PROTOCOL_FEATURES, PROTOCOL_FEATURES
from viowire.vhost_user.frontend import USER_OFFSET, Frontend
from viowire.vhost_user.server import Listener
from viowire.virtio.blk import BlkStatus, BlkType
from viowire.virtio.constants import Feature

TIMEOUT = 5.0
SECTOR = 512


@contextlib.asynccontextmanager
async def serving(tmp_path, device, name: str = "dev") -> AsyncIterator[Listener]:
    listener = Listener(str(tmp_path / f"{name}.sock"), device)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close()


@contextlib.asynccontextmanager
async def frontend(listener: Listener, **kw) -> AsyncIterator[Frontend]:
    fe = await Frontend.connect(listener.path, **kw)
    try:
        yield fe
    finally:
        fe.close()


async def blk_request(ring, readable, writable):
    """One chain through the ring; (status, used.len, writable bytes but the status)."""
    before = ring.ring.used_idx
    chain = ring.ring.add_chain(readable, writable)
    ring.kick_now()
    await ring.wait_call()
    assert ring.ring.used_idx == (before + 1) & 0xFFFF
    head, used_len = ring.ring.used_elem(before)
    assert head == chain.head
    data = b"".join(ring.ring.ram.read(gpa, n) for gpa, n in chain.writable)
    return data[-1], used_len, data[:-1]


def header(kind: int, sector: int = 0) -> bytes:
    return struct.pack("<IIQ", kind, 0, sector)


async def test_features_and_protocol_features(tmp_path):
    device = BlockBackend(size=1 << 20)
    async with serving(tmp_path, device) as listener, frontend(listener) as fe:
        offered = await fe.get_u64(p.Request.GET_FEATURES)
        assert offered & PROTOCOL_FEATURES
        assert offered >> Feature.VERSION_1 & 1
        assert offered >> Feature.RING_EVENT_IDX & 1
        assert offered & device.device_features(2) == device.device_features(2)
        protocol = await fe.get_u64(p.Request.GET_PROTOCOL_FEATURES)
        assert protocol == OFFERED_PROTOCOL_FEATURES
        for bit in ("MQ", "REPLY_ACK", "CONFIG", "CONFIGURE_MEM_SLOTS", "RESET_DEVICE"):
            assert protocol >> p.ProtocolFeature[bit] & 1, bit
        await fe.request(p.Request.SET_PROTOCOL_FEATURES, value=protocol)
        fe.protocol_features = protocol
        assert await fe.get_u64(p.Request.GET_QUEUE_NUM) == 1
        assert await fe.get_u64(p.Request.GET_MAX_MEM_SLOTS) >= 8
        # REPLY_ACK: a feature that was not offered is refused with a non-zero ack
        assert await fe.set_u64(p.Request.SET_FEATURES, offered | 1 << 40) != 0
        assert await fe.set_u64(p.Request.SET_FEATURES, offered) == 0
        assert listener.connection.negotiated_features == offered & ~PROTOCOL_FEATURES


async def test_blk_write_read_flush_through_rings(tmp_path):
    image = tmp_path / "disk.img"
    device = BlockBackend(size=1 << 20, path=str(image))
    async with serving(tmp_path, device) as listener, frontend(listener) as fe:
        await fe.handshake()
        config = await fe.get_config(0, 60)
        assert len(config) == 60
        assert struct.unpack_from("<Q", config)[0] == (1 << 20) // SECTOR  # capacity
        ring = await fe.start_ring(0, 64)
        data = os.urandom(4 * SECTOR)
        status, used, _ = await blk_request(ring, [header(BlkType.OUT, 8), data], [1])
        assert (status, used) == (BlkStatus.OK, 1)
        status, used, got = await blk_request(ring, [header(BlkType.IN, 8)], [len(data), 1])
        assert (status, used, got) == (BlkStatus.OK, len(data) + 1, data)
        status, _, _ = await blk_request(ring, [header(BlkType.FLUSH)], [1])
        assert status == BlkStatus.OK
        assert await fe.stop_ring(0) == 3  # GET_VRING_BASE: three chains taken
    with open(image, "rb") as disk:
        disk.seek(8 * SECTOR)
        assert disk.read(len(data)) == data  # the host sees the data in the file


async def test_ring_resumes_from_base_after_stop(tmp_path):
    device = BlockBackend(size=1 << 20)
    async with serving(tmp_path, device) as listener, frontend(listener) as fe:
        await fe.handshake()
        ring = await fe.start_ring(0, 16)
        for sector in range(3):
            status, _, _ = await blk_request(ring, [header(BlkType.OUT, sector), b"x" * 512], [1])
            assert status == BlkStatus.OK
        base = await fe.stop_ring(0)
        assert base == 3
        # restart the same ring at that base: the back-end reads used.idx from the ring
        builder = ring.ring
        ring.close()
        kick, call = os.eventfd(0, os.EFD_NONBLOCK), os.eventfd(0, os.EFD_NONBLOCK)
        ring.kick, ring.call = kick, call
        await fe.request(p.Request.SET_VRING_BASE, index=0, num=base)
        await fe.request(p.Request.SET_VRING_CALL, [call], value=0)
        await fe.request(p.Request.SET_VRING_KICK, [kick], value=0)
        await fe.request(p.Request.SET_VRING_ENABLE, index=0, num=1)
        status, _, got = await blk_request(ring, [header(BlkType.IN, 2)], [512, 1])
        assert (status, got) == (BlkStatus.OK, b"x" * 512)
        assert builder.used_idx == 4


async def test_rng_fills_buffers_with_multi_region_table(tmp_path):
    async with (
        serving(tmp_path, RngBackend()) as listener,
        frontend(listener, ram_size=1 << 21) as fe,
    ):
        await fe.handshake()
        # as QEMU gives microvm's RAM: the same memfd as two regions
        await fe.expect_ack(await fe.set_mem_table(splits=(0x1000,)))
        assert len(listener.connection.table) == 2
        ring = await fe.start_ring(0, 32)
        chains = [ring.ring.add_chain([], [256]) for _ in range(4)]
        ring.kick_now()
        async with asyncio.timeout(TIMEOUT):
            while ring.ring.used_idx != 4:
                await ring.wait_call()
        for i, chain in enumerate(chains):
            head, length = ring.ring.used_elem(i)
            assert (head, length) == (chain.head, 256)
        buffers = {fe.ram.read(*chain.writable[0]) for chain in chains}
        assert len(buffers) == 4 and b"\xee" * 256 not in buffers  # filled, all different


async def test_add_and_remove_memory_regions(tmp_path):
    async with serving(tmp_path, RngBackend()) as listener, frontend(listener) as fe:
        offered = await fe.get_u64(p.Request.GET_FEATURES)
        protocol = await fe.get_u64(p.Request.GET_PROTOCOL_FEATURES)
        await fe.request(p.Request.SET_PROTOCOL_FEATURES, value=protocol)
        fe.protocol_features = protocol
        await fe.expect_ack(await fe.set_u64(p.Request.SET_FEATURES, offered))
        regions = fe.ram.regions(splits=(0x8000,))
        for region in regions:
            answer = await fe.request(
                p.Request.ADD_MEM_REG, [fe.ram.fd], need_reply=True, padding=0, region=region
            )
            assert answer.parse().value == 0
        assert len(listener.connection.table) == 2
        # the same region again overlaps: refused, table unchanged
        answer = await fe.request(
            p.Request.ADD_MEM_REG, [fe.ram.fd], need_reply=True, padding=0, region=regions[0]
        )
        assert answer.parse().value != 0
        answer = await fe.request(
            p.Request.REM_MEM_REG, need_reply=True, padding=0, region=regions[1]
        )
        assert answer.parse().value == 0
        assert len(listener.connection.table) == 1
        # a ring in the removed region cannot start
        ring_gpa = regions[1]["guest_phys_addr"]
        fe.ram._next = ring_gpa
        with pytest.raises(ConnectionError, match="refused"):
            await fe.start_ring(0, 16)


async def test_reset_device_stops_rings_and_keeps_serving(tmp_path):
    device = BlockBackend(size=1 << 20)
    async with serving(tmp_path, device) as listener, frontend(listener) as fe:
        await fe.handshake()
        ring = await fe.start_ring(0, 16)
        status, _, _ = await blk_request(ring, [header(BlkType.OUT, 0), b"y" * 512], [1])
        assert status == BlkStatus.OK
        answer = await fe.request(p.Request.RESET_DEVICE, need_reply=True)
        assert answer.parse().value == 0
        assert not listener.connection.queues[0].ready
        await fe.expect_ack(await fe.set_u64(p.Request.SET_FEATURES, fe.features))
        ring = await fe.start_ring(0, 16)
        status, _, got = await blk_request(ring, [header(BlkType.IN, 0)], [512, 1])
        assert (status, got) == (BlkStatus.OK, b"y" * 512)  # storage outlives the reset


async def call_pending(ring) -> bool:
    try:
        os.eventfd_read(ring.call)
    except BlockingIOError:
        return False
    return True


async def used(ring, count: int) -> None:
    async with asyncio.timeout(TIMEOUT):
        while ring.ring.used_idx != count:
            await asyncio.sleep(0.005)


async def test_no_interrupt_without_event_idx(tmp_path):
    async with serving(tmp_path, RngBackend()) as listener, frontend(listener) as fe:
        offered = await fe.get_u64(p.Request.GET_FEATURES)
        await fe.handshake(offered & ~(1 << Feature.RING_EVENT_IDX))
        ring = await fe.start_ring(0, 16)
        ring.ring.set_avail_flags(1)  # VIRTQ_AVAIL_F_NO_INTERRUPT
        ring.ring.add_chain([], [8])
        os.eventfd_write(ring.kick, 1)
        await used(ring, 1)
        assert not await call_pending(ring)
        ring.ring.set_avail_flags(0)
        ring.ring.add_chain([], [8])
        os.eventfd_write(ring.kick, 1)
        await ring.wait_call()


async def test_event_idx_calls_when_used_event_is_crossed(tmp_path):
    async with serving(tmp_path, RngBackend()) as listener, frontend(listener) as fe:
        await fe.handshake()
        assert fe.features >> Feature.RING_EVENT_IDX & 1
        ring = await fe.start_ring(0, 16)
        ring.ring.add_chain([], [8])
        ring.kick_now()  # used_event 0: the first used buffer
        await ring.wait_call()
        ring.ring.set_used_event(2)  # not before the third used buffer (index 2)
        ring.ring.add_chain([], [8])
        os.eventfd_write(ring.kick, 1)
        await used(ring, 2)
        assert not await call_pending(ring)
        ring.ring.add_chain([], [8])
        os.eventfd_write(ring.kick, 1)
        await ring.wait_call()
        assert ring.ring.used_idx == 3


# -- bad input --------------------------------------------------------------------------------
async def assert_still_serves(listener: Listener) -> None:
    """A fresh front-end gets rng data through the same socket."""
    async with frontend(listener) as fe:
        await fe.handshake()
        ring = await fe.start_ring(0, 16)
        ring.ring.add_chain([], [64])
        ring.kick_now()
        await ring.wait_call()
        assert ring.ring.used_elem(0)[1] == 64


async def wait_disconnected(fe: Frontend) -> None:
    # the back-end closed the connection (a reset: it closed with our message unread)
    with contextlib.suppress(ConnectionResetError):
        assert await fe.receive() is None


async def test_bad_header_and_sizes_drop_the_connection(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    async with serving(tmp_path, RngBackend()) as listener:
        cases = [
            p.Header.build({"request": 1, "flags": 0x2, "size": 0}),  # version 2
            p.Header.build({"request": 5, "flags": 1, "size": 1 << 20}),  # absurd size
            p.encode(p.Request.SET_FEATURES, b"\0" * 4),  # a u64 of 4 bytes
            p.encode(p.Request.SET_VRING_NUM, b"\0" * 12),  # a vring state of 12 bytes
        ]
        for data in cases:
            async with frontend(listener) as fe:
                await fe.send(data)
                await wait_disconnected(fe)
        assert "closing the connection" in caplog.text
        await assert_still_serves(listener)


async def test_close_mid_message_is_logged(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    async with serving(tmp_path, RngBackend()) as listener:
        async with frontend(listener) as fe:
            await fe.send(p.encode(p.Request.SET_FEATURES, b"\0" * 8)[:15])
        async with asyncio.timeout(TIMEOUT):
            while "mid-message" not in caplog.text:
                await asyncio.sleep(0.01)
        await assert_still_serves(listener)


async def test_messages_out_of_order_are_refused(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    async with serving(tmp_path, RngBackend()) as listener, frontend(listener) as fe:
        protocol = await fe.get_u64(p.Request.GET_PROTOCOL_FEATURES)
        await fe.request(p.Request.SET_PROTOCOL_FEATURES, value=protocol)
        fe.protocol_features = protocol
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            # a kick before the ring's addresses, a ring that does not exist, NUM not a power
            # of 2, GET_CONFIG past 256 bytes: each refused, the connection stays
            for request, fds, fields in [
                (p.Request.SET_VRING_KICK, [kick], {"value": 0}),
                (p.Request.SET_VRING_NUM, [], {"index": 7, "num": 16}),
                (p.Request.SET_VRING_NUM, [], {"index": 0, "num": 100}),
                (p.Request.SET_VRING_CALL, [], {"value": 0}),  # no fd, no NOFD flag
                (p.Request.SET_VRING_ENABLE, [], {"index": 0, "num": 2}),
            ]:
                answer = await fe.request(request, fds, need_reply=True, **fields)
                assert answer.parse().value != 0, request
        finally:
            os.close(kick)
        assert await fe.get_u64(p.Request.GET_QUEUE_NUM) == 1  # still answering
        assert "SET_VRING_KICK refused" in caplog.text


async def test_absurd_and_overlapping_memory_tables(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    async with serving(tmp_path, RngBackend()) as listener, frontend(listener) as fe:
        await fe.handshake()
        good = fe.ram.regions()[0]
        bad_tables = [
            [dict(good, memory_size=1 << 40)],  # larger than the file
            [dict(good, memory_size=0)],
            [dict(good, mmap_offset=123)],  # not page aligned
            [good, dict(good, userspace_addr=good["userspace_addr"] + (1 << 30))],  # same GPA
            [dict(good, guest_phys_addr=(1 << 64) - 4096)],  # ends past 2^64
        ]
        for regions in bad_tables:
            answer = await fe.request(
                p.Request.SET_MEM_TABLE,
                [fe.ram.fd] * len(regions),
                need_reply=True,
                nregions=len(regions),
                padding=0,
                regions=regions,
            )
            assert answer.parse().value != 0, regions
        # descriptors missing for the regions
        answer = await fe.request(
            p.Request.SET_MEM_TABLE, need_reply=True, nregions=1, padding=0, regions=[good]
        )
        assert answer.parse().value != 0
        assert listener.connection.table.regions[0].memory_size == good["memory_size"]
        # too many regions in the count: refused before parsing
        answer = await fe.request(
            p.Request.SET_MEM_TABLE, need_reply=True, payload=struct.pack("<II", 9, 0)
        )
        assert answer.parse().value != 0
        # the table from handshake() still works
        ring = await fe.start_ring(0, 16)
        ring.ring.add_chain([], [32])
        ring.kick_now()
        await ring.wait_call()
        assert "memory table not changed" in caplog.text


async def test_ring_outside_the_table_is_refused(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    async with serving(tmp_path, RngBackend()) as listener, frontend(listener) as fe:
        await fe.handshake()
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        try:
            for desc in (0x1234_0000, USER_OFFSET + fe.ram.gpa + fe.ram.size - 16):
                answer = await fe.request(
                    p.Request.SET_VRING_ADDR,
                    need_reply=True,
                    index=0,
                    flags=0,
                    desc_user_addr=desc,
                    used_user_addr=USER_OFFSET + fe.ram.gpa + 0x1000,
                    avail_user_addr=USER_OFFSET + fe.ram.gpa + 0x2000,
                    log_guest_addr=0,
                )
                assert answer.parse().value == 0  # addresses are checked when the ring starts
                answer = await fe.request(
                    p.Request.SET_VRING_KICK, [os.dup(kick)], need_reply=True, value=0
                )
                assert answer.parse().value != 0
                assert not listener.connection.queues[0].ready
        finally:
            os.close(kick)
        assert "no region of the memory table" in caplog.text
        await assert_still_serves_on(fe)


async def assert_still_serves_on(fe: Frontend) -> None:
    ring = await fe.start_ring(0, 16)
    ring.ring.add_chain([], [16])
    ring.kick_now()
    await ring.wait_call()


async def test_broken_ring_stops_and_signals_err(tmp_path, caplog):
    caplog.set_level(logging.WARNING)
    async with serving(tmp_path, RngBackend()) as listener, frontend(listener) as fe:
        await fe.handshake()
        err = os.eventfd(0, os.EFD_NONBLOCK)
        await fe.request(p.Request.SET_VRING_ERR, [err], value=0)
        ring = await fe.start_ring(0, 16)
        # a descriptor pointing outside guest memory
        ring.ring.set_desc(0, 0xDEAD_0000_0000, 64, 2)
        ring.ring.publish(0)
        ring.kick_now()
        async with asyncio.timeout(TIMEOUT):
            while listener.connection is None or not listener.connection._broken:
                await asyncio.sleep(0.01)
            loop = asyncio.get_running_loop()
            waiter = loop.create_future()
            loop.add_reader(err, waiter.set_result, None)
            try:
                await waiter
            finally:
                loop.remove_reader(err)
        os.close(err)
        assert "rings stopped" in caplog.text
        # the front-end stops and restarts the ring: served again
        await fe.stop_ring(0)
        await assert_still_serves_on(fe)


async def test_other_sockets_keep_serving_while_one_is_abused(tmp_path):
    image = tmp_path / "disk.img"
    async with (
        serving(tmp_path, BlockBackend(size=1 << 20, path=str(image)), "blk") as blk,
        serving(tmp_path, RngBackend(), "rng") as rng,
        frontend(blk) as good,
    ):
        await good.handshake()
        ring = await good.start_ring(0, 16)
        async with frontend(rng) as bad:
            await bad.send(os.urandom(64))
            await wait_disconnected(bad)
        status, _, _ = await blk_request(ring, [header(BlkType.OUT, 0), b"z" * 512], [1])
        assert status == BlkStatus.OK
        await assert_still_serves(rng)


async def test_second_front_end_is_refused_while_one_is_served(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    async with serving(tmp_path, RngBackend()) as listener, frontend(listener) as first:
        await first.handshake()
        async with frontend(listener) as second:
            await second.send(p.encode(p.Request.GET_FEATURES))
            await wait_disconnected(second)
        assert "second front-end" in caplog.text
        await assert_still_serves_on(first)


async def test_front_end_gone_mid_request_resets_the_device(tmp_path):
    """A request still running when the front-end vanishes is cancelled; the next front-end
    starts afresh on the same storage."""
    device = RngBackend(latency=10.0)
    async with serving(tmp_path, device) as listener:
        async with frontend(listener) as fe:
            await fe.handshake()
            ring = await fe.start_ring(0, 16)
            ring.ring.add_chain([], [16])
            ring.kick_now()
            async with asyncio.timeout(TIMEOUT):
                while not listener.connection or not listener.connection.requests_waiting(0):
                    await asyncio.sleep(0.01)
        async with asyncio.timeout(TIMEOUT):
            while listener.connection is not None:
                await asyncio.sleep(0.01)
        device.latency = 0
        await assert_still_serves(listener)


def test_decoder_copes_with_split_and_coalesced_reads():
    messages = [
        p.build(p.Request.SET_FEATURES, value=5),
        p.build(p.Request.SET_VRING_NUM, index=1, num=256),
        p.encode(p.Request.SET_OWNER),
    ]
    data = b"".join(messages)
    decoder = p.Decoder()
    got = []
    pos = 0
    while pos < len(data):
        take = min(decoder.needed, 5)
        got += decoder.feed(data[pos : pos + take])
        pos += take
    assert [m.request for m in got] == [2, 8, 3]
    assert got[0].parse().value == 5 and got[1].parse().num == 256


@pytest.mark.parametrize("blob", [os.urandom(n) for n in (12, 40, 300)])
def test_decoder_random_bytes_raise_protocol_errors_only(blob):
    decoder = p.Decoder()
    try:
        for message in decoder.feed(blob[: decoder.needed]):
            with contextlib.suppress(p.ProtocolError):
                message.parse()
    except p.ProtocolError:
        pass


# -- the command ------------------------------------------------------------------------------
def test_print_capabilities_as_vhost_user_daemons_do():
    from cli_run import viowire

    result = viowire("vhost-user", "--device", "blk,size=1M", "--print-capabilities")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"type": "block", "features": []}
    result = viowire("vhost-user", "--device", "rng", "--print-capabilities")
    assert json.loads(result.stdout)["type"] == "rng"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--socket-path", "a.sock"], "give --device"),
        (["--device", "rng"], "1 --device"),
        (["--device", "rng,version=1", "--socket-path", "a.sock"], "vhost-user device is modern"),
        (["--device", "nosuch", "--socket-path", "a.sock"], "nosuch"),
    ],
)
def test_command_line_errors_say_what_to_do(args, message):
    from cli_run import viowire

    result = viowire("vhost-user", *args)
    assert result.returncode == 2
    assert message in result.stderr


def test_a_socket_path_that_is_not_a_socket_is_refused(tmp_path):
    from cli_run import viowire

    taken = tmp_path / "file"
    taken.write_text("mine")
    result = viowire("vhost-user", "--socket-path", str(taken), "--device", "rng")
    assert result.returncode == 1
    assert "is not a socket" in result.stderr
    assert taken.read_text() == "mine"
