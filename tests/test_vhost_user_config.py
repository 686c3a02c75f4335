"""The back-end request channel (BACKEND_REQ, SET_BACKEND_REQ_FD): a device's config change
reaches the front-end as CONFIG_CHANGE_MSG, which then reads the new config with GET_CONFIG.
Driven by the Python front-end over real Unix sockets, and seen by a real Linux guest: its
virtio_blk learns the disk grew."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import struct
from collections.abc import AsyncIterator

import guest
import pytest

from viowire.server.devices import BlockBackend, RngBackend
from viowire.vhost_user import protocol as p
from viowire.vhost_user.frontend import Frontend
from viowire.vhost_user.server import Listener

TIMEOUT = 5.0


@contextlib.asynccontextmanager
async def served(tmp_path, device) -> AsyncIterator[tuple[Listener, Frontend]]:
    listener = Listener(str(tmp_path / "dev.sock"), device)
    await listener.start()
    try:
        fe = await Frontend.connect(listener.path)
        try:
            await fe.handshake()
            yield listener, fe
        finally:
            fe.close()
    finally:
        await listener.close()


@contextlib.asynccontextmanager
async def channel(fe: Frontend) -> AsyncIterator[socket.socket]:
    """SET_BACKEND_REQ_FD with one end of a socket pair; the front-end's end, to read."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        answer = await fe.request(p.Request.SET_BACKEND_REQ_FD, [theirs.fileno()], need_reply=True)
        theirs.close()
        assert answer.parse().value == 0
        ours.setblocking(False)
        yield ours
    finally:
        theirs.close()
        ours.close()


async def backend_message(sock: socket.socket) -> tuple[int, int, bytes]:
    """(request, flags, payload) of the back-end's next message on the channel."""
    loop = asyncio.get_running_loop()
    async with asyncio.timeout(TIMEOUT):
        head = await loop.sock_recv(sock, p.HEADER_SIZE)
        assert len(head) == p.HEADER_SIZE, head
        request, flags, size = struct.unpack("<III", head)
        payload = await loop.sock_recv(sock, size) if size else b""
    return request, flags, payload


async def capacity(fe: Frontend) -> int:
    return int.from_bytes(await fe.get_config(0, 8), "little")


async def test_config_change_reaches_the_front_end(tmp_path):
    device = BlockBackend(size=1 << 20)
    async with served(tmp_path, device) as (_, fe), channel(fe) as backend:
        assert fe.protocol_features >> p.ProtocolFeature.BACKEND_REQ & 1
        assert await capacity(fe) == (1 << 20) // 512
        device.resize(3 << 20)
        request, flags, payload = await backend_message(backend)
        assert request == p.BackendRequest.CONFIG_CHANGE_MSG
        assert flags == p.VERSION  # no NEED_REPLY: the back-end never waits for the front-end
        assert payload == b""
        assert await capacity(fe) == (3 << 20) // 512  # what the front-end reads next
        device.resize(4 << 20)  # each change, one message
        assert (await backend_message(backend))[0] == p.BackendRequest.CONFIG_CHANGE_MSG
        assert await capacity(fe) == (4 << 20) // 512


async def test_without_a_channel_a_change_is_logged_and_read_at_the_next_get_config(
    tmp_path, caplog
):
    caplog.set_level(logging.INFO, logger="viowire.vhost_user")
    device = BlockBackend(size=1 << 20)
    async with served(tmp_path, device) as (_, fe):
        device.resize(2 << 20)
        assert "not announced: no back-end channel" in caplog.text
        assert await capacity(fe) == (2 << 20) // 512


