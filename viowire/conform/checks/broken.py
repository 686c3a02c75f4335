"""Judging malformed chains (§2.7.4 - §2.7.6): the device up, one broken chain published, and
what the device did about it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from viowire.conform.checks.common import RING_EXPECT, check, fail, isr_with, silence
from viowire.conform.dut import Dut
from viowire.conform.model import Check, Outcome, passed, rejected, wedged
from viowire.conform.ring import Ring
from viowire.virtio.constants import Interrupt, Status

Builder = Callable[[Dut, Ring], Awaitable[tuple[str, int]]]
"""Lays out a malformed chain and publishes it; returns what is wrong with it and how many
device-writable bytes it really has (for a chain the device may serve, 0 otherwise)."""


async def broken_chain(
    dut: Dut, build: Builder, *, extra: int = 0, allow_use: bool = False
) -> Outcome:
    """Bring the device up, publish a malformed chain, notify, and judge the reaction."""
    ring = await dut.up(extra=extra)
    what, writable = await build(dut, ring)
    await ring.notify()
    state = await ring.wait_used(1, silence(dut))
    if state == "used":
        return await _used_broken(dut, ring, what, writable if allow_use else None)
    if state == "needs-reset":
        return await _needs_reset(dut, what)
    return rejected(
        f"{what}: neither used nor reported (no DEVICE_NEEDS_RESET) within {silence(dut):.2f} s"
    )


async def _used_broken(dut: Dut, ring: Ring, what: str, writable: int | None) -> Outcome:
    count = min(await ring.pending_used(), ring.num)
    elems = [await ring.used_elem(k) for k in range(count)]
    shown = ", ".join(f"id {i} len {n}" for i, n in elems)
    if writable is None:
        raise fail(f"the device used the malformed chain ({what}): {shown}")
    if count != 1 or elems[0][0] != 0 or elems[0][1] > writable:
        raise fail(
            f"{what}: used elements {shown}, expected one for head 0 with at most {writable} bytes"
        )
    return passed(f"{what}: served without harm ({shown}; tolerated)")


async def _needs_reset(dut: Dut, what: str) -> Outcome:
    status = await dut.status()
    notified = ""
    if dut.version == 2 and status & Status.DRIVER_OK:
        if await isr_with(dut, Interrupt.CONFIG) is None:
            raise fail(
                f"{what}: DEVICE_NEEDS_RESET set while DRIVER_OK without a configuration "
                "change notification (2.1.2: the device MUST send one)"
            )
        notified = ", configuration change notified"
    return wedged(f"{what}: DEVICE_NEEDS_RESET{notified}")


def ring_check(id: str, section: str, title: str, **kw: Any) -> Callable[[Builder], Check]:
    """A malformed-chain check on blk/rng: WEDGED expected (legacy: WEDGED or REJECT)."""
    extra = kw.pop("extra", 0)
    allow_use = kw.pop("allow_use", False)
    expect = kw.pop("expect", RING_EXPECT)

    def make(build: Builder) -> Check:
        async def run(dut: Dut) -> Outcome:
            return await broken_chain(dut, build, extra=extra, allow_use=allow_use)

        run.__name__ = run.__qualname__ = build.__name__
        return check(
            id, section, title, io=True, expect=expect, violation=True, window=False, **kw
        )(run)

    return make
