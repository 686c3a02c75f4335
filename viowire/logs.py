"""Log hygiene: a hostile peer must not be able to flood the server's log.

Every bad frame and every guest error logs one line, which is what an operator wants, until a
client sends a million of them. :class:`RateLimit` lets each source (the record's first argument:
a session id or a device name) log a burst, then a steady trickle, and says how many it dropped.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Iterator

BURST = 20
PER_SECOND = 2.0
MAX_SOURCES = 4096


class RateLimit(logging.Filter):
    """A token bucket per (logger, source); dropped lines are counted on the next one let out."""

    def __init__(self, burst: int = BURST, per_second: float = PER_SECOND) -> None:
        super().__init__()
        self.burst = burst
        self.per_second = per_second
        self._buckets: dict[tuple[str, object], list[float]] = {}  # tokens, last time, dropped

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.ERROR:
            return True  # server bugs always get through
        key = (
            record.name,
            record.args[0] if isinstance(record.args, tuple) and record.args else None,
        )
        now = time.monotonic()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_SOURCES:
                self._buckets.clear()
            bucket = self._buckets[key] = [float(self.burst), now, 0]
        tokens = min(self.burst, bucket[0] + (now - bucket[1]) * self.per_second)
        bucket[1] = now
        if tokens < 1:
            bucket[0] = tokens
            bucket[2] += 1
            return False
        bucket[0] = tokens - 1
        if bucket[2]:
            record.msg = f"{record.msg} ({int(bucket[2])} similar lines suppressed)"
            bucket[2] = 0
        return True


def install(loggers: tuple[str, ...] = ("viowire.server", "viowire.device")) -> RateLimit:
    """Rate-limit the loggers that report what peers send (filters do not inherit)."""
    limit = RateLimit()
    for name in loggers:
        logging.getLogger(name).addFilter(limit)
    return limit


class Demote(logging.Filter):
    """Passes WARNING records on as INFO: for a server of the command's own whose peer is a
    test that misbehaves on purpose (``viowire conform``), so they show with -v only."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.WARNING:
            record.levelno, record.levelname = logging.INFO, "INFO"
            return logging.getLogger(record.name).isEnabledFor(logging.INFO)
        return True


@contextlib.contextmanager
def demoted(loggers: tuple[str, ...] = ("viowire.server", "viowire.device")) -> Iterator[None]:
    """While it lasts, warnings of ``loggers`` are logged as INFO."""
    demote = Demote()
    for name in loggers:
        logging.getLogger(name).addFilter(demote)
    try:
        yield
    finally:
        for name in loggers:
            logging.getLogger(name).removeFilter(demote)
