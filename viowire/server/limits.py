"""What one server process lets its clients take: sessions, devices, RAM-disk bytes, guest memory.

:class:`Limits` is the configuration (``serve --max-*``); :class:`Budget` is one server process's
account of what its sessions hold, charged when a session connects and when its devices are
built, and credited when it ends. A refusal is :class:`LimitExceeded`, whose message names the
limit and the option that raises it; the session gets ERROR LIMIT_EXCEEDED.

RAM disks are charged at their full size when a session's devices are built, not as they fill:
the pages of an anonymous disk are allocated only when written, but a client may write them all,
so the budget holds the worst case and no client can grow the server past it.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from viowire.units import parse_size

GIB = 1 << 30


class LimitExceeded(Exception):
    """A request a limit refuses; the message says which limit and how to raise it."""


@dataclass(frozen=True)
class Limits:
    """Per server process (each ``--workers`` process has its own) and per session."""

    sessions: int = 256  # open sessions at once, and as many connections in their handshake
    devices: int = 131072  # devices of all sessions together
    session_devices: int = 131072  # devices of one session (its platform)
    ram_disk_bytes: int = 4 * GIB  # RAM-disk bytes of all sessions together
    session_ram_disk_bytes: int = 1 * GIB  # RAM-disk bytes of one session
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
        "RAM-disk bytes of all sessions together, charged at the disks' full size when a "
        "session starts",
    ),
    _Option(
        "session_ram_disk_bytes", "--max-session-ram-disk", True, "RAM-disk bytes of one session"
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

    def take_devices(self, devices: int, ram_disk_bytes: int) -> None:
        """Charge a session's platform: ``devices`` devices holding ``ram_disk_bytes``."""
        limits = self.limits
        if devices > limits.session_devices:
            raise LimitExceeded(
                f"a session has {devices} devices, above {_flag('session_devices')} "
                f"{limits.session_devices}: serve fewer or raise the limit"
            )
        if ram_disk_bytes > limits.session_ram_disk_bytes:
            raise LimitExceeded(
                f"a session's RAM disks hold {ram_disk_bytes} bytes, above "
                f"{_flag('session_ram_disk_bytes')} {limits.session_ram_disk_bytes}: serve "
                "smaller disks or raise the limit"
            )
        if self.devices + devices > limits.devices:
            raise LimitExceeded(
                f"this server's sessions hold {self.devices} devices; {devices} more would pass "
                f"{_flag('devices')} {limits.devices}: try again later"
            )
        if self.ram_disk_bytes + ram_disk_bytes > limits.ram_disk_bytes:
            raise LimitExceeded(
                f"this server's sessions hold {self.ram_disk_bytes} bytes of RAM disks; "
                f"{ram_disk_bytes} more would pass {_flag('ram_disk_bytes')} "
                f"{limits.ram_disk_bytes}: try again later"
            )
        self.devices += devices
        self.ram_disk_bytes += ram_disk_bytes

    def give_devices(self, devices: int, ram_disk_bytes: int) -> None:
        self.devices -= devices
        self.ram_disk_bytes -= ram_disk_bytes

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
