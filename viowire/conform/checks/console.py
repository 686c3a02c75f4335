"""virtio-console's own checks (§5.3): the config space, and the MULTIPORT control handshake as
Linux's drivers/char/virtio_console.c runs it, message by message, on hand-laid rings.

The handshake: every queue of ``max_nr_ports`` ports set up (Linux creates them all at probe),
DRIVER_OK, buffers on the control receiveq, DEVICE_READY(1) (id VIRTIO_CONSOLE_BAD_ID, as
Linux sends it); the device announces its ports with DEVICE_ADD; each gets PORT_READY(1), and a
CONSOLE_PORT is answered with PORT_OPEN(1) (§5.3.6.2.2: the driver MUST). What comes back is
held against the spec: ids below ``max_nr_ports`` and added once, every message at least the
8-byte ``virtio_console_control``, exactly 8 bytes for the events that carry nothing, 12 for
RESIZE, and PORT_NAME followed by a UTF-8 name (a trailing NUL, which QEMU's device sends and
Linux ignores, is tolerated).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from viowire.conform.checks.common import check, fail
from viowire.conform.dut import Dut
from viowire.conform.model import Outcome, passed
from viowire.conform.ring import Ring
from viowire.virtio.console import (
    BAD_ID,
    CONTROL,
    CONTROL_RECEIVEQ,
    CONTROL_TRANSMITQ,
    DEVICE_ID,
    RESIZE,
    ConsoleFeature,
    ControlEvent,
    ControlMessage,
    num_queues,
)
from viowire.virtio.constants import CONFIG_OFFSET, VIRTQ_DESC_F_WRITE

CONSOLE = (DEVICE_ID,)
MULTIPORT = 1 << ConsoleFeature.MULTIPORT
BUFFER = 4096  # Linux's control receive buffers are a page
HEADER_ONLY = {
    ControlEvent.DEVICE_ADD,
    ControlEvent.DEVICE_REMOVE,
    ControlEvent.CONSOLE_PORT,
    ControlEvent.PORT_OPEN,
}


class ControlQueues:
    """The driver's side of the two control queues, on hand-laid rings: buffers kept posted on
    the control receiveq, messages sent one chain each on the control transmitq."""

    def __init__(self, dut: Dut, rx: Ring, tx: Ring) -> None:
        self.dut, self.rx, self.tx = dut, rx, tx
        self.gpa = 0

    async def post_all(self) -> None:
        rx = self.rx
        self.gpa = await self.dut.alloc(rx.num * BUFFER)
        for head in range(rx.num):
            await rx.set_desc(head, self.gpa + head * BUFFER, BUFFER, VIRTQ_DESC_F_WRITE)
        await rx.publish(*range(rx.num))
        await rx.notify()

    async def send(self, msg: ControlMessage) -> None:
        """One message, one descriptor (a legacy device without ANY_LAYOUT needs that)."""
        data = msg.encode()
        gpa = await self.dut.buffer(data=data)
        head = self.tx.avail_idx % self.tx.num
        await self.tx.set_desc(head, gpa, len(data))
        await self.tx.publish(head)
        await self.tx.notify()
        state = await self.tx.wait_used(1)
        if state != "used":
            raise fail(f"the control transmitq did not return {msg} ({state})")
        self.tx.last_used = (self.tx.last_used + 1) & 0xFFFF

    async def receive(self) -> list[tuple[ControlMessage, int]]:
        """The messages the device has sent since the last call, with their used.len, once it
        has been quiet for the calibrated time; their buffers posted again."""
        await self.dut.quiet()
        rx, out = self.rx, []
        heads = []
        for _ in range(await rx.pending_used()):
            head, length = await rx.used_elem(rx.last_used)
            rx.last_used = (rx.last_used + 1) & 0xFFFF
            if head >= rx.num:
                raise fail(f"control receiveq: used element id {head} is not a head posted")
            if length > BUFFER:
                raise fail(f"control receiveq: used.len {length} exceeds the {BUFFER}-byte buffer")
            data = await self.dut.memory.read(self.gpa + head * BUFFER, length)
            if length < CONTROL.size:
                raise fail(
                    f"control receiveq: a {length}-byte message, shorter than the 8-byte "
                    "virtio_console_control (5.3.6.2)"
                )
            out.append((ControlMessage.decode(data), length))
            heads.append(head)
        if heads:
            await rx.publish(*heads)
            await rx.notify()
        return out


@dataclass
class Handshake:
    """What the device said during the handshake."""

    max_nr_ports: int
    added: list[int] = field(default_factory=list)
    consoles: set[int] = field(default_factory=set)
    names: dict[int, str] = field(default_factory=dict)
    open: set[int] = field(default_factory=set)
    messages: int = 0


async def _up_multiport(dut: Dut) -> tuple[ControlQueues, int]:
    """Linux's probe with MULTIPORT: every queue live, DRIVER_OK, control buffers posted."""
    await dut.begin(MULTIPORT)
    max_nr_ports = await dut.read(CONFIG_OFFSET + 4, 4)
    wanted = num_queues(max_nr_ports, multiport=True)
    if max_nr_ports < 1 or wanted > dut.num_queues:
        raise fail(
            f"max_nr_ports {max_nr_ports} needs {wanted} queues, the device has {dut.num_queues} "
            "(5.3.2: a receiveq and a transmitq per port, and the control pair)"
        )
    rings = {}
    for queue in range(wanted):
        rings[queue] = await dut.ring(queue)
        await rings[queue].program()
    await dut.driver_ok()
    control = ControlQueues(dut, rings[CONTROL_RECEIVEQ], rings[CONTROL_TRANSMITQ])
    await control.post_all()
    return control, max_nr_ports


