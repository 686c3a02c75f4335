"""AwaitedRequests (viowire.awaited): futures, one timer and the window's waiting line over the
sans-IO table, as the client connection and the server session use them."""

from __future__ import annotations

import asyncio

import pytest

from viowire.awaited import AwaitedRequests, Unmatched
from viowire.protocol.outstanding import Outstanding
from viowire.protocol.requests import client_ids

pytestmark = pytest.mark.timeout(10)


def awaited(window: int = 1, timeout: float = 5.0) -> AwaitedRequests:
    table: Outstanding = Outstanding(client_ids(), window, timeout)
    return AwaitedRequests(asyncio.get_running_loop(), table, lambda label: TimeoutError(label))


async def test_requests_waiting_for_the_window_go_in_order():
    requests = awaited(window=1)
    first, future = requests.open_now("first")
    order = []

    async def later(name):
        request_id, _ = await requests.open(name)
        order.append(name)
        requests.release(request_id)

    tasks = [asyncio.create_task(later(name)) for name in "abc"]
    await asyncio.sleep(0)
    assert requests.open_now("d") is None  # others wait before it
    assert requests.answer(first) == ("first", future)
    requests.release(first)
    await asyncio.wait_for(asyncio.gather(*tasks), 2)
    assert order == ["a", "b", "c"]


async def test_a_waiter_cancelled_as_it_is_woken_passes_its_place_on():
    requests = awaited(window=1)
    first, _ = requests.open_now("first")
    cancelled = asyncio.create_task(requests.open("cancelled"))
    second = asyncio.create_task(requests.open("second"))
    await asyncio.sleep(0)
    requests.release(first)  # wakes "cancelled"...
    cancelled.cancel()  # ...which goes before it runs
    request_id, _ = await asyncio.wait_for(second, 2)
    assert len(requests) == 1 and request_id in requests.table


async def test_one_timer_fails_the_requests_past_their_deadline():
    requests = awaited(window=4, timeout=0.05)
    _, slow = requests.open_now("MmioRead")
    request_id, quick = requests.open_now("quick", timeout=0.01)
    with pytest.raises(TimeoutError, match="quick"):
        await asyncio.wait_for(quick, 2)
    assert not slow.done()
    with pytest.raises(TimeoutError, match="MmioRead"):
        await asyncio.wait_for(slow, 2)
    assert requests.answer(request_id) is Unmatched.LATE


async def test_close_fails_what_awaits_and_what_waits_and_what_comes_later():
    requests = awaited(window=1)
    _, future = requests.open_now("first")
    waiting = asyncio.create_task(requests.open("second"))
    await asyncio.sleep(0)
    requests.close(ConnectionError("gone"))
    with pytest.raises(ConnectionError, match="gone"):
        await future
    with pytest.raises(ConnectionError, match="gone"):
        await asyncio.wait_for(waiting, 2)
    assert requests.open_now("third") is None
    with pytest.raises(ConnectionError, match="gone"):
        await requests.open("third")


async def test_fail_all_fails_what_awaits_and_the_window_opens_again():
    requests = awaited(window=1)
    _, future = requests.open_now("first")
    requests.fail_all(ConnectionError("fatal ERROR"))
    with pytest.raises(ConnectionError, match="fatal"):
        await future
    assert requests.open_now("next") is not None
