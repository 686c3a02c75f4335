"""Fixtures: a real viowire server on real sockets (TCP on 127.0.0.1 and a Unix socket); and the
checks on the run as a whole (suite_guards: no unexpected skip in CI, nothing left behind)."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import suite_guards
from servers import running_server

from viowire.server.app import Server


def pytest_configure(config: pytest.Config) -> None:
    suite_guards.install(config, allowlist=Path(__file__).with_name("skip-allowlist.txt"))


@pytest.fixture
async def server(tmp_path) -> AsyncIterator[Server]:
    async with running_server(tmp_path) as srv:
        yield srv


@pytest.fixture(autouse=True)
def _quiet_logs(caplog):
    caplog.set_level(logging.WARNING, logger="viowire")
