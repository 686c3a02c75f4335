"""Declared devices: the kernel command line, device tree source and flattened device trees.

The command-line cases follow ``vm_cmdline_set`` in the current virtio_mmio.c (memparse, then
``sscanf("@%lli:%u%n:%d%n")``, nothing trailing, IRQ 0 refused, the window must be claimable).
Device-tree cases are checked against dtc when it is installed.
"""

from __future__ import annotations

import contextlib
import random
import shutil
import struct
import subprocess
from pathlib import Path

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from viowire import declarations as decl_module
from viowire.client.connection import DeviceInfo
from viowire.declarations import (
    CMDLINE_SYNTAX,
    Declaration,
    DeclarationError,
    assign_ids,
    build_dtb,
    build_dts,
    declarations_from_platform,
    format_cmdline,
    format_kernel_params,
    parse_cmdline,
    parse_cmdline_device,
    parse_dtb,
    parse_dts,
)

U64 = 1 << 64
INT_MIN, INT_MAX = -(1 << 31), (1 << 31) - 1
FAST = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
DTC = shutil.which("dtc")
needs_dtc = pytest.mark.skipif(
    DTC is None, reason="dtc not installed (apt-get install device-tree-compiler)"
)


def where(decls: list[Declaration]) -> list[tuple[int, int, int, int | None]]:
    return [(d.base, d.size, d.irq, d.id) for d in decls]


# --------------------------------------------------------------------------------------------
# Declaration
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("base", "size", "irq", "ident", "problem"),
    [
        (0x1000, 0, 5, None, "not a window"),
        (-1, 0x200, 5, None, "64-bit"),
        (U64 - 0x100, 0x200, 5, None, "past the end"),
        (0, U64, 5, None, "does not fit in 64 bits"),
        (0x1000, 0x200, 1 << 32, None, "32-bit"),
        (0x1000, 0x200, -1, None, "32-bit"),
        (0x1000, 0x200, 5, INT_MAX + 1, "C int"),
    ],
)
def test_declaration_refuses_windows_no_kernel_could_claim(base, size, irq, ident, problem):
    with pytest.raises(DeclarationError, match=problem):
        Declaration(base, size, irq, ident, source="test")


EXTREMES = [
    Declaration(0, 1, 1),
    Declaration(0, U64 - 1, 1),
    Declaration(U64 - 1, 1, (1 << 32) - 1),
    Declaration(1 << 32, 1 << 32, 1, id=INT_MIN),
]


@pytest.mark.parametrize("decl", EXTREMES, ids=lambda d: f"{d.base:#x}+{d.size:#x}")
def test_extreme_windows_survive_every_format(decl):
    assert parse_cmdline_device(format_cmdline([decl])) == assign_ids([decl])[0]
    assert parse_cmdline(format_kernel_params([decl])) == assign_ids([decl])
    tree_decl = Declaration(decl.base, decl.size, decl.irq)  # device trees carry no ids
    assert parse_dts(build_dts([decl])) == [tree_decl]
    assert parse_dtb(build_dtb([decl])) == [tree_decl]


def test_declaration_source_is_provenance_not_identity():
    a = Declaration(0x1000, 0x200, 5, source="dts node /a")
    b = Declaration(0x1000, 0x200, 5, source="virtio_mmio.device=0x200@0x1000:5")
    assert a == b and hash(a) == hash(b)
    assert a.end == 0x11FF
    assert Declaration(U64 - 0x200, 0x200, 0).end == U64 - 1  # the very top is a real window


