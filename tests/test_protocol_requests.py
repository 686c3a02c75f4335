"""Request ids (viowire.protocol.requests): the rule both ends number their requests by."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viowire.protocol.requests import (
    SERVER_WRITE_TAG,
    RequestIds,
    client_ids,
    server_read_ids,
    server_write_ids,
)


def test_ids_count_from_one():
    ids = client_ids()
    assert [ids.next() for _ in range(3)] == [1, 2, 3]
    assert [server_read_ids().next() for _ in range(1)] == [1]
    writes = server_write_ids()
    assert [writes.next() for _ in range(2)] == [SERVER_WRITE_TAG, SERVER_WRITE_TAG | 1]


def test_an_id_is_never_zero_across_the_wrap():
    ids = RequestIds(first=0xFFFF_FFFE)
    assert [ids.next() for _ in range(3)] == [0xFFFF_FFFE, 0xFFFF_FFFF, 1]
    reads = RequestIds(SERVER_WRITE_TAG - 1, first=0x7FFF_FFFF)
    assert [reads.next() for _ in range(2)] == [0x7FFF_FFFF, 1]


def test_the_write_space_wraps_within_itself():
    writes = RequestIds(SERVER_WRITE_TAG - 1, SERVER_WRITE_TAG, first=0x7FFF_FFFF)
    assert [writes.next() for _ in range(2)] == [0xFFFF_FFFF, SERVER_WRITE_TAG]


@given(st.integers(0, 1 << 40), st.integers(1, 64))
def test_the_servers_two_spaces_never_meet(start, count):
    reads, writes = RequestIds(SERVER_WRITE_TAG - 1, first=start), server_write_ids()
    for _ in range(count):
        read, write = reads.next(), writes.next()
        assert 0 < read < SERVER_WRITE_TAG <= write <= 0xFFFF_FFFF
        assert read in reads and read not in writes
        assert write in writes and write not in reads


def test_zero_is_nobodys():
    assert 0 not in client_ids() and 0 not in server_read_ids()


@pytest.mark.parametrize(("mask", "tag"), [(0, 0), (0xFF, 0x80), (1 << 32, 0), (0xFF, 1 << 32)])
def test_a_space_must_fit_the_field(mask, tag):
    with pytest.raises(ValueError, match="disjoint, within 32 bits"):
        RequestIds(mask, tag)
