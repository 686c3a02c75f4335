"""The conformance checks, one module per family (spec section); :mod:`.registry` lists them
all in report order. Each drives one device through a correct flow or a deliberate violation
and reports what it saw."""

from viowire.conform.checks.registry import CHECKS

__all__ = ["CHECKS"]
