"""A platform: virtio-mmio device windows at base addresses with IRQ lines, as on a board.

A :class:`PlatformSpec` is the description (from defaults, ``--device`` specs or a TOML file);
:meth:`PlatformSpec.build` makes the per-session instance, so every session gets its own devices.
"""

from __future__ import annotations

import bisect
import itertools
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from viowire.server.devices import BACKENDS, make_backend
from viowire.server.mmio import MmioDevice
from viowire.units import parse_size
from viowire.virtio.constants import DEFAULT_WINDOW_SIZE, VENDOR_ID_VIOWIRE

DEFAULT_BASE = 0x1000_1000  # the RISC-V virt board's first virtio-mmio slot
DEFAULT_STRIDE = 0x1000
DEFAULT_FIRST_IRQ = 1
DEFAULT_DEVICES = ("blk,size=64M,version=1", "blk,size=64M", "rng,version=1", "rng")


class PlatformError(ValueError):
    """A platform description that cannot be built; the message says which device and why."""


@dataclass
class DeviceSpec:
    """One device of a platform description: ``kind`` plus backend options."""

    kind: str
    version: int = 2
    options: dict[str, Any] = field(default_factory=dict)
    base: int | None = None
    irq: int | None = None

    @classmethod
    def parse(cls, text: str) -> DeviceSpec:
        """Parse ``blk,size=64M,version=1`` / ``blk,path=disk.img`` / ``rng``."""
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
        if kind not in BACKENDS:
            raise PlatformError(
                f"device {where or kind}: unknown type {kind!r} (known: {', '.join(BACKENDS)})"
            )
        values = dict(values)
        try:
            version = int(values.pop("version", 2))
            base = _int_or_none(values.pop("base", None))
            irq = _int_or_none(values.pop("irq", None))
            if "size" in values:
                values["size"] = parse_size(values["size"])
            for flag in ("readonly",):
                if isinstance(values.get(flag), str):
                    values[flag] = values[flag].lower() in ("1", "on", "true", "yes")
        except ValueError as exc:
            raise PlatformError(f"device {where or kind}: {exc}") from None
        if version not in (1, 2):
            raise PlatformError(f"device {where or kind}: version must be 1 (legacy) or 2")
        return cls(kind, version, values, base, irq)


def _int_or_none(value: Any) -> int | None:
    return None if value is None else parse_size(value) if isinstance(value, str) else int(value)


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
        try:
            data = tomllib.loads(Path(path).read_text())
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise PlatformError(f"config {path}: {exc}") from None
        board = data.get("platform", {})
        devices = []
        for i, entry in enumerate(data.get("device", [])):
            entry = dict(entry)
            kind = entry.pop("type", None) or entry.pop("kind", None)
            if kind is None:
                raise PlatformError(f'config {path}: [[device]] #{i} needs type = "blk" or "rng"')
            devices.append(DeviceSpec.from_mapping(kind, entry, where=f"{path} [[device]] #{i}"))
        try:
            return cls(
                devices,
                base=_int_or_none(board.get("base")) or DEFAULT_BASE,
                stride=_int_or_none(board.get("stride")) or DEFAULT_STRIDE,
                window=_int_or_none(board.get("window")) or DEFAULT_WINDOW_SIZE,
                first_irq=int(board.get("first_irq", DEFAULT_FIRST_IRQ)),
            )
        except (TypeError, ValueError) as exc:
            raise PlatformError(f"config {path} [platform]: {exc}") from None

    def layout(self) -> list[tuple[int, int, DeviceSpec]]:
        """(base, irq, spec) per device; explicit bases/irqs win, the rest fill slots in order."""
        out = []
        for i, spec in enumerate(self.devices):
            base = spec.base if spec.base is not None else self.base + i * self.stride
            irq = spec.irq if spec.irq is not None else self.first_irq + i
            out.append((base, irq, spec))
        bases = sorted((base, spec) for base, _, spec in out)
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
            try:
                backend = make_backend(spec.kind, **spec.options)
            except (TypeError, ValueError, OSError) as exc:
                raise PlatformError(f"device {spec.kind} at {base:#x}: {exc}") from None
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
