"""MappedGuestMemory against a model: every range is inside one region or refused, whatever the
number of regions (one region takes a fast path; none, two or three take the general one)."""

from __future__ import annotations

import asyncio

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from viowire.virtio.memory import GuestMemoryError, MappedGuestMemory

SIZE = 64


def build(starts: list[int]) -> tuple[MappedGuestMemory, list[tuple[int, bytearray]]]:
    memory = MappedGuestMemory()
    regions = []
    for index, gpa in enumerate(starts):
        buffer = bytearray(bytes(range(index * SIZE, index * SIZE + SIZE)) if index < 4 else SIZE)
        memory.add_region(gpa, buffer)
        regions.append((gpa, buffer))
    return memory, regions


def model(regions: list[tuple[int, bytearray]], gpa: int, length: int):
    """(buffer, offset) holding [gpa, gpa+length), or None."""
    if gpa < 0 or length < 0:
        return None
    for start, buffer in regions:
        if start <= gpa and gpa + length <= start + len(buffer):
            return buffer, gpa - start
    return None


# Starts 2*SIZE apart never overlap; odd starts exercise the unaligned u16 path.
starts_st = st.lists(st.integers(0, 20), max_size=3, unique=True).map(
    lambda slots: [2 * SIZE * slot + (slot % 3 == 2) for slot in slots]
)
near = st.integers(-3, 42 * SIZE + 3)
address_st = st.one_of(near, st.integers(-(1 << 70), 1 << 70))
length_st = st.one_of(st.integers(-2, SIZE + 2), st.integers(-(1 << 40), 1 << 40))


@settings(max_examples=400, deadline=None)
@given(starts_st, address_st, length_st)
def test_every_access_matches_the_model(starts, gpa, length):
    memory, regions = build(starts)
    where = model(regions, gpa, length)
    if where is None:
        for access in (
            lambda: memory.check(gpa, length),
            lambda: memory.view(gpa, length),
            lambda: memory.read_sync(gpa, length),
            lambda: asyncio.run(memory.readv([(gpa, length)])),
        ):
            with pytest.raises(GuestMemoryError):
                access()
        return
    buffer, offset = where
    expected = bytes(buffer[offset : offset + length])
    assert memory.check(gpa, length).gpa == gpa - offset
    assert memory.read_sync(gpa, length) == expected
    assert bytes(memory.view(gpa, length)) == expected
    assert asyncio.run(memory.readv([(gpa, length), (gpa, 0)])) == [expected, b""]
    data = bytes((b + 1) & 0xFF for b in expected)
    asyncio.run(memory.writev([(gpa, data)]))
    assert buffer[offset : offset + length] == data


@settings(max_examples=300, deadline=None)
@given(starts_st, address_st, st.integers(0, 0xFFFF))
def test_u16_accesses_match_the_model(starts, gpa, value):
    memory, regions = build(starts)
    where = model(regions, gpa, 2)
    if where is None:
        with pytest.raises(GuestMemoryError):
            memory.load_u16(gpa)
        with pytest.raises(GuestMemoryError):
            memory.store_u16(gpa, value)
        return
    buffer, offset = where
    assert memory.load_u16(gpa) == int.from_bytes(buffer[offset : offset + 2], "little")
    memory.store_u16(gpa, value | 0x10000)  # only the low 16 bits are stored
    assert buffer[offset : offset + 2] == value.to_bytes(2, "little")
    assert memory.load_u16(gpa) == value


@settings(max_examples=200, deadline=None)
@given(starts_st, st.lists(st.tuples(address_st, st.integers(0, SIZE + 2)), max_size=4))
def test_a_bad_segment_writes_nothing(starts, ranges):
    memory, regions = build(starts)
    before = [bytes(buffer) for _, buffer in regions]
    segments = [(gpa, b"\xee" * length) for gpa, length in ranges]
    if all(model(regions, gpa, length) is not None for gpa, length in ranges):
        asyncio.run(memory.writev(segments))
        return
    with pytest.raises(GuestMemoryError):
        asyncio.run(memory.writev(segments))
    assert [bytes(buffer) for _, buffer in regions] == before


def test_adding_a_second_region_leaves_the_fast_path():
    memory = MappedGuestMemory()
    memory.add_region(0x1000, bytearray(16))
    assert memory.check(0x1000, 16).gpa == 0x1000
    memory.add_region(0x2000, bytearray(16))
    assert memory.check(0x2000, 16).gpa == 0x2000
    assert memory.read_sync(0x100F, 1) == b"\0"
    with pytest.raises(GuestMemoryError):
        memory.check(0x100F, 2)
    memory.close()
    with pytest.raises(GuestMemoryError):
        memory.check(0x1000, 1)
