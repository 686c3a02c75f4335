"""What one server process lets its clients take: sessions, devices, RAM-disk bytes, guest memory.

:class:`Limits` is the configuration (``serve --max-*``); :class:`Budget` is one server process's
account of what its sessions hold, charged when a session connects, opens and builds its
devices, and credited when it ends. A refusal is :class:`LimitExceeded`, whose message names the
limit and the option that raises it; the session gets ERROR LIMIT_EXCEEDED.

RAM disks are charged as they fill, page by page (:class:`RamAccount`): their pages are allocated
only when first written, so large sparse disks cost what is written. A write that would pass a
RAM-disk limit fails with :class:`RamDiskFull` (ENOSPC), and the block device answers IOERR, as
thin-provisioned storage does when its pool is full.
"""

from __future__ import annotations

import argparse
import errno
from dataclasses import dataclass

from viowire.units import parse_size

GIB = 1 << 30


class LimitExceeded(Exception):
    """A request a limit refuses; the message says which limit and how to raise it."""


class RamDiskFull(OSError):
    """A RAM-disk write that would pass a RAM-disk limit (ENOSPC)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


@dataclass(frozen=True)
class Limits:
    """Per server process (each ``--workers`` process has its own) and per session."""

    sessions: int = 256  # open sessions at once, and as many connections in their handshake
    devices: int = 131072  # devices of all sessions together
    session_devices: int = 131072  # devices of one session (its platform)
    ram_disk_bytes: int = 4 * GIB  # RAM-disk bytes written, all sessions together
    session_ram_disk_bytes: int = 1 * GIB  # RAM-disk bytes written by one session
    regions: int = 64  # guest memory regions of one session
    mapped_bytes: int = 64 * GIB  # guest memory one session has the server map (memfd, shm)


@dataclass(frozen=True)
class _Option:
    field: str
    flag: str
    is_size: bool
    help: str


OPTIONS = (
    _Option(
        "sessions",
        "--max-sessions",
        False,
        "sessions at once (and as many connections still in their handshake)",
    ),
    _Option("devices", "--max-devices", False, "devices of all sessions together"),
    _Option("session_devices", "--max-session-devices", False, "devices of one session"),
    _Option(
        "ram_disk_bytes",
        "--max-ram-disk",
        True,
        "RAM-disk bytes written by all sessions together (a write past it fails with IOERR)",
    ),
    _Option(
        "session_ram_disk_bytes",
        "--max-session-ram-disk",
        True,
        "RAM-disk bytes written by one session",
    ),
    _Option(
        "regions", "--max-regions", False, "guest memory regions (MEM_REGISTER) of one session"
    ),
    _Option(
        "mapped_bytes",
        "--max-mapped",
        True,
        "guest memory one session may have the server map (memfd and shm regions)",
    ),
)


def _flag(field: str) -> str:
    return next(option.flag for option in OPTIONS if option.field == field)


def _size_or_count(is_size: bool):
    def parse(text: str) -> int:
        try:
            value = parse_size(text) if is_size else int(text, 0)
        except ValueError:
            kind = "a size such as 4G or 512M" if is_size else "a whole number"
            raise argparse.ArgumentTypeError(f"{text!r}: {kind}") from None
        if value < 1:
            raise argparse.ArgumentTypeError(f"{text!r}: at least 1")
        return value

    return parse


def add_limit_options(parser: argparse.ArgumentParser) -> None:
    """``serve --max-*``: one option per field of :class:`Limits`, with its default."""
    defaults = Limits()
    group = parser.add_argument_group(
        "limits",
        "per server process (each --workers process has them all) and per session; "
        "a refused request gets ERROR LIMIT_EXCEEDED naming the limit",
    )
    for option in OPTIONS:
        default = getattr(defaults, option.field)
        shown = f"{default // GIB}G" if option.is_size and default % GIB == 0 else str(default)
        group.add_argument(
            option.flag,
            dest=f"max_{option.field}",
            type=_size_or_count(option.is_size),
            default=default,
            metavar="SIZE" if option.is_size else "N",
            help=f"{option.help} (default {shown})",
        )


def limits_from_args(args: argparse.Namespace) -> Limits:
    return Limits(**{option.field: getattr(args, f"max_{option.field}") for option in OPTIONS})


class Budget:
    """What the sessions of one server process hold, against its :class:`Limits`."""

    def __init__(self, limits: Limits | None = None) -> None:
        self.limits = limits or Limits()
        self.sessions = 0
        self.handshakes = 0  # connections that have not opened their session yet
        self.devices = 0
        self.ram_disk_bytes = 0

    def take_handshake(self) -> None:
        """A connection arrives. Until it opens its session (after the token, where one is
        required) it holds only a handshake place, so peers without the token cannot take the
        sessions' places; handshakes are capped apart, at the same number."""
        if self.handshakes >= self.limits.sessions:
            raise LimitExceeded(
                f"{self.handshakes} connections to this server are in their handshake, its "
                f"limit ({_flag('sessions')} {self.limits.sessions}): try again later"
            )
        self.handshakes += 1

    def give_handshake(self) -> None:
        self.handshakes -= 1

    def take_session(self) -> None:
        if self.sessions >= self.limits.sessions:
            raise LimitExceeded(
                f"this server has {self.sessions} sessions, its limit "
                f"({_flag('sessions')} {self.limits.sessions}): try again later"
            )
        self.sessions += 1

    def give_session(self) -> None:
        self.sessions -= 1

    def take_devices(self, devices: int) -> None:
        """Charge a session's platform of ``devices`` devices."""
        limits = self.limits
        if devices > limits.session_devices:
            raise LimitExceeded(
                f"a session has {devices} devices, above {_flag('session_devices')} "
                f"{limits.session_devices}: serve fewer or raise the limit"
            )
        if self.devices + devices > limits.devices:
            raise LimitExceeded(
                f"this server's sessions hold {self.devices} devices; {devices} more would pass "
                f"{_flag('devices')} {limits.devices}: try again later"
            )
        self.devices += devices

    def give_devices(self, devices: int) -> None:
        self.devices -= devices

    def check_regions(self, regions: int) -> None:
        """A session holding ``regions`` memory regions registers one more."""
        if regions >= self.limits.regions:
            raise LimitExceeded(
                f"a session may register at most {self.limits.regions} memory regions "
                f"({_flag('regions')})"
            )

    def check_mapped(self, mapped: int, size: int) -> None:
        """A session with ``mapped`` bytes of guest memory mapped maps ``size`` more."""
        if mapped + size > self.limits.mapped_bytes:
            raise LimitExceeded(
                f"this session has {mapped} bytes of guest memory mapped; {size} more would "
                f"pass {_flag('mapped_bytes')} {self.limits.mapped_bytes}"
            )


