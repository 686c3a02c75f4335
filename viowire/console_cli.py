"""``viowire console``: a terminal on a virtio-console port, from the guest's end.

The command is the driver (:class:`~viowire.client.drivers.console.ConsoleDriver`), as a shell on
a guest's /dev/hvc0 would be: it shows what the port's host side (the device's backend: a
program, a pseudo-terminal, a socket, the echo) writes, and sends what you type. On a terminal,
stdin is in raw mode (every key goes through, Ctrl-C too) until the command ends, and **Ctrl-]**
ends it, as in telnet and ``virsh console``. When stdin is not a terminal the bytes go through
as they are, with no escape key: at the end of stdin the command keeps printing until the port
has been quiet for ``--linger`` seconds (or its host side closes), so a script can pipe into it::

    printf 'echo hi\\n' | viowire console --device console,backend=exec:sh
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import termios
import tty
from typing import TYPE_CHECKING

from viowire.options import DEVICE_TYPE, OWN_SERVER_HELP, UsageError, add_target_options

if TYPE_CHECKING:  # imported when the command runs: every `viowire` command builds its parser
    from viowire.client.drivers.console import ConsoleDriver, ConsolePort

ESCAPE = 0x1D  # Ctrl-]
ESCAPE_NAME = "^]"
READ_SIZE = 4096
SETUP_TIMEOUT = 10.0  # the device's probe and DRIVER_OK
PORT_SETTLE = 1.0  # a port that has not come this long after the last one never will


def add_parser(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "console",
        help="a terminal on a virtio-console port (the guest's end; Ctrl-] ends it)",
        description=__doc__.split("\n\n")[0],
    )
    add_target_options(parser, url_optional=True)
    parser.add_argument(
        "--device",
        default=[],
        metavar=f"N|{DEVICE_TYPE}",
        help="index of the device in the platform (see viowire probe; default: the first "
        f"virtio-console){OWN_SERVER_HELP}",
    )
    parser.add_argument(
        "--port",
        default="0",
        metavar="N|NAME",
        help="the port, by number or by the name the device gives it (default: 0, the console)",
    )
    parser.add_argument(
        "--linger",
        type=float,
        default=0.5,
        metavar="SECONDS",
        help="when stdin is not a terminal: after its end, keep printing until the port is "
        "quiet this long (default 0.5)",
    )


async def run(args: argparse.Namespace) -> int:
    from viowire.client.drivers.console import ConsoleDriver
    from viowire.client.target import devices, open_target

    async with await open_target(args.url, memory=args.memory or "auto") as conn:
        platform = await devices(conn)
        info = _pick(platform, args.device, args.url)
        async with asyncio.timeout(SETUP_TIMEOUT):
            driver = await ConsoleDriver.attach(await conn.attach(info))
        try:
            port = await _find_port(driver, args.port)
            if not port.guest_connected:
                await port.open()
            return await Terminal(port, args.linger).run()
        finally:
            await driver.detach()


async def _find_port(driver: ConsoleDriver, text: str) -> ConsolePort:
    """The port numbered or named ``text``, once the device has added it: the wait ends when
    the device has added no port for PORT_SETTLE seconds (it has announced them all)."""
    key: int | str = int(text) if text.isdigit() else text
    seen = -1
    while len(driver.ports) != seen:
        seen = len(driver.ports)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(PORT_SETTLE):
                return await driver.port(key)
    known = ", ".join(f"{p.id} {p.name!r}" for p in driver.ports.values()) or "none"
    raise UsageError(f"--port {text}: the device has no such port (its ports: {known})")


def _pick(platform, device: str | list, url: str):
    from viowire.virtio.constants import DeviceId, device_name

    consoles = [i for i, d in enumerate(platform) if d.device_id == DeviceId.CONSOLE]
    if not device:
        if not consoles:
            raise UsageError(f"{url}: no virtio-console device (see viowire probe)")
        return platform[consoles[0]]
    try:
        index = int(str(device), 0)
    except ValueError:
        raise UsageError(f"--device {device!r}: give an index or {DEVICE_TYPE}") from None
    if not 0 <= index < len(platform):
        raise UsageError(f"--device {index}: the platform has devices 0..{len(platform) - 1}")
    info = platform[index]
    if info.device_id != DeviceId.CONSOLE:
        raise UsageError(f"device {index} is {device_name(info.device_id)}, not virtio-console")
    return info


class Terminal:
    """stdin to the port, the port to stdout, until the escape key, the end of the port, or
    the end of stdin and then a quiet ``linger``."""

    def __init__(self, port: ConsolePort, linger: float) -> None:
        self.port = port
        self.linger = linger
        self.interactive = os.isatty(0)
        self._input: asyncio.Queue[bytes] = asyncio.Queue(maxsize=4)
        self._paused = False  # stdin not watched: the queue is full

    async def run(self) -> int:
        saved = None
        if self.interactive:
            saved = termios.tcgetattr(0)
            tty.setraw(0, termios.TCSADRAIN)  # keys typed ahead go through too
            sys.stderr.write(f"Connected to {self.port}. Escape character is '{ESCAPE_NAME}'.\r\n")
            sys.stderr.flush()
        loop = asyncio.get_running_loop()
        output = loop.create_task(self._output())
        sending = loop.create_task(self._send())
        host_gone = loop.create_task(self._host_gone())
        tasks = {output, sending, host_gone}
        try:
            done, _ = await asyncio.wait(tasks, return_when="FIRST_COMPLETED")
            for task in done:
                task.result()  # an error ends the command with it
            if not output.done() and (host_gone in done or sending.result()):
                await self._quiet(output)  # stdin or the host side ended: what is still coming
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if saved is not None:
                termios.tcsetattr(0, termios.TCSADRAIN, saved)
                sys.stderr.write("\r\n")
        return 0

    async def _host_gone(self) -> None:
        """With MULTIPORT: the host side connected, then left (PORT_OPEN 0)."""
        await self.port.wait_host(True)
        await self.port.wait_host(False)

    async def _quiet(self, output: asyncio.Task) -> None:
        """Wait until the port has been quiet for ``linger`` or has ended."""
        while not output.done():
            before = self._received
            await asyncio.wait({output}, timeout=self.linger)
            if self._received == before:
                return

    _received = 0

    async def _output(self) -> None:
        """The port to stdout, until the port or its host side ends."""
        while True:
            data = await self.port.read(READ_SIZE)
            if not data:
                return
            self._received += len(data)
            _write_all(1, data)

    async def _send(self) -> bool:
        """stdin to the port; True at the end of stdin, False at the escape key."""
        async with self._reading_stdin():
            while True:
                data = await self._input.get()
                self._took_input()
                if not data:
                    return True
                if self.interactive and ESCAPE in data:
                    head = data[: data.index(ESCAPE)]
                    if head:
                        await self.port.write(head)
                    return False
                await self.port.write(data)

    @contextlib.asynccontextmanager
    async def _reading_stdin(self):
        loop = asyncio.get_running_loop()
        try:
            loop.add_reader(0, self._stdin_ready)
        except (PermissionError, OSError):  # a regular file: it never blocks for long
            task = loop.create_task(self._read_file())
            try:
                yield
            finally:
                task.cancel()
            return
        try:
            yield
        finally:
            loop.remove_reader(0)

    def _stdin_ready(self) -> None:
        try:
            data = os.read(0, READ_SIZE)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        self._input.put_nowait(data)
        if not data or self._input.full():
            asyncio.get_running_loop().remove_reader(0)  # until the port has taken some
            self._paused = bool(data)

    def _took_input(self) -> None:
        if self._paused:
            self._paused = False
            asyncio.get_running_loop().add_reader(0, self._stdin_ready)

    async def _read_file(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            data = await loop.run_in_executor(None, os.read, 0, READ_SIZE)
            await self._input.put(data)
            if not data:
                return


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
