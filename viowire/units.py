"""Sizes written the way the kernel's memparse and qemu-io read them: 4K, 64M, 0x200, 1G."""

from __future__ import annotations

_SUFFIXES = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def parse_size(text: str | int) -> int:
    """Parse ``text`` as a number with an optional K/M/G/T/P/E suffix (powers of 1024)."""
    if isinstance(text, int):
        return text
    raw = text.strip()
    suffix = raw[-1:].upper() if raw[-1:].isalpha() and not raw.lower().startswith("0x") else ""
    if raw.lower().startswith("0x") and raw[-1:].upper() in "KMGTPE" and len(raw) > 2:
        # 0x1K is legal for memparse: a hex number then a suffix (hex digits stop before K).
        suffix = raw[-1].upper()
    number = raw[: len(raw) - len(suffix)] if suffix else raw
    if suffix not in _SUFFIXES:
        raise ValueError(f"size {text!r}: unknown suffix {suffix!r} (use K, M, G, T, P or E)")
    try:
        value = int(number, 0)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G suffix") from None
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return value << _SUFFIXES[suffix]


def format_size(value: int) -> str:
    """The shortest exact K/M/G spelling of ``value``."""
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if value and value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    return str(value)