class RamAccount:
    """The RAM-disk bytes one session has written, charged against its limit and the server's
    :class:`Budget`; given back, all at once, when the session ends (:meth:`close`)."""

    def __init__(self, budget: Budget) -> None:
        self.budget = budget
        self.bytes = 0
        self._closed = False

    def take(self, size: int) -> None:
        """Charge ``size`` newly written bytes; :class:`RamDiskFull` if a limit would pass."""
        budget, limits = self.budget, self.budget.limits
        if self._closed:
            raise RamDiskFull("the session has ended")
        if self.bytes + size > limits.session_ram_disk_bytes:
            raise RamDiskFull(
                f"this session's RAM disks hold {self.bytes} written bytes; {size} more would "
                f"pass {_flag('session_ram_disk_bytes')} {limits.session_ram_disk_bytes}"
            )
        if budget.ram_disk_bytes + size > limits.ram_disk_bytes:
            raise RamDiskFull(
                f"this server's RAM disks hold {budget.ram_disk_bytes} written bytes; {size} "
                f"more would pass {_flag('ram_disk_bytes')} {limits.ram_disk_bytes}"
            )
        self.bytes += size
        budget.ram_disk_bytes += size

    def give(self, size: int) -> None:
        if not self._closed:
            self.bytes -= size
            self.budget.ram_disk_bytes -= size

    def close(self) -> None:
        """The session ended: its disks' memory goes back to the server."""
        if not self._closed:
            self.budget.ram_disk_bytes -= self.bytes
            self.bytes = 0
            self._closed = True
