"""virtio-net's own checks (§5.1): the header's size by version and features, the control
queue's answers, and MRG_RXBUF's ``num_buffers``. They run on every net device the suite meets.

A net device receives only what its link brings, so the receive checks need a peer: another
net device of the same platform, which the check brings up and makes transmit a broadcast
frame (``viowire serve --device net --device net`` puts two on one link). Without one, or when
no frame arrives, those checks SKIP and say so. Numbers are the spec's, written out here.
"""

from __future__ import annotations

from dataclasses import dataclass

from viowire.conform.checks.common import check, fail
from viowire.conform.dut import Dut
from viowire.conform.model import CheckFailed, Outcome, passed, skipped
from viowire.conform.requests import Request, chain, finish
from viowire.conform.ring import Ring
from viowire.virtio.constants import VIRTQ_DESC_F_WRITE, DeviceId, Status

NET = (DeviceId.NET,)
RECEIVEQ, TRANSMITQ = 0, 1
MRG_RXBUF, CTRL_VQ, CTRL_RX, CTRL_RX_EXTRA, MQ, CTRL_MAC_ADDR = 15, 17, 18, 20, 22, 23
OK, ERR = 0, 1  # the ack byte (§5.1.6.5)
FRAME = b"\xff" * 6 + b"\x02\x76\x77\xff\xff\xfe" + b"\x88\xb5" + bytes(range(200))
"""A broadcast frame (IEEE local experimental ethertype) a peer sends: 214 bytes."""


@dataclass
class Received:
    """The used elements of one arrival, in order: (buffer gpa, used.len) each."""

    buffers: list[tuple[int, int]]
    published_at_once: bool  # every one of them was there when used.idx first moved


async def _receive_ring(dut: Dut, size: int, count: int) -> tuple[Ring, list[int]]:
    """receiveq0 with ``count`` one-descriptor buffers of ``size`` bytes, published."""
    ring = await dut.ring(RECEIVEQ)
    await ring.program()
    gpas = []
    for head in range(min(count, ring.num)):
        gpa = await dut.buffer(size)
        await ring.set_desc(head, gpa, size, VIRTQ_DESC_F_WRITE)
        gpas.append(gpa)
    await ring.publish(*range(len(gpas)))
    return ring, gpas


async def _peer(dut: Dut) -> Dut | None:
    """Another net device of the platform, identified and ready to be brought up."""
    for index, info in enumerate(dut.target.devices):
        if index == dut.index or info.device_id != DeviceId.NET:
            continue
        peer = Dut(dut.target, info, index, dut.options)
        await peer.identify()
        if not peer.unusable and peer.io:
            return peer
    return None


async def _peer_sends(peer: Dut, frame: bytes) -> None:
    """The peer, from reset, transmits ``frame`` once (without MRG_RXBUF: a 10-byte header
    if legacy, 12 if modern), then is reset."""
    try:
        ring = await peer.up()
        header = bytes(10 if peer.version == 1 else 12)
        segs = [
            (await peer.buffer(data=header), len(header), False),
            (await peer.buffer(data=frame), len(frame), False),
        ]
        head = ring.avail_idx * 2 % ring.num
        req = Request(head, await chain(ring, head, segs), [])
        await ring.publish(head)
        await ring.notify()
        await finish(peer, ring, [req])
    finally:
        await peer.reset()
        peer.free_all()
        peer.forget_guards()


async def _arrival(dut: Dut, ring: Ring, gpas: list[int], peer: Dut) -> Received | None:
    """Have the peer send :data:`FRAME` and collect what the device used on ``ring`` for it
    (None if nothing came within the I/O timeout)."""
    await ring.notify()  # the receive queue is live: the device is on its link from here
    await dut.status()  # a round trip, so the notification is in before the peer sends
    await _peer_sends(peer, FRAME)
    first = await dut.until(ring.pending_used, dut.options.io_timeout)
    if not first:
        return None
    if await dut.status() & Status.DEVICE_NEEDS_RESET:
        raise fail("DEVICE_NEEDS_RESET while receiving a frame into correct buffers")
    await dut.quiet()  # anything else that comes is the device's to explain
    count = await ring.pending_used()
    buffers = []
    for k in range(count):
        head, length = await ring.used_elem(ring.last_used + k)
        if head >= len(gpas):
            raise fail(f"used element id {head} was never made available (2.7.8)")
        buffers.append((gpas[head], length))
    ring.last_used = (ring.last_used + count) & 0xFFFF
    return Received(buffers, first >= len(buffers))


