"""A real viowire server on real sockets (TCP on 127.0.0.1 and a Unix socket), for tests."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator

from viowire.server.app import Server
from viowire.server.platform import DeviceSpec, PlatformSpec


def small_platform() -> PlatformSpec:
    """The default device set, with small disks so every session stays cheap."""
    return PlatformSpec(
        [
            DeviceSpec.parse("blk,size=4M,version=1"),
            DeviceSpec.parse("blk,size=4M"),
            DeviceSpec.parse("rng,version=1"),
            DeviceSpec.parse("rng"),
        ]
    )


@contextlib.asynccontextmanager
async def running_server(tmp_path, spec: PlatformSpec | None = None) -> AsyncIterator[Server]:
    server = Server(spec or small_platform())
    await server.start(["tcp://127.0.0.1:0", f"unix://{tmp_path}/viowire.sock"])
    try:
        yield server
    finally:
        await server.close()


def url_of(server: Server, scheme: str) -> str:
    return next(str(e) for e in server.endpoints if e.scheme == scheme)
