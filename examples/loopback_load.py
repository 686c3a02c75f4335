"""A load test of examples/loopback.py, with a workload function of our own::

    viowire load --device examples.loopback:Loopback,count=4 \\
        --workload examples.loopback_load:workload --duration 5

viowire load brings every loopback up with a GenericDriver, keeps buffers posted on its receive
queue (Loopback's sample_request names it), and calls ``workload`` once per operation, timing
each call; an ``assert`` that fails counts as a verify failure.
"""

import random
import zlib
from contextlib import aclosing

from examples.loopback import RECEIVEQ, TRANSMITQ, Loopback
from viowire.client.drivers.generic import GenericDriver


async def workload(driver: GenericDriver, rng: random.Random) -> int:
    """A message out on the transmit queue, one back from the receive queue: the bytes moved."""
    payload = rng.randbytes(rng.randrange(1, 1024))
    message = zlib.crc32(payload).to_bytes(4, "little") + payload
    await driver.request(TRANSMITQ, out=message)
    async with aclosing(driver.receive(RECEIVEQ)) as received:
        back = await anext(received)
    # with --depth above 1 another call's message may come back first: each carries its CRC
    assert zlib.crc32(back[4:]).to_bytes(4, "little") == back[:4], f"damaged: {back[:16]!r}"
    return len(message) + len(back)


workload.device_type = Loopback  # the devices it drives (default: every device there is)
