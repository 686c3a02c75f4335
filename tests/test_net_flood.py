"""A flood from one net device does not starve the others on its link: the flooded device's
backlog stays bounded, its drops are counted, and two other sessions keep talking meanwhile."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from servers import running_server
from test_net import BROADCAST, TIMEOUT, Session, frame, next_frame, wait_until

from viowire.server.platform import DeviceSpec, PlatformSpec

FLOOD = 3000
TALK = 50


@pytest.fixture
async def sessions(tmp_path):
    spec = PlatformSpec([DeviceSpec.parse("net,link=flood")])
    async with running_server(tmp_path, spec) as server, contextlib.AsyncExitStack() as stack:

        async def new() -> Session:
            return await Session(server, stack).open()

        yield new


async def test_flood_is_bounded_and_others_keep_talking(sessions):
    sa, sb, sc, sd = [await sessions() for _ in range(4)]
    a, c, d = await sa.attach(0), await sc.attach(0), await sd.attach(0)
    b = await sb.attach(0, rx_buffers=4)  # the victim: four buffers, never read
    victim = sb.device(0)
    for drv in (b, c, d):  # the switch learns b, c and d from their hellos
        await drv.send(frame(BROADCAST, drv.mac, b"here"))
    for drv, hellos in ((a, 3), (c, 2), (d, 2)):
        for _ in range(hellos):
            await next_frame(drv)

    backlog = 0

    async def watch() -> None:
        nonlocal backlog
        while True:
            backlog = max(backlog, *(len(path.inbox) for path in victim._rx))
            await asyncio.sleep(0)

    async def flood() -> None:
        for start in range(0, FLOOD, 64):
            count = min(64, FLOOD - start)
            await asyncio.gather(*(a.send(frame(b.mac, a.mac, b"x" * 64)) for _ in range(count)))

    watcher = asyncio.create_task(watch())
    flooding = asyncio.create_task(flood())
    try:
        talk = [frame(d.mac, c.mac, i.to_bytes(2, "big")) for i in range(TALK)]
        async with asyncio.timeout(TIMEOUT * 4):
            for message in talk:
                await c.send(message)
                assert await next_frame(d) == message
            await flooding
        # a full inbox, and the frame at hand waiting for a buffer the victim never posts
        waiting = victim.queue_num_max + 1
        await wait_until(lambda: victim.rx_frames + victim.rx_dropped == FLOOD + 2 - waiting)
    finally:
        watcher.cancel()
        flooding.cancel()
    assert sa.device(0).tx_frames == FLOOD
    # c's and d's hellos and two of the flood filled the four buffers; the rest waits, up to
    # the bound, or was dropped
    assert victim.rx_frames == 4 and victim.rx_dropped == FLOOD + 2 - 4 - waiting
    assert backlog == len(victim._rx[0].inbox) == victim.queue_num_max
    assert sc.device(0).rx_dropped == sd.device(0).rx_dropped == 0