# --------------------------------------------------------------------------------------------
# Kernel command line: what vm_cmdline_set accepts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("0x200@0x10001000:5", (0x10001000, 0x200, 5, None)),
        ("1K@0x1001e000:74", (0x1001E000, 0x400, 74, None)),
        ("virtio_mmio.device=0x100@0x100b0000:48", (0x100B0000, 0x100, 48, None)),
        ("virtio-mmio.device=1K@0x1000:5", (0x1000, 0x400, 5, None)),  # parameq: - equals _
        ("device=1K@0x1000:5", (0x1000, 0x400, 5, None)),  # modprobe virtio_mmio device=...
        ("4k@0x1000:3", (0x1000, 0x1000, 3, None)),  # suffixes are case-insensitive
        ("2m@0:1", (0, 2 << 20, 1, None)),
        ("3G@0x100000000:1", (1 << 32, 3 << 30, 1, None)),
        ("1t@0:1", (0, 1 << 40, 1, None)),
        ("1P@0:1", (0, 1 << 50, 1, None)),
        ("1e@0:1", (0, 1 << 60, 1, None)),  # decimal 1, then the E suffix...
        ("0x1E@0:1", (0, 0x1E, 1, None)),  # ...but after 0x, E is a hex digit
        ("0x1k@0:1", (0, 1 << 10, 1, None)),  # k is not a hex digit, so it is a suffix
        ("01000@010:1", (8, 0o1000, 1, None)),  # leading 0 is octal, for size and base
        ("512@4096:1", (4096, 512, 1, None)),
        ("1K@0x1000:007", (0x1000, 0x400, 7, None)),  # %u is decimal: leading zeros are fine
        ("1K@0x1000:5:3", (0x1000, 0x400, 5, 3)),
        ("1K@0x1000:5:-1", (0x1000, 0x400, 5, -1)),
        ("1K@0x1000:5:010", (0x1000, 0x400, 5, 10)),  # %d is decimal too
        ("1K@-0x400:5", (U64 - 0x400, 0x400, 5, None)),  # %lli is signed; start is unsigned
        ("0x400@0xfffffffffffffc00:5", (U64 - 0x400, 0x400, 5, None)),
        ('virtio_mmio.device="1K@ 0x1000: 5: 6"', (0x1000, 0x400, 5, 6)),  # sscanf skips spaces
        ('"virtio_mmio.device=1K@0x1000:5"', (0x1000, 0x400, 5, None)),
        ("  1K@0x1000:5\n", (0x1000, 0x400, 5, None)),  # separators, not part of the value
    ],
)
def test_accepted_exactly_like_the_kernel(text, expected):
    assert where([parse_cmdline_device(text)]) == [expected]


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("0x200@0x10001000", "':<irq>' is missing"),
        ("0x200@0x10001000:0", "irq 0 is refused"),
        ("0x200@0x10001000:5:3junk", "'junk' after <id>"),
        ("0x200@0x10001000:5junk", "'junk' after <irq>"),
        ("0x200@0x10001000:5:", "':' after <irq>"),
        ("0x200@0x10001000:5:-", "':-' after <irq>"),
        ("0x200@0x10001000:5-7", "not in mainline"),
        ("0x200@0x10001000:0x5", "'x5' after <irq>"),  # %u reads the 0 and stops
        ("0x200@0x10001000:-5", "<irq> is not an unsigned decimal"),
        ("0x200@0x10001000:+5", "<irq> is not an unsigned decimal"),
        ("0x200@+0x10001000:5", "<baseaddr> is not a number"),
        ("0x200@0x:5", "'x:5' after <baseaddr>"),  # 0x needs a hex digit, else it is octal 0
        ("0x200@:5", "<baseaddr> is not a number"),
        ("0x200@0x1000 :5", "expected one parameter"),  # a space ends the parameter
        ("0@0x1000:5", "size 0"),
        ("0K@0x1000:5", "size 0"),
        ("@0x1000:5", "<size> is missing"),
        ("K@0x1000:5", "<size> is missing"),
        ("09@0x1000:5", "expected '@' after <size>"),  # 9 is not an octal digit
        ("1KB@0x1000:5", "expected '@' after <size>"),
        ("1Q@0x1000:5", "expected '@' after <size>"),
        ("-1K@0x1000:5", "expected '@' after <size>"),  # memparse takes no sign
        (" 0x200", "expected '@' after <size>, found the end"),
        ("1K@0xfffffffffffffc01:5", "wraps past 2\\*\\*64"),
        ("1K@-0x3ff:5", "wraps past 2\\*\\*64"),
        ("16E@0:1", "does not fit in 64 bits"),
        ("1K@0x10000000000000000:1", "does not fit in 64 bits"),
        ("1K@0x1000:4294967296", "does not fit in 32 bits"),
        ("1K@0x1000:5:2147483648", "does not fit in a C int"),
        ("1K@0x1000:\uff15", "non-ASCII"),  # a fullwidth 5
        ("root=/dev/vda", "not the virtio_mmio device parameter"),
        ("virtio_mmio.devices=1K@0x1000:5", "not the virtio_mmio device parameter"),
        ("", "expected one parameter, found 0"),
        ("1K@0x1000:5 1K@0x2000:6", "expected one parameter, found 2"),
    ],
)
def test_refused_exactly_like_the_kernel_with_a_useful_message(text, problem):
    with pytest.raises(DeclarationError, match=problem) as info:
        parse_cmdline_device(text)
    assert CMDLINE_SYNTAX in str(info.value)  # every message shows the expected syntax


def test_a_whole_command_line_numbers_devices_like_vm_cmdline_set():
    line = (
        "console=ttyS0 virtio_mmio.device=1K@0x1000:5:10 root=/dev/vda "
        "virtio_mmio.device=1K@0x2000:6 quiet virtio_mmio.device=1K@0x3000:7:3 "
        'virtio-mmio.device="4K@0x4000:8" init=/sbin/init'
    )
    assert [d.id for d in parse_cmdline(line)] == [10, 11, 3, 4]
    reseed = "virtio_mmio.device=1K@0:1:-1 virtio_mmio.device=1K@0x400:2"
    assert [d.id for d in parse_cmdline(reseed)] == [-1, 0]
    wrap = "virtio_mmio.device=1K@0:1:2147483647 virtio_mmio.device=1K@0x400:2"
    assert [d.id for d in parse_cmdline(wrap)] == [INT_MAX, INT_MIN]  # a C int wraps


def test_the_command_line_ends_at_double_dash_and_other_params_are_ignored():
    line = "virtio_mmio.device=1K@0x1000:5 device=1K@0x9000:9 foo -- virtio_mmio.device=1K@0:1"
    assert where(parse_cmdline(line)) == [(0x1000, 0x400, 5, 0)]
    assert parse_cmdline("") == []
    assert parse_cmdline("virtio_mmio.device") == []  # no '=': a flag, not a device


def test_the_command_line_is_split_on_bytes_as_the_kernel_splits_it():
    # 'à' is c3 a0 in UTF-8, and the kernel's isspace() counts 0xa0 as a space.
    assert len(parse_cmdline("fooàvirtio_mmio.device=1K@0x1000:5")) == 1


def test_a_bad_device_anywhere_on_the_command_line_is_an_error():
    with pytest.raises(DeclarationError, match="irq 0"):
        parse_cmdline("quiet virtio_mmio.device=1K@0x1000:5 virtio_mmio.device=1K@0x2000:0")
    with pytest.raises(DeclarationError, match="NUL"):
        parse_cmdline("virtio_mmio.device=1K@0x1000:5\0")


