"""Sizes written the way the kernel's memparse and qemu-io read them: 4K, 64M, 0x200, 1G."""

from __future__ import annotations

_SUFFIXES = {"": 0, "K": 10, "M": 20, "G": 30, "T": 40, "P": 50, "E": 60}


def parse_size(text: str | int) -> int:
    """Parse ``text`` as a number with an optional K/M/G/T/P/E suffix (powers of 1024)."""
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G suffix")
    if isinstance(text, int):
        if text < 0:
            raise ValueError(f"size {text} is negative")
        return text
    raw = text.strip()
    suffix = raw[-1:].upper() if raw[-1:].isalpha() else ""
    if raw[:2].lower() == "0x" and suffix not in "KMGTP":
        # 0x1K is legal for memparse: hex digits stop before K; but in 0xab or 0x1E the
        # letter is a hex digit, as strtoull reads it.
        suffix = ""
    number = raw[: len(raw) - len(suffix)]
    try:
        value = int(number, 0)
    except ValueError:
        raise ValueError(f"size {text!r} is not a number with an optional K/M/G suffix") from None
    if suffix not in _SUFFIXES:
        raise ValueError(f"size {text!r}: unknown suffix {suffix!r} (use K, M, G, T, P or E)")
    if value < 0:
        raise ValueError(f"size {text!r} is negative")
    return value << _SUFFIXES[suffix]


def format_size(value: int) -> str:
    """The shortest exact K/M/G spelling of ``value``."""
    for suffix, shift in (("G", 30), ("M", 20), ("K", 10)):
        if value and value % (1 << shift) == 0:
            return f"{value >> shift}{suffix}"
    return str(value)


_DURATION_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "": 1.0}


def parse_duration(text: str | float | int) -> float:
    """Seconds from ``10ms``, ``250us``, ``1.5s``, ``100ns`` or a plain number of seconds."""
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError(f"duration {text!r} is not a number with an optional ns/us/ms/s unit")
    if isinstance(text, int | float):
        value, scale = float(text), 1.0
    else:
        raw = text.strip().lower()
        number = raw.rstrip("nuµms")
        unit = raw[len(number) :]
        if unit not in _DURATION_UNITS:
            raise ValueError(f"duration {text!r}: unknown unit {unit!r} (use ns, us, ms or s)")
        try:
            value, scale = float(number), _DURATION_UNITS[unit]
        except ValueError:
            raise ValueError(
                f"duration {text!r} is not a number with an optional ns/us/ms/s unit"
            ) from None
    if not value >= 0 or value == float("inf"):
        raise ValueError(f"duration {text!r} must be a finite number >= 0")
    return value * scale
