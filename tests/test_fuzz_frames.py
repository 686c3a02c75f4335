"""Frame fuzzing in CI: hostile sessions (tests/fuzzframes.py) against a real ``viowire serve``,
drawn by hypothesis within a time budget. scripts/fuzz-long is the long run (a million frames and
the fresh-session latency figure); this one keeps every change honest in a few seconds."""

from __future__ import annotations

import asyncio
import os
import random
import time

import fuzzframes as fz
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

# About 10 s on a loaded 2-core machine; VIOWIRE_FUZZ_EXAMPLES raises it for a deeper run.
EXAMPLES = int(os.environ.get("VIOWIRE_FUZZ_EXAMPLES", "150"))
FRESH_EVERY = 25  # examples between two fresh sessions that must work meanwhile
# A seeded Random draws as scripts/fuzz-long does; hypothesis's own leans to the edges (zeros,
# the first choice) and shrinks a failure.
RANDOMS = st.integers(0, 2**64 - 1).map(random.Random) | st.randoms(use_true_random=False)


def test_hostile_sessions_never_crash_hang_or_break_the_server(tmp_path):
    with fz.serve(tmp_path) as served:
        tally = fz.Tally()
        pid = served.proc.pid
        fds = fz.fd_count(pid)

        @settings(
            max_examples=EXAMPLES,
            deadline=None,  # each example has its own bound: fuzzframes.HANG_AFTER
            suppress_health_check=[HealthCheck.too_slow],
        )
        @given(RANDOMS, st.integers(1, 200))
        def session(rng, count):
            asyncio.run(fz.fuzz_session(rng, served.target, count, tally))
            assert served.proc.poll() is None, f"the server exited with {served.proc.returncode}"
            if tally.sessions % FRESH_EVERY == 0:
                fz.fresh_session(served.target.urls[tally.sessions % 2], served.target.token)

        session()
        print(
            f"{tally.frames} frames in {tally.sessions} sessions, {tally.replies} back, "
            f"{tally.fatal} ended by the server, {tally.mem_reads} MEM_READs answered"
        )
        assert tally.frames > EXAMPLES  # the fuzzer did send something
        assert served.problems() == []  # bad input is a warning, never a traceback
        fz.fresh_session(served.target.urls[0], served.target.token)
        # every connection was closed: the server holds no more descriptors than at the start,
        # once it has seen the last close (the fresh session's may still be on its way)
        deadline = time.monotonic() + fz.HANG_AFTER
        while fz.fd_count(pid) > fds and time.monotonic() < deadline:
            time.sleep(0.01)
        assert fz.fd_count(pid) <= fds
