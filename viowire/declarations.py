"""Declared devices: where a virtio-mmio window is, before anyone has looked inside it.

Linux learns about virtio-mmio devices in three equivalent ways (virtio.md §7.1): a static platform
device table, a device-tree node with ``compatible = "virtio,mmio"``, or the
``virtio_mmio.device=`` kernel parameter. Each says only where a register window is and which
interrupt it raises; what sits there is found by probing it (magic, version, device id). This
module reads and writes all three as :class:`Declaration` values, so the client can be told about
devices in exactly the forms a guest kernel accepts.

Kernel command line (:func:`parse_cmdline_device`, :func:`parse_cmdline`, :func:`format_cmdline`)
    ``vm_cmdline_set`` of the current ``virtio_mmio.c``: ``memparse`` for the size, then
    ``sscanf(str, "@%lli:%u%n:%d%n")`` and nothing may follow the last field; IRQ 0 is refused
    (since v5.8); the window ``[base, base+size-1]`` must be a real range or ``insert_resource``
    refuses it (so size 0 fails). The kernel's scanning rules are kept, quirks included: a space
    may follow ``@`` or ``:``, the base may be negative (two's complement, as ``%lli`` stores it),
    ``0x1E`` is 30 bytes (E is a hex digit) but ``1E`` is an exbibyte, ``09`` is not a number.
    One deliberate difference: where the kernel silently wraps a number that does not fit (size or
    base beyond 64 bits, irq beyond 32, id beyond ``int``), we refuse it, because a wrapped value
    is never what was meant. Parameter names compare with ``-`` and ``_`` equal and values may be
    quoted, as ``parse_args`` does. IRQ ranges (``:<irq>-<last>``, proposed in 2023) are not in
    mainline and are refused.

Device tree source (:func:`parse_dts`, :func:`build_dts`)
    A robust subset of dtc's language, not a full dtc: ``/dts-v1/;``, ``/memreserve/``, C and C++
    comments, labels (on nodes, properties and inside values), several root blocks and
    ``&label { };`` / ``&{/path} { };`` amendments merged as dtc merges them,
    ``/delete-node/``, ``/delete-property/``, ``/omit-if-no-ref/``; values as strings, ``<cells>``
    (hex, octal, decimal, char literals, parenthesised C expressions), ``/bits/ N <...>``, byte
    strings ``[00 11]`` and references. References are parsed but not resolved (phandles read as
    0xffffffff), since finding devices never needs them. The C preprocessor (``#include``,
    ``#define``) and ``/include/`` are refused with a hint: run cpp, or compile with dtc and use
    :func:`parse_dtb`.

Flattened device tree (:func:`parse_dtb`, :func:`build_dtb`)
    FDT versions 16 and 17, every offset and length bounds-checked: a hostile blob raises
    :class:`DeclarationError`, never IndexError or struct.error, and parsing is one linear pass
    (every token moves forward) with a nesting limit, so it cannot hang.

Which nodes are devices (shared by DTS and DTB), as Linux's ``of_platform_populate`` sees them
    ``compatible`` lists ``virtio,mmio`` (compared case-insensitively, like ``of_compat_cmp``);
    nodes whose ``status`` is neither absent nor ``okay``/``ok`` are skipped with their subtree;
    ``reg`` is read with ``#address-cells``/``#size-cells`` found from the parent upwards (as
    Linux's ``of_n_addr_cells`` walks ancestors), defaulting at the root to the devicetree
    specification's 2 and 1, and translated to a CPU address through every ancestor bus's
    ``ranges`` (empty ``ranges`` is identity; none means the address cannot be translated, an
    error); the IRQ is the first cell of ``interrupts`` (for a 3-cell GIC specifier that cell is
    the SPI/PPI type, not the line: such trees need their own reading). Only the first ``reg``
    range is used, as the driver maps only resource 0.
"""

from __future__ import annotations

import operator
import re
import struct
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

from viowire.units import format_size

if TYPE_CHECKING:
    from viowire.client.connection import DeviceInfo

__all__ = [
    "CMDLINE_SYNTAX",
    "Declaration",
    "DeclarationError",
    "assign_ids",
    "build_dtb",
    "build_dts",
    "declarations_from_platform",
    "format_cmdline",
    "format_kernel_params",
    "parse_cmdline",
    "parse_cmdline_device",
    "parse_dtb",
    "parse_dts",
]

U32 = 1 << 32
U64 = 1 << 64
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
PLATFORM_DEVID_AUTO = -2  # the kernel numbers these itself, so they may repeat
CMDLINE_SYNTAX = "[virtio_mmio.]device=<size>@<baseaddr>:<irq>[:<id>]"
CMDLINE_EXAMPLE = "virtio_mmio.device=1K@0x1001e000:74"
MAX_DEPTH = 64  # node nesting and expression nesting, so hostile input cannot exhaust the stack


class DeclarationError(ValueError):
    """A device declaration that a guest kernel would refuse; the message says what and where."""


