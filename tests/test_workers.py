"""viowire serve --workers N: several processes serve the same listeners."""

from __future__ import annotations

import asyncio
import os
import signal
import time

from cli_run import serve

from viowire.client.connection import connect
from viowire.client.drivers.blk import BlockDriver


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and read(f"/proc/{pid}/stat").split()[2] != "Z"


def worker_pids(served) -> list[int]:
    line = next(line for line in served.lines if line.startswith("workers: "))
    return [int(pid) for pid in line.split()[1:]]


async def sessions_by_worker(url: str, count: int) -> set[int]:
    """Open ``count`` sessions at once; the worker pid is the high half of the session id."""
    conns = await asyncio.wait_for(
        asyncio.gather(*(connect(url, ram_size=1 << 20) for _ in range(count))), 20
    )
    try:
        for conn in conns:  # each session works, whichever worker has it
            blk = await BlockDriver.attach(await conn.attach((await conn.platform())[1]))
            await blk.write(0, b"w" * 512)
            assert await blk.read(0, 512) == b"w" * 512
            await blk.detach()
        return {conn.session_id >> 32 for conn in conns}
    finally:
        for conn in conns:
            await conn.close()


async def test_connections_spread_over_the_workers(tmp_path):
    with serve("--workers", "2", "--listen", f"unix://{tmp_path}/s.sock",
               "--listen", "tcp://127.0.0.1:0", "--device", "blk,size=1M",
               "--device", "blk,size=1M") as served:  # fmt: skip
        pids = set(worker_pids(served))
        assert len(pids) == 2
        seen = set()
        for _ in range(10):  # the kernel picks; a few rounds see both workers
            seen |= await sessions_by_worker(served.url("tcp"), 8)
            seen |= await sessions_by_worker(served.url("unix"), 8)
            if seen == pids:
                break
        assert seen == pids
    # The supervisor was killed on the way out, with its process group: no worker outlives it.
    assert not any(alive(pid) for pid in pids)


async def test_a_dead_worker_is_replaced_and_sigterm_stops_all(tmp_path):
    sock = tmp_path / "s.sock"
    with serve("--workers", "2", "--listen", f"unix://{sock}") as served:
        first, second = worker_pids(served)
        os.kill(first, signal.SIGKILL)
        deadline = time.monotonic() + 10
        children: set[int] = set()
        while time.monotonic() < deadline:
            pid = served.proc.pid
            children = {int(p) for p in read(f"/proc/{pid}/task/{pid}/children").split()}
            if len(children) == 2 and first not in children:
                break
            await asyncio.sleep(0.05)
        assert second in children and first not in children and len(children) == 2
        await sessions_by_worker(f"unix://{sock}", 4)  # still serving
        served.proc.send_signal(signal.SIGTERM)
        assert served.proc.wait(10) == 0
    assert not sock.exists()
    assert not any(alive(pid) for pid in children)
