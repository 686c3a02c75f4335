"""The handle a device holds for one of its virtqueues (the device API's :class:`Queue`).

Three verbs, as QEMU's VirtQueue and libvhost-user have them: take a chain (:meth:`Queue.pop`,
or :meth:`Queue.get` to wait for one), keep it as long as the device needs, and give it back
with the bytes written (:meth:`Queue.complete`). Completions made in the same loop turn are
published together: used elements, then used.idx, then one notification if the driver wants
it (NO_INTERRUPT, EVENT_IDX). The transport behind it is
:class:`~viowire.server.service.QueueService`.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from viowire.server.virtqueue import DescriptorChain, StaleQueueError

if TYPE_CHECKING:
    from viowire.server.service import QueueService


class Queue:
    """Virtqueue ``index`` of a device, as the device sees it.

    Use it from the event loop's thread (any task). Chains taken before a reset of the queue or
    the device are stale: their reads and writes raise :class:`StaleQueueError` and completing
    them does nothing, so a device may simply drop them (or let the error end its task).
    """

    __slots__ = ("_service", "_waiter", "index")

    def __init__(self, service: QueueService, index: int) -> None:
        self._service = service
        self.index = index
        self._waiter: asyncio.Future[None] | None = None

    def __repr__(self) -> str:
        return f"<Queue {self.index} of {self._service.name}>"

    @property
    def ready(self) -> bool:
        """The driver has enabled the ring and the device may use it now."""
        return self._service._usable(self._service.queues[self.index])

    @property
    def num(self) -> int:
        """The queue size the driver chose (descriptors in the ring)."""
        return self._service.queues[self.index].num

    async def pop(self) -> DescriptorChain | None:
        """The next available chain, or None when the driver has made none available (or the
        queue is not ready). A broken ring puts the device into DEVICE_NEEDS_RESET and
        returns None."""
        return await self._service._pop_for_device(self._service.queues[self.index])

    async def get(self) -> DescriptorChain:
        """Wait for the next available chain: the driver's next notification (or a ring that
        becomes ready) wakes it. It waits across resets, and is cancelled like any task."""
        while True:
            # The waiter exists before the look, so a notification that comes while pop()
            # awaits guest memory (proxied) wakes the next wait instead of being lost.
            waiter = self._waiter
            if waiter is None or waiter.done():
                waiter = self._waiter = asyncio.get_running_loop().create_future()
            chain = await self.pop()
            if chain is not None:
                return chain
            await asyncio.shield(waiter)

    def complete(self, chain: DescriptorChain, written: int) -> None:
        """Give ``chain`` back to the driver with ``written`` bytes of its writable part filled
        (used.len). Published at the end of this loop turn, together with the other completions
        of the turn. A stale chain (the queue was reset since) is dropped."""
        self._service._complete_held(self._service.queues[self.index], chain, written)

    def fail(self, reason: str) -> None:
        """The driver made a chain it must never make on this queue (wrong direction, a header
        too short): the device needs a reset (§2.1.2), as when ``handle()`` raises
        :class:`~viowire.device.ChainError`. For devices that hold chains, where no
        ``handle()`` call can raise; ``reason`` goes into the log line."""
        self._service._fail(f"queue {self.index}: {reason}")

    def serve(self) -> None:
        """Serve every available chain through the device's ``handle`` (the default
        :meth:`~viowire.device.Device.queue_notify`)."""
        self._service._schedule_pass(self._service.queues[self.index])

    def _wake(self) -> None:
        """A notification, or the ring became ready: waiters of :meth:`get` look again."""
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)


__all__ = ["Queue", "StaleQueueError"]
