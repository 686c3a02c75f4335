"""A platform: virtio-mmio device windows at base addresses with IRQ lines, as on a board.

A :class:`PlatformSpec` is the description (from defaults, ``--device`` specs or a TOML file);
:meth:`PlatformSpec.build` makes the per-session instance, so every session gets its own devices.
"""

from __future__ import annotations

import bisect
import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viowire import registry
from viowire.device import Device, DeviceOptionError, option_table, parse_options
from viowire.registry import DeviceTypeError
from viowire.server.mmio import MmioDevice
from viowire.units import parse_size
from viowire.virtio.constants import CONFIG_OFFSET, DEFAULT_WINDOW_SIZE, VENDOR_ID_VIOWIRE

DEFAULT_BASE = 0x1000_1000  # the RISC-V virt board's first virtio-mmio slot
DEFAULT_STRIDE = 0x1000
DEFAULT_FIRST_IRQ = 1
DEFAULT_DEVICES = ("blk,size=64M,version=1", "blk,size=64M", "rng,version=1", "rng")
PLATFORM_KEYS = ("base", "stride", "window", "first_irq")
MAX_ADDRESS = 1 << 64  # PLATFORM_INFO carries a base as a u64 and an IRQ line as a u32
MAX_IRQ = (1 << 32) - 1


class PlatformError(ValueError):
    """A platform description that cannot be built; the message says which device and why."""


TRANSPORT_HELP = "version=1|2 (default 2), base=ADDRESS, irq=LINE, count=N"
"""The keys every device takes besides its type's own options: the platform's, not the type's."""


@dataclass
class DeviceSpec:
    """One device of a platform description: its type, its options, where it goes.

    ``kind`` is what the user wrote (``blk``, ``package.module:Class``); ``options`` the options
    given, parsed; ``arguments`` every keyword the class's constructor gets (with defaults), from
    :func:`viowire.device.parse_options`, the one place options are parsed and checked.
    """

    kind: str
    version: int = 2
    options: dict[str, Any] = field(default_factory=dict)
    base: int | None = None
    irq: int | None = None
    count: int = 1  # this many identical devices in consecutive slots (load tests)
    device_class: type[Device] | None = field(default=None, repr=False, compare=False)
    arguments: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        """Parse ``blk,size=64M,version=1`` / ``blk,path=disk.img`` / ``rng`` /
        ``package.module:Class,key=value``."""
        kind, *pairs = [part.strip() for part in text.split(",")]
        values: dict[str, Any] = {}
        for pair in pairs:
            key, sep, value = pair.partition("=")
            if not sep or not key:
                raise PlatformError(f"device {text!r}: expected key=value, got {pair!r}")
            values[key.strip()] = value.strip()
        return cls.from_mapping(kind, values, where=repr(text))

    @classmethod
    def from_mapping(cls, kind: str, values: dict[str, Any], where: str = "") -> DeviceSpec:
        """A spec from a type and its option values (strings, or TOML values)."""
        where = where or kind
        try:
            device_class = registry.lookup(kind, where)
        except DeviceTypeError as exc:
            raise PlatformError(str(exc)) from None
        values = dict(values)
        version = str(values.pop("version", 2)).strip()
        if version not in ("1", "2"):
            raise PlatformError(f"device {where}: version {version!r} must be 1 (legacy) or 2")
        try:
            base = _int_or_none(values.pop("base", None), "base")
            irq = _int_or_none(values.pop("irq", None), "irq")
            count = _count(values.pop("count", 1), base, irq)
        except ValueError as exc:
            raise PlatformError(f"device {where}: {exc}") from None
        try:
            arguments = parse_options(device_class, values, where)
        except DeviceOptionError as exc:
            unknown = set(values) - set(option_table(device_class))
            also = f"; every device also takes {TRANSPORT_HELP}" if unknown else ""
            raise PlatformError(f"{exc}{also}") from None
        options = {key: arguments[key] for key in values}
        return cls(kind, int(version), options, base, irq, count, device_class, arguments)

    def instantiate(self, where: str) -> Device:
        """A new device of this spec; PlatformError names it (``where``) and the cause."""
        if self.device_class is None or self.arguments is None:  # built by hand, not parsed
            try:
                self.device_class = registry.lookup(self.kind, where)
                self.arguments = parse_options(self.device_class, self.options, where)
            except ValueError as exc:
                raise PlatformError(str(exc)) from None
        device_class, arguments = self.device_class, self.arguments
        try:
            return registry.instantiate(device_class, arguments, where)
        except DeviceTypeError as exc:
            raise PlatformError(str(exc)) from None


def _count(value: Any, base: int | None, irq: int | None) -> int:
    try:
        count = int(str(value), 0)
    except ValueError:
        raise ValueError(f"count {value!r} is not a whole number") from None
    if count < 1:
        raise ValueError(f"count {count} must be at least 1")
    if count > 1 and (base is not None or irq is not None):
        raise ValueError("count above 1 takes slots in order: drop base= and irq=")
    return count


def _int_or_none(value: Any, name: str) -> int | None:
    """An address or IRQ line: an integer, or a string such as 0x10001000 or 256M."""
    if value is None:
        return None
    try:
        return parse_size(value)
    except ValueError:
        raise ValueError(f"{name} {value!r} is not a non-negative number") from None


@dataclass(frozen=True)
class Slot:
    """One device window of a built platform."""

    base: int
    size: int
    irq: int
    device: MmioDevice


