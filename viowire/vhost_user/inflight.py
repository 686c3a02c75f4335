"""Inflight I/O tracking (vhost-user.rst "Inflight I/O tracking", split virtqueues).

With the INFLIGHT_SHMFD protocol feature the back-end keeps, in a shared buffer the front-end
holds on to (GET_INFLIGHT_FD hands it over, SET_INFLIGHT_FD gives it back after a reconnect),
which descriptor heads it took from each ring and has not returned yet. A back-end that
restarts, or a front-end that reconnects, then resubmits exactly those requests: none is lost,
none completes twice.

The buffer is one region per queue, each :func:`queue_region_size` bytes::

    QueueRegionSplit   u64 features (0), u16 version (1; 0: not initialised yet),
                       u16 desc_num (the ring size), u16 last_batch_head, u16 used_idx
    DescStateSplit[desc_num]
                       u8 inflight, u8 padding[5], u16 next, u64 counter

Taking a head: ``counter`` = the global counter (then +1), ``inflight`` = 1. Returning a batch:
each head's ``next`` = ``last_batch_head`` and ``last_batch_head`` = the head; used.idx moves
by the batch; each head's ``inflight`` = 0; ``used_idx`` = used.idx. Reconnecting: if
``used_idx`` differs from used.idx, the last batch reached the used ring but not this buffer
(its ``inflight`` flags are cleared now, following the ``next`` list); then every head still
in flight is resubmitted in ``counter`` order.

:class:`InflightRegion` is that layout over a mapping (no I/O of its own);
:class:`InflightVirtqueue` is the ring layer's queue with the tracking hooked into taking and
returning chains.
"""

from __future__ import annotations

import struct
from collections import deque
from collections.abc import Sequence

from viowire.server.virtqueue import DescriptorChain, RingError, SplitVirtqueue
from viowire.virtio.memory import GuestMemory
from viowire.virtio.ring import DESC_SIZE, MAX_QUEUE_SIZE, valid_queue_size

VERSION = 1
ALIGNMENT = 64
"""Each queue's region starts on a 64-byte boundary (libvhost-user's and DPDK's choice)."""
HEADER = struct.Struct("<QHHHH")  # features, version, desc_num, last_batch_head, used_idx
DESC_STATE = struct.Struct("<B5xHQ")  # inflight, padding, next, counter
_VERSION_AT, _LAST_BATCH_AT, _USED_IDX_AT = 8, 12, 14
MAX_QUEUES = 256
"""A ring index is 8 bits in SET_VRING_KICK/CALL/ERR: no front-end tracks more queues."""


class InflightError(Exception):
    """A description or a buffer that cannot be used (the message is refused)."""


