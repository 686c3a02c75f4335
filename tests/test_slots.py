"""Slots: the in-flight limit of connections and drivers (a semaphore with a synchronous way in)."""

from __future__ import annotations

import asyncio

import pytest

from viowire.client.slots import Slots

pytestmark = pytest.mark.timeout(10)


async def test_free_slots_are_taken_without_waiting_and_the_rest_wait_in_order():
    slots = Slots(2)
    assert slots.take_now() and slots.take_now() and not slots.take_now()
    order = []

    async def waiter(n):
        await slots.take()
        order.append(n)

    tasks = [asyncio.ensure_future(waiter(n)) for n in range(3)]
    await asyncio.sleep(0)
    assert order == [] and not slots.take_now()  # nobody may pass the waiters
    for _ in range(3):
        slots.give()
        await asyncio.sleep(0)
    await asyncio.wait_for(asyncio.gather(*tasks), 1)
    assert order == [0, 1, 2]
    assert slots.free == 0
    slots.give()
    slots.give()
    assert slots.free == 2


async def test_a_cancelled_waiter_leaves_no_slot_behind():
    slots = Slots(1)
    assert slots.take_now()
    cancelled = asyncio.ensure_future(slots.take())
    second = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    cancelled.cancel()
    await asyncio.sleep(0)
    slots.give()  # goes to the second waiter, not lost on the cancelled one
    await asyncio.wait_for(second, 1)
    assert slots.free == 0
    slots.give()
    assert slots.free == 1


async def test_a_slot_handed_to_a_waiter_cancelled_at_once_is_passed_on():
    slots = Slots(1)
    assert slots.take_now()
    first = asyncio.ensure_future(slots.take())
    second = asyncio.ensure_future(slots.take())
    await asyncio.sleep(0)
    slots.give()  # handed to ``first``...
    first.cancel()  # ...which is cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # the slot went on to ``second``
    assert slots.free == 0


def test_a_limit_below_one_is_refused():
    with pytest.raises(ValueError, match="admits nobody"):
        Slots(0)
