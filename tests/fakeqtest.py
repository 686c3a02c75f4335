"""A small in-process qtest peer: guest RAM in a bytearray, every command logged.

Enough of QEMU's qtest protocol for the bus and memory tests to run without QEMU: the memory
commands, read/write of any width, ``endianness`` and ``irq_intercept_in``. A test can queue
extra lines to send before a reply (``IRQ raise N``), hold replies back, or hang up.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import shutil
import tempfile
from collections.abc import AsyncIterator, Callable


class FakeQtest:
    def __init__(self, ram_base: int = 0, ram_size: int = 1 << 20) -> None:
        self.ram_base = ram_base
        self.ram = bytearray(ram_size)
        self.log: list[str] = []
        self.before_reply: dict[str, list[str]] = {}  # command word -> lines sent before its reply
        self.silent: set[str] = set()  # command words never answered
        self.delay = 0.0  # seconds before each reply
        self.endianness = "little"
        self.hook: Callable[[str], str | None] | None = None  # may answer a command itself
        self.writers: list[asyncio.StreamWriter] = []

    def _span(self, addr: str, size: int) -> slice:
        start = int(addr, 0) - self.ram_base
        assert start >= 0 and start + size <= len(self.ram), f"fake RAM has no {addr}+{size}"
        return slice(start, start + size)

    def answer(self, line: str) -> str:
        words = line.split()
        op = words[0]
        if self.hook is not None and (reply := self.hook(line)) is not None:
            return reply
        widths = {"b": 1, "w": 2, "l": 4, "q": 8}
        if op[:-1] == "read" and op[-1] in widths:
            width = widths[op[-1]]
            return f"OK 0x{int.from_bytes(self.ram[self._span(words[1], width)], 'little'):016x}"
        if op[:-1] == "write" and op[-1] in widths:
            width = widths[op[-1]]
            self.ram[self._span(words[1], width)] = int(words[2], 0).to_bytes(width, "little")
            return "OK"
        if op == "b64read":
            return (
                "OK " + base64.b64encode(self.ram[self._span(words[1], int(words[2], 0))]).decode()
            )
        if op == "b64write":
            data = base64.b64decode(words[3])
            assert len(data) == int(words[2], 0)
            self.ram[self._span(words[1], len(data))] = data
            return "OK"
        if op == "memset":
            size = int(words[2], 0)
            self.ram[self._span(words[1], size)] = bytes([int(words[3], 0)]) * size
            return "OK"
        if op == "endianness":
            return f"OK {self.endianness}"
        if op == "irq_intercept_in":
            return "OK"
        return f"FAIL Unknown command '{op}'"

    async def serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError):
            while line := await reader.readline():
                text = line.decode("ascii").rstrip("\n")
                self.log.append(text)
                op = text.split()[0]
                if op in self.silent:
                    continue
                if self.delay:
                    await asyncio.sleep(self.delay)
                extra = self.before_reply.get(op, [])
                writer.write("".join(f"{x}\n" for x in [*extra, self.answer(text)]).encode())
                await writer.drain()

    def hang_up(self) -> None:
        for writer in self.writers:
            writer.close()


@contextlib.asynccontextmanager
async def fake_qtest(fake: FakeQtest) -> AsyncIterator[str]:
    """Serve ``fake`` on a Unix socket; yields its ``qtest+unix://`` URL."""
    sock_dir = tempfile.mkdtemp(prefix="vw-fakeqt-")
    path = os.path.join(sock_dir, "qtest.sock")
    server = await asyncio.start_unix_server(fake.serve, path, limit=1 << 20)
    try:
        yield f"qtest+unix://{path}"
    finally:
        fake.hang_up()
        server.close()
        await server.wait_closed()
        shutil.rmtree(sock_dir, ignore_errors=True)