@dataclass
class PlatformSpec:
    """Where the device windows go and what is in them."""

    devices: list[DeviceSpec]
    base: int = DEFAULT_BASE
    stride: int = DEFAULT_STRIDE
    window: int = DEFAULT_WINDOW_SIZE
    first_irq: int = DEFAULT_FIRST_IRQ

    @classmethod
    def default(cls) -> PlatformSpec:
        return cls([DeviceSpec.parse(text) for text in DEFAULT_DEVICES])

    @classmethod
    def from_toml(cls, path: str | Path) -> PlatformSpec:
        """Read ``[platform]`` (base, stride, window, first_irq) and ``[[device]]`` tables."""
        import tomllib  # with --config alone: it is a good part of `viowire serve`'s start-up

        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PlatformError(f"config {path}: {exc}") from None
        board = data.get("platform", {})
        entries = data.get("device", [])
        unknown = set(data) - {"platform", "device", "link"}  # [[link]]: server.linkpeer's
        if unknown:
            raise PlatformError(
                f"config {path}: unknown table {sorted(unknown)[0]!r} "
                "(use [platform], [[device]] and [[link]])"
            )
        if not isinstance(board, dict) or not isinstance(entries, list):
            raise PlatformError(f"config {path}: use a [platform] table and [[device]] tables")
        unknown = set(board) - set(PLATFORM_KEYS)
        if unknown:
            raise PlatformError(
                f"config {path} [platform]: unknown key {sorted(unknown)[0]!r} "
                f"(known: {', '.join(PLATFORM_KEYS)})"
            )
        devices = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                raise PlatformError(f"config {path}: [[device]] #{i} is not a table")
            entry = dict(entry)
            if isinstance(entry.get("path"), str):
                # An image named in a config file is found beside the file, as QEMU's -readconfig
                # users expect, not wherever the server happens to be started.
                entry["path"] = str(Path(path).parent / entry["path"])
            kind = entry.pop("type", None) or entry.pop("kind", None)
            if not isinstance(kind, str | None):
                raise PlatformError(
                    f"config {path}: [[device]] #{i}: type = {kind!r} is not a string "
                    '(write type = "blk" or type = "package.module:Class")'
                )
            if kind is None:
                raise PlatformError(
                    f"config {path}: [[device]] #{i} needs a type: "
                    f'type = "NAME" ({", ".join(registry.names())}) '
                    'or type = "package.module:Class"'
                )
            devices.append(DeviceSpec.from_mapping(kind, entry, where=f"{path} [[device]] #{i}"))
        try:
            return cls(
                devices,
                base=_int_or_none(board.get("base", DEFAULT_BASE), "base"),
                stride=_int_or_none(board.get("stride", DEFAULT_STRIDE), "stride"),
                window=_int_or_none(board.get("window", DEFAULT_WINDOW_SIZE), "window"),
                first_irq=_int_or_none(board.get("first_irq", DEFAULT_FIRST_IRQ), "first_irq"),
            )
        except ValueError as exc:
            raise PlatformError(f"config {path} [platform]: {exc}") from None

    def layout(self) -> list[tuple[int, int, DeviceSpec]]:
        """(base, irq, spec) per device; explicit bases/irqs win, the rest fill slots in order."""
        out = []
        copies = (spec for spec in self.devices for _ in range(spec.count))
        for i, spec in enumerate(copies):
            base = spec.base if spec.base is not None else self.base + i * self.stride
            irq = spec.irq if spec.irq is not None else self.first_irq + i
            if base + self.window > MAX_ADDRESS or irq > MAX_IRQ:
                raise PlatformError(
                    f"device {spec.kind} at {base:#x} irq {irq}: the window must end below "
                    f"2**64 and the IRQ line fit in 32 bits"
                )
            out.append((base, irq, spec))
        if self.window < CONFIG_OFFSET:
            raise PlatformError(
                f"window {self.window:#x} is smaller than the {CONFIG_OFFSET:#x} bytes of registers"
            )
        bases = sorted(((base, spec) for base, _, spec in out), key=lambda pair: pair[0])
        for (a, _), (b, spec) in itertools.pairwise(bases):
            if b < a + self.window:
                raise PlatformError(f"device {spec.kind} at {b:#x} overlaps the window at {a:#x}")
        return out

    def validate(self) -> None:
        """Build one instance and throw it away, so a bad description fails at startup."""
        platform = self.build()
        platform.close_nowait()

    def build(self, name_prefix: str = "") -> Platform:
        slots = []
        for base, irq, spec in self.layout():
            path = spec.options.get("path")
            if path is not None and spec.options.get("size") is None and not os.path.exists(path):
                raise PlatformError(
                    f"device {spec.kind} at {base:#x}: {path} does not exist "
                    "(give size= to create it)"
                )
            backend = spec.instantiate(f"{spec.kind} at {base:#x}")
            name = f"{name_prefix}virtio-mmio@{base:#x}"
            device = MmioDevice(backend, spec.version, vendor_id=VENDOR_ID_VIOWIRE, name=name)
            slots.append(Slot(base, self.window, irq, device))
        return Platform(slots)


class Platform:
    """A built platform: the address decoder of one session's bus."""

    def __init__(self, slots: list[Slot]) -> None:
        self.slots = sorted(slots, key=lambda slot: slot.base)
        self._bases = [slot.base for slot in self.slots]

    def lookup(self, addr: int) -> tuple[Slot, int] | None:
        """The slot whose window holds ``addr`` and the offset inside it, or None (bus error)."""
        i = bisect.bisect_right(self._bases, addr) - 1
        if i < 0:
            return None
        slot = self.slots[i]
        offset = addr - slot.base
        return (slot, offset) if offset < slot.size else None

    async def aclose(self) -> None:
        for slot in self.slots:
            await slot.device.aclose()
            close = getattr(slot.device.backend, "close", None)
            if close is not None:
                close()

    def close_nowait(self) -> None:
        for slot in self.slots:
            close = getattr(slot.device.backend, "close", None)
            if close is not None:
                close()