def _expected_header(dut: Dut) -> int:
    """§5.1.6: 12 bytes with VERSION_1 or MRG_RXBUF, else 10 (legacy)."""
    if dut.version == 2 or dut.negotiated >> MRG_RXBUF & 1:
        return 12
    return 10


async def _one_frame(dut: Dut, got: Received) -> bytes:
    """The single buffer of an arrival without MRG_RXBUF, checked: one buffer, the header, the
    frame after it."""
    hdr = _expected_header(dut)
    if len(got.buffers) != 1:
        raise fail(
            f"one frame came back in {len(got.buffers)} buffers without MRG_RXBUF (5.1.6.3.2)"
        )
    gpa, length = got.buffers[0]
    if length != hdr + len(FRAME):
        raise fail(
            f"used.len {length} for a {len(FRAME)}-byte frame: expected {hdr + len(FRAME)}, the "
            f"{hdr}-byte header of these features (5.1.6) and the frame"
        )
    data = await dut.memory.read(gpa, length)
    if data[hdr:] != FRAME:
        raise fail(f"the frame does not start {hdr} bytes into the buffer (5.1.6: header size)")
    if data[0:2] != b"\x00\x00":
        raise fail(f"flags/gso_type {data[0:2].hex()}: without GUEST_CSUM/GUEST_TSO both are 0")
    if hdr == 12 and data[10:12] != b"\x01\x00":
        raise fail(f"num_buffers {int.from_bytes(data[10:12], 'little')}, not 1 (5.1.6.4)")
    return data


@check(
    "net.header-size",
    "5.1.6",
    "virtio-net: a received frame follows a 10-byte header (legacy) or 12 (VERSION_1, "
    "MRG_RXBUF), num_buffers 1, no offload flags",
    devices=NET,
    io=True,
)
async def net_header_size(dut: Dut) -> Outcome:
    peer = await _peer(dut)
    if peer is None:
        return skipped("needs a second net device on the same link, to send this one a frame")
    variants = [0] + ([1 << MRG_RXBUF] if dut.version == 1 and dut.offered >> MRG_RXBUF & 1 else [])
    seen = []
    for extra in variants:
        await dut.begin(extra)
        ring, gpas = await _receive_ring(dut, 2048, 4)
        await dut.driver_ok()
        got = await _arrival(dut, ring, gpas, peer)
        if got is None:
            return skipped(f"no frame from {peer.label} arrived: is it on this device's link?")
        await _one_frame(dut, got)
        seen.append(f"{_expected_header(dut)} bytes{' with MRG_RXBUF' if extra else ''}")
        await dut.reset()
    return passed(f"header of {', '.join(seen)}; frame intact, num_buffers right")


