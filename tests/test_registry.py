"""The registry of device types: built-ins, ``package.module:Class``, entry points of installed
packages, and what every command does with them, including the bad input a user gives.

The user's device is a real module (``tests/plugins/echo_device.py``), found through
``sys.path``/PYTHONPATH; the installed package is a real ``*.dist-info`` with an
``entry_points.txt`` on the path, as pip would leave it.
"""

from __future__ import annotations

import asyncio
import importlib
import json
import os
import re
from pathlib import Path

import pytest
from cli_run import serve, viowire

from viowire import cli, registry
from viowire.client.connection import DeviceInfo, connect
from viowire.device import DeviceOptionError, parse_options
from viowire.registry import DeviceTypeError
from viowire.server.devices import BlockBackend, RngBackend
from viowire.server.platform import DeviceSpec, PlatformError, PlatformSpec
from viowire.virtio.constants import DeviceId

ROOT = Path(__file__).resolve().parent.parent
PLUGINS = Path(__file__).resolve().parent / "plugins"
ECHO = "echo_device:EchoDevice"
TIMEOUT = 10.0
ENTRY_POINTS = """\
[viowire.devices]
echo = echo_device:EchoDevice
ghost = nosuch_plugin_module:Ghost
"""


@pytest.fixture
def echo(monkeypatch):
    """The plugin module, importable as a user's module is: from a directory on sys.path."""
    monkeypatch.syspath_prepend(str(PLUGINS))
    return importlib.import_module("echo_device")


def install_plugin(site: Path) -> Path:
    """What ``pip install`` of a package offering ``echo`` (and a broken ``ghost``) leaves."""
    info = site / "viowire_echo_plugin-1.0.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(
        "Metadata-Version: 2.1\nName: viowire-echo-plugin\nVersion: 1.0\n"
    )
    (info / "entry_points.txt").write_text(ENTRY_POINTS)
    return site


@pytest.fixture
def installed(tmp_path, monkeypatch, echo):
    site = install_plugin(tmp_path / "site")
    monkeypatch.syspath_prepend(str(site))
    return site


@pytest.fixture
def user_env(monkeypatch, tmp_path):
    """Subprocesses find the plugin module (and this tree's viowire) on PYTHONPATH."""
    site = install_plugin(tmp_path / "site")
    path = [str(site), str(PLUGINS), str(ROOT), os.environ.get("PYTHONPATH", "")]
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, path)))
    return os.environ.copy()


# -- lookups -------------------------------------------------------------------------------------


def test_builtin_types_by_name_reference_and_device_id():
    assert registry.names()[:2] == ["blk", "rng"]
    assert registry.lookup("blk") is BlockBackend
    assert registry.lookup("rng") is RngBackend
    assert registry.lookup("viowire.server.devices.rng:RngBackend") is RngBackend
    assert registry.by_device_id(DeviceId.BLOCK) is BlockBackend
    assert registry.by_device_id(DeviceId.ENTROPY) is RngBackend
    assert registry.by_device_id(0x7FFF) is None
    assert registry.driver_for(DeviceId.BLOCK).__name__ == "BlockDriver"


def test_a_class_named_directly(echo):
    assert registry.lookup(ECHO) is echo.EchoDevice
    # named once, a client finds it by its device ID: its config layout and its driver
    assert registry.by_device_id(echo.ECHO_ID) is echo.EchoDevice
    assert registry.driver_for(echo.ECHO_ID) is echo.EchoDriver


def test_an_installed_entry_point(installed, echo, caplog):
    assert {"echo", "ghost"} <= set(registry.names())
    assert registry.lookup("echo") is echo.EchoDevice
    with pytest.raises(DeviceTypeError, match=r"ghost \(entry point of viowire-echo-plugin\): no "):
        registry.lookup("ghost")
    # a broken plugin does not stop a client that reads the bus
    assert registry.by_device_id(0x7FFE) is None
    assert "skipping device type ghost" in caplog.text
    described = {name: found for name, _, found in registry.describe()}
    assert described["echo"] is echo.EchoDevice
    assert isinstance(described["ghost"], DeviceTypeError)


def test_register_keeps_names_taken(echo):
    registry.register("echo-test", echo.EchoDevice)
    registry.register("echo-test", echo.EchoDevice)  # the same again is fine
    assert registry.lookup("echo-test") is echo.EchoDevice
    with pytest.raises(DeviceTypeError, match="'blk' is taken already"):
        registry.register("blk", echo.EchoDevice)
    with pytest.raises(DeviceTypeError, match=r"not a subclass of viowire\.device\.Device"):
        registry.register("nodev", echo.NotADevice)


