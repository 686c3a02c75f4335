"""The bare baseline of virtio-blk: a two-process split ring over shared memory.

The driver (this process, on its event loop) posts 3-descriptor chains into a split ring in a
memfd: a 16-byte request header (device-readable), a 4 KiB data buffer (device-writable for a
read, readable for a write) and a 1-byte status. The device (a child process, on the same kind
of event loop) copies 4 KiB between the buffer and its RAM disk, writes the status, the used
element and then used.idx. Notifications go both ways through eventfds watched with
``loop.add_reader`` (kick: driver → device, call: device → driver), the cheapest same-host
notification there is (python-notes: 11.7 µs round trip, against 14.9 for a socket message).
Every index is stored with one 16-bit store (``memoryview.cast('H')``), in the order the spec
wants: descriptors, avail slot, avail.idx; used element, used.idx.

Like viowire's device, the device serves every chain one avail.idx read exposes, then publishes
used.idx once and notifies once; like viowire's driver, a read copies the data out of the buffer
and a write copies it in. There is no EVENT_IDX suppression: every post kicks (an eventfd write
coalesces anyway). Op 2 is a read that also stamps ``time.monotonic_ns()`` into the buffer just
before used.idx is published, for the interrupt latency.

Run by :class:`BareRing` (``python -m viowire.perf.ring`` is the device side).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import mmap
import os
import signal
import struct
import subprocess
import sys
import time
from collections.abc import Sequence

from viowire.runtime import run as run_loop
from viowire.virtio.blk import REQUEST_HEADER

NUM = 256  # ring size, as viowire's devices offer
SLOTS = NUM // 3  # in-flight requests: three descriptors each
DESC = struct.Struct("<QIHH")
HDR = REQUEST_HEADER  # type, reserved, sector
USED_ELEM = struct.Struct("<II")
F_NEXT, F_WRITE = 1, 2
OP_READ, OP_WRITE, OP_STAMP = 0, 1, 2
BLOCK = 4096

DESC_AT = 0
AVAIL_AT = DESC_AT + 16 * NUM  # flags, idx, ring[NUM], used_event
USED_AT = AVAIL_AT + 4096  # flags, idx, ring[NUM] of (id, len), avail_event
HDR_AT = USED_AT + 4096  # per slot: 16-byte header, 1-byte status (32 bytes)
DATA_AT = HDR_AT + 32 * SLOTS + (-(32 * SLOTS) % BLOCK)
RING_SIZE = DATA_AT + BLOCK * SLOTS
DISK_SIZE = 64 << 20


class BareRing:
    """The driver side, and the device process it started."""

    def __init__(self, loop_name: str) -> None:
        self.loop = asyncio.get_running_loop()
        self.fd = os.memfd_create("viowire-bare-ring", os.MFD_CLOEXEC)
        os.ftruncate(self.fd, RING_SIZE)
        self.map = mmap.mmap(self.fd, RING_SIZE)
        self.view = memoryview(self.map)
        self.u16 = self.view.cast("H")
        self.kick = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.call = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "viowire.perf.ring",
                "--loop",
                loop_name,
                "--fds",
                f"{self.fd},{self.kick},{self.call}",
            ],
            pass_fds=(self.fd, self.kick, self.call),
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the bare ring device process did not start")
        self.free = list(range(SLOTS))
        self.pending: dict[int, asyncio.Future] = {}
        self.avail_idx = 0
        self.last_used = 0
        self.loop.add_reader(self.call, self._on_call)

    def pid(self) -> int:
        return self.process.pid

    async def request(self, op: int, sector: int, data: bytes = b"") -> bytes | int:
        """One 4 KiB request; a read returns the data, a stamped read the latency in ns."""
        slot = self.free.pop()
        view = self.view
        head = 3 * slot
        hdr = HDR_AT + 32 * slot
        buf = DATA_AT + BLOCK * slot
        HDR.pack_into(view, hdr, op, 0, sector)
        view[hdr + 16] = 0xFF
        if op == OP_WRITE:
            view[buf : buf + BLOCK] = data
        DESC.pack_into(view, 16 * head, hdr, 16, F_NEXT, head + 1)
        DESC.pack_into(
            view, 16 * head + 16, buf, BLOCK, F_NEXT | (0 if op == OP_WRITE else F_WRITE), head + 2
        )
        DESC.pack_into(view, 16 * head + 32, hdr + 16, 1, F_WRITE, 0)
        self.u16[(AVAIL_AT + 4) // 2 + (self.avail_idx & (NUM - 1))] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.u16[(AVAIL_AT + 2) // 2] = self.avail_idx
        done = self.loop.create_future()
        self.pending[head] = done
        os.eventfd_write(self.kick, 1)
        try:
            await done
            if op == OP_STAMP:
                return time.monotonic_ns() - struct.unpack_from("<Q", view, buf)[0]
            if view[hdr + 16] != 0:
                raise RuntimeError(f"bare ring request failed with status {view[hdr + 16]}")
            return bytes(view[buf : buf + BLOCK]) if op == OP_READ else b""
        finally:
            self.free.append(slot)

    def _on_call(self) -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(self.call)
        used_idx = self.u16[(USED_AT + 2) // 2]
        while self.last_used != used_idx:
            head, _length = USED_ELEM.unpack_from(
                self.view, USED_AT + 4 + 8 * (self.last_used & (NUM - 1))
            )
            self.last_used = (self.last_used + 1) & 0xFFFF
            self.pending.pop(head).set_result(None)

    def close(self) -> None:
        self.loop.remove_reader(self.call)
        self.process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(5)
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        self.process.stdout.close()
        self.u16.release()
        self.view.release()
        self.map.close()
        for fd in (self.fd, self.kick, self.call):
            os.close(fd)


# --- measurements ------------------------------------------------------------------------------


async def iops(ring: BareRing, op: int, depth: int, budget: float, least: int) -> float:
    """4 KiB requests per second with ``depth`` in flight, spread over the first 1000 blocks."""
    payload = bytes(range(256)) * (BLOCK // 256)
    return await closed_loop(
        lambda i: ring.request(op, (i % 1000) * (BLOCK // 512), payload), depth, budget, least
    )


async def closed_loop(make, depth: int, budget: float, least: int) -> float:
    """Operations per second of ``depth`` workers, each awaiting ``make(i)`` back to back."""
    counter = iter(range(1 << 62))
    finished = 0
    start = time.perf_counter()
    deadline = start + budget

    async def worker() -> None:
        nonlocal finished
        while finished < least or time.perf_counter() < deadline:
            await make(next(counter))
            finished += 1

    await asyncio.gather(*(worker() for _ in range(depth)))
    return finished / (time.perf_counter() - start)


async def stamp_latency(ring: BareRing, budget: float, least: int) -> list[float]:
    """µs from used.idx being published (stamp) to the awaiting task running again."""
    samples = []
    deadline = time.perf_counter() + budget
    while len(samples) < least or time.perf_counter() < deadline:
        samples.append(await ring.request(OP_STAMP, 0) / 1000)
    return samples


# --- the device process ------------------------------------------------------------------------


async def device(memfd: int, kick: int, call: int) -> None:
    loop = asyncio.get_running_loop()
    ring = mmap.mmap(memfd, RING_SIZE)
    view = memoryview(ring)
    u16 = view.cast("H")
    disk = mmap.mmap(-1, DISK_SIZE)
    state = {"last_avail": 0, "used_idx": 0}
    stopped = loop.create_future()

    def on_kick() -> None:
        with contextlib.suppress(BlockingIOError):
            os.eventfd_read(kick)
        last_avail, used_idx = state["last_avail"], state["used_idx"]
        avail_idx = u16[(AVAIL_AT + 2) // 2]
        stamps = []
        while last_avail != avail_idx:
            head = u16[(AVAIL_AT + 4) // 2 + (last_avail & (NUM - 1))]
            chain = []
            index = head
            while True:
                addr, length, flags, nxt = DESC.unpack_from(view, 16 * index)
                chain.append((addr, length))
                if not flags & F_NEXT:
                    break
                index = nxt
            (hdr, _), (buf, size), (status, _) = chain
            op, _reserved, sector = HDR.unpack_from(view, hdr)
            at = sector * 512
            written = 1
            if op == OP_WRITE:
                disk[at : at + size] = view[buf : buf + size]
            else:
                view[buf : buf + size] = disk[at : at + size]
                written += size
                if op == OP_STAMP:
                    stamps.append(buf)
            view[status] = 0
            USED_ELEM.pack_into(view, USED_AT + 4 + 8 * (used_idx & (NUM - 1)), head, written)
            used_idx = (used_idx + 1) & 0xFFFF
            last_avail = (last_avail + 1) & 0xFFFF
        state["last_avail"], state["used_idx"] = last_avail, used_idx
        for buf in stamps:
            struct.pack_into("<Q", view, buf, time.monotonic_ns())
        u16[(USED_AT + 2) // 2] = used_idx
        os.eventfd_write(call, 1)

    loop.add_reader(kick, on_kick)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopped.cancel)
    print("ready", flush=True)
    with contextlib.suppress(asyncio.CancelledError):
        await stopped


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="the device side of the bare split ring")
    parser.add_argument("--loop", default="uvloop", choices=("uvloop", "asyncio"))
    parser.add_argument("--fds", required=True, help="memfd,kick eventfd,call eventfd")
    args = parser.parse_args(argv)
    memfd, kick, call = (int(fd) for fd in args.fds.split(","))
    run_loop(device(memfd, kick, call), loop=args.loop)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