@dataclass(frozen=True)
class Declaration:
    """A device the driver is told about: a register window and an IRQ, contents unknown.

    ``id`` is the platform device id of a command-line device (None when the declaration has
    none). ``source`` says where the declaration came from, for messages; it is not part of the
    identity, so declarations read from different forms compare equal when they say the same.
    """

    base: int
    size: int
    irq: int
    id: int | None = None
    source: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        problem = _range_problem(self)
        if problem:
            raise DeclarationError(f"{self.source or 'declaration'}: {problem}")

    @property
    def end(self) -> int:
        """The last byte of the window, as the kernel's resource ``end``."""
        return self.base + self.size - 1


def _range_problem(d: Declaration) -> str:
    if not 0 <= d.base < U64:
        return f"base {d.base:#x} is not a 64-bit physical address"
    if d.size <= 0:
        return f"size {d.size:#x} is not a window (the resource would end before it starts)"
    if d.size >= U64:
        return f"size {d.size:#x} does not fit in 64 bits (the kernel's resource size would be 0)"
    if d.base + d.size > U64:
        return f"window {d.base:#x}+{d.size:#x} runs past the end of the 64-bit address space"
    if not 0 <= d.irq < U32:
        return f"irq {d.irq} is not a 32-bit interrupt number"
    if d.id is not None and not INT_MIN <= d.id <= INT_MAX:
        return f"id {d.id} does not fit in a C int"
    return ""


# --------------------------------------------------------------------------------------------
# Kernel command line
# --------------------------------------------------------------------------------------------

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
        while self.peek() and self.peek() in _KSPACE:
            self.pos += 1

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


def _digit(c: str) -> int | None:
    """The value of an ASCII hex digit, as ``_parse_integer`` reads it."""
    if len(c) != 1 or c.lower() not in "0123456789abcdef":
        return None
    return int(c, 16)


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


# --------------------------------------------------------------------------------------------
# The tree both device-tree forms read into, and the devices found in it
# --------------------------------------------------------------------------------------------


@dataclass
class _Node:
    """A device-tree node: raw property values, children in order, an index by name."""

    name: str
    props: dict[str, bytes] = field(default_factory=dict)
    children: list[_Node] = field(default_factory=list)
    _by_name: dict[str, _Node] = field(default_factory=dict, repr=False, compare=False)

    def child(self, name: str) -> _Node | None:
        return self._by_name.get(name)

    def add_child(self, child: _Node) -> None:
        self.children.append(child)
        self._by_name.setdefault(child.name, child)

    def remove_child(self, child: _Node) -> None:
        self.children.remove(child)
        if self._by_name.get(child.name) is child:
            del self._by_name[child.name]


def _declarations(root: _Node, kind: str) -> list[Declaration]:
    out: list[Declaration] = []
    _walk([root], kind, out)
    return out


def _walk(chain: list[_Node], kind: str, out: list[Declaration]) -> None:
    """Visit the children of ``chain[-1]``; ``chain`` runs from the root down."""
    for child in chain[-1].children:
        if not _available(child):
            continue  # of_platform_populate skips disabled nodes and everything under them
        if _is_virtio_mmio(child):
            out.append(_declare(child, chain, f"{kind} node {_path([*chain, child])}"))
        elif len(chain) < MAX_DEPTH:
            _walk([*chain, child], kind, out)


def _path(chain: Sequence[_Node]) -> str:
    return "/" + "/".join(node.name for node in chain[1:])


def _available(node: _Node) -> bool:
    status = node.props.get("status")
    return status is None or (len(status) > 0 and status.split(b"\0")[0] in (b"okay", b"ok"))


def _is_virtio_mmio(node: _Node) -> bool:
    compatible = node.props.get("compatible", b"")
    return any(s.lower() == b"virtio,mmio" for s in compatible.split(b"\0"))


def _declare(node: _Node, chain: list[_Node], where: str) -> Declaration:
    reg = _required(node, "reg", where)
    na, ns = _addr_cells(chain, where), _size_cells(chain, where)
    if na == 0 or ns == 0:
        raise DeclarationError(
            f"{where}: #address-cells/#size-cells of {na}/{ns} leave no room for a window"
        )
    if not reg or len(reg) % (4 * (na + ns)):
        raise DeclarationError(
            f"{where}: 'reg' is {len(reg)} bytes, not a whole number of"
            f" <address size> entries of {na}+{ns} cells"
        )
    cells = _u32s(reg)
    base = _translate(_number(cells[:na]), chain, where)
    size = _number(cells[na : na + ns])
    return Declaration(base, size, _first_interrupt(node, where), source=where)


def _first_interrupt(node: _Node, where: str) -> int:
    interrupts = node.props.get("interrupts")
    if interrupts is None:
        extended = "interrupts-extended" in node.props
        hint = " (interrupts-extended is not supported)" if extended else ""
        raise DeclarationError(f"{where}: missing property 'interrupts'{hint}")
    if not interrupts or len(interrupts) % 4:
        raise DeclarationError(f"{where}: 'interrupts' is {len(interrupts)} bytes, not whole cells")
    return _u32s(interrupts[:4])[0]