# -- options, through the one parser ------------------------------------------------------------


def test_user_options_are_parsed_by_the_class_declaration(echo):
    spec = DeviceSpec.parse(f"{ECHO},prefix=>,max_request=1K,version=1")
    assert (spec.kind, spec.version, spec.options) == (
        ECHO,
        1,
        {"prefix": ">", "max_request": 1024},
    )
    assert spec.arguments == parse_options(echo.EchoDevice, {"prefix": ">", "max_request": "1K"})
    device = PlatformSpec([spec]).build().slots[0].device.backend
    assert (device.prefix, device.max_request) == (b">", 1024)
    defaults = DeviceSpec.parse(ECHO).instantiate("test")
    assert (defaults.prefix, defaults.max_request) == (b"", 4096)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("nosuch.module:Cls", "device 'nosuch.module:Cls': no module named 'nosuch': give a known "
         "type (blk, rng"),
        ("echo_device:Nope", "module echo_device has no 'Nope' (it has echo_device:BrokenDevice, "
         "echo_device:EchoDevice)"),
        ("echo_device:NotADevice", "echo_device:NotADevice is not a subclass of "
         "viowire.device.Device"),
        ("echo", "unknown type 'echo': give one of blk, rng"),
        (f"{ECHO},colour=red", "unknown option 'colour' (known: prefix, max_request); every "
         "device also takes version=1|2"),
        (f"{ECHO},max_request=lots", "option max_request='lots': size 'lots' is not a number"),
        ("blk,readonly=maybe", "option readonly='maybe': 'maybe' is not on/off"),
    ],
)  # fmt: skip
def test_bad_specs_name_the_device_and_the_fix(echo, text, message):
    with pytest.raises(PlatformError, match=re.escape(message)):
        DeviceSpec.parse(text)


def test_a_constructor_that_raises_names_the_device_and_the_cause(echo):
    spec = PlatformSpec([DeviceSpec.parse("echo_device:BrokenDevice")])
    message = (
        "device echo_device:BrokenDevice at 0x10001000: BrokenDevice() raised RuntimeError: "
        "the echo chamber is flooded"
    )
    with pytest.raises(PlatformError, match=re.escape(message)):
        spec.validate()


def test_option_errors_are_the_devices_own(echo):
    with pytest.raises(DeviceOptionError, match="device echo: unknown option 'x'"):
        parse_options(echo.EchoDevice, {"x": 1})


# -- serving a user's device, driven by the real client -----------------------------------------


async def echo_request(url: str, data: bytes, which: int = 0) -> tuple[bytes, DeviceInfo]:
    """Bring echo device ``which`` up with its driver, send one chain, return the answer."""
    echo = importlib.import_module("echo_device")
    async with asyncio.timeout(TIMEOUT), await connect(url) as conn:
        info = [d for d in await conn.platform() if d.device_id == echo.ECHO_ID][which]
        driver = await echo.EchoDriver.attach(await conn.attach(info))
        try:
            return await driver.request(data), info
        finally:
            await driver.detach()


async def test_serve_a_class_named_on_the_command_line(tmp_path, user_env, echo):
    sock = f"unix://{tmp_path}/s.sock"
    with serve("--listen", sock, "--device", f"{ECHO},prefix=echo:", "--device", "rng") as served:
        assert served.lines[0] == f"device {ECHO} v2 at 0x10001000 irq 1"
        answer, info = await echo_request(served.url("unix"), b"hello")
        probed = viowire("probe", "--json", served.url("unix"), env=user_env)
    assert answer == b"echo:hello"
    assert info.base == 0x10001000
    devices = json.loads(probed.stdout)["devices"]
    assert devices[0]["device_id"] == echo.ECHO_ID
    assert devices[0]["config"] == {"max_request": 4096}  # decoded by the class's layout


async def test_serve_an_installed_type_by_name(tmp_path, user_env, echo):
    sock = f"unix://{tmp_path}/s.sock"
    with serve("--listen", sock, "--device", "echo,prefix=ep:") as served:
        answer, _ = await echo_request(served.url("unix"), b"ping")
    assert answer == b"ep:ping"


async def test_toml_names_a_class(tmp_path, user_env, echo):
    config = tmp_path / "platform.toml"
    config.write_text(
        f'[[device]]\ntype = "{ECHO}"\nprefix = "toml:"\nmax_request = "2K"\n'
        '[[device]]\ntype = "echo"\nversion = 1\n'
    )
    with serve("--config", str(config), "--listen", f"unix://{tmp_path}/s.sock") as served:
        answer, _ = await echo_request(served.url("unix"), b"x" * 3000)
        legacy, info = await echo_request(served.url("unix"), b"y", which=1)
    assert answer == b"toml:" + b"x" * 2048  # max_request=2K cut the request
    assert (legacy, info.version) == (b"y", 1)


