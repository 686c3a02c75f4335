"""The real server and the real client over real sockets: every combination of
{Version 1, Version 2} x {shared, proxied} memory x {TCP, Unix}."""

from __future__ import annotations

import asyncio
import os

import pytest
from servers import running_server, url_of

from viowire.client.connection import connect
from viowire.client.drivers.blk import BlockDriver
from viowire.client.drivers.rng import EntropyDriver
from viowire.server.platform import DeviceSpec, PlatformSpec
from viowire.virtio.constants import DeviceId, Feature, Status

MATRIX = [
    pytest.param(version, memory, scheme, id=f"v{version}-{memory}-{scheme}")
    for version in (1, 2)
    for memory in ("shared", "proxied")
    for scheme in ("tcp", "unix")
]


def pick(platform, device_id: int, version: int):
    return next(d for d in platform if d.device_id == device_id and d.version == version)


@pytest.mark.parametrize(("version", "memory", "scheme"), MATRIX)
async def test_block_and_entropy_full_flow(server, version, memory, scheme):
    async with await connect(url_of(server, scheme), memory=memory) as conn:
        assert conn.memory_mode == memory
        assert (
            conn.ram.backing
            == {"proxied": "anon", "tcp": "shm", "unix": "memfd"}[
                memory if memory == "proxied" else scheme
            ]
        )
        platform = await conn.platform()
        blk = await BlockDriver.attach(await conn.attach(pick(platform, DeviceId.BLOCK, version)))
        dev = blk.dev
        assert dev.status & Status.DRIVER_OK
        assert bool(dev.status & Status.FEATURES_OK) == (version == 2)
        assert bool(blk.negotiated_features >> Feature.VERSION_1 & 1) == (version == 2)
        assert blk.capacity == (4 << 20) // 512

        # Many requests in flight at once, each completed by an interrupt.
        chunks = [os.urandom(8192) for _ in range(48)]
        await asyncio.wait_for(
            asyncio.gather(*(blk.write(i * 8192, c) for i, c in enumerate(chunks))), 10
        )
        await asyncio.wait_for(blk.flush(), 10)
        back = await asyncio.wait_for(
            asyncio.gather(*(blk.read(i * 8192, 8192) for i in range(len(chunks)))), 10
        )
        assert back == chunks
        assert await blk.get_id() == "viowire-blk"
        await blk.detach()
        assert await conn.mmio_read(dev.base + 0x70, 4) == 0  # reset on teardown

        rng = await EntropyDriver.attach(
            await conn.attach(pick(platform, DeviceId.ENTROPY, version))
        )
        data = await asyncio.wait_for(rng.read(64), 5)
        assert len(data) == 64 and len(set(data)) > 8
        await rng.detach()


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
async def test_sessions_have_their_own_devices(server, scheme):
    """Two sessions write the same sector of 'the same' disk: each sees only its own data."""
    url = url_of(server, scheme)
    async with await connect(url) as a, await connect(url, memory="proxied") as b:
        blk_a = await BlockDriver.attach(await a.attach((await a.platform())[1]))
        blk_b = await BlockDriver.attach(await b.attach((await b.platform())[1]))
        await blk_a.write(0, b"A" * 512)
        await blk_b.write(0, b"B" * 512)
        assert await blk_a.read(0, 512) == b"A" * 512
        assert await blk_b.read(0, 512) == b"B" * 512
        await blk_a.detach()
        await blk_b.detach()


async def test_interrupts_are_asyncio_events(server):
    async with await connect(url_of(server, "unix")) as conn:
        blk = await BlockDriver.attach(await conn.attach((await conn.platform())[1]))
        seen = []

        async def watch():
            async for status in blk.dev.interrupts():
                seen.append(status)
                return

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0)
        await blk.write(0, bytes(512))
        await asyncio.wait_for(watcher, 5)
        assert seen and seen[0] & 1  # VRING
        await blk.detach()


async def test_flushed_data_is_on_disk(tmp_path):
    image = tmp_path / "disk.img"
    spec = PlatformSpec([DeviceSpec.parse(f"blk,path={image},size=1M")])
    async with (
        running_server(tmp_path, spec) as server,
        await connect(url_of(server, "unix")) as conn,
    ):
        blk = await BlockDriver.attach(await conn.attach((await conn.platform())[0]))
        await blk.write(4096, b"\x5a" * 4096)
        await blk.flush()
        with open(image, "rb") as f:  # another reader of the file sees it, no client involved
            f.seek(4096)
            assert f.read(4096) == b"\x5a" * 4096
        await blk.detach()


async def test_server_survives_client_vanishing_mid_io(server):
    """A client that disconnects with requests in flight: its session ends, others go on."""
    url = url_of(server, "tcp")
    victim = await connect(url, memory="proxied")
    blk = await BlockDriver.attach(await victim.attach((await victim.platform())[1]))
    pending = [asyncio.create_task(blk.write(i * 4096, bytes(4096))) for i in range(16)]
    await asyncio.sleep(0)
    victim.transport.abort()
    results = await asyncio.wait_for(asyncio.gather(*pending, return_exceptions=True), 10)
    assert all(r is None or isinstance(r, Exception) for r in results)
    await victim.close()
    async with await connect(url) as conn:
        blk = await BlockDriver.attach(await conn.attach((await conn.platform())[1]))
        await blk.write(0, b"x" * 512)
        assert await blk.read(0, 512) == b"x" * 512
        await blk.detach()


async def test_platform_larger_than_one_frame_comes_in_pages(tmp_path):
    """50,000 devices: 28 bytes each are more than one 1 MiB frame holds."""
    spec = PlatformSpec([DeviceSpec.parse("rng,count=50000")], stride=0x200)
    async with (
        running_server(tmp_path, spec) as server,
        await connect(url_of(server, "unix"), ram_size=1 << 20) as conn,
    ):
        platform = await asyncio.wait_for(conn.platform(), 60)
    assert len(platform) == 50000
    assert [d.base for d in platform[-2:]] == [
        0x10001000 + 49998 * 0x200,
        0x10001000 + 49999 * 0x200,
    ]
