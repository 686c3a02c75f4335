"""Request ids, the same rule at both ends (sans-IO).

A request id is 32 bits and never 0: request_id 0 marks what answers no request (an IRQ event,
the ERROR a peer sends before it closes). Each end numbers its own requests, wrapping; a reply
carries the id of the request it answers. The server keeps two spaces apart, its MEM_READs (bit
31 clear) and its MEM_WRITEs (bit 31 set), so that an ERROR answering a posted MEM_WRITE is
recognised from its id alone, without remembering every write.
"""

from __future__ import annotations

import itertools

ID_MASK = 0xFFFF_FFFF
SERVER_WRITE_TAG = 0x8000_0000  # the server's MEM_WRITE ids
SERVER_READ_MASK = SERVER_WRITE_TAG - 1  # the server's MEM_READ ids


class RequestIds:
    """The ids one end gives its requests: ``tag | n & mask`` for n = 1, 2, ..., wrapping, and
    never 0. A request this old is long answered (at most max_inflight are out at once)."""

    __slots__ = ("_count", "_mask", "_tag")

    def __init__(self, mask: int = ID_MASK, tag: int = 0, first: int = 1) -> None:
        if not mask or mask & tag or (mask | tag) & ~ID_MASK:
            raise ValueError(f"mask {mask:#x} and tag {tag:#x}: disjoint, within 32 bits")
        self._count = itertools.count(first)
        self._mask = mask
        self._tag = tag

    def next(self) -> int:
        request_id = self._tag | next(self._count) & self._mask
        return request_id or next(self._count) & self._mask

    def __contains__(self, request_id: int) -> bool:
        """Whether ``request_id`` is of this space (and could be one of ours)."""
        return bool(request_id) and request_id & ~self._mask == self._tag


def client_ids() -> RequestIds:
    return RequestIds()


def server_read_ids() -> RequestIds:
    return RequestIds(SERVER_READ_MASK)


def server_write_ids() -> RequestIds:
    # Numbered from 0: with bit 31 set the first id is not 0.
    return RequestIds(SERVER_READ_MASK, SERVER_WRITE_TAG, first=0)
