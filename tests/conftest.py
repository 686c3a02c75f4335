"""Fixtures: a real viowire server on real sockets (TCP on 127.0.0.1 and a Unix socket)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

import pytest
from servers import running_server

from viowire.server.app import Server


@pytest.fixture
async def server(tmp_path) -> AsyncIterator[Server]:
    async with running_server(tmp_path) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING, logger="viowire")
