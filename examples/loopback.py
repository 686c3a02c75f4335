"""A loopback device, written with viowire's device API: docs/devices.md builds it step by step.

What the driver sends on the transmit queue comes back on the receive queue, as a virtio-console
port wired to itself would do. The receive queue's buffers wait in the device until a message
needs one; a message waits for a buffer as long as the driver posts none.
"""

import asyncio
import struct

from viowire.device import (
    ConfigField,
    DescriptorChain,
    Device,
    GuestMemory,
    Option,
    Queue,
    SampleRequest,
)

RECEIVEQ, TRANSMITQ = 0, 1


class Loopback(Device):
    device_id = 0x7F10  # not a type the virtio spec assigns: free for our own
    type_name = "loopback"
    num_queues = 2
    options = {
        "latency": Option.duration(0.0, "delay before each message comes back (10ms, 1s)"),
        "mtu": Option.size(4096, "the longest message; longer ones are cut"),
    }
    config_layout = (ConfigField("mtu", 0, 4, None),)
    # what viowire conform sends to test it: a message, which needs a receive buffer
    sample_request = SampleRequest(TRANSMITQ, readable=b"ping", receive_queue=RECEIVEQ)

    def __init__(self, latency: float = 0.0, mtu: int = 4096) -> None:
        super().__init__()
        self.latency, self.mtu = latency, mtu

    def config_space(self) -> bytes:
        return struct.pack("<I", self.mtu)

    def queue_notify(self, queue: Queue) -> None:
        if queue.index == TRANSMITQ:
            queue.serve()  # each transmitted chain goes to handle()
        # RECEIVEQ: its buffers stay in the ring until handle() takes one

    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        message = await chain.read(0, self.mtu)
        if self.latency:
            await asyncio.sleep(self.latency)  # other messages go on meanwhile
        receiveq = self.queue(RECEIVEQ)
        buffer = await receiveq.get()  # waits for the driver to post one
        receiveq.complete(buffer, await buffer.write(message))
        return 0  # nothing written into the transmitted chain
