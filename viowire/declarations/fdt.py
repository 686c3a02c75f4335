"""Flattened device trees: :func:`parse_dtb` reads them, :func:`build_dtb` writes them.

FDT versions 16 and 17, every offset and length bounds-checked: a hostile blob raises
:class:`~viowire.declarations.model.DeclarationError`, never IndexError or struct.error, and
parsing is one linear pass (every token moves forward) with a nesting limit, so it cannot hang.
Which nodes are devices is shared with the DTS reader: see :mod:`viowire.declarations.model`.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable

from viowire.declarations.model import (
    MAX_DEPTH,
    Declaration,
    DeclarationError,
    _declarations,
    _Node,
    _OutNode,
    _platform_tree,
    _PropValue,
)

FDT_MAGIC = 0xD00DFEED
FDT_VERSION = 17
FDT_LAST_COMPATIBLE = 16
_FDT_BEGIN_NODE, _FDT_END_NODE, _FDT_PROP, _FDT_NOP, _FDT_END = 1, 2, 3, 4, 9
_HEADER_V16 = struct.Struct(">9I")  # magic .. size_dt_strings: 36 bytes; v17 adds size_dt_struct


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
