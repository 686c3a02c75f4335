"""The device API: write a virtio device type once, serve it over any transport.

Everything a device author needs is importable from here::

    from viowire.device import Device, DescriptorChain, GuestMemory, Option, Queue

A device type is a subclass of :class:`Device` that declares what it is (``device_id``,
``num_queues``, its feature bits, its config space, its options) and what it does with the
buffers the driver makes available. It never sees a register, a socket or a ring layout: the
transport (viowire's virtio-mmio server today) walks the rings, checks every guest value and
publishes completions, honouring NO_INTERRUPT and EVENT_IDX.

Two ways to serve a queue:

* **Request/response** (blk, rng, most users' first device): override :meth:`Device.handle`.
  The transport pops every available chain and runs each request as a task of its own, so one
  that waits (a thread, a timer, another socket) holds back neither the chains behind it nor
  their completion; requests complete whenever they are done, in any order (``handle_inline``
  trades the task for speed where a request seldom waits). Return the number of bytes written
  into the chain's writable part.
* **Held buffers** (receive queues: net's receiveq, console input, vsock events): override
  :meth:`Device.queue_notify` and take chains from the :class:`Queue` handle when data arrives
  (``await queue.get()``), keep them as long as needed, then ``queue.complete(chain, written)``
  from any task.

A device reset, a queue reset and DEVICE_NEEDS_RESET end every chain the device holds: the
transport cancels running requests, and a stale chain's reads, writes and completion are refused
(:class:`StaleQueueError`, or dropped for ``complete``), so nothing reaches guest memory after.

A minimal device (the tutorial in docs/devices.md grows it)::

    class Reverse(Device):
        '''Each request: readable bytes in, the same bytes reversed out.'''

        device_id = 0x7F00
        type_name = "reverse"

        async def handle(self, queue, chain, memory):
            data = await chain.read()
            return await chain.write(data[::-1])
"""

from __future__ import annotations

import enum
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

from viowire.blocking import run as run_blocking
from viowire.server.virtqueue import ChainError, DescriptorChain, RingError, StaleQueueError
from viowire.units import parse_duration, parse_size
from viowire.virtio.config import ConfigField
from viowire.virtio.constants import device_name
from viowire.virtio.memory import GuestMemory, GuestMemoryError

if TYPE_CHECKING:
    from viowire.server.queue import Queue

log = logging.getLogger("viowire.device")

_REQUIRED: Any = object()


def parse_bool(text: str | bool) -> bool:
    """``on``/``off``, ``true``/``false``, ``yes``/``no``, ``1``/``0``, as QEMU's -device."""
    if isinstance(text, bool):
        return text
    word = str(text).strip().lower()
    if word in ("1", "on", "true", "yes"):
        return True
    if word in ("0", "off", "false", "no"):
        return False
    raise ValueError(f"{text!r} is not on/off, true/false, yes/no or 1/0")


def _parse_int(text: str | int) -> int:
    if isinstance(text, bool):
        raise ValueError(f"{text!r} is not an integer")
    return text if isinstance(text, int) else int(str(text).strip(), 0)


def _parse_str(text: Any) -> str:
    if not isinstance(text, str):
        raise ValueError(f"{text!r} is not a string")
    return text


@dataclass(frozen=True)
class Option:
    """One option of a device type, as ``--device TYPE,NAME=VALUE`` or a TOML key gives it.

    ``parse`` turns the text (or the TOML value) into what the constructor takes and raises
    ValueError with a reason; ``default`` is passed when the option is not given (leave it out
    to make the option required); ``help`` is shown by ``viowire serve --list-devices``.
    """

    parse: Callable[[Any], Any] = _parse_str
    default: Any = _REQUIRED
    help: str = ""

    @property
    def required(self) -> bool:
        return self.default is _REQUIRED

    @classmethod
    def size(cls, default: Any = _REQUIRED, help: str = "") -> Option:
        """Bytes, with an optional K/M/G suffix (powers of 1024): ``64M``."""
        return cls(parse_size, default, help)

    @classmethod
    def duration(cls, default: Any = _REQUIRED, help: str = "") -> Option:
        """Seconds as a float, from ``10ms``, ``250us``, ``1.5s``, ``100ns`` or plain seconds."""
        return cls(parse_duration, default, help)

    @classmethod
    def flag(cls, default: Any = False, help: str = "") -> Option:
        return cls(parse_bool, default, help)

    @classmethod
    def integer(cls, default: Any = _REQUIRED, help: str = "") -> Option:
        return cls(_parse_int, default, help)

    @classmethod
    def string(cls, default: Any = _REQUIRED, help: str = "") -> Option:
        return cls(_parse_str, default, help)


