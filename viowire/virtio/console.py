"""virtio-console's facts from the spec (§5.3), in one place for every side that needs them: the
device (viowire/server/devices/console.py), the driver (viowire/client/drivers/console.py),
``viowire conform`` and the tests.

Queues: port 0's receiveq (0) and transmitq (1) always exist; with MULTIPORT the control
receiveq (2) and control transmitq (3) follow, then port N >= 1 at 2(N+1) and 2(N+1)+1, up to
``max_nr_ports`` ports (Linux creates all of them at probe).

The two ends of a port: the *driver* is the guest's terminal (a shell on /dev/hvc0); the *device*
is the host's character device (QEMU's chardev). Receive queues carry host-to-guest bytes,
transmit queues guest-to-host bytes.

Control messages (MULTIPORT) are ``virtio_console_control`` (8 bytes), some followed by a
payload: PORT_NAME by the name's UTF-8 bytes (the spec: without a NUL; QEMU sends one, Linux
copes with both), RESIZE by ``virtio_console_resize``, cols then rows in the spec's order (which
Linux follows since commit 5326ab737a47; it had rows first before).
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from viowire.virtio.config import ConfigField
from viowire.virtio.constants import DeviceId

DEVICE_ID = DeviceId.CONSOLE

RECEIVEQ0, TRANSMITQ0 = 0, 1
CONTROL_RECEIVEQ, CONTROL_TRANSMITQ = 2, 3

BAD_ID = 0xFFFFFFFF
"""The port id Linux and QEMU use for "no port" (VIRTIO_CONSOLE_BAD_ID)."""


class ConsoleFeature(enum.IntEnum):
    """virtio-console feature bits (§5.3.3)."""

    SIZE = 0
    MULTIPORT = 1
    EMERG_WRITE = 2


class ControlEvent(enum.IntEnum):
    """``virtio_console_control.event`` (§5.3.6.2). Linux calls 1 and 2 PORT_ADD/PORT_REMOVE."""

    DEVICE_READY = 0  # driver -> device, value 1 ok / 0 failed
    DEVICE_ADD = 1  # device -> driver
    DEVICE_REMOVE = 2  # device -> driver
    PORT_READY = 3  # driver -> device, value 1 ok / 0 failed
    CONSOLE_PORT = 4  # device -> driver; the driver answers PORT_OPEN 1
    RESIZE = 5  # device -> driver, followed by RESIZE (cols, rows)
    PORT_OPEN = 6  # both ways, value 1 open / 0 closed
    PORT_NAME = 7  # device -> driver, followed by the name (UTF-8)


CONSOLE_CONFIG = (  # §5.3.4
    ConfigField("cols", 0x00, 2, ConsoleFeature.SIZE),
    ConfigField("rows", 0x02, 2, ConsoleFeature.SIZE),
    ConfigField("max_nr_ports", 0x04, 4, ConsoleFeature.MULTIPORT),
    ConfigField("emerg_wr", 0x08, 4, ConsoleFeature.EMERG_WRITE),
)
CONFIG = struct.Struct("<HHII")
"""cols, rows, max_nr_ports, emerg_wr: the whole config space (12 bytes)."""
EMERG_WR_OFFSET = 0x08

CONTROL = struct.Struct("<IHH")
"""id, event, value: ``virtio_console_control``, 8 bytes."""
RESIZE = struct.Struct("<HH")
"""cols, rows: ``virtio_console_resize``, after a RESIZE control header."""

MAX_NAME = 255
"""The longest port name viowire's device gives (UTF-8 bytes), so that every control message
fits a buffer of 4 KiB, the size Linux posts, with room to spare."""


def receiveq(port: int) -> int:
    """Port ``port``'s receive queue (host to guest)."""
    return RECEIVEQ0 if port == 0 else 2 * (port + 1)


def transmitq(port: int) -> int:
    """Port ``port``'s transmit queue (guest to host)."""
    return TRANSMITQ0 if port == 0 else 2 * (port + 1) + 1


def port_of_queue(index: int) -> tuple[int, bool] | None:
    """(port, is the transmit queue) of a data queue; None for the control queues."""
    if index in (CONTROL_RECEIVEQ, CONTROL_TRANSMITQ):
        return None
    if index < 2:
        return 0, index == TRANSMITQ0
    return index // 2 - 1, index % 2 == 1


def num_queues(max_nr_ports: int, multiport: bool) -> int:
    """Queues of a device: 2 without MULTIPORT, else a pair per port and the control pair."""
    return 2 * (max_nr_ports + 1) if multiport else 2


def queue_names(max_nr_ports: int, multiport: bool) -> list[str]:
    """Names of the queues, in order (the driver's logs and errors use them)."""
    names = ["receiveq0", "transmitq0"]
    if multiport:
        names += ["control.receiveq", "control.transmitq"]
        for port in range(1, max_nr_ports):
            names += [f"receiveq{port}", f"transmitq{port}"]
    return names


@dataclass(frozen=True)
class ControlMessage:
    """One control message: the header's fields and what follows it."""

    id: int
    event: int
    value: int = 0
    payload: bytes = b""

    def encode(self) -> bytes:
        return CONTROL.pack(self.id, self.event, self.value) + self.payload

    @classmethod
    def decode(cls, data: bytes) -> ControlMessage:
        """ValueError for a buffer shorter than the 8-byte header."""
        if len(data) < CONTROL.size:
            raise ValueError(
                f"control message of {len(data)} bytes is shorter than its {CONTROL.size}-byte "
                "header (id, event, value)"
            )
        id_, event, value = CONTROL.unpack_from(data)
        return cls(id_, event, value, bytes(data[CONTROL.size :]))

    @property
    def event_name(self) -> str:
        try:
            return ControlEvent(self.event).name
        except ValueError:
            return f"unknown event {self.event}"

    def __str__(self) -> str:
        extra = f" +{len(self.payload)} bytes" if self.payload else ""
        return f"{self.event_name}(id={self.id}, value={self.value}){extra}"


def resize_message(port: int, cols: int, rows: int) -> ControlMessage:
    """RESIZE for ``port``: value unused, then cols and rows (the spec's order)."""
    return ControlMessage(port, ControlEvent.RESIZE, 0, RESIZE.pack(cols, rows))


def name_message(port: int, name: str) -> ControlMessage:
    """PORT_NAME for ``port``: the name's UTF-8 bytes follow, without a NUL (the spec); value 1,
    as QEMU sends it (unused)."""
    return ControlMessage(port, ControlEvent.PORT_NAME, 1, name.encode())


def decode_name(payload: bytes) -> str:
    """A PORT_NAME's name; a NUL ends it (QEMU's device appends one), as Linux reads it."""
    return payload.split(b"\0", 1)[0].decode("utf-8", "replace")


def decode_resize(payload: bytes) -> tuple[int, int]:
    """(cols, rows) of a RESIZE; ValueError when the payload is too short."""
    if len(payload) < RESIZE.size:
        raise ValueError(f"RESIZE carries {len(payload)} bytes, not the 4 of cols and rows")
    cols, rows = RESIZE.unpack_from(payload)
    return cols, rows
