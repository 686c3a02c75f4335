"""Client commands told where devices are (kernel syntax, DTS, DTB) and pointed at QEMU's devices
through qtest, as a user runs them."""

from __future__ import annotations

import asyncio

import pytest
from cli_run import serve, viowire
from qemu import needs_qemu, running_qemu

from viowire.declarations import parse_cmdline, parse_dtb


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with serve("--listen", f"unix://{tmp_path_factory.mktemp('decl')}/s.sock") as served:
        yield served


def probe(*args: str) -> str:
    result = viowire("probe", *args)
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_declared_windows_replace_the_platform_table(server):
    out = probe(
        server.url("unix"), "--device", "0x200@0x10002000:2", "--device", "0x200@0x10009000:9"
    )
    assert "0: 0x10002000 virtio-blk" in out
    assert "0x10001000" not in out and "0x10009000" not in out  # nothing there: skipped


def test_cmdline_and_device_tree_outputs_round_trip(server, tmp_path):
    url = server.url("unix")
    windows = parse_cmdline(probe(url, "--cmdline"))
    assert [(w.base, w.irq) for w in windows] == [
        (0x10001000 + i * 0x1000, 1 + i) for i in range(4)
    ]
    dtb = tmp_path / "platform.dtb"
    probe(url, "--dtb", str(dtb))
    assert [(d.base, d.size, d.irq) for d in parse_dtb(dtb.read_bytes())] == [
        (w.base, w.size, w.irq) for w in windows
    ]
    dts = tmp_path / "platform.dts"
    dts.write_text(probe(url, "--dts"))
    from_dts = probe(url, "--from-dts", str(dts), "--json")
    assert from_dts == probe(url, "--from-dtb", str(dtb), "--json") == probe(url, "--json")


def test_io_on_a_declared_window(server):
    result = viowire(
        "io", server.url("unix"), "--device", "0x200@0x10001000:1",
        "-c", "write -P 0x3c 0 8K", "-c", "read -P 0x3c 0 8K",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "read 8192/8192 bytes at offset 0" in result.stdout


def test_bad_declaration_is_one_clear_line(server):
    result = viowire("probe", server.url("unix"), "--device", "0x200@0x10001000")
    assert result.returncode == 1 and "Traceback" not in result.stderr
    assert "<irq>" in result.stderr or "irq" in result.stderr


@needs_qemu
@pytest.mark.parametrize("legacy", [True, False], ids=["legacy", "modern"])
async def test_probe_and_io_against_qemu(tmp_path, legacy):
    async with running_qemu(tmp_path, legacy=legacy) as machine:
        loop = asyncio.get_running_loop()
        listing = await loop.run_in_executor(None, probe, machine.url)
        assert "virtio-blk" in listing and "virtio-rng" in listing
        assert "VendorID 0x554d4551" in listing and f"Version {machine.version}" in listing
        blk = "0x200@0xfeb00e00:23"
        result = await loop.run_in_executor(
            None,
            lambda: viowire(
                "io", machine.url, "--device", blk, "-c", "write -P 0x77 4K 4K", "-c", "flush"
            ),
        )
        assert result.returncode == 0, result.stderr
        assert machine.image.read_bytes()[4096:8192] == b"\x77" * 4096


def test_serve_writes_its_platform_as_a_device_tree(tmp_path):
    dts, dtb = tmp_path / "board.dts", tmp_path / "board.dtb"
    with serve(
        "--listen", f"unix://{tmp_path}/s.sock", "--device", "blk,size=1M", "--device", "rng",
        "--write-dts", str(dts), "--write-dtb", str(dtb),
    ) as served:  # fmt: skip
        from_tree = probe(served.url("unix"), "--from-dtb", str(dtb), "--json")
        assert from_tree == probe(served.url("unix"), "--from-dts", str(dts), "--json")
        assert from_tree == probe(served.url("unix"), "--json")
    assert [(d.base, d.irq) for d in parse_dtb(dtb.read_bytes())] == [
        (0x10001000, 1),
        (0x10002000, 2),
    ]
