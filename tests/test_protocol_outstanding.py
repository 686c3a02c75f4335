"""The table of requests awaiting answers (viowire.protocol.outstanding), with a given clock and
no I/O: the window, deadlines, matching, late and unknown answers, failing them all."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viowire.protocol.outstanding import REMEMBERED, Outstanding, Unmatched
from viowire.protocol.requests import client_ids, server_read_ids, server_write_ids


def table(window: int = 3, timeout: float = 10.0, ids=None) -> Outstanding[str]:
    return Outstanding(ids or client_ids(), window, timeout)


def test_a_full_window_admits_nothing_until_a_request_is_answered_or_closed():
    requests = table(window=2)
    first, second = requests.open(0, "a"), requests.open(0, "b")
    assert (first, second) == (1, 2)
    assert requests.full and requests.open(0, "c") is None
    assert requests.answer(first) == "a"
    assert requests.open(1, "c") == 3
    assert requests.close(second) == "b"
    assert not requests.full and len(requests) == 1


def test_a_window_raised_after_hello_admits_more():
    requests = table(window=1)
    requests.open(0, "a")
    assert requests.open(0, "b") is None
    requests.window = 2
    assert requests.open(0, "b") is not None


def test_a_window_of_nothing_is_refused():
    with pytest.raises(ValueError, match="at least 1"):
        table(window=0)


def test_answers_match_by_id_not_order():
    requests = table()
    ids = [requests.open(0, what) for what in "abc"]
    assert [requests.answer(i) for i in reversed(ids)] == ["c", "b", "a"]
    assert len(requests) == 0


def test_requests_expire_in_deadline_order_by_the_given_clock():
    requests = table(window=8, timeout=10)
    a, b, c = (requests.open(t, w) for t, w in ((0, "a"), (1, "b"), (2, "c")))
    assert requests.next_deadline() == 10
    assert requests.expired(9.9) == []
    assert requests.expired(11) == [(a, "a"), (b, "b")]
    assert requests.next_deadline() == 12
    assert requests.expired(12) == [(c, "c")]
    assert requests.next_deadline() is None


def test_a_shorter_timeout_expires_before_older_requests():
    requests = table(window=8, timeout=10)
    a = requests.open(0, "a")
    short = requests.open(1, "short", timeout=2)
    assert requests.next_deadline() == 3
    assert requests.expired(3) == [(short, "short")]
    assert requests.next_deadline() == 10
    assert requests.expired(10) == [(a, "a")]


def test_an_answer_after_expiry_is_late_and_an_answer_nobody_sent_is_unknown():
    requests = table(timeout=1)
    expired = requests.open(0, "a")
    abandoned = requests.open(0, "b")
    requests.close(abandoned)
    requests.expired(5)
    assert requests.answer(expired) is Unmatched.LATE
    assert requests.answer(abandoned) is Unmatched.LATE
    assert requests.answer(99) is Unmatched.UNKNOWN  # of our ids, never sent (or posted)
    assert requests.answer(0) is Unmatched.FOREIGN  # 0 answers nothing
    answered = requests.open(6, "c")
    requests.answer(answered)
    assert requests.answer(answered) is Unmatched.UNKNOWN  # answered once already


def test_only_recent_late_ids_are_remembered():
    requests = table(window=1, timeout=1)
    first = requests.open(0, "first")
    requests.close(first)
    for _ in range(REMEMBERED):
        requests.close(requests.open(0, "x"))
    assert requests.answer(first) is Unmatched.UNKNOWN


def test_fail_all_hands_back_every_request_and_frees_the_window():
    requests = table(window=2)
    a, b = requests.open(0, "a"), requests.open(0, "b")
    assert requests.fail_all() == ["a", "b"]
    assert len(requests) == 0 and requests.next_deadline() is None
    assert requests.answer(a) is Unmatched.LATE and requests.answer(b) is Unmatched.LATE
    assert requests.open(0, "c") is not None


def test_the_server_mem_read_table_tells_a_mem_write_answer_by_its_id_space():
    reads, writes = table(ids=server_read_ids()), server_write_ids()
    read = reads.open(0, "MemRead")
    write = writes.next()  # posted: not in the table
    assert reads.answer(write) is Unmatched.FOREIGN and write in writes
    assert reads.answer(read) == "MemRead"
    assert reads.answer(read) is Unmatched.UNKNOWN and read not in writes


def test_an_id_still_awaiting_is_not_given_again_after_a_wrap():
    from viowire.protocol.requests import RequestIds

    requests = Outstanding(RequestIds(mask=0x3), window=3, timeout=1)
    kept = requests.open(0, "kept")  # 1
    for _ in range(5):  # 2, 3, then 1 again: skipped
        requests.close(requests.open(0, "x"))
    assert requests.answer(kept) == "kept"


@given(st.lists(st.tuples(st.booleans(), st.floats(0, 100), st.floats(0.5, 20)), max_size=60))
def test_expired_matches_a_plain_scan(steps):
    """Whatever mix of opens and expiries, what expires is every request whose deadline has
    passed, and the window counts what is left."""
    requests = table(window=16)
    model: dict[int, float] = {}
    now = 0.0
    for opens, advance, timeout in steps:
        now += advance / 10
        if opens:
            request_id = requests.open(now, "x", timeout)
            assert (request_id is None) == (len(model) >= 16)
            if request_id is not None:
                model[request_id] = now + timeout
        else:
            gone = {i for i, _ in requests.expired(now)}
            assert gone == {i for i, d in model.items() if d <= now}
            for i in gone:
                del model[i]
        assert len(requests) == len(model)
        expected = min(model.values()) if model else None
        assert requests.next_deadline() == expected


def test_a_timeout_lowered_while_requests_await_keeps_expiry_exact():
    """A request opened after the table's timeout is lowered may expire before older ones: the
    next deadline and expiry must see it, not stop at the oldest."""
    requests = table(timeout=30.0)
    old = requests.open(0, "old")
    requests.timeout = 1.0
    new = requests.open(1, "new")
    assert requests.next_deadline() == 2.0
    assert requests.expired(5) == [(new, "new")]
    assert old in requests and requests.next_deadline() == 30.0
