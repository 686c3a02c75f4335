"""What the check families share: verdict shorthands, the :func:`check` decorator, and the
helpers several families drive the device with (deliberately wrong register accesses, every
queue live, waiting for an InterruptStatus bit, requests the device must not act on)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from viowire.conform.dut import Dut
from viowire.conform.model import (
    Check,
    CheckFailed,
    Outcome,
    Unresponsive,
    Verdict,
    passed,
    rejected,
    wedged,
)
from viowire.conform.requests import Request, finish, io_round, request
from viowire.conform.ring import Ring
from viowire.virtio.constants import (
    VIRTQ_DESC_F_NEXT,
    VIRTQ_DESC_F_WRITE,
    DeviceId,
    Feature,
    Interrupt,
    Status,
)

PASS, REJECT, WEDGED = Verdict.PASS, Verdict.REJECT, Verdict.WEDGED
RING_EXPECT = {1: (WEDGED, REJECT), 2: (WEDGED,)}
TOLERANT_EXPECT = {1: (WEDGED, REJECT, PASS), 2: (WEDGED, PASS)}  # see checks.registry
INDIRECT = 1 << Feature.RING_INDIRECT_DESC
EVENT_IDX = 1 << Feature.RING_EVENT_IDX
BLK, RNG = (DeviceId.BLOCK,), (DeviceId.ENTROPY,)  # the checks of their own spec sections
W, N = VIRTQ_DESC_F_WRITE, VIRTQ_DESC_F_NEXT
ACK_DRIVER = Status.ACKNOWLEDGE | Status.DRIVER

CheckFn = Callable[[Dut], Awaitable[Outcome]]


def check(
    id: str,
    section: str,
    title: str,
    *,
    expect: tuple[Verdict, ...] | Mapping[int, tuple[Verdict, ...]] = (PASS,),
    **applies: Any,
) -> Callable[[CheckFn], Check]:
    """Make a check of the decorated coroutine; ``applies``: versions, devices, feature,
    violation, identification (see :class:`~viowire.conform.model.Check`). The report order is
    the order of :data:`viowire.conform.checks.registry.CHECKS`."""

    def make(fn: CheckFn) -> Check:
        return Check(id, section, title, fn, expect, **applies)

    return make


def fail(message: str) -> CheckFailed:
    return CheckFailed(message)


def silence(dut: Dut) -> float:
    """How long to wait for a device to react to a violation before calling it silent."""
    return max(4 * dut.settle, 0.2)


async def isr_with(dut: Dut, bits: int) -> int | None:
    async def probe() -> int:
        value = await dut.interrupt_status()
        return value if value & bits else 0

    return await dut.until(probe)


async def try_read(dut: Dut, offset: int, width: int) -> int | None:
    """A deliberately wrong read; None if the bus itself refused it (a bus error)."""
    try:
        return await dut.read(offset, width)
    except (CheckFailed, Unresponsive, ConnectionError):
        raise
    except Exception:
        return None


async def try_write(dut: Dut, offset: int, value: int, width: int) -> None:
    try:
        await dut.write(offset, value, width)
    except (CheckFailed, Unresponsive, ConnectionError):
        raise
    except Exception:
        return


async def live_device(dut: Dut) -> list[Ring]:
    """The device at DRIVER_OK with every queue live, their rings in queue order; a device
    that does I/O has served one sample request, whose interrupt is left pending."""
    await dut.begin()
    io = await dut.io_ring() if dut.io else None
    rings = {} if io is None else {io.index: io}
    if io is not None and io.receiver is not None:
        rings[io.receiver.ring.index] = io.receiver.ring  # programmed with io
    for queue in range(dut.num_queues):
        if queue not in rings:
            rings[queue] = await dut.ring(queue)
            await rings[queue].program()
    if io is not None:
        await io.program()
    await dut.driver_ok()
    if io is not None:
        await io_round(dut, io)
        await isr_with(dut, Interrupt.VRING)
    return [rings[queue] for queue in sorted(rings)]


async def kick_and_watch(dut: Dut, ring: Ring, head: int = 0) -> tuple[Request, int]:
    """Publish a correct request at ``head`` and notify where the device must not act on it;
    the request and how many used elements appeared in the calibrated time anyway."""
    req = await request(dut, ring, head)
    await ring.publish(req.head)
    await ring.notify()
    await dut.quiet()
    return req, await ring.pending_used()


async def after_stray_notify(
    dut: Dut, stray: Callable[[], Awaitable[None]], *, wedge: str, early: str, ignored: str
) -> Outcome:
    """Publish a correct request, make the ``stray`` notifications instead of a correct one,
    then notify correctly and check the request. WEDGED (``wedge``) if the stray ones set
    DEVICE_NEEDS_RESET; PASS (``early``) if they got the request served, a spurious
    notification (§2.7.10); else REJECT (``ignored``)."""
    ring = await dut.up()
    req = await request(dut, ring)
    await ring.publish(req.head)
    await stray()
    await dut.quiet()
    served = await ring.pending_used()
    if await dut.status() & Status.DEVICE_NEEDS_RESET:
        return wedged(wedge)
    await ring.notify()
    await finish(dut, ring, [req])
    return passed(early) if served else rejected(ignored)


async def still_works(dut: Dut, rings: list[Ring]) -> str:
    """One more sample request on the live queue (of :func:`live_device`), without a reset in
    between."""
    if not dut.io:
        return ""
    await io_round(dut, rings[dut.io_queue])
    return "; the live queue still works"
