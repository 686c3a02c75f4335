"""The kernel command line: ``virtio_mmio.device=<size>@<baseaddr>:<irq>[:<id>]``.

:func:`parse_cmdline_device`, :func:`parse_cmdline`, :func:`format_cmdline` and
:func:`format_kernel_params` follow ``vm_cmdline_set`` of the current ``virtio_mmio.c``:
``memparse`` for the size, then ``sscanf(str, "@%lli:%u%n:%d%n")`` and nothing may follow the
last field; IRQ 0 is refused (since v5.8); the window ``[base, base+size-1]`` must be a real range
or ``insert_resource`` refuses it (so size 0 fails). The kernel's scanning rules are kept, quirks
included: a space may follow ``@`` or ``:``, the base may be negative (two's complement, as
``%lli`` stores it), ``0x1E`` is 30 bytes (E is a hex digit) but ``1E`` is an exbibyte, ``09`` is
not a number. One deliberate difference: where the kernel silently wraps a number that does not
fit (size or base beyond 64 bits, irq beyond 32, id beyond ``int``), we refuse it, because a
wrapped value is never what was meant. Parameter names compare with ``-`` and ``_`` equal and
values may be quoted, as ``parse_args`` does. IRQ ranges (``:<irq>-<last>``, proposed in 2023)
are not in mainline and are refused.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Sequence
from dataclasses import replace

from viowire.declarations.model import (
    INT_MAX,
    INT_MIN,
    U32,
    U64,
    Declaration,
    DeclarationError,
    _digit,
)
from viowire.units import format_size

PLATFORM_DEVID_AUTO = -2  # the kernel numbers these itself, so they may repeat
CMDLINE_SYNTAX = "[virtio_mmio.]device=<size>@<baseaddr>:<irq>[:<id>]"
CMDLINE_EXAMPLE = "virtio_mmio.device=1K@0x1001e000:74"
_KSPACE = " \t\n\v\f\r\xa0"  # the kernel's isspace() over bytes (Latin-1 NBSP included)
_SUFFIX_SHIFT = {"k": 10, "m": 20, "g": 30, "t": 40, "p": 50, "e": 60}


class _KernelScan:
    """A cursor over one parameter value that reads numbers as lib/kstrtox.c does."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def peek(self, ahead: int = 0) -> str:
        i = self.pos + ahead
        return self.text[i] if i < len(self.text) else ""

    @property
    def rest(self) -> str:
        return self.text[self.pos :]

    def skip_spaces(self) -> None:
        self.pos = _skip_kspace(self.text, self.pos)

    def strtoull(self, base: int) -> tuple[int, int]:
        """``simple_strtoull``: (value, digits read); no digits reads 0 and moves nothing."""
        base = self._fixup_radix(base)
        value = digits = 0
        while (d := _digit(self.peek())) is not None and d < base:
            value, digits = value * base + d, digits + 1
            self.pos += 1
        return value, digits

    def _fixup_radix(self, base: int) -> int:
        # _parse_integer_fixup_radix: "0x" only counts when a hex digit follows it.
        if base == 0:
            hex_prefix = self.peek(1).lower() == "x" and _digit(self.peek(2)) is not None
            base = (16 if hex_prefix else 8) if self.peek() == "0" else 10
        if base == 16 and self.peek() == "0" and self.peek(1).lower() == "x":
            self.pos += 2
        return base

    def signed(self, base: int) -> int | None:
        """A ``%lli``/``%d`` conversion: spaces, optional '-', then a digit is required."""
        self.skip_spaces()
        negative = self.peek() == "-"
        if not _isdigit(self.peek(int(negative))):
            return None
        self.pos += negative
        value, _ = self.strtoull(base)
        return -value if negative else value

    def unsigned(self) -> int | None:
        """A ``%u`` conversion: spaces, then a decimal digit is required (no sign)."""
        self.skip_spaces()
        if not _isdigit(self.peek()):
            return None
        return self.strtoull(10)[0]


def _isdigit(c: str) -> bool:
    return len(c) == 1 and c in "0123456789"


def _memparse(scan: _KernelScan) -> tuple[int, int]:
    """``memparse``: a number and an optional K/M/G/T/P/E suffix; returns (value, digits)."""
    value, digits = scan.strtoull(0)
    shift = _SUFFIX_SHIFT.get(scan.peek().lower())
    if shift:
        value <<= shift
        scan.pos += 1
    return value, digits


def parse_cmdline_device(text: str) -> Declaration:
    """Parse one ``[virtio_mmio.]device=<size>@<baseaddr>:<irq>[:<id>]`` (or the bare value).

    Accepted exactly when the kernel's ``vm_cmdline_set`` would register the device (see the
    module docstring for the one deliberate difference). ``id`` is None unless given; use
    :func:`assign_ids` or :func:`parse_cmdline` for the numbering the kernel applies.
    """
    args = list(_kernel_args(text))
    if len(args) != 1:
        raise _cmdline_error(repr(text), f"expected one parameter, found {len(args)}")
    param, value = args[0]
    if value is None:
        return _parse_device_value(param)
    if _param_name(param) not in ("device", "virtio_mmio.device"):
        raise _cmdline_error(repr(text), f"{param!r} is not the virtio_mmio device parameter")
    return _parse_device_value(value)