def _check_message(msg: ControlMessage, length: int, shake: Handshake) -> None:
    """Header sizes and ids, for any message a device sends."""
    shake.messages += 1
    try:
        event = ControlEvent(msg.event)
    except ValueError:
        raise fail(f"{msg}: not an event of 5.3.6.2") from None
    if event in (ControlEvent.DEVICE_READY, ControlEvent.PORT_READY):
        raise fail(f"{msg}: an event the driver sends, not the device (5.3.6.2)")
    if event in HEADER_ONLY and length != CONTROL.size:
        raise fail(f"{msg}: used.len {length}, not the 8 bytes of the header alone")
    if event == ControlEvent.RESIZE and length != CONTROL.size + RESIZE.size:
        raise fail(f"{msg}: used.len {length}, not 12 (header, cols, rows)")
    if msg.id >= shake.max_nr_ports:
        raise fail(f"{msg}: port {msg.id} is not below max_nr_ports {shake.max_nr_ports}")
    if event != ControlEvent.DEVICE_ADD and msg.id not in shake.added:
        raise fail(f"{msg}: port {msg.id} was never added (5.3.6.2.1)")


async def handshake(dut: Dut) -> Handshake:
    control, max_nr_ports = await _up_multiport(dut)
    shake = Handshake(max_nr_ports)
    await control.send(ControlMessage(BAD_ID, ControlEvent.DEVICE_READY, 1))
    for msg, length in await control.receive():
        _check_message(msg, length, shake)
        if msg.event != ControlEvent.DEVICE_ADD:
            raise fail(f"{msg} before the ports were announced: DEVICE_READY gets DEVICE_ADDs")
        if msg.id in shake.added:
            raise fail(f"DEVICE_ADD for port {msg.id}, which exists (5.3.6.2.1)")
        shake.added.append(msg.id)
    if not shake.added:
        raise fail("no DEVICE_ADD after DEVICE_READY(1): the device announced no port")
    for port in shake.added:
        await control.send(ControlMessage(port, ControlEvent.PORT_READY, 1))
        for msg, length in await control.receive():
            _check_message(msg, length, shake)
            await _port_event(control, msg, length, shake)
    return shake