def _required(node: _Node, name: str, where: str) -> bytes:
    value = node.props.get(name)
    if value is None:
        raise DeclarationError(f"{where}: missing property {name!r}")
    return value


def _inherited_cells(chain: Sequence[_Node], name: str, default: int, where: str) -> int:
    """``#address-cells``/``#size-cells`` from the innermost node of ``chain`` that has it."""
    for depth in range(len(chain) - 1, -1, -1):
        value = chain[depth].props.get(name)
        if value is None:
            continue
        if len(value) != 4 or _u32s(value)[0] > 4:
            shown = _u32s(value)[0] if len(value) == 4 else f"{len(value)} bytes"
            owner = _path(chain[: depth + 1])
            raise DeclarationError(f"{where}: {name} of {owner} is {shown}, not 0..4 cells")
        return _u32s(value)[0]
    return default


def _addr_cells(chain: Sequence[_Node], where: str) -> int:
    return _inherited_cells(chain, "#address-cells", 2, where)


def _size_cells(chain: Sequence[_Node], where: str) -> int:
    return _inherited_cells(chain, "#size-cells", 1, where)


def _translate(addr: int, chain: list[_Node], where: str) -> int:
    """A bus address made a CPU address through the ``ranges`` of every bus above it."""
    for depth in range(len(chain) - 1, 0, -1):  # the root's own ranges are never used
        bus = chain[: depth + 1]
        ranges = bus[-1].props.get("ranges")
        if ranges is None:
            raise DeclarationError(
                f"{where}: {_path(bus)} has no 'ranges', so addresses below it do not reach the CPU"
            )
        if ranges:
            addr = _map_range(addr, ranges, bus, where)
    return addr


def _map_range(addr: int, ranges: bytes, bus: list[_Node], where: str) -> int:
    na, pna, ns = _addr_cells(bus, where), _addr_cells(bus[:-1], where), _size_cells(bus, where)
    entry = na + pna + ns
    if entry == 0 or len(ranges) % (4 * entry):
        raise DeclarationError(
            f"{where}: 'ranges' of {_path(bus)} is not whole {na}+{pna}+{ns}-cell entries"
        )
    cells = _u32s(ranges)
    for i in range(0, len(cells), entry):
        child = _number(cells[i : i + na])
        parent = _number(cells[i + na : i + na + pna])
        size = _number(cells[i + na + pna : i + entry])
        if child <= addr < child + size:
            return addr - child + parent
    raise DeclarationError(
        f"{where}: address {addr:#x} is outside every 'ranges' entry of {_path(bus)}"
    )


