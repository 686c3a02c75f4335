"""Net devices under load: each streams verified frames to a partner on the same link.

Flows: the load's net devices form rings, each device sending to the next
(:func:`ring_pairs`). Devices in the same platform slot of different sessions come from one
device spec, so they are on one link: they ring first. The rest (one session, or a slot only
one session uses) ring in the order of their sessions and slots, which a handshake checks: a
device whose partner is on another link broadcasts a probe, and is paired again with a device
left without a sender that heard it (the client cannot see which link a device is on).

Bring-up (:meth:`NetTraffic.start`), after every device is at DRIVER_OK:

1. every device's frames are read as they come (``async for frame in driver.frames()``);
2. every device sends a frame to its own MAC (:func:`~viowire.load.frames.announce`): the
   switch learns where each MAC is and delivers the frame nowhere, so no unicast frame of the
   run is ever flooded to every port of the link;
3. every flow sends its frame 0 and waits for it; a flow whose frame 0 does not arrive within
   ``--timeout`` is paired again as above, and a device that finds no partner so leaves the
   workload.

The ``net`` operation (:meth:`NetTraffic.transmit` then :meth:`NetTraffic.receipt`) sends the
flow's next frame and waits until its partner has it: the latency is one frame's trip from the
sending driver to the receiving one. ``--depth`` operations per device are in flight, so a
flow has at most that many frames on the way. Frames enter the transmit ring in sequence order
(a lock per flow around the send), and the link keeps their order, so the receiver checks:

- the frame itself (:class:`~viowire.load.frames.FramePattern`): corrupt, misdirected, of the
  wrong length: verify errors;
- its sequence number: one below the next expected is ``verify:net-order`` (reordered or
  duplicated); one above it means the frames in between were dropped: *lost*, as is a frame
  not received within ``--timeout``. Losses are counted apart from errors, and are errors too
  unless ``--allow-loss``.

Why a lost frame is an error by default: a user reads errors as "something is wrong", and on a
link that only the load keeps busy nothing should be lost. A frame that finds its receiver's
ring empty waits there for the driver to post buffers again (as QEMU holds it), and the link
drops a frame only when that backlog (``queue_num_max`` frames per receive queue) is full; a
load flow has at most ``--depth`` frames on the way, and its receiver reads all the time, so
its own frames never fill it, nor does light traffic beside it (the compose file's conform and
netpeers on the load's link). A loss there means a device or link lost a frame it should have
kept. Only a link that others flood faster than a receiver reads can drop by design, as a NIC's
full ring does: ``--allow-loss`` is for that. (The compose test's load clients once lost a frame
per flow: the device dropped a frame that found the ring empty; tests/test_load_net.py's
bursts test reproduces that without Docker.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from viowire.load.frames import ANYONE, FramePattern, announce
from viowire.load.stats import error_kind
from viowire.virtio.net import BROADCAST, format_mac

T = TypeVar("T")
LOST = -1  # the value of a receipt whose frame was dropped
ErrorSink = Callable[[str, str], None]


def ring_pairs(
    devices: Sequence[T],
    slot: Callable[[T], int],
    order: Callable[[T], Any],
    mac: Callable[[T], bytes],
) -> tuple[list[tuple[T, T]], list[T], list[T]]:
    """(sender, receiver) pairs: a ring of the devices of each slot, then a ring of the rest;
    the devices left without a partner; and the twins: devices whose MAC an earlier device
    has (``mac=`` in a spec gives every session's device that MAC), which a switch cannot tell
    apart, so they take no part."""
    unique: dict[bytes, T] = {}
    twins: list[T] = []
    for dev in sorted(devices, key=order):
        if mac(dev) in unique:
            twins.append(dev)
        else:
            unique[mac(dev)] = dev
    groups: dict[int, list[T]] = {}
    for dev in unique.values():
        groups.setdefault(slot(dev), []).append(dev)
    rings = [group for group in groups.values() if len(group) >= 2]
    rest = sorted((g[0] for g in groups.values() if len(g) == 1), key=order)
    alone: list[T] = []
    if len(rest) >= 2:
        rings.append(rest)
    else:
        alone = rest
    pairs = [(ring[i], ring[(i + 1) % len(ring)]) for ring in rings for i in range(len(ring))]
    return pairs, alone, twins


@dataclass(eq=False)
class Flow:
    """The frames from ``sender`` to ``receiver`` (load devices), and where they are."""

    sender: Any
    receiver: Any
    next_seq: int = 0  # the sender's next frame
    expected: int = 0  # the receiver's next frame
    pending: dict[int, asyncio.Future[int]] = field(default_factory=dict)  # seq -> receipt
    given_up: set[int] = field(default_factory=set)  # counted lost after --timeout
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    sent: int = 0
    received: int = 0
    lost: int = 0
    late: int = 0

    def arrive(self, seq: int, now_ns: int) -> str | None:
        """Frame ``seq`` arrived: resolve its receipt, and those of the frames it overtook
        (dropped: a link keeps a flow's order). The error's text, if the sequence is wrong."""
        if seq >= self.next_seq:
            return f"frame {seq} arrived, but the sender has sent only {self.next_seq}"
        if seq < self.expected:
            return f"frame {seq} arrived after frame {self.expected - 1} (reordered or repeated)"
        for dropped in range(self.expected, seq):
            receipt = self.pending.pop(dropped, None)
            if receipt is not None:
                self.lost += 1
                receipt.set_result(LOST)
        self.expected = seq + 1
        self.received += 1
        if seq in self.given_up:
            self.given_up.discard(seq)
            self.late += 1
        receipt = self.pending.pop(seq, None)
        if receipt is not None and not receipt.done():
            receipt.set_result(now_ns)
        return None


class NetTraffic:
    """The flows of one load run; ``on_error(kind, message)`` records a receive-side error."""

    def __init__(self, pattern: FramePattern, timeout: float, on_error: ErrorSink) -> None:
        self.pattern = pattern
        self.timeout = timeout
        self.on_error = on_error
        self.flows: dict[int, Flow] = {}  # by the sender's index
        self.incoming: dict[int, Flow] = {}  # by the receiver's index
        self.foreign = 0
        self.unpaired = self.twins = 0
        self.deaf: set[int] = set()  # devices that stopped receiving
        self._twins: set[int] = set()
        self.heard: dict[int, set[int]] = {}  # a probe's sender -> the devices that heard it
        self._probed = asyncio.Event()
        self._readers: list[asyncio.Task[None]] = []
        self._stopping = False

    # -- bring-up ----------------------------------------------------------------------------

    async def start(self, devices: Sequence[Any], concurrency: int) -> list[tuple[Any, str]]:
        """Pair, read, announce and shake hands (see the module); the devices that cannot take
        part, each with the reason."""
        pairs, alone, twins = ring_pairs(
            devices,
            slot=lambda d: d.info.base,
            order=lambda d: (d.session, d.info.base),
            mac=lambda d: d.driver.mac,
        )
        self.unpaired = len(alone)
        self._twins = {id(dev) for dev in twins}
        self.twins = len(twins)
        for sender, receiver in pairs:
            flow = Flow(sender, receiver)
            self.flows[sender.index] = self.incoming[receiver.index] = flow
        loop = asyncio.get_running_loop()
        self._readers = [loop.create_task(self._read(dev)) for dev in devices]
        failed: list[tuple[Any, str]] = []
        gate = asyncio.Semaphore(concurrency)

        async def learn(dev: Any) -> None:
            async with gate:
                try:
                    async with asyncio.timeout(self.timeout):
                        await dev.driver.send(announce(dev.driver.mac))
                except Exception as exc:
                    failed.append((dev, f"its first frame failed: {error_kind(exc)}: {exc}"))

        await asyncio.gather(*(learn(dev) for dev in devices))
        broken = {id(dev) for dev, _ in failed}
        for flow in [f for f in self.flows.values() if id(f.sender) in broken]:
            self._drop(flow)
        unreachable: list[Flow] = []
        await asyncio.gather(
            *(self._shake(f, gate, failed, unreachable) for f in list(self.flows.values()))
        )
        if unreachable:
            await self._repair(unreachable, gate, failed)
        return failed

    async def _shake(
        self,
        flow: Flow,
        gate: asyncio.Semaphore,
        failed: list[tuple[Any, str]],
        unreachable: list[Flow],
    ) -> None:
        """Frame 0 of ``flow``: sent and received, or the flow is dropped (and why noted)."""
        async with gate:
            try:
                async with asyncio.timeout(self.timeout):
                    seq, receipt = await self.transmit(flow)
            except Exception as exc:
                self._drop(flow)
                failed.append((flow.sender, f"its frame 0 failed: {error_kind(exc)}: {exc}"))
                return
            if await self.receipt(flow, seq, receipt) == LOST:
                self._drop(flow)
                unreachable.append(flow)

    async def _repair(
        self, unreachable: list[Flow], gate: asyncio.Semaphore, failed: list[tuple[Any, str]]
    ) -> None:
        """Flows whose partners were on other links: each sender broadcasts a probe, and is
        paired anew with a receiver left without a sender that heard it (so on its link)."""
        idle = [f.receiver for f in unreachable]
        for flow in unreachable:
            probe = self.pattern.make(
                BROADCAST, flow.sender.driver.mac, flow.sender.index, ANYONE, 0
            )
            try:
                async with asyncio.timeout(self.timeout):
                    await flow.sender.driver.send(probe)
            except Exception as exc:
                failed.append((flow.sender, f"its probe failed: {error_kind(exc)}: {exc}"))
        for flow in unreachable:
            sender = flow.sender
            receiver = await self._heard_by(sender, idle)
            if receiver is None:
                self.unpaired += 1  # alone on its link, as far as its probe tells
                continue
            idle.remove(receiver)
            again = Flow(sender, receiver)
            self.flows[sender.index] = self.incoming[receiver.index] = again
            retried: list[Flow] = []
            await self._shake(again, gate, failed, retried)
            if retried:
                failed.append((sender, self._unreachable(again)))

    async def _heard_by(self, sender: Any, idle: list[Any]) -> Any | None:
        """The first of ``idle`` (not ``sender``, nor of its MAC) that heard its probe."""

        def found() -> Any | None:
            heard = self.heard.get(sender.index, set())
            for dev in idle:
                if dev.index in heard and dev is not sender and dev.driver.mac != sender.driver.mac:
                    return dev
            return None

        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.timeout):
                while found() is None:
                    self._probed.clear()
                    await self._probed.wait()
        return found()

    def _drop(self, flow: Flow) -> None:
        if self.flows.get(flow.sender.index) is flow:
            del self.flows[flow.sender.index]
        if self.incoming.get(flow.receiver.index) is flow:
            del self.incoming[flow.receiver.index]

    @staticmethod
    def _unreachable(flow: Flow) -> str:
        b = flow.receiver
        return (
            f"its frames did not reach {b.name} ({format_mac(b.driver.mac)}), which heard its "
            "broadcast, within --timeout"
        )

    # -- the operation -----------------------------------------------------------------------

    async def transmit(self, flow: Flow) -> tuple[int, asyncio.Future[int]]:
        """Send the flow's next frame; (its sequence number, its receipt)."""
        receipt: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        async with flow.lock:  # frames enter the ring in sequence order
            seq = flow.next_seq
            flow.next_seq += 1
            flow.pending[seq] = receipt
            frame = self.pattern.make(
                flow.receiver.driver.mac,
                flow.sender.driver.mac,
                flow.sender.index,
                flow.receiver.index,
                seq,
            )
            try:
                await flow.sender.driver.send(frame)
            except BaseException:
                flow.pending.pop(seq, None)  # never sent: its gap is no loss
                raise
        flow.sent += 1
        return seq, receipt

    async def receipt(self, flow: Flow, seq: int, receipt: asyncio.Future[int]) -> int:
        """When frame ``seq`` arrived (``time.perf_counter_ns``), or LOST: dropped, or not
        there within the timeout."""
        await asyncio.wait((receipt,), timeout=self.timeout)
        if receipt.done():
            return receipt.result()
        flow.pending.pop(seq, None)
        flow.given_up.add(seq)
        flow.lost += 1
        return LOST

    # -- receiving ---------------------------------------------------------------------------

    def twin(self, dev: Any) -> bool:
        """Whether ``dev`` was left out for another device's MAC."""
        return id(dev) in self._twins

    async def _read(self, dev: Any) -> None:
        try:
            async for frame in dev.driver.frames():
                self.arrived(dev, frame)
        except Exception as exc:
            if not self._stopping:
                self.on_error(f"net-receive:{error_kind(exc)}", f"{dev.name}: {exc}")
        finally:
            self.deaf.add(dev.index)  # its driver detached or broke: nothing more arrives

    def arrived(self, dev: Any, frame: bytes) -> None:
        """One frame received by ``dev``: verified, and its flow's receipts resolved."""
        now = time.perf_counter_ns()
        verdict = self.pattern.check(frame, dev.driver.mac, dev.index)
        if verdict.kind == "foreign":
            self.foreign += 1
            return
        if verdict.kind == "probe":
            self.heard.setdefault(verdict.sender, set()).add(dev.index)
            self._probed.set()
            return
        flow = self.incoming.get(dev.index)
        if verdict.kind == "misdirected" or flow is None or flow.sender.index != verdict.sender:
            detail = verdict.detail or f"frame {verdict.seq} of device {verdict.sender}"
            self.on_error("verify:net-misdirected", f"{dev.name}: {detail}")
            return
        wrong = flow.arrive(verdict.seq, now)
        if wrong is not None:
            self.on_error("verify:net-order", f"{dev.name} from {flow.sender.name}: {wrong}")
        if verdict.kind != "ok":
            self.on_error(f"verify:net-{verdict.kind}", f"{dev.name}: {verdict.detail}")

    async def stop(self) -> None:
        self._stopping = True
        for task in self._readers:
            task.cancel()
        await asyncio.gather(*self._readers, return_exceptions=True)

    def summary(self) -> dict[str, int]:
        flows = self.flows.values()
        return {
            "flows": len(self.flows),
            "unpaired": self.unpaired,
            "twins": self.twins,
            "frame_size": self.pattern.size,
            "sent": sum(f.sent for f in flows),
            "received": sum(f.received for f in flows),
            "lost": sum(f.lost for f in flows),
            "late": sum(f.late for f in flows),
            "foreign": self.foreign,
        }
