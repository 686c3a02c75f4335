"""Device tree source: :func:`parse_dts` reads it, :func:`build_dts` writes it.

A robust subset of dtc's language, not a full dtc: ``/dts-v1/;``, ``/memreserve/``, C and C++
comments, labels (on nodes, properties and inside values), several root blocks and
``&label { };`` / ``&{/path} { };`` amendments merged as dtc merges them, ``/delete-node/``,
``/delete-property/``, ``/omit-if-no-ref/``; values as strings, ``<cells>`` (hex, octal, decimal,
char literals, parenthesised C expressions), ``/bits/ N <...>``, byte strings ``[00 11]`` and
references. References are parsed but not resolved (phandles read as 0xffffffff), since finding
devices never needs them. The C preprocessor (``#include``, ``#define``) and ``/include/`` are
refused with a hint: run cpp, or compile with dtc and use
:func:`~viowire.declarations.fdt.parse_dtb`.

Which nodes are devices is shared with the DTB reader: see :mod:`viowire.declarations.model`.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable

from viowire.declarations.model import (
    MAX_DEPTH,
    U64,
    Declaration,
    DeclarationError,
    _declarations,
    _digit,
    _Node,
    _OutNode,
    _platform_tree,
    _PropValue,
)

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