def test_devices_the_kernel_cannot_register_side_by_side_are_refused():
    with pytest.raises(DeclarationError, match="id 3 is already used"):
        parse_cmdline("virtio_mmio.device=1K@0x1000:5:3 virtio_mmio.device=1K@0x2000:6:3")
    with pytest.raises(DeclarationError, match="partly overlaps"):
        parse_cmdline("virtio_mmio.device=4K@0x1000:5 virtio_mmio.device=4K@0x1800:6")
    # The kernel numbers PLATFORM_DEVID_AUTO devices itself; nested windows can be inserted.
    auto = "virtio_mmio.device=1K@0x1000:5:-2 virtio_mmio.device=1K@0x2000:6:-2"
    assert [d.id for d in parse_cmdline(auto)] == [-2, -2]
    nested = "virtio_mmio.device=4K@0x1000:5 virtio_mmio.device=1K@0x1400:6"
    assert len(parse_cmdline(nested)) == 2


def test_format_cmdline_is_the_sysfs_read_back():
    decls = parse_cmdline(
        "virtio_mmio.device=0x100@0x100b0000:48 virtio_mmio.device=1K@0x1001e000:74:7"
    )
    assert format_cmdline(decls) == "0x100@0x100b0000:48:0\n0x400@0x1001e000:74:7\n"
    assert format_cmdline([]) == ""
    with pytest.raises(DeclarationError, match="irq 0"):
        format_cmdline([Declaration(0x1000, 0x200, 0, source="dts node /x")])


def test_format_kernel_params_writes_what_parse_cmdline_reads():
    decls = [Declaration(0x1000, 4096, 5), Declaration(0x2000, 0x200, 6, id=9)]
    params = format_kernel_params(decls)
    assert params == "virtio_mmio.device=4K@0x1000:5 virtio_mmio.device=512@0x2000:6:9"
    assert parse_cmdline(params) == assign_ids(decls)


@st.composite
def windows(draw, min_irq: int = 0, max_count: int = 6) -> list[Declaration]:
    """Declarations with distinct bases and any sizes (windows may overlap)."""
    count = draw(st.integers(0, max_count))
    bases = draw(st.lists(st.integers(0, U64 - 1), min_size=count, max_size=count, unique=True))
    out = []
    for base in bases:
        typical = st.sampled_from([1, 0x200, 0x1000]).filter(lambda s, b=base: b + s <= U64)
        size = draw(st.integers(1, min(U64 - base, U64 - 1)) | typical)
        irq = draw(st.integers(min_irq, (1 << 32) - 1))
        out.append(Declaration(base, size, irq))
    return out


@st.composite
def disjoint_windows(draw) -> list[Declaration]:
    """Windows a kernel could register together: apart, numbered from an optional first id."""
    count = draw(st.integers(0, 6))
    points = st.lists(st.integers(0, U64 - 1), min_size=2 * count, max_size=2 * count, unique=True)
    edges = sorted(draw(points))
    decls = [
        Declaration(edges[2 * i], edges[2 * i + 1] - edges[2 * i], draw(st.integers(1, 2**32 - 1)))
        for i in range(count)
    ]
    decls = draw(st.permutations(decls))
    first = draw(st.none() | st.integers(INT_MIN, INT_MAX))
    if decls and first is not None:
        decls[0] = Declaration(decls[0].base, decls[0].size, decls[0].irq, first)
    return decls


@FAST
@given(windows(min_irq=1), st.lists(st.none() | st.integers(INT_MIN, INT_MAX), max_size=6))
def test_format_cmdline_lines_parse_back(decls, ids):
    ids = (ids + [None] * len(decls))[: len(decls)]
    decls = [Declaration(d.base, d.size, d.irq, i) for d, i in zip(decls, ids, strict=True)]
    lines = format_cmdline(decls).splitlines()
    assert [parse_cmdline_device(line) for line in lines] == assign_ids(decls)


@FAST
@given(disjoint_windows())
def test_kernel_params_round_trip(decls):
    assert parse_cmdline(format_kernel_params(decls)) == assign_ids(decls)


def spell_unsigned(draw, value: int, allow_octal: bool = True) -> str:
    styles = ["dec", "hex", "HEX"] + (["oct"] if allow_octal else [])
    style = draw(st.sampled_from(styles))
    return {
        "dec": str(value),
        "hex": f"0x{value:x}",
        "HEX": f"0X{value:X}",
        "oct": f"0{value:o}",
    }[style]


