"""Live progress of a load run: one status line, redrawn in place on a terminal.

On a TTY the line is rewritten about four times a second (``\\r`` and erase-to-end-of-line);
anywhere else (a pipe, a CI log) a plain line goes out every few seconds, so logs stay readable.
The text comes from a callback, so the run decides what matters in each phase.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from typing import TextIO

TTY_INTERVAL = 0.25
PLAIN_INTERVAL = 5.0


class Progress:
    """Writes ``status(elapsed_s)`` to ``stream`` until stopped."""

    def __init__(
        self, stream: TextIO, status: Callable[[float], str], *, enabled: bool = True
    ) -> None:
        self.stream = stream
        self.status = status
        self.enabled = enabled
        self.tty = _isatty(stream)
        self.interval = TTY_INTERVAL if self.tty else PLAIN_INTERVAL
        self._task: asyncio.Task[None] | None = None
        self._start = time.monotonic()

    def start(self) -> None:
        if self.enabled and self._task is None:
            self._start = time.monotonic()
            self._task = asyncio.get_running_loop().create_task(self._run(), name="load progress")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            self.show()

    def show(self) -> None:
        """Draw the line now (also between ticks, when a phase ends)."""
        if not self.enabled:
            return
        line = self.status(time.monotonic() - self._start)
        if self.tty:
            self.stream.write(f"\r{line}\x1b[K")
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    async def stop(self) -> None:
        """Stop redrawing; on a terminal, erase the line so the summary starts clean."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self.enabled and self.tty:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
