"""``viowire io``: qemu-io's read/write/flush commands, every byte through the virtio-blk queue."""

from __future__ import annotations

import shlex
import time
from collections.abc import Sequence
from dataclasses import dataclass

from viowire.client.drivers.blk import BlockDriver
from viowire.client.target import devices, open_target
from viowire.declarations import Declaration
from viowire.units import format_size, parse_size
from viowire.virtio.constants import DeviceId, device_name


class CommandError(ValueError):
    """A command line that qemu-io would not accept either."""


@dataclass(frozen=True)
class IoCommand:
    op: str  # read, write, flush
    offset: int = 0
    length: int = 0
    pattern: int | None = None


def parse_command(text: str) -> IoCommand:
    """Parse ``write -P 0xab 0 64K``, ``read -P 0xab 0 64K``, ``read 0 4K`` or ``flush``."""
    words = shlex.split(text)
    if not words:
        raise CommandError("empty command")
    op, args = words[0], words[1:]
    if op == "flush":
        if args:
            raise CommandError("flush takes no arguments")
        return IoCommand("flush")
    if op not in ("read", "write"):
        raise CommandError(f"unknown command {op!r}: use read, write or flush")
    pattern = None
    if args[:1] == ["-P"]:
        if len(args) < 2:
            raise CommandError(f"{op}: -P needs a pattern byte")
        try:
            pattern = int(args[1], 0)
        except ValueError:
            raise CommandError(f"{op}: pattern {args[1]!r} is not a number") from None
        if not 0 <= pattern <= 0xFF:
            raise CommandError(f"{op}: pattern {pattern:#x} does not fit in a byte")
        args = args[2:]
    if len(args) != 2:
        raise CommandError(f"usage: {op} [-P PATTERN] OFFSET LENGTH")
    try:
        offset, length = parse_size(args[0]), parse_size(args[1])
    except ValueError as exc:
        raise CommandError(f"{op}: {exc}") from None
    return IoCommand(op, offset, length, pattern)


def _rate_line(length: int, seconds: float) -> str:
    seconds = max(seconds, 1e-9)
    return (
        f"{format_size(length) if length else 0} bytes, 1 ops; {seconds:.4f} sec "
        f"({length / seconds / (1 << 20):.3f} MiB/sec and {1 / seconds:.2f} ops/sec)"
    )


async def execute(blk: BlockDriver, cmd: IoCommand) -> tuple[bool, str]:
    """Run one command; returns (ok, what qemu-io would print)."""
    start = time.perf_counter()
    if cmd.op == "flush":
        await blk.flush()
        return True, f"flush done; {time.perf_counter() - start:.4f} sec"
    if cmd.op == "write":
        pattern = 0xCD if cmd.pattern is None else cmd.pattern  # qemu-io's default; 0 is a pattern
        await blk.write(cmd.offset, bytes([pattern]) * cmd.length)
        took = time.perf_counter() - start
        return True, f"wrote {cmd.length}/{cmd.length} bytes at offset {cmd.offset}\n" + _rate_line(
            cmd.length, took
        )
    data = await blk.read(cmd.offset, cmd.length)
    took = time.perf_counter() - start
    if cmd.pattern is not None:
        expected = bytes([cmd.pattern]) * cmd.length
        if data != expected:
            bad = next(i for i, (a, b) in enumerate(zip(data, expected, strict=True)) if a != b)
            return False, (
                f"Pattern verification failed at offset {cmd.offset + bad}, {cmd.length} bytes "
                f"(read {data[bad]:#04x}, expected {cmd.pattern:#04x})"
            )
    return True, f"read {cmd.length}/{cmd.length} bytes at offset {cmd.offset}\n" + _rate_line(
        cmd.length, took
    )


async def run_commands(
    url: str,
    index: int,
    texts: list[str],
    *,
    memory: str = "auto",
    windows: Sequence[Declaration] = (),
) -> int:
    """Attach the block driver to device ``index`` of ``url`` (or of the declared ``windows``)
    and run the commands in order."""
    commands = [parse_command(text) for text in texts]
    async with await open_target(url, memory=memory, windows=windows) as conn:
        platform = await devices(conn, windows)
        if not platform:
            raise CommandError(f"{url}: no virtio device in the declared windows")
        if not 0 <= index < len(platform):
            raise CommandError(f"device {index}: the platform has devices 0..{len(platform) - 1}")
        info = platform[index]
        if info.device_id != DeviceId.BLOCK:
            raise CommandError(
                f"device {index} at {info.base:#x} is {device_name(info.device_id)}, not virtio-blk"
            )
        blk = await BlockDriver.attach(await conn.attach(info))
        try:
            for cmd in commands:
                ok, text = await execute(blk, cmd)
                print(text, flush=True)
                if not ok:
                    return 1
        finally:
            await blk.detach()
    return 0