@st.composite
def spelled_devices(draw) -> tuple[str, Declaration]:
    """A device and one of the many ways the kernel lets you write it."""
    [decl] = draw(windows(min_irq=1, max_count=1).filter(len))
    ident = draw(st.none() | st.integers(INT_MIN, INT_MAX))
    shifts = [s for s in range(0, 61, 10) if decl.size % (1 << s) == 0]
    shift = draw(st.sampled_from(shifts))
    size = spell_unsigned(draw, decl.size >> shift)
    if shift:
        suffix = "KMGTPE"[shift // 10 - 1]
        suffix = draw(st.sampled_from([suffix, suffix.lower()]))
        assume(not (size[:2].lower() == "0x" and suffix in "eE"))  # E would be a hex digit
        size += suffix
    negative = decl.base and draw(st.booleans())
    magnitude = U64 - decl.base if negative else decl.base
    base = ("-" if negative else "") + spell_unsigned(draw, magnitude)
    space = draw(st.sampled_from(["", " ", "\t ", "  "]))
    irq = "0" * draw(st.integers(0, 2)) + str(decl.irq)
    value = f"{size}@{space}{base}:{space}{irq}" + ("" if ident is None else f":{space}{ident}")
    prefix = draw(st.sampled_from(["", "device=", "virtio_mmio.device=", "virtio-mmio.device="]))
    text = f'{prefix}"{value}"' if space and prefix else f'"{value}"' if space else prefix + value
    return text, Declaration(decl.base, decl.size, decl.irq, ident)


@FAST
@given(spelled_devices())
def test_every_spelling_the_kernel_accepts_is_accepted(case):
    text, expected = case
    assert parse_cmdline_device(text) == expected


CMDLINE_CHARS = '0123456789abcdefxXkKmMgGtTpPeE@:-+ \t"=_.virtomdc\n\xa0à'


@FAST
@given(st.text(CMDLINE_CHARS, max_size=60) | st.text(max_size=40))
def test_any_text_is_a_device_or_a_declaration_error(text):
    for parse in (parse_cmdline_device, parse_cmdline):
        with contextlib.suppress(DeclarationError):
            parse(text)


# --------------------------------------------------------------------------------------------
# Device tree source
# --------------------------------------------------------------------------------------------

BOARD_DTS = r"""
/dts-v1/;
/memreserve/ 0x80000000 0x10000;
// A board: a bus with an offset, labels, comments, disabled nodes and later amendments.
/ {
	#address-cells = <2>;
	#size-cells = <2>;
	compatible = "test,board", "test,soc";
	model = "a \"test\" board";
	interrupt-parent = <&plic>;

	chosen { bootargs = "console=ttyS0 virtio_mmio.device=1K@0x1000:5"; };

	soc: soc@40000000 {
		#address-cells = <1>;
		#size-cells = <1>;
		compatible = "simple-bus";
		ranges = <0x0 0x0 0x40000000 0x20000000>;   /* bus 0 is CPU 0x40000000 */

		plic: interrupt-controller@c000000 {
			compatible = "sifive,plic-1.0.0";
			#interrupt-cells = <1>;
			#address-cells = <0>;
			interrupt-controller;
			reg = <0xc000000 0x4000000>;
		};

		vblk: virtio_mmio@10001000 {
			compatible = "virtio,mmio";
			reg = <0x10001000 0x1000>;
			interrupts = <1>;
			labelled = lbl1: <0x1 lbl2: 0x2>, "str" endlbl:;
			bytes = [00 11 2233];
			expr = <(0x100 + 2 * 3) (1 << 4) ((5 > 3) ? 7 : 9) (-1) 'a'>;
			wide = /bits/ 64 <0x123456789>;
		};

		virtio_mmio@10002000 {
			compatible = "virtio,mmio";
			reg = <0x10002000 0x1000>;
			interrupts = <2>;
			status = "disabled";
		};

		virtio_mmio@10003000 {
			compatible = "foo,bar", "VIRTIO,MMIO";
			reg = <0x10003000 0x200>, <0x1000000 0x100>;
			interrupts = <3 4>;
			status = "okay";
		};

		gone: virtio_mmio@10004000 {
			compatible = "virtio,mmio";
			reg = <0x10004000 0x1000>;
			interrupts = <4>;
		};
	};

	failed-bus {
		compatible = "simple-bus";
		#address-cells = <2>; #size-cells = <2>;
		ranges;
		status = "fail";
		virtio_mmio@5000 {
			compatible = "virtio,mmio"; reg = <0 0x5000 0 0x200>; interrupts = <9>;
		};
	};

	virtio_mmio@a000000 {
		compatible = "virtio,mmio";
		reg = <0x0 0xa000000 0x0 0x200>;
		interrupts = <0x10>;
		status = "disabled";
	};
};

&vblk { interrupts = <7>; };
/delete-node/ &gone;
/ {
	virtio_mmio@a000200 {
		compatible = "virtio,mmio";
		reg = <0x0 0xa000200 0x0 0x200>;
		interrupts = <0x11>;
	};
};
&{/virtio_mmio@a000000} { status = "ok"; };
"""

BOARD_DEVICES = [
    (0x50001000, 0x1000, 7, None),  # bus address 0x10001000 through ranges; irq amended
    (0x50003000, 0x200, 3, None),  # compatible compared case-insensitively; first reg, cell
    (0xA000000, 0x200, 16, None),  # enabled later by a path reference
    (0xA000200, 0x200, 17, None),  # from a second root block
]


def test_a_board_dts_declares_what_linux_would_populate():
    decls = parse_dts(BOARD_DTS)
    assert where(decls) == BOARD_DEVICES
    assert decls[0].source == "dts node /soc@40000000/virtio_mmio@10001000"


def test_labels_comments_and_disabled_nodes():
    text = """/dts-v1/;
    / {
        /* a comment with { braces } and "quotes" */
        #address-cells = <1>; #size-cells = <1>;   // one cell each
        first: virtio@1000 { compatible = "virtio,mmio"; reg = <0x1000 0x200>; interrupts = <5>; };
        second: virtio@2000 {
            compatible = "virtio,mmio";
            reg = <0x2000 0x200>;
            interrupts = <6>;
            status = "disabled";
        };
        third: virtio@3000 { compatible = "virtio,mmio"; reg = <0x3000 0x200>; interrupts = <07>; };
    };
    &first { status = "reserved"; };
    """
    assert where(parse_dts(text)) == [(0x3000, 0x200, 7, None)]


def test_cells_default_to_the_spec_values_and_are_found_up_the_tree():
    device = 'compatible = "virtio,mmio"; interrupts = <1>;'
    no_cells = f"/ {{ v@0 {{ {device} reg = <0 0x1000 0x200>; }}; }};"
    assert where(parse_dts(no_cells)) == [(0x1000, 0x200, 1, None)]  # 2 address cells, 1 size
    # Linux's of_n_addr_cells walks up from the parent, so a bus without its own cells
    # uses its parent's.
    inherited = f"""/ {{ #address-cells = <1>; #size-cells = <1>;
        bus {{ ranges; v@0 {{ {device} reg = <0x1000 0x200>; }}; }};
    }};"""
    assert where(parse_dts(inherited)) == [(0x1000, 0x200, 1, None)]


def test_wide_addresses_and_sizes():
    text = """/ { #address-cells = <2>; #size-cells = <2>;
        v@100000000 { compatible = "virtio,mmio"; reg = <0x1 0x0 0x1 0x0>; interrupts = <9>; };
    };"""
    assert where(parse_dts(text)) == [(1 << 32, 1 << 32, 9, None)]


@pytest.mark.parametrize(
    ("body", "problem"),
    [
        ("interrupts = <1>;", "node /v@0: missing property 'reg'"),
        ("reg = <0x0 0x200>;", "node /v@0: missing property 'interrupts'"),
        ("reg = <0x0 0x200>; interrupts-extended = <&x 1>;", "interrupts-extended"),
        ("reg = <0x0>; interrupts = <1>;", "'reg' is 4 bytes"),
        ("reg = <0x0 0x0>; interrupts = <1>;", "not a window"),
        ("reg = <0x0 0x200>; interrupts;", "'interrupts' is 0 bytes"),
        ("reg = <0x0 0x200>; interrupts = [01];", "not whole cells"),
    ],
)
def test_a_broken_device_node_names_itself_and_the_property(body, problem):
    one_cell = "#address-cells = <1>; #size-cells = <1>;"
    text = f'/ {{ {one_cell} v@0 {{ compatible = "virtio,mmio"; {body} }}; }};'
    with pytest.raises(DeclarationError, match=problem):
        parse_dts(text)


VIRTIO_AT_0 = 'v@0 { compatible = "virtio,mmio"; reg = <0x200 1>; interrupts = <1>; };'
ONE_CELL = "#address-cells = <1>; #size-cells = <1>;"


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        (f"/ {{ bus {{ {ONE_CELL} {VIRTIO_AT_0} }}; }};", "/bus has no 'ranges'"),
        (
            f"/ {{ bus {{ {ONE_CELL} ranges = <0 0 0 0x100>; {VIRTIO_AT_0} }}; }};",
            "outside every 'ranges' entry",
        ),
        (f"/ {{ #address-cells = <5>; {VIRTIO_AT_0} }};", "#address-cells of / is 5"),
        (f"/ {{ #size-cells = <0>; {VIRTIO_AT_0} }};", "no room for a window"),
    ],
)
def test_addresses_that_do_not_reach_the_cpu_are_errors(text, problem):
    with pytest.raises(DeclarationError, match=problem):
        parse_dts(text)


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('#include "board.dtsi"\n/ { };', "preprocessor"),
        ("#define IRQ 5\n/ { };", "preprocessor"),
        ('/include/ "board.dtsi"', "/include/"),
        ("/dts-v1/;\n/plugin/;", "overlays"),
        ("/dts-v1/;", "no root node"),
        ("/ { a = <1>; ", "line 1:14: expected '}'|expected a property"),
        ("/ {\n  a = <1 2\n};", "line 3:1: bad integer|line 3:1: expected a number"),
        ('/ { a = "open; };', "unterminated string"),
        ("/ { /* open };", "unterminated /\\* comment"),
        ("/ { a = <08>; };", "bad integer literal '08'"),
        ("/ { a = <0x1g>; };", "bad integer literal"),
        ("/ { a = <99999999999999999999>; };", "out of 64-bit range"),
        ("/ { a = /bits/ 8 <256>; };", "does not fit a 8-bit element"),
        ("/ { a = /bits/ 12 <1>; };", "only 8, 16, 32 or 64"),
        ("/ { a = <(1 / 0)>; };", "division by zero"),
        ("/ { a = [0]; };", "pairs of hex digits"),
        ("/ { a = ''; };", "empty character literal|expected a value"),
        ("&nowhere { };", "no such node"),
        ("/ { x: a { }; x: b { }; };", "label 'x' is already used"),
        ("/ { a b; };", "expected '=', ';' or '{'"),
    ],
)
def test_source_errors_say_where(text, problem):
    with pytest.raises(DeclarationError, match=problem):
        parse_dts(text)


