"""viowire serve --workers N: several processes serve the same listeners."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time

import pytest
from cli_run import serve

from viowire.client.connection import connect
from viowire.client.drivers.blk import BlockDriver


def read(path: str) -> str:
    with open(path) as f:
        return f.read()


def alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}") and read(f"/proc/{pid}/stat").split()[2] != "Z"


def gone(pid: int) -> bool:
    """Whether ``pid`` has exited; reaps it when it is this process's child (the test run is a
    child subreaper, so the workers of a killed supervisor become ours)."""
    try:
        if os.waitpid(pid, os.WNOHANG)[0]:
            return True
    except ChildProcessError:
        pass
    return not alive(pid)


def worker_pids(served) -> list[int]:
    line = next(line for line in served.lines if line.startswith("workers: "))
    return [int(pid) for pid in line.split()[1:]]


async def sessions_by_worker(url: str, count: int, *, blk: bool = True) -> set[int]:
    """Open ``count`` sessions at once; the worker pid is the high half of the session id."""
    conns = await asyncio.wait_for(
        asyncio.gather(*(connect(url, ram_size=1 << 20) for _ in range(count))), 20
    )
    try:
        for conn in conns if blk else ():  # each session works, whichever worker has it
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
    assert not any(alive(pid) for pid in pids)


# How a worker learns that its supervisor died: both ways, and each alone (the other disabled in
# the process that runs viowire's main), so that neither hides a fault of the other.
ORPHAN_GUARDS = {
    "both": "",
    "pdeathsig-only": "w.until_orphaned = lambda fd: asyncio.Event().wait()",
    "pipe-only": "w.die_with_parent = lambda parent: False",
}
SUPERVISOR_GONE_WITHIN = 5.0


@pytest.mark.parametrize("guard", ORPHAN_GUARDS)
async def test_workers_exit_when_the_supervisor_is_killed(tmp_path, guard):
    """SIGKILL of the supervisor alone (not its process group: it forwards nothing then), and
    every worker is gone soon after."""
    script = "\n".join([
        "import asyncio, sys",
        "import viowire.server.workers as w",
        ORPHAN_GUARDS[guard],
        "from viowire.cli import main",
        "sys.exit(main(sys.argv[1:]))",
    ])  # fmt: skip
    args = ("--workers", "2", "--listen", f"unix://{tmp_path}/s.sock", "--device", "rng")
    with serve(*args, command=[sys.executable, "-c", script]) as served:
        workers = worker_pids(served)
        await sessions_by_worker(served.url("unix"), 2, blk=False)
        os.kill(served.proc.pid, signal.SIGKILL)
        served.proc.wait(5)
        killed = time.monotonic()
        while not all(gone(pid) for pid in workers):
            assert time.monotonic() - killed < SUPERVISOR_GONE_WITHIN, [
                (pid, alive(pid)) for pid in workers
            ]
            await asyncio.sleep(0.02)
        print(f"{guard}: workers gone {time.monotonic() - killed:.3f} s after SIGKILL")


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