async def _port_event(
    control: ControlQueues, msg: ControlMessage, length: int, shake: Handshake
) -> None:
    if msg.event == ControlEvent.CONSOLE_PORT and msg.value:
        shake.consoles.add(msg.id)
        await control.send(ControlMessage(msg.id, ControlEvent.PORT_OPEN, 1))
    elif msg.event == ControlEvent.PORT_NAME:
        name = msg.payload[:-1] if msg.payload.endswith(b"\0") else msg.payload
        if not name or b"\0" in name:
            raise fail(f"{msg}: the name {msg.payload!r} is empty or holds a NUL (5.3.6.2)")
        try:
            shake.names[msg.id] = name.decode("utf-8")
        except UnicodeDecodeError:
            raise fail(f"{msg}: the name {msg.payload!r} is not UTF-8 (5.3.6.2)") from None
    elif msg.event == ControlEvent.PORT_OPEN:
        (shake.open.add if msg.value else shake.open.discard)(msg.id)
    elif msg.event == ControlEvent.DEVICE_ADD:
        raise fail(f"{msg}: port {msg.id} added again after PORT_READY (5.3.6.2.1)")


@check(
    "console.config",
    "5.3.4",
    "virtio-console: cols/rows with SIZE, max_nr_ports with MULTIPORT and its queues exist",
    devices=CONSOLE,
)
async def console_config(dut: Dut) -> Outcome:
    await dut.begin(dut.offered)
    said = []
    if dut.offered >> ConsoleFeature.SIZE & 1:
        cols, rows = await dut.read(CONFIG_OFFSET, 2), await dut.read(CONFIG_OFFSET + 2, 2)
        said.append(f"{cols}x{rows}")
    if dut.offered & MULTIPORT:
        ports = await dut.read(CONFIG_OFFSET + 4, 4)
        wanted = num_queues(ports, multiport=True)
        if not ports or wanted > dut.num_queues:
            raise fail(
                f"max_nr_ports {ports} needs {wanted} queues; QueueNumMax is 0 from queue "
                f"{dut.num_queues} on (5.3.2)"
            )
        said.append(f"max_nr_ports {ports}, {dut.num_queues} queues")
    elif dut.num_queues < 2:
        raise fail(f"{dut.num_queues} queue(s): port 0's receiveq and transmitq always exist")
    return passed(", ".join(said) or "no config field offered")


@check(
    "console.multiport-handshake",
    "5.3.6.2",
    "virtio-console: DEVICE_READY → DEVICE_ADD per port, PORT_READY → CONSOLE_PORT / PORT_NAME "
    "/ PORT_OPEN, ids in range, headers of the spec's sizes",
    devices=CONSOLE,
    feature=ConsoleFeature.MULTIPORT,
)
async def console_multiport_handshake(dut: Dut) -> Outcome:
    shake = await handshake(dut)
    ports = ", ".join(
        f"{p}{' console' if p in shake.consoles else ''}{' open' if p in shake.open else ''}"
        for p in shake.added
    )
    return passed(f"{shake.messages} messages; ports {ports} of max_nr_ports {shake.max_nr_ports}")


@check(
    "console.port-names",
    "5.3.6.2",
    "virtio-console: PORT_NAME names are UTF-8, without NUL inside, one per port, unique",
    devices=CONSOLE,
    feature=ConsoleFeature.MULTIPORT,
)
async def console_port_names(dut: Dut) -> Outcome:
    shake = await handshake(dut)
    names = list(shake.names.values())
    if len(set(names)) != len(names):
        raise fail(f"two ports have the same name: {shake.names}")
    if not names:
        return passed("no port is named (PORT_NAME is optional)")
    return passed(", ".join(f"port {p} {n!r}" for p, n in sorted(shake.names.items())))


CHECKS = [console_config, console_multiport_handshake, console_port_names]
"""virtio-console's checks, in report order (after the other device-specific I/O checks)."""
