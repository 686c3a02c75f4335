"""One registry of device types: what ``--device TYPE`` names, for every command.

A device type is a :class:`viowire.device.Device` subclass. Commands find one

* by **name**: the built-in types (``blk``, ``rng``), types registered in this process
  (:func:`register`), and types installed packages offer through the entry-point group
  ``viowire.devices`` (the entry point's name is the type's name, its value ``module:Class``),
  as pytest finds its plugins::

      [project.entry-points."viowire.devices"]
      echo = "mypkg.echo:EchoDevice"

* by **reference**: ``package.module:Class``, any Device subclass importable from ``sys.path``;
* by **virtio device ID** (the first type registered with it wins: built-ins, then types
  registered or named by reference in this process, then entry points): for a client that met the
  device on a bus, so that ``viowire probe`` decodes its config space by the class's
  ``config_layout`` and ``viowire demo`` finds its ``driver``.

Classes are imported only when asked for, so a broken plugin breaks only the command that names
it, and every failure is a :class:`DeviceTypeError` that names the device, the cause and what to
write instead.
"""

from __future__ import annotations

import enum
import importlib
import logging
import os
import re
import sys
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

from viowire.device import Device

if TYPE_CHECKING:
    import importlib.metadata

log = logging.getLogger("viowire.registry")

GROUP = "viowire.devices"
"""The entry-point group in which installed packages offer device types."""

BUILTIN: Mapping[str, str] = {
    "blk": "viowire.server.devices.blk:BlockBackend",
    "rng": "viowire.server.devices.rng:RngBackend",
    "net": "viowire.server.devices.net:NetDevice",
    "console": "viowire.server.devices.console:ConsoleDevice",
}

_REFERENCE = re.compile(r"[A-Za-z_][\w.]*:[A-Za-z_][\w.]*")
HINT = "package.module:Class of a Device subclass importable from sys.path (set PYTHONPATH)"

# name -> class or "module:Class", in registration order; built-ins first
_names: dict[str, type[Device] | str] = dict(BUILTIN)
# "module:Class" -> the class, for every reference resolved in this process
_classes: dict[str, type[Device]] = {}
# the classes named directly (not by a name), in the order they were first named
_named_directly: list[type[Device]] = []


class DeviceTypeError(ValueError):
    """A device type that cannot be used: unknown, unimportable, not a Device, or one whose
    constructor failed. The message names the device and the cause."""


def is_reference(text: str) -> bool:
    """``package.module:Class`` rather than a registered name."""
    return _REFERENCE.fullmatch(text) is not None


def register(name: str, device_class: type[Device] | str) -> None:
    """Make ``name`` mean ``device_class`` (a class or ``"module:Class"``) in this process.

    A name that means another type already is refused: built-in types and earlier registrations
    keep their meaning.
    """
    if not name or not re.fullmatch(r"[\w.-]+", name):
        raise DeviceTypeError(f"device type name {name!r}: use letters, digits, '_', '-', '.'")
    old = _names.get(name)
    if old is not None and old is not device_class and old != device_class:
        raise DeviceTypeError(f"device type {name!r} is taken already (by {_describe_ref(old)})")
    if not isinstance(device_class, str):
        check_class(device_class, name)
    _names[name] = device_class


def entry_points() -> dict[str, importlib.metadata.EntryPoint]:
    """The types installed packages offer (group ``viowire.devices``), by name, read afresh
    from ``sys.path`` each time: the first distribution that offers a name wins."""
    import importlib.metadata  # only for a name that is not built in: it is slow to import

    found: dict[str, importlib.metadata.EntryPoint] = {}
    for entry in importlib.metadata.entry_points(group=GROUP):
        found.setdefault(entry.name, entry)
    return found


def names() -> list[str]:
    """Every name ``--device`` knows: built-ins, registered types, then installed ones."""
    return [*_names, *(name for name in entry_points() if name not in _names)]


def lookup(spec: str, where: str = "") -> type[Device]:
    """The device class a name (``blk``) or a reference (``package.module:Class``) means.

    ``where`` names the device in errors (default: ``spec``), e.g. the whole ``--device`` text.
    """
    spec = spec.strip()
    what = where or spec
    if spec in _names:
        return _resolve(_names[spec], what)
    if is_reference(spec):
        return _named(spec, what)
    entry = entry_points().get(spec)
    if entry is not None:
        return _resolve(_entry_ref(entry), f"{what} (entry point of {_dist_name(entry)})")
    known = ", ".join(names())
    raise DeviceTypeError(
        f"device {what}: unknown type {spec!r}: give one of {known} (viowire serve "
        f"--list-devices shows their options), or {HINT}"
    )


def by_device_id(device_id: int) -> type[Device] | None:
    """The first type registered with virtio device ID ``device_id``, or None.

    An installed type that fails to import is skipped with a warning: a client that only reads
    a bus must not fail for a broken plugin it does not need.
    """
    for device_class in _candidates():
        if device_class.device_id == device_id:
            return device_class
    return None


def feature_bits(device_id: int) -> type[enum.IntEnum] | None:
    """The names of ``device_id``'s feature bits (its type's ``feature_bits``), if known."""
    device_type = by_device_id(device_id)
    return device_type.feature_bits if device_type is not None else None


def driver_for(device_id: int) -> type[Any] | None:
    """The client driver class of the type with ``device_id`` (its ``driver``), or None."""
    device_class = by_device_id(device_id)
    if device_class is None or device_class.driver is None:
        return None
    driver = device_class.driver
    if isinstance(driver, str):
        what = f"{device_class.__module__}:{device_class.__qualname__}"
        driver = _import(driver, f"driver of {what}")
    return driver