def test_list_devices_shows_options_defaults_and_help(user_env):
    result = viowire("serve", "--list-devices", env=user_env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "blk  viowire.server.devices.blk:BlockBackend  (virtio-blk, DeviceID 2)" in out
    assert re.search(r"size=\s+disk size .*\(default none\)", out)
    assert re.search(r"readonly=\s+offer VIRTIO_BLK_F_RO.*\(default off\)", out)
    assert "echo  echo_device:EchoDevice (from viowire-echo-plugin)" in out
    assert re.search(
        r"max_request=\s+readable bytes served per request at most \(default 4K\)", out
    )
    assert "ghost  nosuch_plugin_module:Ghost" in out and "unusable: " in out
    assert "every device also takes version=1|2" in out


def test_probe_and_demo_on_a_private_server(user_env):
    result = viowire("probe", "--json", "--device", f"{ECHO},max_request=1K", env=user_env)
    assert result.returncode == 0, result.stderr
    (device,) = json.loads(result.stdout)["devices"]
    assert device["config"] == {"max_request": 1024}
    result = viowire("demo", "--device", ECHO, "--device", "rng", env=user_env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "I/O: none that the demo knows for this device type" in result.stdout  # EchoDriver
    assert "I/O: 32 bytes of entropy" in result.stdout


def test_io_and_load_on_a_private_server():
    result = viowire("io", "--device", "blk,size=1M", "-c", "write -P 0x5a 0 4K", "-c",
                     "read -P 0x5a 0 4K")  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "read 4096/4096 bytes at offset 0" in result.stdout
    result = viowire(
        "load", "--device", "blk,size=1M", "--device", "rng", "--sessions", "2",
        "--requests", "100", "--no-progress", "--json",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


def test_conform_on_a_private_server():
    result = viowire("conform", "--device", "rng", "--only", "status.*", "--json")
    assert result.returncode == 0, result.stderr
    results = json.loads(result.stdout)
    assert results and all(r["verdict"] == "PASS" for r in results)


# -- bad input: status 2 and one line, for every command -----------------------------------------

COMMANDS = {
    "serve": ["serve", "--listen", "unix:///nonexistent/never.sock"],
    "demo": ["demo"],
    "probe": ["probe"],
    "io": ["io", "-c", "flush"],
    "conform": ["conform"],
    "load": ["load", "--requests", "1"],
}
BAD = {
    "nosuch.module:Cls": "no module named 'nosuch': give a known type (blk, rng",
    "blk,size=1M,sise=2M": "unknown option 'sise' (known: size, path",
    "blk,size=lots": "option size='lots': size 'lots' is not a number with an optional K/M/G",
    "echo_device:BrokenDevice": "device echo_device:BrokenDevice at 0x10001000: BrokenDevice() "
    "raised RuntimeError: the echo chamber is flooded",
}


@pytest.mark.parametrize("spec", BAD)
@pytest.mark.parametrize("command", COMMANDS)
def test_bad_device_is_status_2_and_one_line(echo, capsys, command, spec):
    argv = [*COMMANDS[command], "--device", spec]
    assert cli.main(argv) == 2
    out, err = capsys.readouterr()
    assert err.startswith(f"viowire {command}: ")
    assert BAD[spec] in err
    assert err.count("\n") == 1, err
    assert "Traceback" not in err and not out


@pytest.mark.parametrize("spec", BAD)
def test_bad_device_from_a_shell(user_env, spec):
    """The same, as a user's shell sees it: a process, its status, its stderr."""
    result = viowire("probe", "--device", spec, env=user_env)
    assert result.returncode == 2
    assert result.stderr.startswith("viowire probe: ") and result.stderr.count("\n") == 1
    assert BAD[spec] in result.stderr


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["probe"], "give a server URL (tcp://HOST:PORT or unix:///PATH), or --device TYPE"),
        (["probe", "unix:///x.sock", "--device", "rng"], "drop the URL unix:///x.sock"),
        (["conform", "--device", "rng", "--device", "0"], "give device types only"),
        (["probe", "--device", "rng", "--from-dts", "x.dts"], "drop --from-dts/--from-dtb"),
        (["load", "--requests", "1"], "give a server URL"),
    ],
)
def test_mixed_up_targets_are_status_2(capsys, argv, message):
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
