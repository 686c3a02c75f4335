"""A user's own device type, as a plugin would ship it: a module outside viowire, found by
``--device echo_device:EchoDevice`` (with this directory on PYTHONPATH) or by an entry point.

``EchoDevice`` answers each request with its readable bytes after a prefix; ``EchoDriver`` is
its client driver. The other classes fail on purpose, for the bad-input tests.
"""

from __future__ import annotations

import struct

from viowire.client.drivers.base import VirtioDriver
from viowire.device import ConfigField, DescriptorChain, Device, GuestMemory, Option, SampleRequest

ECHO_ID = 0x7F01
_CONFIG = struct.Struct("<I")


class EchoDevice(Device):
    """Each request's readable bytes come back in its writable part, after a prefix."""

    device_id = ECHO_ID
    type_name = "echo"
    options = {
        "prefix": Option.string("", "bytes written before each answer"),
        "max_request": Option.size(4096, "readable bytes served per request at most"),
    }
    config_layout = (ConfigField("max_request", 0, 4, None),)
    driver = "echo_device:EchoDriver"
    sample_request = SampleRequest(readable=b"ping", writable=64, min_written=4)

    def __init__(self, prefix: str = "", max_request: int = 4096) -> None:
        super().__init__()
        self.prefix = prefix.encode()
        self.max_request = max_request

    def config_space(self) -> bytes:
        return _CONFIG.pack(self.max_request)

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        data = await chain.read(0, self.max_request)
        return await chain.write(self.prefix + data)


class EchoDriver(VirtioDriver):
    """``await echo.request(b"hi")``: the device's answer."""

    device_id = ECHO_ID

    async def setup(self) -> None:
        (self.vq,) = await self.dev.find_vqs(["requestq"])

    async def request(self, data: bytes, answer_size: int = 4096) -> bytes:
        allocator, memory = self.dev.allocator, self.dev.memory
        out, answer = allocator.alloc(len(data)), allocator.alloc(answer_size)
        try:
            await memory.write(out, data)
            used = await self.vq.submit([(out, len(data))], [(answer, answer_size)])
            return await memory.read(answer, used)
        finally:
            allocator.free(out)
            allocator.free(answer)


class BrokenDevice(Device):
    """Its constructor fails, as a device whose backing store is missing would."""

    device_id = 0x7F02

    def __init__(self) -> None:
        super().__init__()
        raise RuntimeError("the echo chamber is flooded")


class NotADevice:
    """A class that forgot to subclass Device."""

    device_id = 0x7F03