@dataclass(frozen=True)
class SampleRequest:
    """One correct request of a device type, so that tools that do not know the type can drive
    it: ``viowire conform`` builds it by hand in its rings for its I/O checks (rounds that wrap
    the ring, indirect tables, interrupts, malformed chains made from its buffers, resets with it
    in flight) and ``viowire load`` keeps buffers posted on its ``receive_queue``. A type that
    declares none gets only the checks that need no I/O; the others report SKIP, with the reason.

    ``queue``
        The virtqueue it goes to: a request/response queue, where every chain made available
        comes back on its own (once ``receive_queue`` has buffers).
    ``readable`` / ``writable``
        The device-readable bytes (``bytes``, or a tuple of them: one descriptor each) and the
        sizes of the device-writable buffers (an ``int`` or a tuple), laid out in that order.
    ``min_written``
        The fewest bytes the device may report written (used.len, §2.7.8); the most is every
        writable byte.
    ``status``
        What the last writable byte must hold once the request is back (a status byte, as
        virtio-blk's), or None.
    ``receive_queue``
        A receive queue the request needs buffers on (its answer or its message lands there):
        tools keep device-writable buffers of :attr:`receive_size` bytes posted on it. Chains on
        a receive queue stay with the device until it has data for them, so no tool waits for
        one to come back.
    """

    receive_size: ClassVar[int] = 4096
    """Bytes of each buffer tools post on ``receive_queue``."""

    queue: int = 0
    readable: bytes | tuple[bytes, ...] = ()
    writable: int | tuple[int, ...] = ()
    min_written: int = 0
    status: int | None = None
    receive_queue: int | None = None

    def __post_init__(self) -> None:
        writable = sum(self.writable_sizes)
        if any(n < 0 for n in self.writable_sizes):
            raise ValueError(f"SampleRequest: writable sizes {self.writable} cannot be negative")
        if not self.readable_buffers and not writable:
            raise ValueError("SampleRequest: give readable= bytes or writable= sizes (or both)")
        if self.status is not None and not writable:
            raise ValueError("SampleRequest: a status byte needs a writable buffer to land in")
        if not 0 <= self.min_written <= writable:
            raise ValueError(
                f"SampleRequest: min_written {self.min_written} is not within the {writable} "
                "writable bytes"
            )
        if self.receive_queue == self.queue:
            raise ValueError("SampleRequest: receive_queue must be another queue than queue")

    @property
    def readable_buffers(self) -> tuple[bytes, ...]:
        """The device-readable buffers, one descriptor each (empty ones left out)."""
        parts = (self.readable,) if isinstance(self.readable, bytes) else self.readable
        return tuple(bytes(part) for part in parts if part)

    @property
    def writable_sizes(self) -> tuple[int, ...]:
        """The device-writable buffers' sizes, one descriptor each (empty ones left out)."""
        sizes = (self.writable,) if isinstance(self.writable, int) else self.writable
        return tuple(size for size in sizes if size)


class DeviceOptionError(ValueError):
    """Options that do not fit the device type; the message names the device and the option."""


def _no_config_change() -> None:
    pass