def describe() -> Iterator[tuple[str, str, type[Device] | DeviceTypeError]]:
    """(name, where it comes from, its class or why it cannot be used) of every named type,
    for ``viowire serve --list-devices``."""
    entries = entry_points()
    for name in names():
        ref = _names.get(name)
        if ref is None:
            origin = f"{_entry_ref(entries[name])} (from {_dist_name(entries[name])})"
        else:
            origin = _describe_ref(ref)
        try:
            yield name, origin, lookup(name)
        except DeviceTypeError as exc:
            yield name, origin, exc


def instantiate(device_class: type[Device], arguments: Mapping[str, Any], where: str) -> Device:
    """``device_class(**arguments)``; any exception of the constructor becomes a
    :class:`DeviceTypeError` that names the device (``where``) and the cause.

    A ValueError, TypeError or OSError is the class refusing its options or its files: its own
    words suffice. Anything else is a bug in the class, named with its exception type.
    """
    try:
        return device_class(**arguments)
    except (ValueError, TypeError, OSError) as exc:
        raise DeviceTypeError(f"device {where}: {exc}") from exc
    except Exception as exc:
        raise DeviceTypeError(
            f"device {where}: {device_class.__qualname__}() raised {type(exc).__name__}: {exc}"
        ) from exc


def check_class(obj: object, what: str) -> type[Device]:
    """``obj`` if it is a usable device class, else a DeviceTypeError that says why."""
    if not isinstance(obj, type) or not issubclass(obj, Device):
        name = _describe_ref(obj) if isinstance(obj, type) else f"{obj!r}, a {type(obj).__name__},"
        raise DeviceTypeError(
            f"device {what}: {name} is not a subclass of viowire.device.Device: name a class "
            "that subclasses it"
        )
    device_id = getattr(obj, "device_id", None)
    if not isinstance(device_id, int) or isinstance(device_id, bool) or device_id < 0:
        raise DeviceTypeError(
            f"device {what}: {obj.__qualname__} declares no device_id (set the class "
            "attribute to its virtio device ID, e.g. 0x7F00 for a type of your own)"
        )
    return obj


# -- inside ------------------------------------------------------------------------------------


def _candidates() -> Iterator[type[Device]]:
    """Every type in lookup order, built-ins first, unusable ones skipped; the installed ones
    are looked for only if the caller has not found its type by then."""
    yield from _usable(list(_names.items()))
    yield from list(_named_directly)
    installed = [(name, e) for name, e in entry_points().items() if name not in _names]
    yield from _usable(
        [(f"{name} (entry point of {_dist_name(e)})", _entry_ref(e)) for name, e in installed]
    )


def _usable(refs: list[tuple[str, type[Device] | str]]) -> Iterator[type[Device]]:
    for what, ref in refs:
        try:
            yield _resolve(ref, what)
        except DeviceTypeError as exc:
            log.warning("skipping device type %s: %s", what, exc)


def _resolve(ref: type[Device] | str, what: str) -> type[Device]:
    if isinstance(ref, str):
        return _import_device(ref, what)
    return ref


def _named(ref: str, what: str) -> type[Device]:
    """A class named by reference; remembered, so that a client of a private server finds it
    by its device ID."""
    device_class = _import_device(ref, what)
    if device_class not in _named_directly:
        _named_directly.append(device_class)
    return device_class


def _import_device(ref: str, what: str) -> type[Device]:
    cached = _classes.get(ref)
    if cached is None:
        cached = check_class(_import(ref, what), what)
        _classes[ref] = cached
    return cached


def _import(ref: str, what: str) -> Any:
    """The object ``module:attr.path`` names; DeviceTypeError says what went wrong."""
    module_name, _, attr_path = ref.partition(":")
    try:
        module = import_module(module_name)
    except ModuleNotFoundError as exc:
        missing = exc.name or module_name
        if not (module_name == missing or module_name.startswith(f"{missing}.")):
            # the module is there but needs another that is not installed
            raise DeviceTypeError(f"device {what}: importing {module_name}: {exc}") from None
        raise DeviceTypeError(
            f"device {what}: no module named {missing!r}: give a known type "
            f"({', '.join(_names)}), or {HINT}"
        ) from None
    except Exception as exc:
        raise DeviceTypeError(
            f"device {what}: importing {module_name} raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in filter(None, attr_path.split(".")):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            offered = _device_classes_in(module)
            also = f" (it has {', '.join(offered)})" if offered else ""
            raise DeviceTypeError(
                f"device {what}: module {module_name} has no {attr_path!r}{also}"
            ) from None
    return obj


def import_module(name: str) -> Any:
    """Import ``name``; a module not found on sys.path is looked for in the current directory
    too (after everything installed), as ``python -m`` and uvicorn's ``module:app`` find a
    project's own modules: ``viowire serve --device examples.loopback:Loopback`` from a
    checkout."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        here = os.getcwd()
        top = name.partition(".")[0]
        if exc.name != top or here in sys.path or "" in sys.path:
            raise
        sys.path.append(here)
        return importlib.import_module(name)


def _device_classes_in(module: Any) -> list[str]:
    return sorted(
        f"{module.__name__}:{name}"
        for name, obj in vars(module).items()
        if isinstance(obj, type) and issubclass(obj, Device) and obj is not Device
    )


def _describe_ref(ref: type[Any] | str) -> str:
    return ref if isinstance(ref, str) else f"{ref.__module__}:{ref.__qualname__}"


def _entry_ref(entry: importlib.metadata.EntryPoint) -> str:
    """``module:Class`` of an entry point (its value may also carry ``[extras]``)."""
    return f"{entry.module}:{entry.attr}" if entry.attr else entry.module


def _dist_name(entry: importlib.metadata.EntryPoint) -> str:
    dist = getattr(entry, "dist", None)
    return dist.name if dist is not None else "an installed package"
