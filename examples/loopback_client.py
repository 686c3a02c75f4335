"""Drive examples/loopback.py's device from Python with the generic driver: no transport code.

python examples/loopback_client.py unix:///tmp/loopback.sock
"""

import asyncio
import sys

from loopback import RECEIVEQ, TRANSMITQ, Loopback

from viowire.client.connection import connect
from viowire.client.drivers.generic import GenericDriver


async def main(url: str) -> None:
    async with await connect(url) as conn:
        info = next(d for d in await conn.platform() if d.device_id == Loopback.device_id)
        drv = await GenericDriver.attach(await conn.attach(info), device_type=Loopback)
        print("config:", await drv.config())
        await drv.post(RECEIVEQ, size=4096, count=8)  # the device holds them until it has data
        messages = [f"message {i}".encode() for i in range(3)]
        await asyncio.gather(*(drv.request(TRANSMITQ, out=m) for m in messages))
        received = drv.receive(RECEIVEQ)
        for _ in messages:
            print("received:", (await anext(received)).decode())
        await drv.detach()


asyncio.run(main(sys.argv[1] if len(sys.argv) > 1 else "unix:///tmp/loopback.sock"))
