"""``viowire serve`` as a benchmark child process, with one extra device type: ``tsrng``.

``tsrng`` is virtio-rng (same DeviceID, same driver) whose every buffer starts with the
``time.monotonic_ns()`` of the moment the device finished it, just before the transport marks it
used; the client subtracts that from the moment its awaiting task runs again: the interrupt
latency (used element published, IRQ frame, InterruptStatus read, ACK, used ring read, future
resolved, task woken). CLOCK_MONOTONIC is one clock for every process of the host.

``python -m viowire.perf.server [viowire options] serve --listen URL --device tsrng ...``
"""

from __future__ import annotations

import struct
import sys
import time
from collections.abc import Sequence

from viowire import cli, registry
from viowire.server.devices.rng import RngBackend
from viowire.server.virtqueue import DescriptorChain, scatter, slice_segments
from viowire.virtio.memory import GuestMemory

_STAMP = struct.Struct("<Q")


class StampingRngBackend(RngBackend):
    """virtio-rng that writes the completion time (monotonic ns) at the start of each buffer."""

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        length = min(chain.writable_len, _STAMP.size)
        segments = slice_segments(chain.writable, 0, length)
        await memory.writev(scatter(segments, _STAMP.pack(time.monotonic_ns())[:length]))
        return length


def main(argv: Sequence[str] | None = None) -> int:
    registry.register("tsrng", StampingRngBackend)
    return cli.main(argv)


if __name__ == "__main__":
    sys.exit(main())
