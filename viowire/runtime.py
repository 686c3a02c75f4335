"""Event-loop choice: uvloop when it is installed (about 1.5x on a round trip), else asyncio."""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
LOOPS = ("auto", "uvloop", "asyncio")


def run(main: Coroutine[Any, Any, T], loop: str = "auto") -> T:
    """Run ``main`` on the chosen loop; ``auto`` picks uvloop when it can be imported."""
    if loop not in LOOPS:
        raise ValueError(f"loop {loop!r}: use one of {', '.join(LOOPS)}")
    if loop != "asyncio":
        try:
            import uvloop
        except ImportError as exc:
            if loop == "uvloop":
                raise SystemExit(
                    "uvloop is not installed: pip install uvloop, or use --loop asyncio"
                ) from exc
        else:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
                return runner.run(main)
    return asyncio.run(main)


def loop_name() -> str:
    """'uvloop' or 'asyncio': the loop running now."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )


async def until_signalled() -> None:
    """Return on SIGINT or SIGTERM: how a server process is asked to stop."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