class Device:
    """One virtio device type (virtio 1.2 §5), independent of its transport.

    Class attributes declare the type; set them in a subclass:

    ``device_id``
        The virtio device ID (§5: 1 net, 2 blk, 3 console, 4 entropy, ...). Users' own device
        types may take any unused value, such as 0x7F00 and up.
    ``type_name``
        The name ``--device`` knows the type by (``blk``); registered types must have one.
    ``num_queues`` / ``queue_num_max``
        How many virtqueues, and the most descriptors each may have (a power of 2).
    ``options``
        ``{name: Option}``: the keyword arguments of ``__init__`` that a user may set, parsed and
        checked in one place (:meth:`from_options`).
    ``config_layout``
        The config space's fields (:class:`~viowire.virtio.config.ConfigField`), so that
        ``viowire probe`` decodes them.
    ``handle_inline``
        False (the default): each request runs as a task of its own from its first step, so
        ``handle()`` may use anything a task can (``asyncio.timeout``, ``TaskGroup``,
        ``current_task``). True: the transport runs ``handle()`` inline until it first waits,
        and a request that never waits costs no task (viowire's blk and rng, on the hot path);
        set it only if ``handle()`` needs no current task before its first ``await``.
    ``feature_bits``
        An IntEnum naming the device-type feature bits (0 to 23), for log lines and probe.
    ``driver``
        The client driver class for this type, if it has one (``"package.module:Class"`` or the
        class); ``viowire demo``, ``conform`` and ``load`` use it.
    ``sample_request``
        One correct request (:class:`SampleRequest`), so that ``viowire conform`` can run its
        I/O checks on the type; without one they are skipped as not applicable.

    Override :meth:`device_features`, :meth:`config_space` (and :meth:`config_write` for
    writable fields), then either :meth:`handle` or :meth:`queue_notify`. Call
    ``super().__init__()`` first in ``__init__``.
    """

    device_id: ClassVar[int]
    type_name: ClassVar[str] = ""
    num_queues: ClassVar[int] = 1
    queue_num_max: ClassVar[int] = 256  # a power of 2: Linux split rings need one
    options: ClassVar[Mapping[str, Option]] = {}
    config_layout: ClassVar[tuple[ConfigField, ...]] = ()
    feature_bits: ClassVar[type[enum.IntEnum] | None] = None
    handle_inline: ClassVar[bool] = False
    driver: ClassVar[Any] = None
    sample_request: ClassVar[SampleRequest | None] = None

    def __init__(self) -> None:
        self.on_config_change: Callable[[], None] = _no_config_change
        """Set by the transport; call it after every change of the config space."""
        self.name = device_name(self.device_id)
        """For log lines; the transport replaces it with the device's own name."""
        self.transport: Any = None
        """What serves the device (set by the transport): :meth:`queue` asks it for handles."""

    def queue(self, index: int) -> Queue:
        """The :class:`Queue` handle of virtqueue ``index``."""
        if self.transport is None:
            raise RuntimeError(f"{self.name} is not served by a transport yet: no queue handles")
        return self.transport.queue_handle(index)

    @classmethod
    def from_options(cls, values: Mapping[str, Any], where: str = "") -> Device:
        """Build the device from option values (strings from a command line, or TOML values):
        each parsed by its :class:`Option`, unknown and missing ones refused with an error that
        names the device and the option."""
        return cls(**parse_options(cls, values, where))

    # -- what the device is ---------------------------------------------------------------------
    def device_features(self, version: int) -> int:
        """Device-type feature bits offered to a Version ``version`` (1: legacy) driver."""
        return 0

    def config_space(self) -> bytes:
        """The device configuration structure as it is now (little-endian)."""
        return b""

    def config_read(self, offset: int, width: int) -> int:
        """Read ``width`` bytes at ``offset``, little-endian, at any alignment; bytes past the
        end of the structure read as 0xFF, as QEMU's do."""
        space = self.config_space()
        raw = bytes(
            space[i] if 0 <= i < len(space) else 0xFF for i in range(offset, offset + width)
        )
        return int.from_bytes(raw, "little")

    def config_write(self, offset: int, data_value: int, width: int) -> None:
        """Drivers may write only fields the device type declares writable; none by default."""
        log.warning(
            "%s: %d-byte config write of %#x at offset %#x ignored: field is read-only",
            self.name,
            width,
            data_value,
            offset,
        )

    # -- what the device does -------------------------------------------------------------------
    async def handle(self, queue: int, chain: DescriptorChain, memory: GuestMemory) -> int:
        """Serve one request from virtqueue ``queue``; return the bytes written into the
        chain's writable part (used.len, §2.7.8).

        ``await chain.read()`` gives the readable bytes and ``await chain.write(data)`` fills
        the writable part; ``memory`` is there for scatter-gather work of your own. Raise
        :class:`ChainError` for a request so malformed that the device must stop
        (DEVICE_NEEDS_RESET); report ordinary errors in the request's own status field. Any
        other exception also stops the device, with the exception in the log.
        """
        raise NotImplementedError(
            f"{type(self).__name__} serves its queues neither by handle() nor by queue_notify()"
        )

    def queue_notify(self, queue: Queue) -> None:
        """The driver notified virtqueue ``queue.index`` (new buffers are available).

        The default serves every available chain through :meth:`handle`. A device that holds
        buffers (a receive queue) overrides it, for that queue or all, and takes chains from
        ``queue`` when it has data for them; it returns at once (start a task for slow work).
        """
        queue.serve()

    def queue_reset(self, index: int) -> None:
        """Virtqueue ``index`` was reset or stopped: forget the chains taken from it (their
        buffers are the driver's again). Not called for a device reset: :meth:`reset` is."""

    def reset(self) -> None:
        """Device reset (Status = 0): forget driver-visible state and every chain held;
        storage persists."""

    def close(self) -> None:
        """The session is over: release files, sockets and tasks."""


def option_table(cls: type[Device]) -> Mapping[str, Option]:
    """The options ``cls`` declares (its ``options`` mapping)."""
    return cls.options


def parse_options(cls: type[Device], values: Mapping[str, Any], where: str = "") -> dict[str, Any]:
    """``values`` checked against ``cls.options`` and parsed; DeviceOptionError otherwise."""
    what = where or cls.type_name or cls.__name__
    table = option_table(cls)
    out: dict[str, Any] = {}
    for key, raw in values.items():
        option = table.get(key)
        if option is None:
            known = ", ".join(table) or "none"
            raise DeviceOptionError(f"device {what}: unknown option {key!r} (known: {known})")
        try:
            out[key] = option.parse(raw)
        except ValueError as exc:
            raise DeviceOptionError(f"device {what}: option {key}={raw!r}: {exc}") from None
    for key, option in table.items():
        if key not in out:
            if option.required:
                raise DeviceOptionError(f"device {what}: option {key}= is required")
            out[key] = option.default
    return out


__all__ = [
    "ChainError",
    "ConfigField",
    "DescriptorChain",
    "Device",
    "DeviceOptionError",
    "GuestMemory",
    "GuestMemoryError",
    "Option",
    "Queue",
    "RingError",
    "SampleRequest",
    "StaleQueueError",
    "parse_bool",
    "parse_options",
    "run_blocking",
]


def __getattr__(name: str) -> Any:
    # Queue lives with the transport that implements it; imported late to keep imports acyclic.
    if name == "Queue":
        from viowire.server.queue import Queue

        return Queue
    raise AttributeError(name)