async def test_a_closed_channel_is_dropped_and_the_device_keeps_serving(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    device = BlockBackend(size=1 << 20)
    async with served(tmp_path, device) as (listener, fe):
        async with channel(fe):
            pass  # the front-end's end is closed
        device.resize(2 << 20)
        assert "back-end channel failed" in caplog.text
        assert listener.connection.backend_channel is None
        device.resize(3 << 20)  # no channel any more: logged, nothing else
        assert await capacity(fe) == (3 << 20) // 512


async def test_bad_backend_channels_are_refused(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    async with served(tmp_path, RngBackend()) as (listener, fe):
        event = os.eventfd(0)
        datagram, other = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            for fds in ([], [event], [datagram.fileno()], [event, datagram.fileno()]):
                answer = await fe.request(p.Request.SET_BACKEND_REQ_FD, fds, need_reply=True)
                assert answer.parse().value != 0, fds
        finally:
            for closing in (datagram, other):
                closing.close()
            os.close(event)
        assert listener.connection.backend_channel is None
        assert "SET_BACKEND_REQ_FD refused: the descriptor is not a socket" in caplog.text
        assert "not a Unix stream socket" in caplog.text
        assert await fe.get_u64(p.Request.GET_QUEUE_NUM) == 1  # still answering


async def test_channel_needs_the_protocol_feature(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    listener = Listener(str(tmp_path / "dev.sock"), RngBackend())
    await listener.start()
    try:
        async with await Frontend.connect(listener.path) as fe:
            offered = await fe.get_u64(p.Request.GET_PROTOCOL_FEATURES)
            fe.protocol_features = offered & ~(1 << p.ProtocolFeature.BACKEND_REQ)
            await fe.request(p.Request.SET_PROTOCOL_FEATURES, value=fe.protocol_features)
            ours, theirs = socket.socketpair()
            with ours, theirs:
                answer = await fe.request(
                    p.Request.SET_BACKEND_REQ_FD, [theirs.fileno()], need_reply=True
                )
            assert answer.parse().value != 0
            assert "BACKEND_REQ protocol feature was not negotiated" in caplog.text
    finally:
        await listener.close()


# -- a real Linux guest -----------------------------------------------------------------------
MARKER = b"VIOWIRE-RESIZE-ME"
RESIZE_SCRIPT = f"""
echo "SIZE-BEFORE $(cat /sys/block/vda/size)"
printf {MARKER.decode()} | dd of=/dev/vda bs=512 seek=8 conv=sync oflag=direct 2>/dev/null
i=0
while [ "$(cat /sys/block/vda/size)" = 32768 ] && [ $i -lt 200 ]; do sleep 0.1; i=$((i+1)); done
echo "SIZE-AFTER $(cat /sys/block/vda/size)"
"""
"""The guest asks for the resize by writing a marker (so the disk grows after its driver read the
first capacity), then waits, 20 s at most, for its disk to change size."""


async def resize_on_marker(device: BlockBackend, image, new_size: int) -> None:
    async with asyncio.timeout(60):
        while True:
            with open(image, "rb") as disk:
                disk.seek(8 * 512)
                if disk.read(len(MARKER)) == MARKER:
                    break
            await asyncio.sleep(0.05)
    device.resize(new_size)


@pytest.mark.skipif(guest.missing() is not None, reason=str(guest.missing()))
@pytest.mark.timeout(180)
async def test_linux_guest_sees_its_disk_grow(tmp_path, caplog):
    """viowire's blk grows from 16 MiB to 24 MiB while the guest runs: CONFIG_CHANGE_MSG, QEMU
    reads the config again (GET_CONFIG) and interrupts the guest, whose virtio_blk updates the
    disk's size."""
    caplog.set_level(logging.INFO, logger="viowire.vhost_user")
    image = tmp_path / "disk.img"
    with open(image, "wb") as disk:
        disk.truncate(16 << 20)
    device = BlockBackend(path=str(image))
    listener = Listener(str(tmp_path / "blk.sock"), device)
    await listener.start()
    resizer = asyncio.get_running_loop().create_task(resize_on_marker(device, image, 24 << 20))
    try:
        run = await guest.run_guest(
            tmp_path, RESIZE_SCRIPT, guest.vhost_user_blk("blk", listener.path)
        )
    finally:
        resizer.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await resizer
        await listener.close()
    assert run.status == 0, f"guest:\n{run.output}\nviowire:\n{caplog.text}"
    assert run.value("SIZE-BEFORE") == str((16 << 20) // 512)
    assert run.value("SIZE-AFTER") == str((24 << 20) // 512), run.output
    assert "announced to the front-end" in caplog.text


async def test_a_front_end_that_does_not_read_its_channel_never_stalls_the_device(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    device = BlockBackend(size=1 << 20)
    async with served(tmp_path, device) as (listener, fe), channel(fe):
        sending = listener.connection.backend_channel
        sending.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1)  # the smallest it takes
        for n in range(10000):
            device.resize((2 + n % 2) << 20)
            if "does not read its back-end channel" in caplog.text:
                break
        else:
            pytest.fail("10000 config changes fitted into a full channel")
        assert listener.connection.backend_channel is sending  # kept: it may read later
        assert await capacity(fe) in ((2 << 20) // 512, (3 << 20) // 512)
