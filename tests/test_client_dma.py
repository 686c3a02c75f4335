"""Drivers' DMA buffers: the slot pool (allocate once, reuse, give back only what the device has
returned) and the blk/rng drivers on it, against the in-process fake device of test_client_mmio."""

from __future__ import annotations

import asyncio

import pytest
from test_client_mmio import make as make_mmio
from test_client_mmio import make_disk, rng_serve
from test_client_vring import FakeRAM, settle, wait

from viowire.client.drivers.rng import EntropyDriver
from viowire.client.guest import DmaPool
from viowire.virtio.constants import Interrupt


def test_slots_are_allocated_once_and_reused():
    ram = FakeRAM()
    pool = DmaPool(ram, prefix=17)
    slot = pool.take(4096)
    assert slot.data == slot.gpa + 64 and slot.capacity == 4096 and len(ram.blocks) == 1
    pool.give(slot)
    again = pool.take(512)
    assert again is slot and len(ram.blocks) == 1


def test_a_slot_too_small_is_replaced_by_a_larger_power_of_two():
    ram = FakeRAM()
    pool = DmaPool(ram)
    pool.give(pool.take(100))
    big = pool.take(5000)
    assert big.capacity == 8192 and len(ram.blocks) == 1


def test_idle_slots_are_freed_when_guest_ram_runs_short():
    ram = FakeRAM(size=64 * 1024)
    pool = DmaPool(ram, min_data=16 * 1024)
    slots = [pool.take(1) for _ in range(3)]
    for slot in slots:
        pool.give(slot)
    assert pool.idle == 3
    pool.take(40 * 1024)  # the idle slot popped is too small, and there is no room beside them
    assert pool.idle == 0


def test_at_most_keep_idle_slots_and_a_closed_pool_frees_what_comes_back():
    ram = FakeRAM()
    pool = DmaPool(ram, keep=2)
    slots = [pool.take(1) for _ in range(3)]
    for slot in slots[:2]:
        pool.give(slot)
    pool.close()
    assert pool.idle == 0 and len(ram.blocks) == 1
    pool.give(slots[2])
    assert not ram.blocks


async def test_blk_reuses_one_slot_for_sequential_requests():
    disk, _, ram = await make_disk()
    await wait(disk.write(0, b"a" * 4096))
    blocks = len(ram.blocks)
    for i in range(5):
        await wait(disk.write(4096 * i, bytes([i]) * 4096))
        assert await wait(disk.read(4096 * i, 4096)) == bytes([i]) * 4096
    assert len(ram.blocks) == blocks


async def test_a_cancelled_blk_request_keeps_its_slot_until_the_device_returns_it():
    disk, model, ram = await make_disk()
    fake = model.fake
    serve, fake.serve = fake.serve, None  # the device sits on what is published
    task = asyncio.create_task(disk.read(0, 4096))
    await settle()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await wait(task)
    assert disk._dma.idle == 0  # the slot is still the device's
    ring = fake.queues[0].ring
    held_head, held_chain = ring.pop()
    ring.set_avail_event(ring.last_avail)  # as a device does when it takes a chain
    headers = []

    def recording_serve(queue: int, chain: list) -> int:
        headers.append(chain[0][0])
        return serve(queue, chain)

    fake.serve = recording_serve
    await wait(disk.write(4096, b"w" * 4096))  # meanwhile: must not reuse the held slot
    assert headers and held_chain[0][0] not in headers
    idle = disk._dma.idle
    ring.push(held_head, 4097)  # the device finally returns the cancelled read
    fake.raise_interrupt(Interrupt.VRING)
    await settle()
    assert disk._dma.idle == idle + 1
    await disk.detach()
    assert not ram.blocks


async def test_rng_uses_one_buffer_per_read_and_frees_it():
    fake, dev, ram = make_mmio()
    rng = await EntropyDriver.attach(dev)
    rng_serve(fake, limit=7)
    allocs = []
    real = ram.alloc
    ram.alloc = lambda size, align=16: allocs.append(size) or real(size, align)
    assert len(await wait(rng.read(100))) == 100  # 15 requests of at most 7 bytes
    assert allocs == [100] and len(ram.blocks) == 3
