"""Running the conformance suite: each check on each device, bounded, recovered, judged.

A check drives one device window through a :class:`~viowire.conform.dut.Dut`: register accesses
on a ``RegisterBus`` (every one bounded by a timeout), split rings laid out by hand in guest
memory (:mod:`viowire.conform.ring`), and the correct request the device's type declares (its
:class:`~viowire.device.SampleRequest`, :mod:`viowire.conform.requests`); the checks that make a
device do I/O are skipped, as not applicable, on a type that declares none. Nothing here knows
that the bus is a viowire connection: a qtest transport with the same bus and memory interfaces
runs the same suite.

Around each check :func:`run_suite` resets the device, and afterwards resets it again, verifies
that the reset took (§2.4.1, §4.2.2.1), audits guest memory for writes the device had no right
to make (§2.7.5.1), and, after a deliberate violation, runs a correct I/O round: a device that
only works until the first mistake fails. The check's own outcome is then held against the
verdicts it allows; anything else is FAIL.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence

from viowire.conform.dut import Dut
from viowire.conform.model import (
    Check,
    CheckFailed,
    Options,
    Outcome,
    Result,
    Target,
    Unresponsive,
    Verdict,
    failed,
    selected,
    skipped,
    summary,
)
from viowire.conform.recovery import health_round, verify_reset
from viowire.conform.requests import Request
from viowire.conform.ring import Ring

log = logging.getLogger("viowire.conform")

Reopen = Callable[[], Awaitable[Target]]


class _Link:
    """Whether the connection is alive, and how to get a new one."""

    def __init__(self, target: Target, reopen: Reopen | None) -> None:
        self.target = target
        self.reopen = reopen
        self.lost_in = ""  # the check during which the link died, if it could not be reopened

    async def replace(self, during: str) -> bool:
        if self.reopen is not None:
            try:
                self.target = await self.reopen()
                return True
            except (OSError, ConnectionError) as exc:
                log.error("could not reconnect after the link died in %s: %s", during, exc)
        self.lost_in = during
        return False


async def run_suite(
    target: Target,
    *,
    checks: Sequence[Check] | None = None,
    devices: Sequence[int] | None = None,
    options: Options | None = None,
    reopen: Reopen | None = None,
    on_result: Callable[[Result], None] | None = None,
) -> list[Result]:
    """Run ``checks`` (default: all) on each device of ``target`` (or the ``devices`` indices).

    ``reopen`` makes a fresh target when the connection dies (the death is a FAIL of the check
    that caused it); without it the remaining checks FAIL as not run.
    """
    options = options or Options()
    if checks is None:
        from viowire.conform.checks import CHECKS

        checks = CHECKS
    chosen = selected(checks, options.only)
    link = _Link(target, reopen)
    results: list[Result] = []

    def emit(result: Result) -> None:
        results.append(result)
        if on_result is not None:
            on_result(result)

    for index in range(len(target.devices)):
        if devices is None or index in devices:
            await _run_device(link, index, chosen, options, emit)
    return results


async def _run_device(
    link: _Link,
    index: int,
    checks: Sequence[Check],
    options: Options,
    emit: Callable[[Result], None],
) -> None:
    dut = Dut(link.target, link.target.devices[index], index, options)
    not_run = await _identify(dut)
    dut.install_irq()
    strikes = 0
    try:
        for check in checks:
            if link.lost_in:
                not_run = f"not run: the connection died during {link.lost_in}"
            if not_run:
                emit(_result(check, dut, Outcome(Verdict.FAIL, not_run)))
                continue
            result, fate = await _run_check(dut, check)
            emit(result)
            if fate == "link":
                if not await link.replace(f"{check.id} on {dut.label}"):
                    continue
                dut = Dut(link.target, link.target.devices[index], index, options)
                not_run = await _identify(dut)
                dut.install_irq()
            strikes = strikes + 1 if fate == "hang" else 0
            if strikes >= 2:
                not_run = f"not run: the device stopped answering during {check.id}"
    finally:
        if not link.lost_in:
            dut.remove_irq()


async def _identify(dut: Dut) -> str:
    """Identify the device; a message if that already fails (every check then FAILs)."""
    try:
        async with asyncio.timeout(dut.options.check_timeout):
            await dut.identify()
    except (CheckFailed, Unresponsive, TimeoutError, ConnectionError) as exc:
        return f"not run: identifying the device failed: {exc or type(exc).__name__}"
    return ""


def _result(check: Check, dut: Dut, outcome: Outcome, duration: float = 0.0) -> Result:
    return Result(
        check.id,
        check.section,
        check.title,
        dut.label,
        outcome.verdict,
        outcome.detail,
        check.expected(dut.version),
        duration,
    )


async def _run_check(dut: Dut, check: Check) -> tuple[Result, str]:
    """Run one check with its preparation and recovery; the result and what happened to the
    device: ``"ok"``, ``"hang"`` (stopped answering) or ``"link"`` (connection died)."""
    reason = check.skip_reason(dut)
    if reason is not None:
        return _result(check, dut, skipped(reason)), "ok"
    loop = asyncio.get_running_loop()
    start = loop.time()
    outcome, fate = await _guarded(dut, check, _prepared_run(dut, check))
    if fate == "ok" and not dut.unusable:  # a placeholder slot is never touched (4.2.3.1.1)
        outcome, fate = await _recover(dut, check, outcome)
    if outcome.verdict not in (Verdict.FAIL, Verdict.SKIP):
        expected = check.expected(dut.version)
        if outcome.verdict not in expected:
            wanted = " or ".join(expected)
            outcome = Outcome(
                Verdict.FAIL, f"observed {outcome.verdict}, expected {wanted}: {outcome.detail}"
            )
    return _result(check, dut, outcome, loop.time() - start), fate


async def _prepared_run(dut: Dut, check: Check) -> Outcome:
    dut.forget_guards()
    dut.irq_events.clear()
    if not dut.unusable:
        try:
            await dut.reset()
        except CheckFailed as exc:
            raise CheckFailed(f"before the check: {exc}") from None
    return await check.run(dut)


async def _guarded(dut: Dut, check: Check, work: Awaitable[Outcome]) -> tuple[Outcome, str]:
    """Await ``work`` bounded by the check timeout; map every way it can go wrong to FAIL."""
    try:
        async with asyncio.timeout(dut.options.check_timeout):
            return await work, "ok"
    except Unresponsive as exc:
        return Outcome(Verdict.FAIL, f"device hangs: {exc}"), "hang"
    except CheckFailed as exc:
        return Outcome(Verdict.FAIL, str(exc)), "ok"
    except TimeoutError:
        return Outcome(
            Verdict.FAIL,
            f"did not finish within {dut.options.check_timeout:g} s "
            "(the device stopped making progress)",
        ), "hang"
    except ConnectionError as exc:
        return Outcome(Verdict.FAIL, f"the connection died: {exc}"), "link"
    except Exception as exc:  # the suite's own bug must not hide the other results
        log.exception("%s on %s: check error", check.id, dut.label)
        return Outcome(Verdict.FAIL, f"check error {type(exc).__name__}: {exc}"), "ok"


async def _recover(dut: Dut, check: Check, outcome: Outcome) -> tuple[Outcome, str]:
    """Reset and verify it took, audit guest memory, and after a violation prove that a
    correct I/O round works. Any failure here turns the outcome into FAIL."""

    async def recovery() -> Outcome:
        try:
            await verify_reset(dut)
        except CheckFailed as exc:
            raise CheckFailed(f"{outcome.detail}; then the device did not recover: {exc}") from None
        damage = await dut.audit()
        dut.free_all()  # the device is reset: it no longer owns any of it
        dut.forget_guards()
        if damage:
            raise CheckFailed(
                f"the device wrote guest memory it must not touch: {', '.join(damage)} "
                f"(2.7.5.1; {outcome.verdict}: {outcome.detail})"
            )
        if check.violation and outcome.verdict not in (Verdict.FAIL, Verdict.SKIP):
            try:
                await health_round(dut)
            except CheckFailed as exc:
                raise CheckFailed(
                    f"{outcome.verdict}: {outcome.detail}; but after a reset a correct round "
                    f"failed: {exc}"
                ) from None
            dut.free_all()
        return outcome

    return await _guarded(dut, check, recovery())


__all__ = [  # the names this module always offered; they now live in the modules above
    "Check",
    "CheckFailed",
    "Dut",
    "Options",
    "Outcome",
    "Request",
    "Result",
    "Ring",
    "Target",
    "Unresponsive",
    "Verdict",
    "failed",
    "run_suite",
    "selected",
    "summary",
]
