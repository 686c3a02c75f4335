"""virtio-rng (entropy source, §5.4): one requestq of device-writable buffers, filled at random.

``latency=`` delays every request's completion (as blk's does), for load tests of a slow entropy
source: the requests wait at once, each completing that long after it arrives.
"""

from __future__ import annotations

import asyncio
import os

from viowire.device import Device, Option, SampleRequest
from viowire.server.virtqueue import ChainError, DescriptorChain, scatter, slice_segments
from viowire.units import parse_duration
from viowire.virtio.constants import DeviceId
from viowire.virtio.memory import GuestMemory

MAX_FILL = 64 * 1024
"""Bytes produced per request at most: used.len may under-report (§2.7.8), and a chain of huge
buffers must not stall the server. Linux asks for far less."""


class RngBackend(Device):
    """Entropy from ``os.urandom``; no features, no config space."""

    device_id = DeviceId.ENTROPY
    type_name = "rng"
    handle_inline = True  # no current task needed before its first await
    num_queues = 1
    driver = "viowire.client.drivers.rng:EntropyDriver"
    sample_request = SampleRequest(writable=64, min_written=1)  # §5.4.6.2: one byte or more
    options = {
        "latency": Option.duration(0.0, "complete every request this long after it arrives"),
    }

    def __init__(self, latency: float | str = 0.0) -> None:
        """``latency``: seconds (or a duration such as ``10ms``) by which every request's
        completion is delayed; 0 serves requests inline."""
        super().__init__()
        self.latency = parse_duration(latency)

    def device_features(self, version: int) -> int:
        return 0

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        if chain.readable:
            raise ChainError("virtio-rng: device-readable buffer in the requestq")
        if self.latency:
            await asyncio.sleep(self.latency)
        length = min(chain.writable_len, MAX_FILL)
        segments = slice_segments(chain.writable, 0, length)
        await memory.writev(scatter(segments, os.urandom(length)))
        return length