def test_cpp_line_markers_are_skipped():
    text = f'# 1 "board.dts"\n/dts-v1/;\n# 3 "board.dts"\n/ {{ {ONE_CELL} }};\n'
    assert parse_dts(text) == []


def test_nesting_is_bounded_so_hostile_source_cannot_exhaust_the_stack():
    with pytest.raises(DeclarationError, match="nested deeper"):
        parse_dts("/ {" + " a {" * 10_000)
    with pytest.raises(DeclarationError, match="nested deeper"):
        parse_dts("/ { a = <" + "(" * 10_000 + "1" + ")" * 10_000 + ">; };")
    with pytest.raises(DeclarationError, match="nested deeper"):
        parse_dts("/ { a = <(" + "-" * 10_000 + "1)>; };")


@FAST
@given(windows())
def test_build_dts_round_trips(decls):
    assert parse_dts(build_dts(decls)) == decls


def test_build_dts_refuses_two_devices_at_one_base():
    twins = [Declaration(0x1000, 0x200, 1, source="a"), Declaration(0x1000, 0x400, 2, source="b")]
    with pytest.raises(DeclarationError, match="node names would clash"):
        build_dts(twins)
    with pytest.raises(DeclarationError, match="node names would clash"):
        build_dtb(twins)


def test_build_dts_escapes_the_model():
    text = build_dts([], model='a "quoted" \\ model\n')
    assert r'model = "a \"quoted\" \\ model\x0a";' in text
    with pytest.raises(DeclarationError, match="NUL"):
        build_dts([], model="a\0b")


