"""``viowire conform``: a conformance suite for virtio-mmio devices, viowire's or anyone's.

It drives each device of a platform through the correct flows and through deliberate
violations, using only a register bus, guest memory with an allocator and the platform table,
so the same checks run against any transport with those interfaces.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from viowire.conform.model import Check, Options, Outcome, Result, Target, Verdict
    from viowire.conform.runner import run_suite

__all__ = ["Check", "Options", "Outcome", "Result", "Target", "Verdict", "run_suite"]
_HOME = {name: "viowire.conform.model" for name in __all__[:-1]} | {
    "run_suite": "viowire.conform.runner"
}


def __getattr__(name: str) -> object:
    """The suite's API, imported on first use: every `viowire` command imports ``conform.cli``
    (for its parser), and the suite imports the client and the server (PEP 562)."""
    if name not in _HOME:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_HOME[name]), name)
