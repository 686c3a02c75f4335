"""``viowire demo`` with console devices: a line to port 0 and the host side's answer."""

from __future__ import annotations

import asyncio

from viowire.demo import demo
from viowire.server.platform import DeviceSpec, PlatformSpec

TIMEOUT = 20.0


def spec(*texts: str) -> PlatformSpec:
    return PlatformSpec([DeviceSpec.parse(text) for text in texts])


async def test_demo_echoes_a_line_through_the_default_console(capsys):
    async with asyncio.timeout(TIMEOUT):
        assert await demo(spec("console", "console,version=1", "console,ports=a:echo")) == 0
    out = capsys.readouterr().out
    assert out.count("-- I/O: port 0") == 3
    assert out.count("answered b'hello, console\\r\\n'") == 3
    assert out.count(", the echo verified") == 3
    assert "MULTIPORT, " in out  # ports= gives MULTIPORT
    assert "demo: every device went through probe, I/O and teardown" in out


async def test_demo_takes_a_host_side_that_answers_nothing(capsys):
    async with asyncio.timeout(TIMEOUT):
        assert await demo(spec("console,backend=exec:/bin/true")) == 0
    out = capsys.readouterr().out
    assert "the host side answered nothing" in out and "echo verified" not in out
