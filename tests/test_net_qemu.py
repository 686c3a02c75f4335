"""viowire conform's virtio-net checks against QEMU's virtio-net-device, the reference: two of
them on one QEMU hub (``-netdev hubport``, which has no host side: no frame leaves QEMU), driven
over qtest. What QEMU does differently from the spec is recorded in docs/qemu-differences.md
(D15) and asserted here."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import tempfile
import time

from cli_run import end_group, viowire
from qemu import QEMU, STARTUP_TIMEOUT, needs_qemu

pytestmark = needs_qemu

NET_CHECKS = ("net.header-size", "net.mrg-rxbuf", "net.ctrl-commands")


def qemu_with_two_nics(socket_path: str, *, legacy: bool) -> list[str]:
    command = [
        QEMU or "qemu-system-x86_64",
        "-M", "microvm,ioapic2=off",
        "-qtest", f"unix:{socket_path},server=on,wait=off",
        "-qtest-log", "/dev/null",
        "-display", "none",
        "-nodefaults",
        "-m", "64M",
        "-netdev", "hubport,id=n0,hubid=0",
        "-netdev", "hubport,id=n1,hubid=0",
        "-device", "virtio-net-device,netdev=n0",
        "-device", "virtio-net-device,netdev=n1",
    ]  # fmt: skip
    if not legacy:
        command += ["-global", "virtio-mmio.force-legacy=false"]
    return command


def conform_on_qemu(legacy: bool) -> dict[tuple[str, str], dict[str, str]]:
    sock_dir = tempfile.mkdtemp(prefix="vw-qnet-")
    socket_path = os.path.join(sock_dir, "qtest.sock")
    proc = subprocess.Popen(
        qemu_with_two_nics(socket_path, legacy=legacy),
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not os.path.exists(socket_path):
            assert proc.poll() is None, proc.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "QEMU did not create its qtest socket"
            time.sleep(0.01)
        result = viowire("conform", f"qtest+unix://{socket_path}", "--only", "net.*", "--json")
    finally:
        end_group(proc)
        proc.stderr.close()
        shutil.rmtree(sock_dir, ignore_errors=True)
    return {(row["device"], row["id"]): row for row in json.loads(result.stdout)}


def test_legacy_qemu_passes_every_net_check():
    rows = conform_on_qemu(legacy=True)
    assert len(rows) == 2 * len(NET_CHECKS)
    assert {row["verdict"] for row in rows.values()} == {"PASS"}, rows


def test_modern_qemu_leaves_num_buffers_unset_without_mrg_rxbuf():
    """D15: §5.1.6.4 says num_buffers MUST be 1 without MRG_RXBUF; QEMU writes only the first
    10 bytes of the 12-byte header (our buffers' poison, 0xeeee, stays)."""
    rows = conform_on_qemu(legacy=False)
    verdicts = {key: row["verdict"] for key, row in rows.items()}
    for (_, check), verdict in verdicts.items():
        assert verdict == ("FAIL" if check == "net.header-size" else "PASS"), rows
    details = {row["detail"] for key, row in rows.items() if key[1] == "net.header-size"}
    assert details == {"num_buffers 61166, not 1 (5.1.6.4)"}
