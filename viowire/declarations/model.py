"""The declaration every form reads into, and what the device-tree forms share.

A :class:`Declaration` says only where a virtio-mmio register window is and which interrupt it
raises; what sits there is found by probing it (magic, version, device id). Anything a guest
kernel would refuse raises :class:`DeclarationError`, whose message says what and where.

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

What both device-tree builders write
    One description of the viowire platform (``_platform_tree``), written as DTS by
    :func:`~viowire.declarations.dts.build_dts` and as an FDT by
    :func:`~viowire.declarations.fdt.build_dtb`, so the two cannot drift apart.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

U32 = 1 << 32
U64 = 1 << 64
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
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


def _digit(c: str) -> int | None:
    """The value of an ASCII hex digit, as ``_parse_integer`` reads it."""
    if len(c) != 1 or c.lower() not in "0123456789abcdef":
        return None
    return int(c, 16)


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
# The tree both device-tree forms write
# --------------------------------------------------------------------------------------------

_ROOT_COMPATIBLE = "viowire,platform"
_INTC_COMPATIBLE = "viowire,irq-lines"
_PropValue = str | tuple[int, ...] | None
_INTC_PHANDLE = 1


@dataclass
class _OutNode:
    """A node to write: property values are a string, a tuple of cells, or None (empty)."""

    name: str
    props: list[tuple[str, _PropValue]]
    children: list[_OutNode] = field(default_factory=list)


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