DTS_TOKENS = """/ { }; { } ; = < > [ ] ( ) , " ' & : /* */ // a v@1 0x10 07 1 - ? << /bits/
/dts-v1/; /delete-node/ /delete-property/ &{/ lbl: &lbl #address-cells reg "virtio,mmio"
compatible interrupts status "disabled" ranges #"""
DTS_FRAGMENTS = ["\n", " ", *DTS_TOKENS.split()]


@FAST
@given(st.lists(st.sampled_from(DTS_FRAGMENTS), max_size=40).map(" ".join) | st.text(max_size=80))
def test_any_source_is_devices_or_a_declaration_error(text):
    with contextlib.suppress(DeclarationError):
        parse_dts(text)


@FAST
@given(st.data())
def test_mutated_board_source_is_devices_or_a_declaration_error(data):
    text = list(BOARD_DTS)
    for _ in range(data.draw(st.integers(1, 4))):
        at = data.draw(st.integers(0, len(text) - 1))
        text[at : at + data.draw(st.integers(0, 8))] = data.draw(st.sampled_from(DTS_FRAGMENTS))
    with contextlib.suppress(DeclarationError):
        parse_dts("".join(text))


# --------------------------------------------------------------------------------------------
# Flattened device tree
# --------------------------------------------------------------------------------------------


def fdt(tree, **header) -> bytes:
    """A test FDT of (name, {prop: bytes}, [children]); any header field, ``body`` (the struct
    block) or ``strings`` may be overridden to make it hostile."""
    strings = bytearray()
    tree_body = struct_block(tree, strings)
    body = header.pop("body", tree_body)
    strings_bytes = header.pop("strings", bytes(strings))
    fields = {
        "magic": 0xD00DFEED,
        "totalsize": 56 + len(body) + len(strings_bytes),
        "off_struct": 56,
        "off_strings": 56 + len(body),
        "off_rsvmap": 40,
        "version": 17,
        "last_comp": 16,
        "cpu": 0,
        "size_strings": len(strings_bytes),
        "size_struct": len(body),
    }
    fields.update(header)
    assert tuple(fields) == FDT_FIELDS
    return struct.pack(">10I", *fields.values()) + bytes(16) + body + strings_bytes


FDT_FIELDS = (
    "magic", "totalsize", "off_struct", "off_strings", "off_rsvmap",
    "version", "last_comp", "cpu", "size_strings", "size_struct",
)  # fmt: skip


def header_of(blob: bytes) -> dict[str, int]:
    return dict(zip(FDT_FIELDS, struct.unpack_from(">10I", blob), strict=True))


def struct_block(tree, strings: bytearray | None = None) -> bytes:
    """FDT_BEGIN_NODE/PROP/END_NODE tokens for ``tree``, then FDT_END."""
    strings = bytearray() if strings is None else strings
    offsets: dict[str, int] = {}

    def node(name, props, children) -> bytes:
        out = struct.pack(">I", 1) + pad(name.encode() + b"\0")
        for prop, value in props.items():
            if prop not in offsets:
                offsets[prop] = len(strings)
                strings.extend(prop.encode() + b"\0")
            out += struct.pack(">3I", 3, len(value), offsets[prop]) + pad(value)
        return out + b"".join(node(*c) for c in children) + struct.pack(">I", 2)

    return node(*tree) + struct.pack(">I", 9)


def pad(data: bytes) -> bytes:
    return data + bytes(-len(data) % 4)


def cells(*values: int) -> bytes:
    return struct.pack(f">{len(values)}I", *values)


def virtio(name: str, reg: bytes, irq: int, **extra: bytes):
    return (
        name,
        {"compatible": b"virtio,mmio\0", "reg": reg, "interrupts": cells(irq), **extra},
        [],
    )


SMALL_TREE = (
    "",
    {"#address-cells": cells(2), "#size-cells": cells(2)},
    [virtio("virtio_mmio@1000", cells(0, 0x1000, 0, 0x200), 5)],
)


def test_the_test_fdt_builder_makes_readable_trees():
    assert parse_dtb(fdt(SMALL_TREE)) == [Declaration(0x1000, 0x200, 5)]


def test_build_dtb_writes_a_v17_header_and_an_empty_reservation_map():
    blob = build_dtb([Declaration(0x10001000, 0x200, 5)])
    h = header_of(blob)
    assert (h["magic"], h["totalsize"], h["version"], h["last_comp"]) == (
        0xD00DFEED,
        len(blob),
        17,
        16,
    )
    assert blob[h["off_rsvmap"] : h["off_rsvmap"] + 16] == bytes(16)
    assert h["off_struct"] + h["size_struct"] == h["off_strings"]
    assert h["off_strings"] + h["size_strings"] == h["totalsize"]


@FAST
@given(windows())
def test_build_dtb_round_trips(decls):
    assert parse_dtb(build_dtb(decls)) == decls


