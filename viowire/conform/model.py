"""The suite's vocabulary: verdicts, what a check observed, the checks themselves, their
results, and what the suite runs against (a target) and how (options)."""

from __future__ import annotations

import enum
import fnmatch
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from viowire.client.connection import DeviceInfo
from viowire.client.mmio import RegisterBus
from viowire.client.virtqueue import Allocator
from viowire.virtio.constants import device_name
from viowire.virtio.memory import GuestMemory

if TYPE_CHECKING:
    from viowire.conform.dut import Dut


class Verdict(enum.StrEnum):
    PASS = "PASS"  # the correct flow works / the value is right
    REJECT = "REJECT"  # the violation was refused and the device stayed healthy
    WEDGED = "WEDGED"  # the device set DEVICE_NEEDS_RESET
    FAIL = "FAIL"  # wrong value, crash, hang, corruption, broken ring used, link lost
    SKIP = "SKIP"  # the check does not apply to this device (the detail says why): its version,
    # a feature it does not offer, or, for a check that needs I/O, no known correct request


@dataclass(frozen=True)
class Outcome:
    """What a check observed; the runner decides whether that is acceptable."""

    verdict: Verdict
    detail: str


def passed(detail: str) -> Outcome:
    return Outcome(Verdict.PASS, detail)


def rejected(detail: str) -> Outcome:
    return Outcome(Verdict.REJECT, detail)


def wedged(detail: str) -> Outcome:
    return Outcome(Verdict.WEDGED, detail)


def skipped(detail: str) -> Outcome:
    return Outcome(Verdict.SKIP, detail)


class CheckFailed(Exception):
    """The device did something the spec (or the check's contract) does not allow: FAIL."""


class Unresponsive(Exception):
    """A register access got no answer in time: the device hangs (FAIL, and after two in a row
    the device's remaining checks are not run)."""


NO_WINDOW = (
    "not applicable: a vhost-user back-end has no virtio-mmio register window; this check "
    "judges the window (its registers, widths, QueueNumMax, InterruptStatus) or what a "
    "vhost-user front-end does on its side (the Status byte, refusing features, filtering "
    "config writes)"
)


@dataclass(frozen=True)
class Check:
    """One conformance check: where it comes from, what it does, what outcomes are good."""

    id: str
    section: str  # virtio 1.2/1.3 numbering
    title: str
    run: Callable[[Dut], Awaitable[Outcome]]
    expect: tuple[Verdict, ...] | Mapping[int, tuple[Verdict, ...]]  # also per version
    versions: tuple[int, ...] = (1, 2)
    devices: tuple[int, ...] | None = None  # device IDs, None = any
    io: bool = False  # makes the device do I/O: needs its type's sample request (Dut.no_io)
    feature: int | None = None  # a feature bit the device must offer
    violation: bool = False  # a correct I/O round must work after it (after a reset)
    identification: bool = False  # runs even on a slot that is not a usable device
    window: bool = True  # judges the virtio-mmio register window itself (not vhost-user's)

    def expected(self, version: int) -> tuple[Verdict, ...]:
        if isinstance(self.expect, Mapping):
            return tuple(self.expect.get(version, ()))
        return self.expect

    def skip_reason(self, dut: Dut) -> str | None:
        if self.window and not dut.window:
            return NO_WINDOW
        if dut.unusable and not self.identification:
            return f"not run: {dut.unusable}"
        if self.identification:
            return None
        if dut.version not in self.versions:
            return f"applies to version {' and '.join(map(str, self.versions))} devices"
        if self.devices is not None and dut.device_id not in self.devices:
            return f"applies to {', '.join(device_name(d) for d in self.devices)} only"
        if self.io and dut.no_io:
            return dut.no_io
        if self.feature is not None and not dut.offered >> self.feature & 1:
            return f"needs feature bit {self.feature}, which the device does not offer"
        if self.devices is not None and not dut.queue_max:
            return "the device has no queues"
        return None


@dataclass(frozen=True)
class Result:
    """One check on one device."""

    id: str
    section: str
    title: str
    device: str
    verdict: Verdict
    detail: str
    expected: tuple[Verdict, ...] = ()
    duration: float = 0.0

    def as_dict(self) -> dict[str, str]:
        return {
            "id": self.id,
            "section": self.section,
            "title": self.title,
            "device": self.device,
            "verdict": str(self.verdict),
            "detail": self.detail,
        }


@dataclass
class Target:
    """What the suite needs: a bus, guest memory with an allocator, and the platform's devices."""

    bus: RegisterBus
    memory: GuestMemory
    allocator: Allocator
    devices: Sequence[DeviceInfo]


@dataclass(frozen=True)
class Options:
    access_timeout: float = 2.0  # one register access
    io_timeout: float = 2.0  # a correct request, a reset, an expected interrupt
    check_timeout: float = 20.0  # one whole check, recovery included
    only: Sequence[str] = ()  # fnmatch patterns on check ids
    seed: int = 2024  # reset storm


def selected(checks: Sequence[Check], patterns: Sequence[str]) -> list[Check]:
    """The checks whose id matches one of ``patterns`` (all when there are none)."""
    if not patterns:
        return list(checks)
    return [c for c in checks if any(fnmatch.fnmatchcase(c.id, p) for p in patterns)]


def summary(results: Sequence[Result]) -> dict[Verdict, int]:
    counts = dict.fromkeys(Verdict, 0)
    for result in results:
        counts[result.verdict] += 1
    return counts


def failed(results: Sequence[Result]) -> bool:
    return any(r.verdict == Verdict.FAIL for r in results)
