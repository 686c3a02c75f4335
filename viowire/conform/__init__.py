"""``viowire conform``: a conformance suite for virtio-mmio devices, viowire's or anyone's.

It drives each device of a platform through the correct flows and through deliberate
violations, using only a register bus, guest memory with an allocator and the platform table,
so the same checks run against any transport with those interfaces.
"""

from viowire.conform.model import Check, Options, Outcome, Result, Target, Verdict
from viowire.conform.runner import run_suite

__all__ = ["Check", "Options", "Outcome", "Result", "Target", "Verdict", "run_suite"]