def queue_region_size(queue_size: int) -> int:
    """Bytes of one queue's region for rings of ``queue_size`` entries."""
    raw = HEADER.size + DESC_STATE.size * queue_size
    return -(-raw // ALIGNMENT) * ALIGNMENT


def buffer_size(num_queues: int, queue_size: int) -> int:
    """Bytes of the whole buffer (GET_INFLIGHT_FD's ``mmap_size``), after checking the
    front-end's numbers: InflightError for numbers no ring can have."""
    if not 0 < num_queues <= MAX_QUEUES:
        raise InflightError(f"{num_queues} queues (1 to {MAX_QUEUES})")
    if not valid_queue_size(queue_size):
        raise InflightError(f"queue size {queue_size} is not a power of 2 <= {MAX_QUEUE_SIZE}")
    return num_queues * queue_region_size(queue_size)


class InflightRegion:
    """One queue's region of the shared buffer, as a view of its bytes."""

    def __init__(self, view: memoryview, queue_size: int) -> None:
        self.view = view
        self.queue_size = queue_size
        self.counter = 0  # the global counter: the order in which heads were taken

    # -- fields -----------------------------------------------------------------------------------
    @property
    def version(self) -> int:
        return int.from_bytes(self.view[_VERSION_AT : _VERSION_AT + 2], "little")

    @property
    def used_idx(self) -> int:
        return int.from_bytes(self.view[_USED_IDX_AT : _USED_IDX_AT + 2], "little")

    @used_idx.setter
    def used_idx(self, value: int) -> None:
        self.view[_USED_IDX_AT : _USED_IDX_AT + 2] = value.to_bytes(2, "little")

    @property
    def last_batch_head(self) -> int:
        return int.from_bytes(self.view[_LAST_BATCH_AT : _LAST_BATCH_AT + 2], "little")

    @last_batch_head.setter
    def last_batch_head(self, value: int) -> None:
        self.view[_LAST_BATCH_AT : _LAST_BATCH_AT + 2] = value.to_bytes(2, "little")

    def desc(self, head: int) -> tuple[int, int, int]:
        """(inflight, next, counter) of descriptor ``head``."""
        return DESC_STATE.unpack_from(self.view, HEADER.size + DESC_STATE.size * head)

    def _set_inflight(self, head: int, value: int) -> None:
        self.view[HEADER.size + DESC_STATE.size * head] = value

    def _set_next(self, head: int, value: int) -> None:
        at = HEADER.size + DESC_STATE.size * head + 6
        self.view[at : at + 2] = value.to_bytes(2, "little")

    # -- the three steps of the specification ------------------------------------------------------
    def taken(self, head: int) -> None:
        """A head was taken from the available ring."""
        at = HEADER.size + DESC_STATE.size * head
        DESC_STATE.pack_into(self.view, at, 0, self.desc(head)[1], self.counter)
        self.counter += 1
        self._set_inflight(head, 1)  # last: the entry is whole before it counts

    def batch(self, heads: Sequence[int]) -> None:
        """Before the used ring moves: the heads about to be returned, as the last batch."""
        for head in heads:
            self._set_next(head, self.last_batch_head)
            self.last_batch_head = head

    def returned(self, heads: Sequence[int], used_idx: int) -> None:
        """After the used ring moved to ``used_idx``: the batch is no longer in flight."""
        for head in heads:
            self._set_inflight(head, 0)
        self.used_idx = used_idx

    def recover(self, ring_size: int, used_idx: int) -> list[int]:
        """A ring (re)starts with used.idx ``used_idx``: the heads to resubmit, in the order
        they were taken. A fresh buffer (version 0) is initialised instead. InflightError for
        a buffer that cannot be the back-end's (a head past the ring, more heads than fit)."""
        if ring_size > self.queue_size:
            raise InflightError(
                f"a ring of {ring_size} entries, but the inflight buffer tracks {self.queue_size}"
            )
        if self.version == 0:
            HEADER.pack_into(self.view, 0, 0, VERSION, self.queue_size, 0, used_idx)
            self.view[HEADER.size : HEADER.size + DESC_STATE.size * self.queue_size] = bytes(
                DESC_STATE.size * self.queue_size
            )
            self.counter = 0
            return []
        if self.version != VERSION:
            raise InflightError(f"inflight buffer version {self.version}, not {VERSION}")
        last_batch = (used_idx - self.used_idx) & 0xFFFF
        if last_batch:
            self._clear_last_batch(last_batch)
            self.used_idx = used_idx
        states = [(self.desc(head), head) for head in range(self.queue_size)]
        pending = sorted((counter, head) for (inflight, _, counter), head in states if inflight)
        if len(pending) > ring_size or any(head >= ring_size for _, head in pending):
            raise InflightError(
                f"{len(pending)} heads in flight, some past the ring of {ring_size} entries: "
                "the buffer is not this ring's"
            )
        self.counter = pending[-1][0] + 1 if pending else 0
        return [head for _, head in pending]

    def _clear_last_batch(self, size: int) -> None:
        """The last batch reached the used ring: its heads are not in flight any more."""
        head = self.last_batch_head
        for _ in range(min(size, self.queue_size)):  # bounded: the list is the front-end's too
            if head >= self.queue_size:
                raise InflightError(f"last batch list reaches head {head}, past the buffer")
            self._set_inflight(head, 0)
            head = self.desc(head)[1]


class InflightVirtqueue(SplitVirtqueue):
    """A split virtqueue that records the heads it takes and returns in an
    :class:`InflightRegion`, and hands out resubmitted heads before new ones."""

    def __init__(self, index: int, num_max: int) -> None:
        self.inflight: InflightRegion | None = None
        self.resubmit: deque[int] = deque()
        super().__init__(index, num_max)

    def stop(self) -> None:
        super().stop()
        self.resubmit = deque()  # they stay in flight in the buffer: the next start finds them

    async def pop(self, memory: GuestMemory) -> DescriptorChain | None:
        if self.resubmit:
            return await self._resubmitted(memory)
        chain = await super().pop(memory)
        if chain is not None and self.inflight is not None:
            self.inflight.taken(chain.head)
        return chain

    async def _resubmitted(self, memory: GuestMemory) -> DescriptorChain:
        """The next head to resubmit, walked afresh from the descriptor table (its avail ring
        slot may hold a newer head by now: that is why the buffer exists)."""
        epoch = self.epoch
        head = self.resubmit.popleft()
        (table,) = await memory.readv([(self.desc_addr, DESC_SIZE * self.num)])
        self._check_epoch(epoch)
        walked, error = self._walk_heads(memory, table, [head])
        chains, error = await self._flatten_indirect(memory, walked, error)
        self._check_epoch(epoch)
        if error is not None:
            raise error
        if not chains:
            raise RingError(f"resubmitted head {head} cannot be walked")
        return chains[0]

    async def push_many(self, memory: GuestMemory, used: Sequence[tuple[int, int]]) -> None:
        region = self.inflight
        if region is None or not used:
            await super().push_many(memory, used)
            return
        heads = [head for head, _ in used]
        region.batch(heads)
        await super().push_many(memory, used)
        region.returned(heads, self.used_idx)