@check(
    "net.mrg-rxbuf",
    "5.1.6.4",
    "virtio-net MRG_RXBUF: a frame over several buffers, every one but the last full, "
    "num_buffers in the first header, all used together",
    devices=NET,
    io=True,
    feature=MRG_RXBUF,
)
async def net_mrg_rxbuf(dut: Dut) -> Outcome:
    peer = await _peer(dut)
    if peer is None:
        return skipped("needs a second net device on the same link, to send this one a frame")
    size = 32
    await dut.begin(1 << MRG_RXBUF)
    ring, gpas = await _receive_ring(dut, size, 16)
    await dut.driver_ok()
    got = await _arrival(dut, ring, gpas, peer)
    if got is None:
        return skipped(f"no frame from {peer.label} arrived: is it on this device's link?")
    need = -(-(12 + len(FRAME)) // size)
    lengths = [n for _, n in got.buffers]
    if len(lengths) != need or any(n != size for n in lengths[:-1]):
        raise fail(
            f"used.len {lengths} for a {len(FRAME)}-byte frame in {size}-byte buffers: expected "
            f"{need} buffers, all but the last full (5.1.6.4)"
        )
    data = b"".join([await dut.memory.read(gpa, n) for gpa, n in got.buffers])
    count = int.from_bytes(data[10:12], "little")
    if count != need:
        raise fail(f"num_buffers {count} for a frame spread over {need} buffers (5.1.6.4)")
    if data[12:] != FRAME:
        raise fail("the buffers joined are not the frame sent")
    if not got.published_at_once:
        raise fail(f"used.idx first moved by fewer than the {need} buffers of one frame (5.1.6.4)")
    return passed(f"{len(FRAME)}-byte frame in {need} buffers of {size}, num_buffers {count}")


async def _command(dut: Dut, ring: Ring, cls: int, cmd: int, data: bytes) -> int:
    """One control command, its header, data and ack in descriptors of their own (legacy
    framing, §5.1.8); the ack is 0xff until the device writes it."""
    segs = [(await dut.buffer(data=bytes([cls, cmd])), 2, False)]
    if data:
        segs.append((await dut.buffer(data=data), len(data), False))
    ack = await dut.buffer(1, fill=0xFF)
    segs.append((ack, 1, True))
    head = ring.avail_idx * 3 % ring.num
    req = Request(head, await chain(ring, head, segs), [(ack, 1)])
    await ring.publish(head)
    await ring.notify()
    await finish(dut, ring, [req])
    return (await dut.memory.read(ack, 1))[0]


@check(
    "net.ctrl-commands",
    "5.1.6.5",
    "virtio-net controlq: commands of the features negotiated get VIRTIO_NET_OK, an unknown "
    "class or command and malformed data VIRTIO_NET_ERR",
    devices=NET,
    feature=CTRL_VQ,
)
async def net_ctrl_commands(dut: Dut) -> Outcome:
    extra = sum(1 << b for b in (CTRL_VQ, CTRL_RX, CTRL_RX_EXTRA, CTRL_MAC_ADDR))
    features = await dut.begin(extra)
    for queue in (RECEIVEQ, TRANSMITQ):
        await (await dut.ring(queue)).program()
    ctrl = await dut.ring(2)  # 2N with N = 1: MQ is not negotiated (5.1.2)
    await ctrl.program()
    await dut.driver_ok()
    mac = await dut.config_bytes(0, 6)
    cases: list[tuple[str, int, int, bytes, int]] = [
        ("an unknown class", 0x7F, 0, b"\x01", ERR),
        ("class RX, an unknown command", 0, 0x7F, b"\x01", ERR),
    ]
    if features >> CTRL_RX & 1:
        table = bytes(4) + bytes(4)  # both tables empty
        cases += [
            ("RX_PROMISC on", 0, 0, b"\x01", OK),
            ("RX_ALLMULTI off", 0, 1, b"\x00", OK),
            ("MAC_TABLE_SET, two empty tables", 1, 0, table, OK),
            ("MAC_TABLE_SET, 1 entry announced and none given", 1, 0, b"\x01" + bytes(7), ERR),
        ]
    if features >> CTRL_RX_EXTRA & 1:
        cases.append(("RX_NOBCAST off", 0, 5, b"\x00", OK))
    if features >> CTRL_MAC_ADDR & 1:
        cases += [
            ("MAC_ADDR_SET of its own MAC", 1, 1, mac, OK),
            ("MAC_ADDR_SET of 5 bytes", 1, 1, mac[:5], ERR),
        ]
    wrong = []
    for what, cls, cmd, data, want in cases:
        try:
            ack = await _command(dut, ctrl, cls, cmd, data)
        except CheckFailed as exc:
            raise fail(f"{what}: {exc}") from None
        if ack != want:
            wrong.append(f"{what}: ack {ack:#x}, expected {'OK' if want == OK else 'ERR'}")
    if wrong:
        raise fail("; ".join(wrong) + " (5.1.6.5)")
    return passed(f"{len(cases)} commands answered as the spec says")


CHECKS = [net_header_size, net_mrg_rxbuf, net_ctrl_commands]
"""virtio-net's checks, in report order (:mod:`viowire.conform.checks.registry` runs them)."""
