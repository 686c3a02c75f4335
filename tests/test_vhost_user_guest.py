"""A real Linux guest (QEMU microvm, TCG; the Debian kernel's own virtio drivers) on
``viowire vhost-user``: virtio-blk and virtio-rng served by one viowire process, two sockets.

Skipped, with the reason, where QEMU, the kernel or busybox is missing (scripts/install-test-tools
installs them). ``python tests/guest.py bench`` gives the figure against qemu-storage-daemon.
"""

from __future__ import annotations

import hashlib

import guest
import pytest

pytestmark = pytest.mark.skipif(guest.missing() is not None, reason=str(guest.missing()))

RELOAD_SCRIPT = """
rmmod virtio_blk
insmod /lib/modules/virtio_blk.ko
dd if=/dev/vda of=/tmp/again bs=1M count=1 iflag=direct 2>/dev/null
echo "MD5-AFTER-RELOAD $(md5sum /tmp/again | cut -d' ' -f1)"
"""
"""The driver unbound and bound again: QEMU stops the ring (GET_VRING_BASE) and starts it
afresh, the back-end resumes at the index it gave."""

RNG_SCRIPT = """
echo "RNG-CURRENT $(cat /sys/class/misc/hw_random/rng_current)"
echo "RNG-A $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
echo "RNG-B $(dd if=/dev/hwrng bs=64 count=1 2>/dev/null | md5sum | cut -d' ' -f1)"
"""


@pytest.mark.timeout(180)
async def test_linux_guest_uses_viowire_blk_and_rng(tmp_path):
    image = tmp_path / "disk.img"
    with open(image, "wb") as disk:
        disk.truncate(16 << 20)
    blk, rng = tmp_path / "blk.sock", tmp_path / "rng.sock"
    command = guest.viowire_vhost_user([(blk, f"blk,path={image}"), (rng, "rng")])
    async with guest.process(command, [blk, rng], tmp_path / "viowire.log"):
        run = await guest.run_guest(
            tmp_path,
            guest.BLK_SCRIPT + RELOAD_SCRIPT + RNG_SCRIPT,
            guest.vhost_user_blk("blk", blk) + guest.vhost_user_rng("rng", rng),
        )
    log = (tmp_path / "viowire.log").read_text()
    assert run.status == 0, f"guest:\n{run.output}\nviowire:\n{log}"
    written = run.value("MD5-WRITTEN")
    # O_DIRECT write, caches dropped, O_DIRECT read back: the same bytes
    assert run.value("MD5-READ") == written
    assert run.value("MD5-AFTER-RELOAD") == written
    # and the host sees them in the disk file (fsync'd by the guest: conv=fsync)
    with open(image, "rb") as disk:
        assert hashlib.md5(disk.read(1 << 20)).hexdigest() == written
    # the guest's hwrng is viowire's virtio-rng, and it gives fresh bytes each read
    assert run.value("RNG-CURRENT").startswith("virtio_rng")
    zeros = hashlib.md5(bytes(64)).hexdigest()
    assert zeros != run.value("RNG-A") != run.value("RNG-B")
    assert "front-end disconnected" in log  # the guest powered off; QEMU closed the sockets
    assert "Traceback" not in log