def parse_cmdline(text: str) -> list[Declaration]:
    """Every ``virtio_mmio.device=`` of a kernel command line, numbered as the kernel numbers them.

    Other parameters are ignored; ``--`` ends the kernel's part of the line. A device without an
    id gets the running counter; an explicit id reseeds it (the next device gets id+1). Two
    devices with the same id, or windows that overlap without one holding the other, are
    refused, because registering the second one fails in the kernel too.
    """
    found = [
        _parse_device_value(value)
        for param, value in _kernel_args(text)
        if value is not None and _param_name(param) == "virtio_mmio.device"
    ]
    numbered = assign_ids(found)
    _check_registrable(numbered)
    return numbered


def assign_ids(decls: Iterable[Declaration], first: int = 0) -> list[Declaration]:
    """Give every declaration the platform device id ``vm_cmdline_set`` would give it."""
    out, next_id = [], first
    for decl in decls:
        ident = next_id if decl.id is None else decl.id
        out.append(replace(decl, id=ident))
        next_id = (ident + 1 - INT_MIN) % U32 + INT_MIN  # a C int wraps
    return out


def format_cmdline(decls: Iterable[Declaration]) -> str:
    """What ``/sys/module/virtio_mmio/parameters/device`` reads back for these devices.

    One ``0x<size>@0x<base>:<irq>:<id>`` line each, ids numbered as the kernel numbers them.
    """
    lines = []
    for decl in assign_ids(_cmdline_ready(decls)):
        lines.append(f"0x{decl.size:x}@0x{decl.base:x}:{decl.irq}:{decl.id}\n")
    return "".join(lines)


def format_kernel_params(decls: Iterable[Declaration]) -> str:
    """``virtio_mmio.device=`` parameters for a guest's command line, ids only where given."""
    params = []
    for decl in _cmdline_ready(decls):
        ident = "" if decl.id is None else f":{decl.id}"
        value = f"{format_size(decl.size)}@0x{decl.base:x}:{decl.irq}{ident}"
        params.append(f"virtio_mmio.device={value}")
    return " ".join(params)


def _cmdline_ready(decls: Iterable[Declaration]) -> list[Declaration]:
    decls = list(decls)
    for decl in decls:
        if decl.irq == 0:
            raise DeclarationError(
                f"{decl.source or 'declaration'}: irq 0 cannot be given on the kernel command line"
            )
    return decls


def _parse_device_value(value: str) -> Declaration:
    """``vm_cmdline_set`` on one value, with a message naming the first thing that is wrong."""
    where = f"virtio_mmio.device={value}"
    if not value.isascii():
        raise _cmdline_error(where, "it contains a non-ASCII character")
    scan = _KernelScan(value)
    size, size_digits = _memparse(scan)
    if scan.peek() != "@":
        found = f"found {scan.rest!r}" if scan.rest else "found the end"
        raise _cmdline_error(where, f"expected '@' after <size>, {found}")
    if not size_digits:
        raise _cmdline_error(where, "<size> is missing (size 0 is not a window)")
    scan.pos += 1
    base, irq, ident = _scan_base_irq_id(scan, where)
    return _checked_declaration(size, base, irq, ident, where)


def _scan_base_irq_id(scan: _KernelScan, where: str) -> tuple[int, int, int | None]:
    """The ``"@%lli:%u%n:%d%n"`` part, after the '@'."""
    base = scan.signed(0)
    if base is None:
        number = "0x hex, 0 octal or decimal"
        raise _cmdline_error(where, f"<baseaddr> is not a number ({number}): {scan.rest!r}")
    if scan.peek() != ":":
        if scan.rest:
            raise _cmdline_error(where, f"unexpected {scan.rest!r} after <baseaddr>")
        raise _cmdline_error(where, "':<irq>' is missing")
    scan.pos += 1
    irq = scan.unsigned()
    if irq is None:
        raise _cmdline_error(where, f"<irq> is not an unsigned decimal number: {scan.rest!r}")
    ident, consumed = None, scan.pos
    if scan.peek() == ":":
        scan.pos += 1
        ident = scan.signed(10)
        consumed = scan.pos if ident is not None else consumed
    if consumed != len(scan.text):
        last = "<id>" if ident is not None else "<irq>"
        trailing = scan.text[consumed:]
        hint = ""
        if ident is None and trailing.startswith("-"):
            hint = " (IRQ ranges, proposed in 2023, are not in mainline Linux)"
        raise _cmdline_error(where, f"unexpected {trailing!r} after {last}{hint}")
    return base, irq, ident


