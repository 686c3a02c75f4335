"""A server of the command's own: ``viowire demo``, and ``probe``/``io``/``conform``/``load``
given ``--device TYPE``, serve their devices in-process on a Unix socket nobody else can reach."""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import AsyncIterator

from viowire.server.app import Server
from viowire.server.platform import PlatformSpec


@contextlib.asynccontextmanager
async def private_server(spec: PlatformSpec) -> AsyncIterator[str]:
    """Serve ``spec`` in this event loop while the block runs; yields the server's URL.

    The socket lives in a new 0700 directory, removed with it afterwards. A description that
    cannot be built (a device whose constructor fails) raises PlatformError before anything
    listens.
    """
    with tempfile.TemporaryDirectory(prefix="viowire-") as tmp:
        url = f"unix://{os.path.join(tmp, 'viowire.sock')}"
        async with Server(spec) as server:
            await server.start([url])
            yield url
