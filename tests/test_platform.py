"""Platform descriptions (``--device`` specs, TOML), their layout and address decoding, and the
size and endpoint spellings the command line accepts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from viowire.server.platform import (
    DEFAULT_BASE,
    DEFAULT_STRIDE,
    DeviceSpec,
    Platform,
    PlatformError,
    PlatformSpec,
)
from viowire.units import format_size, parse_size
from viowire.urls import Endpoint, parse_endpoint
from viowire.virtio.constants import DEFAULT_WINDOW_SIZE

README = Path(__file__).resolve().parent.parent / "README.md"


# -- DeviceSpec.parse ------------------------------------------------------------------------


def test_parse_ram_disk():
    spec = DeviceSpec.parse("blk,size=64M")
    assert (spec.kind, spec.version, spec.options) == ("blk", 2, {"size": 64 << 20})
    assert spec.base is None and spec.irq is None


def test_parse_file_disk():
    spec = DeviceSpec.parse("blk,path=disk.img")
    assert (spec.kind, spec.version, spec.options) == ("blk", 2, {"path": "disk.img"})


def test_parse_legacy_version():
    spec = DeviceSpec.parse("blk,size=1M,version=1")
    assert spec.version == 1 and spec.options == {"size": 1 << 20}
    assert DeviceSpec.parse("blk, version = 1 , size=4K").version == 1  # spaces are fine


def test_parse_rng():
    spec = DeviceSpec.parse("rng")
    assert (spec.kind, spec.version, spec.options) == ("rng", 2, {})


def test_parse_explicit_base_and_irq():
    spec = DeviceSpec.parse("rng,base=0x20000000,irq=7")
    assert (spec.base, spec.irq) == (0x2000_0000, 7)


def test_parse_readonly_flag():
    assert DeviceSpec.parse("blk,path=x.img,readonly=on").options["readonly"] is True
    assert DeviceSpec.parse("blk,path=x.img,readonly=no").options["readonly"] is False


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("bogus", "unknown type 'bogus': give one of blk, rng"),
        ("", "unknown type ''"),
        ("blk,size=1M,version=3", "version '3' must be 1 (legacy) or 2"),
        ("blk,size=1M,version=x", "version 'x' must be 1 (legacy) or 2"),
        ("blk,size", "expected key=value, got 'size'"),
        ("blk,=1M", "expected key=value, got '=1M'"),
        ("blk,size=abc", "size 'abc' is not a number"),
        ("blk,size=64Q", "unknown suffix 'Q'"),
        ("blk,size=-1", "size '-1' is negative"),
        ("blk,size=1M,colour=red", "unknown option 'colour' (known: size, path, readonly"),
        ("rng,size=1M", "unknown option 'size' (known: "),
        ("rng,irq=-1", "irq '-1' is not a non-negative number"),
        ("rng,base=nowhere", "base 'nowhere' is not a non-negative number"),
    ],
)
def test_parse_errors_name_the_spec_and_the_problem(text, message):
    with pytest.raises(PlatformError, match=re.escape(message)) as info:
        DeviceSpec.parse(text)
    assert repr(text) in str(info.value)
    assert isinstance(info.value, ValueError)  # the CLI prints ValueErrors without a traceback


# -- PlatformSpec.from_toml ------------------------------------------------------------------


def readme_toml() -> str:
    return re.search(r"```toml\n(.*?)```", README.read_text(), re.S).group(1)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "platform.toml"
    path.write_text(text)
    return path


def test_readme_toml_example(tmp_path):
    spec = PlatformSpec.from_toml(write(tmp_path, readme_toml()))
    assert (spec.base, spec.stride, spec.window, spec.first_irq) == (0x10001000, 0x1000, 0x200, 1)
    assert [(d.kind, d.version, d.options) for d in spec.devices] == [
        ("blk", 1, {"size": 64 << 20}),
        # found beside the config file, and made at its size if it is not there
        ("blk", 2, {"path": str(tmp_path / "disk.img"), "size": 64 << 20}),
        ("rng", 2, {}),
    ]
    assert [(base, irq) for base, irq, _ in spec.layout()] == [
        (0x10001000, 1),
        (0x10002000, 2),
        (0x10003000, 3),
    ]


def test_toml_defaults_and_explicit_zero(tmp_path):
    spec = PlatformSpec.from_toml(write(tmp_path, '[[device]]\ntype = "rng"\n'))
    assert (spec.base, spec.stride, spec.window) == (DEFAULT_BASE, DEFAULT_STRIDE, 0x200)
    spec = PlatformSpec.from_toml(write(tmp_path, '[platform]\nbase = 0\n[[device]]\ntype="rng"\n'))
    assert spec.base == 0  # an explicit 0 is not "unset"


def test_toml_strings_for_numbers(tmp_path):
    text = '[platform]\nbase = "0x40000000"\nstride = "4K"\n[[device]]\ntype = "rng"\nirq = 9\n'
    spec = PlatformSpec.from_toml(write(tmp_path, text))
    assert (spec.base, spec.stride) == (0x4000_0000, 0x1000)
    assert spec.layout()[0][1] == 9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[platform\n", "config"),  # TOML syntax error
        ("[[device]]\nsize = 1\n", '[[device]] #0 needs a type: type = "NAME" (blk, rng'),
        ("[[device]]\ntype = 5\n", "[[device]] #0: type = 5 is not a string"),
        ('[[device]]\ntype = "tape"\n', "[[device]] #0: unknown type 'tape'"),
        ('[[device]]\ntype = "blk"\nsize = "big"\n', "size 'big' is not a number"),
        ('[[device]]\ntype = "blk"\nsize = 1.5\n', "size 1.5 is not a number"),
        ('[[device]]\ntype = "blk"\nversion = 9\nsize = 1\n', "version '9' must be 1"),
        ('[[devices]]\ntype = "rng"\n', "unknown table 'devices'"),
        ('[platform]\nbse = 1\n[[device]]\ntype = "rng"\n', "unknown key 'bse'"),
        ('[platform]\nbase = "high"\n', "[platform]: base 'high' is not a non-negative"),
        ('device = "rng"\n', "[[device]] tables"),
    ],
)
def test_toml_errors(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(PlatformError, match=re.escape(message)) as info:
        PlatformSpec.from_toml(path)
    assert str(path) in str(info.value)


def test_toml_missing_file(tmp_path):
    with pytest.raises(PlatformError, match=re.escape("nothere.toml")):
        PlatformSpec.from_toml(tmp_path / "nothere.toml")


# -- layout ----------------------------------------------------------------------------------


def test_default_layout_is_the_readme_one():
    layout = PlatformSpec.default().layout()
    assert [(base, irq, d.kind, d.version) for base, irq, d in layout] == [
        (0x10001000, 1, "blk", 1),
        (0x10002000, 2, "blk", 2),
        (0x10003000, 3, "rng", 1),
        (0x10004000, 4, "rng", 2),
    ]


def test_layout_explicit_base_and_irq_win():
    spec = PlatformSpec(
        [
            DeviceSpec.parse("rng"),
            DeviceSpec.parse("rng,base=0x20000000,irq=33"),
            DeviceSpec.parse("rng"),
        ]
    )
    assert [(base, irq) for base, irq, _ in spec.layout()] == [
        (0x10001000, 1),
        (0x20000000, 33),
        (0x10003000, 3),  # the others keep their slot, as if the explicit one were not there
    ]


def test_layout_overlap_is_detected():
    spec = PlatformSpec([DeviceSpec.parse("rng"), DeviceSpec.parse("rng,base=0x10001100")])
    with pytest.raises(PlatformError, match="at 0x10001100 overlaps the window at 0x10001000"):
        spec.layout()


def test_layout_same_base_twice_is_an_overlap():
    spec = PlatformSpec([DeviceSpec.parse("rng"), DeviceSpec.parse("blk,size=1M,base=0x10001000")])
    with pytest.raises(PlatformError, match="overlaps"):
        spec.layout()


def test_layout_stride_smaller_than_window_overlaps():
    spec = PlatformSpec([DeviceSpec.parse("rng"), DeviceSpec.parse("rng")], stride=0x100)
    with pytest.raises(PlatformError, match="overlaps"):
        spec.layout()


def test_layout_windows_that_touch_do_not_overlap():
    spec = PlatformSpec([DeviceSpec.parse("rng"), DeviceSpec.parse("rng")], stride=0x200)
    assert [base for base, _, _ in spec.layout()] == [0x10001000, 0x10001200]


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (PlatformSpec([DeviceSpec.parse("rng,base=0xffffffffffffff00")]), "below 2\\*\\*64"),
        (PlatformSpec([DeviceSpec.parse("rng,irq=0x100000000")]), "32 bits"),
        (PlatformSpec([DeviceSpec.parse("rng")], window=0x80), "smaller than the 0x100 bytes"),
    ],
)
def test_layout_rejects_what_the_wire_cannot_carry(spec, message):
    with pytest.raises(PlatformError, match=message):
        spec.layout()


def test_build_file_disk_that_does_not_exist(tmp_path):
    missing = tmp_path / "missing.img"
    with pytest.raises(PlatformError, match="does not exist \\(give size= to create it\\)"):
        PlatformSpec([DeviceSpec.parse(f"blk,path={missing}")]).validate()
    assert not missing.exists()
    PlatformSpec([DeviceSpec.parse(f"blk,path={missing},size=1M")]).validate()
    assert missing.stat().st_size == 1 << 20


# -- Platform.lookup -------------------------------------------------------------------------


@pytest.fixture
def platform():
    built = PlatformSpec(
        [DeviceSpec.parse("rng"), DeviceSpec.parse("rng"), DeviceSpec.parse("rng,base=0x10010000")]
    ).build()
    yield built
    built.close_nowait()


def test_lookup_window_edges(platform):
    first, second, far = platform.slots
    assert platform.lookup(0x10001000) == (first, 0)
    assert platform.lookup(0x10001000 + DEFAULT_WINDOW_SIZE - 1) == (first, DEFAULT_WINDOW_SIZE - 1)
    assert platform.lookup(0x10002000 + 0x70) == (second, 0x70)
    assert platform.lookup(0x10010000 + 0x1FF) == (far, 0x1FF)


@pytest.mark.parametrize(
    "addr",
    [
        0,
        0x10001000 - 1,  # just below the first window
        0x10001000 + DEFAULT_WINDOW_SIZE,  # just past it: the gap up to the next stride
        0x10001FFF,
        0x10002200,
        0x10010200,  # past the last window
        (1 << 64) - 1,
    ],
)
def test_lookup_gaps_are_bus_errors(platform, addr):
    assert platform.lookup(addr) is None


def test_lookup_empty_platform():
    assert Platform([]).lookup(0x10001000) is None


# -- sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("0", 0),
        ("512", 512),
        ("4K", 4096),
        ("4k", 4096),
        ("64M", 64 << 20),
        ("1G", 1 << 30),
        ("2T", 2 << 40),
        (" 8M ", 8 << 20),
        ("0x200", 0x200),
        ("0X10001000", 0x10001000),
        ("0xab", 0xAB),  # b is a hex digit, not a suffix
        ("0x1E", 0x1E),  # so is E, as the kernel's memparse reads it
        ("0x1K", 1024),
        ("0x10M", 16 << 20),
        (4096, 4096),
    ],
)
def test_parse_size(text, value):
    assert parse_size(text) == value


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "is not a number"),
        ("abc", "'abc' is not a number"),
        ("64MB", "is not a number"),
        ("1.5G", "is not a number"),
        ("0x", "is not a number"),
        ("0xZZ", "is not a number"),
        ("12Q", "unknown suffix 'Q' (use K, M, G, T, P or E)"),
        ("-4K", "is negative"),
        (-1, "is negative"),
        (1.5, "is not a number"),
        (True, "is not a number"),
        (None, "is not a number"),
    ],
)
def test_parse_size_errors(text, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        parse_size(text)


@pytest.mark.parametrize(
    ("value", "text"),
    [(0, "0"), (512, "512"), (1024, "1K"), (1536, "1536"), (64 << 20, "64M"), (3 << 30, "3G")],
)
def test_format_size(value, text):
    assert format_size(value) == text


@given(st.integers(min_value=0, max_value=1 << 50))
def test_format_size_round_trips(value):
    assert parse_size(format_size(value)) == value


# -- endpoints -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("tcp://127.0.0.1:7000", Endpoint("tcp", host="127.0.0.1", port=7000)),
        ("tcp://0.0.0.0:0", Endpoint("tcp", host="0.0.0.0", port=0)),
        ("tcp://localhost:65535", Endpoint("tcp", host="localhost", port=65535)),
        ("tcp://[::1]:7000", Endpoint("tcp", host="::1", port=7000)),
        ("unix:///tmp/viowire.sock", Endpoint("unix", path="/tmp/viowire.sock")),
        ("unix:/run/v.sock", Endpoint("unix", path="/run/v.sock")),
    ],
)
def test_parse_endpoint(url, endpoint):
    assert parse_endpoint(url) == endpoint


@pytest.mark.parametrize(
    "url", ["tcp://127.0.0.1:7000", "tcp://[::1]:7000", "tcp://[fe80::1]:9", "unix:///tmp/v.sock"]
)
def test_endpoint_str_round_trips(url):
    assert str(parse_endpoint(url)) == url
    assert parse_endpoint(str(parse_endpoint(url))) == parse_endpoint(url)


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("127.0.0.1:7000", "use tcp://HOST:PORT or unix:///PATH"),
        ("/tmp/viowire.sock", "use tcp://HOST:PORT or unix:///PATH"),
        ("http://example.com:80", "use tcp://HOST:PORT or unix:///PATH"),
        ("tcp://127.0.0.1", "a TCP URL needs a host and a port"),
        ("tcp://:7000", "a TCP URL needs a host and a port"),
        ("tcp://127.0.0.1:http", "a TCP URL needs a host and a port"),
        ("tcp://127.0.0.1:70000", "a TCP URL needs a host and a port"),
        ("tcp://[::1]", "a TCP URL needs a host and a port"),
        ("tcp://[::1:7000", "e.g. tcp://[::1]:7000"),
        ("unix://", "a Unix socket URL needs a path"),
    ],
)
def test_parse_endpoint_errors(url, message):
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        parse_endpoint(url)
    assert repr(url) in str(info.value)


def test_count_repeats_a_device_in_consecutive_slots():
    spec = PlatformSpec([DeviceSpec.parse("rng,count=3"), DeviceSpec.parse("blk,size=1M")])
    assert [(base, irq, d.kind) for base, irq, d in spec.layout()] == [
        (0x10001000, 1, "rng"), (0x10002000, 2, "rng"), (0x10003000, 3, "rng"),
        (0x10004000, 4, "blk"),
    ]  # fmt: skip
    assert len(spec.build().slots) == 4


@pytest.mark.parametrize(
    ("text", "message"),
    [("rng,count=0", "at least 1"), ("rng,count=2,base=0x1000", "drop base")],
)
def test_count_errors(text, message):
    with pytest.raises(PlatformError, match=message):
        DeviceSpec.parse(text)