def _checked_declaration(
    size: int, base: int, irq: int, ident: int | None, where: str
) -> Declaration:
    if irq == 0:
        raise _cmdline_error(where, "irq 0 is refused (no interrupt can be requested on it)")
    if size >= U64 or not -U64 < base < U64:
        raise _cmdline_error(where, "a number does not fit in 64 bits (the kernel would wrap it)")
    if irq >= U32:
        raise _cmdline_error(where, f"irq {irq} does not fit in 32 bits (the kernel would wrap it)")
    if ident is not None and not INT_MIN <= ident <= INT_MAX:
        raise _cmdline_error(
            where, f"id {ident} does not fit in a C int (the kernel would wrap it)"
        )
    base %= U64  # %lli stores two's complement; the resource start is unsigned
    if size == 0 or base + size > U64:
        problem = "size 0" if size == 0 else f"{base:#x}+{size:#x} wraps past 2**64"
        raise _cmdline_error(where, f"{problem}: not a memory range the kernel can claim")
    return Declaration(base, size, irq, ident, source=where)


def _check_registrable(decls: Sequence[Declaration]) -> None:
    """What ``platform_device_register_resndata`` refuses: a repeated name or a clashing range."""
    by_id: dict[int | None, Declaration] = {}
    for decl in decls:
        other = by_id.setdefault(decl.id, decl)
        if other is not decl and decl.id != PLATFORM_DEVID_AUTO:
            raise DeclarationError(
                f"{decl.source}: id {decl.id} is already used by {other.source}"
                f" (the kernel cannot register virtio-mmio.{decl.id} twice)"
            )
    _check_nesting(decls)


def _check_nesting(decls: Sequence[Declaration]) -> None:
    """``insert_resource`` takes windows that nest or are apart, never ones that half overlap.

    Sorted by start (outer first), the windows still open form a chain of nested ranges, so
    each new window only needs comparing with the innermost one: one pass, no pairs.
    """
    open_windows: list[Declaration] = []
    for decl in sorted(decls, key=lambda d: (d.base, -d.size)):
        while open_windows and open_windows[-1].end < decl.base:
            open_windows.pop()
        if open_windows and decl.end > open_windows[-1].end:
            outer = open_windows[-1]
            raise DeclarationError(
                f"{decl.source}: window {decl.base:#x}-{decl.end:#x} partly overlaps"
                f" {outer.source} ({outer.base:#x}-{outer.end:#x}); insert_resource refuses that"
            )
        open_windows.append(decl)


def _cmdline_error(where: str, problem: str) -> DeclarationError:
    return DeclarationError(
        f"{where}: {problem}; expected {CMDLINE_SYNTAX}, e.g. {CMDLINE_EXAMPLE}"
    )


def _param_name(param: str) -> str:
    return param.replace("-", "_")  # parameq(): dashes and underscores are equal in names


def _kernel_args(text: str) -> Iterator[tuple[str, str | None]]:
    """(param, value) pairs as ``parse_args``/``next_arg`` split a command line.

    The kernel splits bytes, not characters: the text is taken as UTF-8 and split with the
    kernel's idea of white space, then each piece is decoded back.
    """
    if "\0" in text:
        raise DeclarationError(f"{text!r}: a command line cannot contain NUL")
    raw = text.encode("utf-8", "surrogatepass").decode("latin-1")
    pos = _skip_kspace(raw, 0)
    while pos < len(raw):
        param, value, pos = _next_arg(raw, pos)
        if value is None and param == "--":
            return
        yield _unraw(param), None if value is None else _unraw(value)


def _next_arg(s: str, i: int) -> tuple[str, str | None, int]:
    """One ``next_arg`` step: double quotes group spaces and are dropped around the value."""
    quoted = s[i] == '"'
    i += quoted
    in_quote, j, equals = quoted, i, 0
    while j < len(s) and (in_quote or s[j] not in _KSPACE):
        if not equals and s[j] == "=":
            equals = j - i  # stays 0 for a leading '=', as in the kernel
        in_quote ^= s[j] == '"'
        j += 1
    buf = [*s[i:j], "\0"]
    n, value_at = j - i, None
    if equals:
        buf[equals], value_at = "\0", equals + 1
        if buf[value_at] == '"':
            value_at += 1
            if buf[n - 1] == '"':
                buf[n - 1] = "\0"
    if quoted and n > 0 and buf[n - 1] == '"':
        buf[n - 1] = "\0"
    param = _c_string(buf, 0)
    value = None if value_at is None else _c_string(buf, value_at)
    return param, value, _skip_kspace(s, min(j + 1, len(s)))


def _c_string(buf: list[str], start: int) -> str:
    return "".join(buf[start:]).split("\0", 1)[0]


def _skip_kspace(s: str, i: int) -> int:
    while i < len(s) and s[i] in _KSPACE:
        i += 1
    return i


def _unraw(raw: str) -> str:
    return raw.encode("latin-1").decode("utf-8", "surrogateescape")