def _u32s(data: bytes) -> tuple[int, ...]:
    return struct.unpack(f">{len(data) // 4}I", data[: len(data) // 4 * 4])


def _number(cells: Sequence[int]) -> int:
    value = 0
    for cell in cells:
        value = value << 32 | cell
    return value


# --------------------------------------------------------------------------------------------
# Device tree source
# --------------------------------------------------------------------------------------------

_NAME = re.compile(r"[A-Za-z0-9,._+*#?@-]+")
_LABEL = re.compile(r"([A-Za-z_][A-Za-z0-9_]*):")
_REF = re.compile(r"&(?:([A-Za-z_][A-Za-z0-9_]*)|\{([A-Za-z0-9,._+*#?@/-]*)\})")
_LITERAL = re.compile(r"[0-9][0-9A-Za-z_]*")
_C_LITERAL = re.compile(r"(0[xX][0-9a-fA-F]+|[0-9]+)(U|L|UL|LL|ULL)?")
_CPP = re.compile(r"#\s*(include|define|undef|ifn?def|if|elif|else|endif|error|warning|pragma)\b")
_LINEMARKER = re.compile(r"#\s*(line\b|[0-9])[^\n]*")
_HEX_ESCAPE = re.compile(r"[0-9A-Fa-f]{1,2}")
_OCTAL_ESCAPE = re.compile(r"[0-7]{0,2}")
_ESCAPES = {"a": 7, "b": 8, "t": 9, "n": 10, "v": 11, "f": 12, "r": 13}
_MASK64 = U64 - 1
# dtc's integer expressions: C precedence (higher binds tighter), uint64_t arithmetic.
_BINARY: dict[str, tuple[int, Callable[[int, int], int]]] = {
    "||": (2, lambda a, b: int(bool(a or b))),
    "&&": (3, lambda a, b: int(bool(a and b))),
    "|": (4, operator.or_),
    "^": (5, operator.xor),
    "&": (6, operator.and_),
    "==": (7, operator.eq),
    "!=": (7, operator.ne),
    "<=": (8, operator.le),
    ">=": (8, operator.ge),
    "<": (8, operator.lt),
    ">": (8, operator.gt),
    "<<": (9, lambda a, b: a << b if b < 64 else 0),
    ">>": (9, lambda a, b: a >> b if b < 64 else 0),
    "+": (10, operator.add),
    "-": (10, operator.sub),
    "*": (11, operator.mul),
    "/": (11, operator.floordiv),
    "%": (11, operator.mod),
}
_OPERATORS = sorted(_BINARY, key=len, reverse=True)  # longest first: "<<" before "<"
_PHANDLE_PLACEHOLDER = 0xFFFFFFFF


def parse_dts(text: str) -> list[Declaration]:
    """The available ``virtio,mmio`` nodes of a device tree source, in document order.

    The supported language and the rules for finding devices are in the module docstring;
    errors give the line and column, or name the node and the missing property.
    """
    return _declarations(_DtsParser(text).parse(), "dts")


class _DtsParser:
    """A recursive-descent reader of the dtc subset; scanning is driven by the grammar because
    dtc's tokens depend on context (``0x10`` is a number in a cell list, a name elsewhere)."""

    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0
        self.depth = 0
        self.root = _Node("")
        self.labels: dict[str, _Node] = {}
        self.has_root = False

    # -- structure -----------------------------------------------------------------------------
    def parse(self) -> _Node:
        while self._skip():
            self._top_level()
        if not self.has_root:
            raise DeclarationError("DTS: no root node ('/ { ... };')")
        return self.root

    def _top_level(self) -> None:
        if self._accept("/dts-v1/"):
            self._expect(";")
        elif self._accept("/plugin/"):
            raise self._error("overlays (/plugin/) are not supported: apply the overlay first")
        elif self._accept("/include/"):
            raise self._error("/include/ is not supported: compile with dtc and read the DTB")
        elif self._accept("/delete-node/"):
            self._delete_referenced()
        else:
            labels = self._labels()
            if self._accept("/memreserve/"):
                self._primary()  # address
                self._primary()  # size
                self._expect(";")
            else:
                self._node_block(self._block_target(), labels)

    def _block_target(self) -> _Node:
        if self._accept("/"):
            self.has_root = True
            return self.root
        if self._peek() == "&":
            return self._referenced_node()
        raise self._error("expected '/ {', '&label {' or a directive")

    def _delete_referenced(self) -> None:
        node = self._referenced_node()
        self._expect(";")
        self._remove(self.root, node)

    def _remove(self, parent: _Node, node: _Node) -> None:
        if parent.child(node.name) is node:
            parent.remove_child(node)
        for child in parent.children:
            self._remove(child, node)

    def _referenced_node(self) -> _Node:
        start = self.pos
        label, path = self._reference()
        node = self.labels.get(label) if label else self._node_at(path)
        if node is None:
            self.pos = start
            raise self._error(f"reference to {'&' + label if label else path!r}: no such node")
        return node

    def _node_at(self, path: str) -> _Node | None:
        node: _Node | None = self.root
        for name in filter(None, path.split("/")):
            node = node.child(name) if node else None
        return node

    def _node_block(self, node: _Node, labels: list[str]) -> None:
        self._label(node, labels)
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self._error(f"nodes nested deeper than {MAX_DEPTH}")
        self._expect("{")
        while not self._accept("}"):
            self._node_item(node)
        self._expect(";")
        self.depth -= 1

    def _node_item(self, node: _Node) -> None:
        if self._accept("/delete-property/"):
            node.props.pop(self._name("property name"), None)
            self._expect(";")
            return
        if self._accept("/delete-node/"):
            doomed = node.child(self._name("node name"))
            if doomed:
                node.remove_child(doomed)
            self._expect(";")
            return
        self._accept("/omit-if-no-ref/")  # only a hint to dtc; the node is kept
        labels = self._labels()
        name = self._name("property or node name")
        if self._skip() and self._peek() == "{":
            child = node.child(name)
            if child is None:
                child = _Node(name)
                node.add_child(child)
            self._node_block(child, labels)
        elif self._accept("="):
            node.props[name] = self._values()
            self._expect(";")
        elif self._accept(";"):
            node.props[name] = b""
        else:
            raise self._error(f"expected '=', ';' or '{{' after {name!r}")

    def _label(self, node: _Node, labels: list[str]) -> None:
        for label in labels:
            if self.labels.setdefault(label, node) is not node:
                raise self._error(f"label {label!r} is already used for another node")

    # -- values --------------------------------------------------------------------------------
    def _values(self) -> bytes:
        parts = [self._value()]
        self._labels()  # labels may follow a value, too
        while self._accept(","):
            parts.append(self._value())
            self._labels()
        return b"".join(parts)

    def _value(self) -> bytes:
        self._labels()
        self._skip()
        if self._peek() == '"':
            return self._string() + b"\0"
        if self._accept("<"):
            return self._cells(32)
        if self._accept("/bits/"):
            bits = self._literal()
            if bits not in (8, 16, 32, 64):
                raise self._error(f"/bits/ {bits}: only 8, 16, 32 or 64")
            self._expect("<")
            return self._cells(bits)
        if self._accept("["):
            return self._bytestring()
        if self._peek() == "&":
            label, path = self._reference()
            return (label or path).encode() + b"\0"  # a path reference; never needed here
        raise self._error('expected a value: "string", <cells>, [bytes] or &reference')

    def _cells(self, bits: int) -> bytes:
        out = bytearray()
        while True:
            self._labels()
            self._skip()
            if self._accept(">"):
                return bytes(out)
            if self._peek() == "&":
                self._reference()
                value = _PHANDLE_PLACEHOLDER
            else:
                value = self._primary()
            out += self._pack(value, bits)

    def _pack(self, value: int, bits: int) -> bytes:
        mask = (1 << bits) - 1
        if value > mask and (value | mask) != _MASK64:  # dtc allows sign-extended negatives
            raise self._error(f"value {value:#x} does not fit a {bits}-bit element")
        return (value & mask).to_bytes(bits // 8, "big")

    def _bytestring(self) -> bytes:
        out = bytearray()
        while True:
            self._labels()
            self._skip()
            if self._accept("]"):
                return bytes(out)
            pair = self.text[self.pos : self.pos + 2]
            if len(pair) < 2 or any(_digit(c) is None for c in pair):
                raise self._error("a byte string holds pairs of hex digits: [00 1f ...]")
            out.append(int(pair, 16))
            self.pos += 2

    def _string(self) -> bytes:
        self.pos += 1  # the opening quote
        out = bytearray()
        while True:
            c = self._peek()
            if not c:
                raise self._error("unterminated string")
            self.pos += 1
            if c == '"':
                return bytes(out)
            out += self._escape() if c == "\\" else c.encode("utf-8", "surrogatepass")

    def _escape(self) -> bytes:
        """The character after a backslash, as dtc's ``get_escape_char`` reads it."""
        c = self._peek()
        if not c:
            raise self._error("unterminated string")
        self.pos += 1
        if c in _ESCAPES:
            return bytes([_ESCAPES[c]])
        if c == "x" or c in "01234567":
            pattern = _HEX_ESCAPE if c == "x" else _OCTAL_ESCAPE
            digits = pattern.match(self.text, self.pos)
            if digits is None:
                raise self._error("\\x needs a hex digit")
            self.pos = digits.end()
            number = digits.group() if c == "x" else c + digits.group()
            return bytes([int(number, 16 if c == "x" else 8) & 0xFF])
        return c.encode("utf-8", "surrogatepass")

    # -- integers ------------------------------------------------------------------------------
    def _primary(self) -> int:
        self._skip()
        c = self._peek()
        if c == "(":
            self.pos += 1
            value = self._nested(self._expr)
            self._expect(")")
            return value
        if c == "'":
            return self._char()
        return self._literal()

    def _nested(self, parse) -> int:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self._error(f"expression nested deeper than {MAX_DEPTH}")
        value = parse()
        self.depth -= 1
        return value

    def _expr(self, min_prec: int = 1) -> int:
        left = self._unary()
        while True:
            self._skip()
            if min_prec <= 1 and self._accept("?"):  # right-associative, lowest precedence
                yes = self._nested(self._expr)
                self._expect(":")
                no = self._nested(self._expr)
                left = yes if left else no
                continue
            op = next((o for o in _OPERATORS if self.text.startswith(o, self.pos)), None)
            if op is None or _BINARY[op][0] < min_prec:
                return left
            self.pos += len(op)
            right = self._nested(lambda op=op: self._expr(_BINARY[op][0] + 1))
            left = self._apply(op, left, right)

    def _unary(self) -> int:
        self._skip()
        c = self._peek()
        if c and c in "-~!":
            self.pos += 1
            value = self._nested(self._unary)
            if c == "!":
                return int(not value)
            return (-value if c == "-" else ~value) & _MASK64
        return self._primary()

    def _apply(self, op: str, a: int, b: int) -> int:
        if op in ("/", "%") and b == 0:
            raise self._error("division by zero")
        return int(_BINARY[op][1](a, b)) & _MASK64

    def _literal(self) -> int:
        self._skip()
        match = _LITERAL.match(self.text, self.pos)
        if not match:
            raise self._error("expected a number")
        text = match.group()
        literal = _C_LITERAL.fullmatch(text)
        try:
            value = _c_integer(literal.group(1) if literal else "")
        except ValueError:
            raise self._error(f"bad integer literal {text!r}") from None
        self.pos = match.end()
        if value >= U64:
            raise self._error(f"integer literal {text!r} is out of 64-bit range")
        return value

    def _char(self) -> int:
        self.pos += 1
        c = self._peek()
        if not c or c == "'":
            raise self._error("empty character literal")
        self.pos += 1
        value = self._escape() if c == "\\" else c.encode("utf-8", "surrogatepass")
        if len(value) != 1:
            raise self._error("a character literal holds one byte")
        self._expect("'")
        return value[0]

    # -- lexical -------------------------------------------------------------------------------
    def _skip(self) -> bool:
        """Skip space, comments and cpp line markers; True if anything is left."""
        while True:
            while self.pos < len(self.text) and self.text[self.pos].isspace():
                self.pos += 1
            if self.text.startswith("/*", self.pos):
                end = self.text.find("*/", self.pos + 2)
                if end < 0:
                    raise self._error("unterminated /* comment")
                self.pos = end + 2
            elif self.text.startswith("//", self.pos):
                end = self.text.find("\n", self.pos)
                self.pos = len(self.text) if end < 0 else end
            elif self._peek() == "#" and self._preprocessor():
                continue
            else:
                return self.pos < len(self.text)

    def _preprocessor(self) -> bool:
        if _CPP.match(self.text, self.pos):
            raise self._error(
                "C preprocessor directives are not supported: run the file through"
                " 'cpp -P -undef -x assembler-with-cpp' or compile it with dtc and use the DTB"
            )
        marker = _LINEMARKER.match(self.text, self.pos)
        if marker:
            self.pos = marker.end()
        return marker is not None

    def _peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def _accept(self, token: str) -> bool:
        self._skip()
        if self.text.startswith(token, self.pos):
            self.pos += len(token)
            return True
        return False

    def _expect(self, token: str) -> None:
        if not self._accept(token):
            raise self._error(f"expected {token!r}")

    def _name(self, what: str) -> str:
        self._skip()
        match = _NAME.match(self.text, self.pos)
        if not match:
            raise self._error(f"expected a {what}")
        self.pos = match.end()
        return match.group()

    def _labels(self) -> list[str]:
        labels = []
        while self._skip() and (match := _LABEL.match(self.text, self.pos)):
            labels.append(match.group(1))
            self.pos = match.end()
        return labels

    def _reference(self) -> tuple[str, str]:
        self._skip()
        match = _REF.match(self.text, self.pos)
        if not match:
            raise self._error("expected a reference: &label or &{/path}")
        self.pos = match.end()
        return match.group(1) or "", match.group(2) or ""

    def _error(self, problem: str) -> DeclarationError:
        line = self.text.count("\n", 0, self.pos) + 1
        column = self.pos - (self.text.rfind("\n", 0, self.pos) + 1) + 1
        found = self.text[self.pos : self.pos + 20].split("\n")[0]
        near = f" (at {found!r})" if found else " (at the end)"
        return DeclarationError(f"DTS line {line}:{column}: {problem}{near}")


def _c_integer(text: str) -> int:
    """A C integer literal: 0x hex, leading-0 octal, else decimal."""
    if text[:2].lower() == "0x":
        return int(text[2:], 16)
    if text.startswith("0") and len(text) > 1:
        return int(text[1:], 8)
    return int(text, 10)


def build_dts(decls: Iterable[Declaration], model: str = "viowire") -> str:
    """A complete DTS document of the tree :func:`build_dtb` writes; parse_dts and dtc read it."""
    return "/dts-v1/;\n\n" + "\n".join(_dts_lines(_platform_tree(decls, model), 0)) + "\n"


def _dts_lines(node: _OutNode, depth: int) -> list[str]:
    tab = "\t" * depth
    lines = [f"{tab}{node.name or '/'} {{"]
    for name, value in node.props:
        lines.append(f"{tab}\t{name}{_dts_value(value)};")
    for child in node.children:
        lines += ["", *_dts_lines(child, depth + 1)]
    return [*lines, f"{tab}}};"]


def _dts_value(value: _PropValue) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return f" = {_dts_string(value)}"
    return f" = <{' '.join(f'{cell:#x}' for cell in value)}>"


def _dts_string(text: str) -> str:
    out = []
    for byte in text.encode("utf-8", "surrogatepass"):
        c = chr(byte)
        out.append(f"\\{c}" if c in '"\\' else c if 32 <= byte < 127 else f"\\x{byte:02x}")
    return '"' + "".join(out) + '"'


# --------------------------------------------------------------------------------------------
# Flattened device tree
# --------------------------------------------------------------------------------------------

FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17
FDT_LAST_COMPATIBLE = 16
_FDT_BEGIN_NODE, _FDT_END_NODE, _FDT_PROP, _FDT_NOP, _FDT_END = 1, 2, 3, 4, 9
_HEADER_V16 = struct.Struct(">9I")  # magic .. size_dt_strings: 36 bytes; v17 adds size_dt_struct
_ROOT_COMPATIBLE = "viowire,platform"
_INTC_COMPATIBLE = "viowire,irq-lines"


def parse_dtb(blob: bytes) -> list[Declaration]:
    """The available ``virtio,mmio`` nodes of a flattened device tree (FDT v16/v17).

    Any malformed blob, however hostile, raises :class:`DeclarationError`.
    """
    blob = bytes(blob)
    struct_block, strings = _fdt_blocks(blob)
    return _declarations(_fdt_tree(struct_block, strings), "dtb")


def _fdt_blocks(blob: bytes) -> tuple[bytes, bytes]:
    """The header checked as libfdt's ``fdt_check_header`` does; returns (struct, strings)."""
    if len(blob) < _HEADER_V16.size:
        raise DeclarationError(f"DTB: {len(blob)} bytes is too short for an FDT header")
    magic, total, off_struct, off_strings, off_rsv, version, last_comp, _, size_strings = (
        _HEADER_V16.unpack_from(blob)
    )
    if magic != FDT_MAGIC:
        raise DeclarationError(f"DTB: magic {magic:#010x} is not {FDT_MAGIC:#010x}")
    if version < 16 or last_comp > FDT_VERSION:
        raise DeclarationError(
            f"DTB: version {version} (compatible with {last_comp}) is not 16 or 17"
        )
    header = 40 if version >= 17 else 36
    if not header <= total <= len(blob):
        raise DeclarationError(f"DTB: totalsize {total} is outside the {len(blob)}-byte blob")
    size_struct = struct.unpack_from(">I", blob, 36)[0] if version >= 17 else None
    _check_block("struct block", off_struct, size_struct, header, total, align=4)
    _check_block("strings block", off_strings, size_strings, header, total, align=1)
    _check_reservations(blob, off_rsv, header, total)
    end_struct = total if size_struct is None else off_struct + size_struct
    return blob[off_struct:end_struct], blob[off_strings : off_strings + size_strings]


def _check_block(
    what: str, offset: int, size: int | None, header: int, total: int, align: int
) -> None:
    if offset < header or offset > total or offset % align:
        raise DeclarationError(
            f"DTB: {what} offset {offset} is outside [{header}, {total}] or misaligned"
        )
    if size is not None and offset + size > total:
        raise DeclarationError(
            f"DTB: {what} ({size} bytes at {offset}) runs past totalsize {total}"
        )


def _check_reservations(blob: bytes, offset: int, header: int, total: int) -> None:
    """The memory reservation map must be 8-aligned and end with a (0, 0) entry in the blob."""
    if offset < header or offset % 8:
        raise DeclarationError(f"DTB: memory reservation map offset {offset} is invalid")
    for entry in range(offset, total - 15, 16):
        if blob[entry : entry + 16] == bytes(16):
            return
    raise DeclarationError("DTB: memory reservation map has no terminating entry")


def _fdt_tree(block: bytes, strings: bytes) -> _Node:
    """One forward pass over the struct block's tokens; every token advances, so no loops."""
    stack: list[_Node] = []
    root: _Node | None = None
    pos = 0
    while True:
        token, pos = _fdt_u32(block, pos, "token"), pos + 4
        if token == _FDT_BEGIN_NODE:
            node, pos = _fdt_begin_node(block, pos, stack, first=root is None)
            root = node if root is None else root
        elif token == _FDT_END_NODE:
            if not stack:
                raise DeclarationError(f"DTB: FDT_END_NODE at {pos - 4} closes no node")
            stack.pop()
        elif token == _FDT_PROP:
            pos = _fdt_prop(block, pos, strings, stack)
        elif token == _FDT_END:
            if stack or root is None:
                open_nodes = f"{len(stack)} node(s) still open" if stack else "no root node"
                raise DeclarationError(f"DTB: FDT_END at {pos - 4} with {open_nodes}")
            return root
        elif token != _FDT_NOP:
            raise DeclarationError(f"DTB: unknown token {token:#x} at struct offset {pos - 4}")


def _fdt_begin_node(block: bytes, pos: int, stack: list[_Node], first: bool) -> tuple[_Node, int]:
    name, pos = _fdt_cstring(block, pos, "node name")
    node = _Node(name)
    if stack:
        stack[-1].add_child(node)
    elif not first:
        raise DeclarationError(f"DTB: a second root node {name!r}")
    stack.append(node)
    if len(stack) > MAX_DEPTH:
        raise DeclarationError(f"DTB: nodes nested deeper than {MAX_DEPTH}")
    return node, _align4(pos)


def _fdt_prop(block: bytes, pos: int, strings: bytes, stack: list[_Node]) -> int:
    if not stack:
        raise DeclarationError(f"DTB: property at struct offset {pos - 4} outside any node")
    length = _fdt_u32(block, pos, "property length")
    name_offset = _fdt_u32(block, pos + 4, "property name offset")
    start = pos + 8
    if start + length > len(block):
        raise DeclarationError(
            f"DTB: property of {length} bytes at {start} runs past the struct block"
        )
    name, _ = _fdt_cstring(strings, name_offset, "property name")
    stack[-1].props[name] = block[start : start + length]
    return _align4(start + length)


def _fdt_u32(block: bytes, pos: int, what: str) -> int:
    if pos + 4 > len(block):
        raise DeclarationError(
            f"DTB: struct block ends at {len(block)} while reading a {what} (no FDT_END)"
        )
    return struct.unpack_from(">I", block, pos)[0]


def _fdt_cstring(data: bytes, pos: int, what: str) -> tuple[str, int]:
    end = data.find(b"\0", pos) if pos < len(data) else -1
    if end < 0:
        raise DeclarationError(
            f"DTB: {what} at {pos} is not a NUL-terminated string inside its block"
        )
    return data[pos:end].decode("latin-1"), end + 1


def _align4(pos: int) -> int:
    return (pos + 3) & ~3


def build_dtb(decls: Iterable[Declaration], model: str = "viowire") -> bytes:
    """A flattened device tree (FDT v17, no memory reservations) of the viowire platform.

    The root has ``#address-cells = <2>`` and ``#size-cells = <2>`` and one
    ``virtio_mmio@<base>`` node per device with ``compatible``, ``reg`` and ``interrupts``.
    Linux cannot map an ``interrupts`` entry without an interrupt parent (and dtc warns), so the
    root also names an ``interrupt-controller`` node standing for viowire's IRQ lines, one cell
    per interrupt.
    """
    writer = _FdtWriter()
    writer.node(_platform_tree(decls, model))
    return writer.finish()


@dataclass
class _OutNode:
    """A node to write: property values are a string, a tuple of cells, or None (empty)."""

    name: str
    props: list[tuple[str, _PropValue]]
    children: list[_OutNode] = field(default_factory=list)


_PropValue = str | tuple[int, ...] | None
_INTC_PHANDLE = 1


def _platform_tree(decls: Iterable[Declaration], model: str) -> _OutNode:
    """The one description both builders write, so the DTS and the DTB cannot drift apart."""
    decls = _tree_ready(decls)
    _check_model(model)
    intc = _OutNode(
        "interrupt-controller",
        [
            ("compatible", _INTC_COMPATIBLE),
            ("interrupt-controller", None),
            ("#interrupt-cells", (1,)),
            ("#address-cells", (0,)),
            ("phandle", (_INTC_PHANDLE,)),
        ],
    )
    devices = [
        _OutNode(
            _node_name(d),
            [("compatible", "virtio,mmio"), ("reg", _reg_cells(d)), ("interrupts", (d.irq,))],
        )
        for d in decls
    ]
    root_props: list[tuple[str, _PropValue]] = [
        ("model", model),
        ("compatible", _ROOT_COMPATIBLE),
        ("#address-cells", (2,)),
        ("#size-cells", (2,)),
        ("interrupt-parent", (_INTC_PHANDLE,)),
    ]
    return _OutNode("", root_props, [intc, *devices])


class _FdtWriter:
    """Struct and strings blocks built as nodes are added; ``finish`` lays out the blob."""

    def __init__(self) -> None:
        self.struct = bytearray()
        self.strings = bytearray()
        self.string_offsets: dict[str, int] = {}

    def node(self, node: _OutNode) -> None:
        self.struct += struct.pack(">I", _FDT_BEGIN_NODE) + _padded(node.name.encode() + b"\0")
        for name, value in node.props:
            self.prop(name, _encode_value(value))
        for child in node.children:
            self.node(child)
        self.struct += struct.pack(">I", _FDT_END_NODE)

    def prop(self, name: str, value: bytes) -> None:
        if name not in self.string_offsets:
            self.string_offsets[name] = len(self.strings)
            self.strings += name.encode() + b"\0"
        self.struct += struct.pack(">3I", _FDT_PROP, len(value), self.string_offsets[name])
        self.struct += _padded(value)

    def finish(self) -> bytes:
        body = bytes(self.struct) + struct.pack(">I", _FDT_END)
        off_rsv = 40
        off_struct = off_rsv + 16  # one all-zero entry: the reservation map is empty
        off_strings = off_struct + len(body)
        total = off_strings + len(self.strings)
        header = struct.pack(
            ">10I", FDT_MAGIC, total, off_struct, off_strings, off_rsv,
            FDT_VERSION, FDT_LAST_COMPATIBLE, 0, len(self.strings), len(body),
        )  # fmt: skip
        return header + bytes(16) + body + bytes(self.strings)


def _encode_value(value: _PropValue) -> bytes:
    if value is None:
        return b""
    if isinstance(value, str):
        return value.encode("utf-8", "surrogatepass") + b"\0"
    return struct.pack(f">{len(value)}I", *value)


def _padded(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def _tree_ready(decls: Iterable[Declaration]) -> list[Declaration]:
    """Node names come from base addresses, so two devices at one base cannot both be nodes."""
    decls = list(decls)
    seen: dict[int, Declaration] = {}
    for decl in decls:
        other = seen.setdefault(decl.base, decl)
        if other is not decl:
            raise DeclarationError(
                f"{decl.source or 'declaration'}: base {decl.base:#x} is also the base of"
                f" {other.source or 'another declaration'}; node names would clash"
            )
    return decls


def _check_model(model: str) -> None:
    if "\0" in model:
        raise DeclarationError(f"model {model!r}: a device-tree string cannot contain NUL")


def _node_name(decl: Declaration) -> str:
    return f"virtio_mmio@{decl.base:x}"


def _reg_cells(decl: Declaration) -> tuple[int, int, int, int]:
    return decl.base >> 32, decl.base & (U32 - 1), decl.size >> 32, decl.size & (U32 - 1)


# --------------------------------------------------------------------------------------------
# Static platform table
# --------------------------------------------------------------------------------------------


def declarations_from_platform(devices: Iterable[DeviceInfo]) -> list[Declaration]:
    """The server's platform table as declarations: what a board file's static table says."""
    return [
        Declaration(d.base, d.size, d.irq, source=f"platform table entry {i} ({d.name})")
        for i, d in enumerate(devices)
    ]
