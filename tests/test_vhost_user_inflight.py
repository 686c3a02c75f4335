"""Inflight I/O tracking (INFLIGHT_SHMFD, GET/SET_INFLIGHT_FD): a front-end that reconnects
gets every request it had made available back exactly once, whether the back-end had completed
it before the connection dropped or not.

The layout and its three steps are unit-tested on a bytearray; the reconnect runs the back-end
over real Unix sockets with the Python front-end, whose guest RAM, rings and inflight buffer
outlive the connection as QEMU's do; and a Linux guest keeps writing while the ``viowire
vhost-user`` process under it is killed and started again (QEMU's ``reconnect=``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hashlib
import logging
import mmap
import os
from collections.abc import AsyncIterator
from pathlib import Path

import guest
import pytest

from viowire.device import Device
from viowire.vhost_user import inflight
from viowire.vhost_user import protocol as p
from viowire.vhost_user.frontend import Frontend, FrontendRing
from viowire.vhost_user.inflight import InflightError, InflightRegion
from viowire.vhost_user.server import Listener

TIMEOUT = 5.0
RING = 16
WARM_UP = 11  # requests (of two descriptors each) before the test's: the ring wraps


# -- the layout, sans-IO ----------------------------------------------------------------------
def region(queue_size: int = 8) -> InflightRegion:
    return InflightRegion(memoryview(bytearray(inflight.queue_region_size(queue_size))), 8)


def test_region_sizes_follow_the_split_layout():
    # a 16-byte header, 16 bytes per descriptor, each queue's region 64-byte aligned
    assert inflight.HEADER.size == 16 and inflight.DESC_STATE.size == 16
    assert inflight.queue_region_size(1) == 64
    assert inflight.queue_region_size(128) == 16 + 16 * 128 + 48
    assert inflight.buffer_size(2, 1024) == 2 * inflight.queue_region_size(1024)
    for bad in [(0, 16), (1, 0), (1, 100), (1, 65536), (257, 16)]:
        with pytest.raises(InflightError):
            inflight.buffer_size(*bad)


def test_fresh_region_is_initialised_and_has_nothing_to_resubmit():
    r = region()
    assert r.version == 0
    assert r.recover(8, used_idx=5) == []
    assert (r.version, r.used_idx) == (1, 5)


def test_heads_taken_and_not_returned_are_resubmitted_in_the_order_taken():
    r = region()
    r.recover(8, 0)
    for head in (3, 0, 6, 1):
        r.taken(head)
    r.batch([0, 1])
    r.returned([0, 1], used_idx=2)
    assert r.recover(8, used_idx=2) == [3, 6]
    r.taken(5)  # the counter goes on after the resubmitted ones
    assert r.recover(8, used_idx=2) == [3, 6, 5]


def test_a_batch_that_reached_the_used_ring_but_not_the_buffer_is_not_resubmitted():
    r = region()
    r.recover(8, 0)
    for head in (2, 4, 7):
        r.taken(head)
    r.batch([4, 2])  # the back-end moved used.idx by 2 and died before step "returned"
    assert r.recover(8, used_idx=2) == [7]
    assert r.used_idx == 2


def test_a_buffer_that_is_not_the_rings_is_refused():
    r = region()
    r.recover(8, 0)
    r.taken(7)
    with pytest.raises(InflightError, match="past the ring"):
        r.recover(4, 0)  # head 7 in a ring of 4
    with pytest.raises(InflightError, match="tracks 8"):
        r.recover(16, 0)
    r.view[8] = 9  # version 9
    with pytest.raises(InflightError, match="version 9"):
        r.recover(8, 0)
    r = region()
    r.recover(8, 0)
    r.taken(1)
    r.last_batch_head = 200
    with pytest.raises(InflightError, match="past the buffer"):
        r.recover(8, 1)


# -- reconnecting -----------------------------------------------------------------------------
class Gated(Device):
    """Each request: its readable bytes back, after ``b"done:"``; those starting with ``slow``
    wait for ``gate``. ``runs`` counts how often each request ran."""

    device_id = 0x7F21
    type_name = "gated"

    def __init__(self) -> None:
        super().__init__()
        self.gate = asyncio.Event()
        self.runs: collections.Counter[bytes] = collections.Counter()

    async def handle(self, queue, chain, memory) -> int:
        data = await chain.read()
        self.runs[data] += 1
        if data.startswith(b"slow"):
            await self.gate.wait()
        return await chain.write(b"done:" + data)


@contextlib.asynccontextmanager
async def listening(tmp_path, device: Device) -> AsyncIterator[Listener]:
    listener = Listener(str(tmp_path / "dev.sock"), device)
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close()


async def get_inflight_fd(fe: Frontend, num_queues: int = 1, queue_size: int = RING):
    ask = {"mmap_size": 0, "mmap_offset": 0, "num_queues": num_queues, "queue_size": queue_size}
    return await fe.request(p.Request.GET_INFLIGHT_FD, payload=p.Inflight.build(ask))


async def set_inflight_fd(fe: Frontend, fd: int, size: int, **overrides) -> int:
    given = {"mmap_size": size, "mmap_offset": 0, "num_queues": 1, "queue_size": RING}
    given.update(overrides)
    answer = await fe.request(
        p.Request.SET_INFLIGHT_FD,
        [fd] if fd >= 0 else [],
        need_reply=True,
        payload=p.Inflight.build(given),
    )
    return answer.parse().value


class Guest:
    """What outlives a connection, as in QEMU: guest RAM, the ring, the inflight buffer."""

    def __init__(self) -> None:
        self.fe: Frontend | None = None
        self.ring: FrontendRing | None = None
        self.inflight_fd = -1
        self.inflight_size = 0
        self.chains: dict[bytes, object] = {}

    async def connect(self, path: str) -> None:
        ram = self.fe.ram if self.fe is not None else None
        self.fe = await Frontend.connect(path, ram=ram)
        await self.fe.handshake()
        if self.inflight_fd < 0:  # the first start: the back-end makes the buffer
            answer = await get_inflight_fd(self.fe)
            assert len(answer.fds) == 1, "GET_INFLIGHT_FD's reply carries the buffer"
            self.inflight_fd = answer.fds[0]
            self.inflight_size = answer.parse().mmap_size
        assert await set_inflight_fd(self.fe, self.inflight_fd, self.inflight_size) == 0
        # after a crash QEMU restarts the ring at used.idx (it could not ask GET_VRING_BASE)
        old = self.ring.ring if self.ring is not None else None
        base = old.used_idx if old is not None else 0
        self.ring = await self.fe.start_ring(0, RING, base=base, ring=old)

    def submit(self, data: bytes) -> None:
        self.chains[data] = self.ring.ring.add_chain([data], [len(data) + 5])
        self.ring.kick_now()

    def used(self, start: int = 0) -> dict[int, tuple[int, bytes]]:
        """Used elements from index ``start`` on: head -> (count seen, last data)."""
        out: dict[int, tuple[int, bytes]] = {}
        heads = {chain.head: (data, chain) for data, chain in self.chains.items()}
        for idx in range(start, self.ring.ring.used_idx):
            head, length = self.ring.ring.used_elem(idx)
            _, chain = heads[head]
            gpa, _ = chain.writable[0]
            seen = out.get(head, (0, b""))[0]
            out[head] = (seen + 1, self.fe.ram.read(gpa, length))
        return out

    def drop_connection(self) -> None:
        """The connection goes, the guest stays (only the socket is closed)."""
        self.fe.sock.close()
        self.ring.close()

    def close(self) -> None:
        if self.fe is not None:
            self.fe.close()
        if self.ring is not None:
            self.ring.close()
        if self.inflight_fd >= 0:
            os.close(self.inflight_fd)


async def until(predicate, what: str) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not predicate():
            await asyncio.sleep(0.005)


async def test_requests_in_flight_complete_exactly_once_after_a_reconnect(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="viowire.vhost_user")
    device = Gated()
    guest = Guest()
    try:
        async with listening(tmp_path, device) as listener:
            await guest.connect(listener.path)
            for n in range(WARM_UP):  # the ring wraps: heads are reused, batches come and go
                guest.submit(b"warm-%d" % n)
                await until(lambda n=n: guest.ring.ring.used_idx == n + 1, "warm-up")
            guest.chains.clear()
            for data in (b"fast-1", b"slow-A", b"fast-2", b"slow-B"):
                guest.submit(data)
            await until(lambda: guest.ring.ring.used_idx == WARM_UP + 2, "the fast requests")
            await until(lambda: listener.connection.requests_waiting(0) == 2, "slow ones wait")
            guest.drop_connection()  # mid-request: slow-A and slow-B never completed
            await until(lambda: listener.connection is None, "the back-end saw it")
            assert guest.ring.ring.used_idx == WARM_UP + 2

            await guest.connect(listener.path)
            device.gate.set()
            await until(lambda: guest.ring.ring.used_idx == WARM_UP + 4, "the resubmitted ones")
            guest.submit(b"fast-3")  # and new requests go on from the next available slot
            await until(lambda: guest.ring.ring.used_idx == WARM_UP + 5, "a new request")
            await asyncio.sleep(0.05)  # nothing more comes
            assert guest.ring.ring.used_idx == WARM_UP + 5
        used = guest.used(WARM_UP)
        assert sorted(count for count, _ in used.values()) == [1] * 5  # each head once
        assert {data for _, data in used.values()} == {
            b"done:" + data for data in (b"fast-1", b"slow-A", b"fast-2", b"slow-B", b"fast-3")
        }
        # the completed ones ran once; the interrupted ones ran again, in the order taken
        assert device.runs - collections.Counter(b"warm-%d" % n for n in range(WARM_UP)) == {
            b"fast-1": 1,
            b"fast-2": 1,
            b"fast-3": 1,
            b"slow-A": 2,
            b"slow-B": 2,
        }
        order = [guest.ring.ring.used_elem(WARM_UP + i)[0] for i in (2, 3)]
        assert order == [guest.chains[b"slow-A"].head, guest.chains[b"slow-B"].head]
        assert "2 requests in flight resubmitted" in caplog.text
    finally:
        guest.close()


async def test_without_inflight_tracking_a_crash_repeats_one_request_and_loses_another(tmp_path):
    """The contrast, and why the buffer exists: requests complete out of order, so restarting
    at used.idx (all QEMU can do after a crash) takes a completed request again and never the
    one that was in flight."""
    device = Gated()
    async with listening(tmp_path, device) as listener:
        fe = await Frontend.connect(listener.path)
        again = None
        try:
            await fe.handshake()
            ring = await fe.start_ring(0, RING)
            ring.ring.add_chain([b"slow-X"], [16])
            fast = ring.ring.add_chain([b"fast-Y"], [16])
            ring.kick_now()
            await until(lambda: ring.ring.used_idx == 1, "fast-Y completes first")
            fe.sock.close()
            await until(lambda: listener.connection is None, "dropped")
            again = await Frontend.connect(listener.path, ram=fe.ram)
            await again.handshake()
            ring2 = await again.start_ring(0, RING, base=ring.ring.used_idx, ring=ring.ring)
            device.gate.set()
            await until(lambda: ring2.ring.used_idx == 2, "a second completion")
            await asyncio.sleep(0.05)
            assert [ring2.ring.used_elem(i)[0] for i in range(ring2.ring.used_idx)] == [
                fast.head,
                fast.head,
            ]
            assert device.runs == {b"slow-X": 1, b"fast-Y": 2}  # slow-X: cancelled, never back
            ring2.close()
        finally:
            if again is not None:
                again.sock.close()
            fe.close()


# -- bad input --------------------------------------------------------------------------------
def memfd(size: int, seal: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if seal else 0)
    fd = os.memfd_create("test-inflight", flags)
    os.ftruncate(fd, size)
    return fd


async def test_absurd_inflight_requests_are_refused_with_a_log_line(tmp_path, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    async with (
        listening(tmp_path, Gated()) as listener,
        await Frontend.connect(listener.path) as fe,
    ):
        await fe.handshake()
        for num_queues, queue_size in [(0, 16), (1, 0), (1, 1000), (300, 16), (256, 32768)]:
            answer = await get_inflight_fd(fe, num_queues, queue_size)
            assert answer.parse().mmap_size == 0 and not answer.fds, (num_queues, queue_size)
        assert "GET_INFLIGHT_FD refused" in caplog.text
        assert "inflight buffer (at most" in caplog.text  # 256 x 32768: too big
        size = inflight.buffer_size(1, RING)
        good = memfd(size)
        unsealable = memfd(size, seal=False)
        event = os.eventfd(0)
        try:
            cases = [
                (-1, {}),  # no descriptor
                (good, {"mmap_size": size + 64}),  # not this back-end's layout
                (good, {"mmap_offset": 4096}),  # past the file's end
                (good, {"mmap_offset": 100}),  # not page aligned
                (good, {"queue_size": 100}),
                (unsealable, {}),  # could shrink under the mapping: refused
                (event, {}),  # not a memory file
            ]
            for fd, overrides in cases:
                assert await set_inflight_fd(fe, fd, size, **overrides) != 0, overrides
            assert "SET_INFLIGHT_FD refused" in caplog.text
            # a good buffer whose content is not a ring's: the ring does not start
            with mmap.mmap(good, size) as view:
                view[8:10] = (7).to_bytes(2, "little")  # version 7
            assert await set_inflight_fd(fe, good, size) == 0
            with pytest.raises(ConnectionError, match="refused"):
                await fe.start_ring(0, RING)
            assert "inflight buffer version 7, not 1" in caplog.text
            with mmap.mmap(good, size) as view:
                view[8:10] = (0).to_bytes(2, "little")  # a fresh buffer: starts
            assert await set_inflight_fd(fe, good, size) == 0
            ring = await fe.start_ring(0, RING)
            # a ring that is running keeps its buffer
            assert await set_inflight_fd(fe, good, size) != 0
            ring.ring.add_chain([b"fast"], [16])
            ring.kick_now()
            await ring.wait_call()
        finally:
            for fd in (good, unsealable, event):
                os.close(fd)
        assert await fe.get_u64(p.Request.GET_QUEUE_NUM) == 1  # still connected, answering


async def test_inflight_needs_the_protocol_feature(tmp_path):
    async with (
        listening(tmp_path, Gated()) as listener,
        await Frontend.connect(listener.path) as fe,
    ):
        offered = await fe.get_u64(p.Request.GET_PROTOCOL_FEATURES)
        fe.protocol_features = offered & ~(1 << p.ProtocolFeature.INFLIGHT_SHMFD)
        await fe.request(p.Request.SET_PROTOCOL_FEATURES, value=fe.protocol_features)
        answer = await get_inflight_fd(fe)
        assert answer.parse().mmap_size == 0 and not answer.fds
        fd = memfd(inflight.buffer_size(1, RING))
        try:
            assert await set_inflight_fd(fe, fd, inflight.buffer_size(1, RING)) != 0
        finally:
            os.close(fd)


async def test_a_packed_inflight_description_breaks_the_framing(tmp_path, caplog):
    """QEMU sends the 24-byte C struct (trailing padding): 20 bytes is not a description."""
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    async with (
        listening(tmp_path, Gated()) as listener,
        await Frontend.connect(listener.path) as fe,
    ):
        await fe.handshake()
        await fe.send(p.encode(p.Request.GET_INFLIGHT_FD, bytes(20)))
        with contextlib.suppress(ConnectionResetError):
            assert await fe.receive() is None
        assert "GET_INFLIGHT_FD: payload of 20 bytes" in caplog.text


async def test_a_ring_larger_than_the_buffer_runs_untracked_with_a_warning(tmp_path, caplog):
    """QEMU 7.2 on virtio-mmio asks for a buffer of its queue-size (128) while the guest picks
    rings of 1024: the ring must still run (without tracking), not fail or write past it."""
    caplog.set_level(logging.WARNING, logger="viowire.vhost_user")
    async with (
        listening(tmp_path, Gated()) as listener,
        await Frontend.connect(listener.path) as fe,
    ):
        await fe.handshake()
        answer = await get_inflight_fd(fe, 1, RING)
        fd = answer.fds[0]
        try:
            size = answer.parse().mmap_size
            assert await set_inflight_fd(fe, fd, size) == 0
            ring = await fe.start_ring(0, 4 * RING)
            ring.ring.add_chain([b"fast"], [16])
            ring.kick_now()
            await ring.wait_call()
            assert listener.connection.queues[0].inflight is None
            with mmap.mmap(fd, size) as view:
                assert view[8:10] == bytes(2)  # untouched: version 0
        finally:
            os.close(fd)
        assert "give the front-end queue-size=64" in caplog.text


# -- a real Linux guest, its back-end killed under it ------------------------------------------
PLUGINS = str(Path(__file__).resolve().parent / "plugins")
MARKER = b"VIOWIRE-KILL-NOW"
MARKER_SECTOR = 60000  # past the data the guest writes (16 MiB: sectors 0-32767)
KILL_SCRIPT = f"""
set -e
dd if=/dev/urandom of=/tmp/data bs=1M count=16 2>/dev/null
echo "MD5-WRITTEN $(md5sum /tmp/data | cut -d' ' -f1)"
printf {MARKER.decode()} | dd of=/dev/vda bs=512 seek={MARKER_SECTOR} conv=sync oflag=direct \
    2>/dev/null