def test_dtb_cells_are_found_up_the_tree_and_translated():
    tree = (
        "",
        {"#address-cells": cells(1), "#size-cells": cells(1)},
        [
            (
                "bus@40000000",
                {"ranges": cells(0x0, 0x40000000, 0x10000)},
                [virtio("virtio_mmio@1000", cells(0x1000, 0x200), 5)],
            ),
            (
                "off",
                {"status": b"disabled\0"},
                [virtio("virtio_mmio@2000", cells(0x2000, 0x200), 6)],
            ),
        ],
    )
    [decl] = parse_dtb(fdt(tree))
    assert (decl.base, decl.size, decl.irq) == (0x40001000, 0x200, 5)
    assert decl.source == "dtb node /bus@40000000/virtio_mmio@1000"


def test_a_self_referencing_interrupt_parent_is_not_followed():
    tree = (
        "",
        {"#address-cells": cells(1), "#size-cells": cells(1)},
        [
            virtio(
                "virtio_mmio@1000",
                cells(0x1000, 0x200),
                5,
                **{"interrupt-parent": cells(1), "phandle": cells(1)},
            ),
        ],
    )
    assert len(parse_dtb(fdt(tree))) == 1


NOP, END = struct.pack(">I", 4), struct.pack(">I", 9)
BEGIN_ROOT, END_NODE = struct.pack(">I", 1) + bytes(4), struct.pack(">I", 2)


@pytest.mark.parametrize(
    ("blob", "problem"),
    [
        (b"", "too short"),
        (bytes(36), "magic 0x00000000"),
        (fdt(SMALL_TREE)[:-1], "totalsize"),
        (fdt(SMALL_TREE, totalsize=1 << 31), "totalsize"),
        (fdt(SMALL_TREE, totalsize=10), "totalsize"),
        (fdt(SMALL_TREE, version=15), "version 15"),
        (fdt(SMALL_TREE, last_comp=18), "compatible with 18"),
        (fdt(SMALL_TREE, off_struct=1 << 30), "struct block offset"),
        (fdt(SMALL_TREE, off_struct=58), "struct block offset"),  # misaligned
        (fdt(SMALL_TREE, off_struct=8), "struct block offset"),  # inside the header
        (fdt(SMALL_TREE, size_struct=1 << 30), "struct block"),
        (fdt(SMALL_TREE, off_strings=1 << 30), "strings block offset"),
        (fdt(SMALL_TREE, size_strings=0xFFFFFFFF), "strings block"),
        (fdt(SMALL_TREE, off_rsvmap=44), "reservation map"),
        (fdt(SMALL_TREE, off_rsvmap=0xFFFFFFF8), "reservation map"),
        (fdt(SMALL_TREE, strings=b"#address-cells"), "not a NUL-terminated string"),
        (
            fdt(
                SMALL_TREE,
                body=BEGIN_ROOT + struct.pack(">3I", 3, 4, 999) + bytes(4) + END_NODE + END,
            ),
            "property name at 999",
        ),
        (
            fdt(
                SMALL_TREE, body=BEGIN_ROOT + struct.pack(">3I", 3, 0xFFFFFFF0, 0) + END_NODE + END
            ),
            "runs past the struct block",
        ),
        (fdt(SMALL_TREE, body=struct.pack(">I", 1) + b"root"), "node name"),
        (fdt(SMALL_TREE, body=BEGIN_ROOT + END_NODE), "no FDT_END"),
        (fdt(SMALL_TREE, body=BEGIN_ROOT + END), "1 node\\(s\\) still open"),
        (fdt(SMALL_TREE, body=END), "no root node"),
        (fdt(SMALL_TREE, body=END_NODE + END), "closes no node"),
        (fdt(SMALL_TREE, body=struct.pack(">3I", 3, 0, 0) + END), "outside any node"),
        (fdt(SMALL_TREE, body=BEGIN_ROOT + END_NODE + BEGIN_ROOT + END_NODE + END), "second root"),
        (fdt(SMALL_TREE, body=BEGIN_ROOT + struct.pack(">I", 7) + END), "unknown token 0x7"),
        (fdt(SMALL_TREE, body=BEGIN_ROOT * 100 + END_NODE * 100 + END), "nested deeper"),
        (
            fdt(("", {"#address-cells": b"\0\0"}, [virtio("v", cells(0, 1), 1)])),
            "#address-cells of / is 2 bytes",
        ),
    ],
)
def test_malformed_dtbs_are_declaration_errors(blob, problem):
    with pytest.raises(DeclarationError, match=problem):
        parse_dtb(blob)


def test_the_reservation_map_must_be_terminated():
    blob = bytearray(fdt(SMALL_TREE))
    blob[40:56] = b"\xff" * 16  # a reservation entry, then no (0, 0) entry before the end
    blob[56:] = b"\xff" * (len(blob) - 56)
    with pytest.raises(DeclarationError, match="reservation map"):
        parse_dtb(bytes(blob))


def test_nops_and_v16_headers_are_read():
    body = NOP * 1000 + struct_block(SMALL_TREE)
    assert len(parse_dtb(fdt(SMALL_TREE, body=body))) == 1
    v16 = bytearray(fdt(SMALL_TREE, version=16))
    v16[36:40] = b"\xff\xff\xff\xff"  # size_dt_struct does not exist before v17
    assert len(parse_dtb(bytes(v16))) == 1


@pytest.mark.timeout(30)
def test_every_truncation_of_a_dtb_is_an_error_or_devices():
    blob = build_dtb([Declaration(0x1000, 0x200, 5), Declaration(0x2000, 0x200, 6)])
    for end in range(len(blob)):
        with pytest.raises(DeclarationError):
            parse_dtb(blob[:end])


@pytest.mark.timeout(60)
@FAST
@given(st.binary(max_size=512))
def test_random_bytes_are_declaration_errors(blob):
    with pytest.raises(DeclarationError):
        parse_dtb(blob)