dd if=/tmp/data of=/dev/vda bs=4k count=4096 oflag=direct conv=fsync 2>/dev/null
echo 3 > /proc/sys/vm/drop_caches
dd if=/dev/vda of=/tmp/back bs=1M count=16 iflag=direct 2>/dev/null
echo "MD5-READ $(md5sum /tmp/back | cut -d' ' -f1)"
"""
"""The guest writes a marker, then 16 MiB with O_DIRECT, 4 KiB a request: the test kills the
back-end when the marker is in the disk image (its request still in flight), so the guest's
writes stall until QEMU reconnects to the new back-end process, then go on; the data read back
must be what was written."""


async def marker_written(image) -> None:
    async with asyncio.timeout(60):
        while True:
            with open(image, "rb") as disk:
                disk.seek(MARKER_SECTOR * 512)
                if disk.read(len(MARKER)) == MARKER:
                    return
            await asyncio.sleep(0.02)


@pytest.mark.skipif(guest.missing() is not None, reason=str(guest.missing()))
@pytest.mark.timeout(240)
async def test_linux_guest_survives_its_back_end_being_killed_and_restarted(tmp_path, monkeypatch):
    """The first back-end never completes the marker's write (tests/plugins/stalling_blk.py),
    so a request is in flight when it is killed: the second resubmits it from the inflight
    buffer QEMU kept, and the guest goes on."""
    paths = [os.environ.get("PYTHONPATH", ""), PLUGINS]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(path for path in paths if path))
    image = tmp_path / "disk.img"
    with open(image, "wb") as disk:
        disk.truncate(32 << 20)
    sock = tmp_path / "blk.sock"
    stalling = f"stalling_blk:StallingBlk,path={image},stall_sector={MARKER_SECTOR}"
    devices = guest.vhost_user_blk("blk", sock, reconnect=1, queue_size=1024)
    first, second = tmp_path / "first.log", tmp_path / "second.log"
    async with guest.process(guest.viowire_vhost_user([(sock, stalling)]), [sock], first):
        run_task = asyncio.get_running_loop().create_task(
            guest.run_guest(tmp_path, KILL_SCRIPT, devices)
        )
        try:
            await marker_written(image)
        except BaseException:
            run_task.cancel()  # its QEMU is killed as the task ends
            with contextlib.suppress(asyncio.CancelledError):
                await run_task
            raise
    # killed (SIGKILL, its process group) with the marker's write in flight
    sock.unlink(missing_ok=True)
    command = guest.viowire_vhost_user([(sock, f"blk,path={image}")])
    async with guest.process(command, [sock], second):
        run = await run_task
    logs = f"first:\n{first.read_text()}\nsecond:\n{second.read_text()}"
    assert run.status == 0, f"guest:\n{run.output}\n{logs}"
    written = run.value("MD5-WRITTEN")
    assert run.value("MD5-READ") == written, logs
    with open(image, "rb") as disk:
        assert hashlib.md5(disk.read(16 << 20)).hexdigest() == written
    assert "front-end connected" in second.read_text()  # QEMU came back to the new process
    assert "ring 0: 1 requests in flight resubmitted" in second.read_text(), logs
    assert "Traceback" not in logs


async def test_reset_device_forgets_the_inflight_buffer(tmp_path):
    """A reset device has nothing in flight: an old buffer must not resubmit into new rings."""
    async with (
        listening(tmp_path, Gated()) as listener,
        await Frontend.connect(listener.path) as fe,
    ):
        await fe.handshake()
        answer = await get_inflight_fd(fe)
        os.close(answer.fds[0])
        assert listener.connection.queues[0].inflight is not None
        assert (await fe.request(p.Request.RESET_DEVICE, need_reply=True)).parse().value == 0
        assert listener.connection.queues[0].inflight is None