@pytest.mark.timeout(60)
@FAST
@given(st.binary(max_size=256))
def test_random_bodies_behind_a_valid_header_are_devices_or_declaration_errors(body):
    with contextlib.suppress(DeclarationError):
        parse_dtb(fdt(SMALL_TREE, body=body or END))


@pytest.mark.timeout(60)
@settings(max_examples=500, deadline=None)
@given(
    st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), min_size=1, max_size=8),
    st.none() | st.integers(0, 10_000),
    st.integers(0, 2**31),
)
def test_mutated_dtbs_are_devices_or_declaration_errors(mutations, cut, seed):
    blob = bytearray(
        build_dtb([Declaration(0x10001000, 0x200, 5), Declaration(1 << 32, 0x1000, 6)])
    )
    rng = random.Random(seed)
    for at, value in mutations:
        blob[at % len(blob)] = value
    if rng.random() < 0.3:  # also scramble one header word wholesale
        word = rng.randrange(10) * 4
        blob[word : word + 4] = rng.randbytes(4)
    with contextlib.suppress(DeclarationError):
        parse_dtb(bytes(blob[: cut if cut is not None else len(blob)]))


def test_a_huge_nop_flood_is_one_linear_pass():
    body = BEGIN_ROOT + NOP * 250_000 + END_NODE + END
    assert parse_dtb(fdt(SMALL_TREE, body=body)) == []


# --------------------------------------------------------------------------------------------
# dtc agrees
# --------------------------------------------------------------------------------------------


def dtc(
    tmp_path: Path, source: str, *args: str, input_format: str = "dts"
) -> subprocess.CompletedProcess:
    path = tmp_path / f"in.{input_format}"
    if isinstance(source, bytes):
        path.write_bytes(source)
    else:
        path.write_text(source)
    return subprocess.run(
        [DTC, "-I", input_format, *args, str(path)], capture_output=True, check=False
    )


@needs_dtc
@FAST
@given(windows())
def test_dtc_compiles_build_dts_cleanly_into_build_dtb(tmp_path_factory, decls):
    tmp_path = tmp_path_factory.mktemp("dtc")
    result = dtc(tmp_path, build_dts(decls), "-O", "dtb")
    assert result.returncode == 0, result.stderr
    assert result.stderr == b""  # no warnings either
    assert result.stdout == build_dtb(decls)  # byte for byte what dtc writes
    assert parse_dtb(result.stdout) == decls


@needs_dtc
def test_dtc_reads_build_dtb_and_its_source_parses(tmp_path):
    decls = [Declaration(0x10001000, 0x200, 5), Declaration(0x1_0000_0000, 0x1000, 6)]
    result = dtc(tmp_path, build_dtb(decls), "-O", "dts", input_format="dtb")
    assert result.returncode == 0 and result.stderr == b"", result.stderr
    assert parse_dts(result.stdout.decode()) == decls


@needs_dtc
def test_dtc_compiled_board_gives_the_same_devices(tmp_path):
    result = dtc(tmp_path, BOARD_DTS, "-O", "dtb")
    assert result.returncode == 0, result.stderr
    assert parse_dtb(result.stdout) == parse_dts(BOARD_DTS)
    assert where(parse_dtb(result.stdout)) == BOARD_DEVICES


VALUES_DTS = r"""/dts-v1/;
/ {
	a = <(0x100 + 2 * 3) (1 << 4) ((5 > 3) ? 7 : 9) (-1) 'a' '\n' (~0 >> 60) (7 / 2) (7 % 4)
		(1 && 0) (1 || 0) (!5) (3 ^ 5) (6 & 3) (6 | 1) (1 == 1) (2 != 2) (2 <= 3) (3 >= 4)
		(100 - 200) (1 ? 2 : 3 ? 4 : 5) (0 ? 2 : 0 ? 4 : 5) (1 + 2 * 3 - 4 / 2) (1 << 2 + 1)>;
	b = /bits/ 8 <1 2 0xff (-1)>;
	c = /bits/ 16 <0x1234 077>;
	d = /bits/ 64 <0x123456789abcdef0 (-2)>;
	e = [00 11 2233 aB];
	f = "esc\t\x41\101\"\\\q", "two";
	g;
	h = "a", <1>, [ff], /bits/ 16 <2>;
	i = <10U 0x10UL 010LL 0ULL>;
	n@1 { x = "y"; };
};
"""


@needs_dtc
def test_property_values_are_encoded_as_dtc_encodes_them(tmp_path):
    result = dtc(tmp_path, VALUES_DTS, "-O", "dtb")
    assert result.returncode == 0, result.stderr
    ours = decl_module._DtsParser(VALUES_DTS).parse()
    theirs = decl_module._fdt_tree(*decl_module._fdt_blocks(result.stdout))
    assert ours.props == theirs.props
    assert ours.children == theirs.children


# --------------------------------------------------------------------------------------------
# The static platform table
# --------------------------------------------------------------------------------------------


def test_the_platform_table_is_a_list_of_declarations():
    table = [
        DeviceInfo(
            base=0x10001000, size=0x200, irq=1, version=1, device_id=2, vendor_id=0x554D4551
        ),
        DeviceInfo(
            base=0x10002000, size=0x200, irq=2, version=2, device_id=4, vendor_id=0x554D4551
        ),
    ]
    decls = declarations_from_platform(table)
    assert where(decls) == [(0x10001000, 0x200, 1, None), (0x10002000, 0x200, 2, None)]
    assert decls[0].source.startswith("platform table entry 0")
    assert parse_dtb(build_dtb(decls)) == decls
