"""A workload of the user's own: ``viowire load --workload package.module:function`` drives any
device type.

The function is called once per operation, with the device's driver and the run's random
generator, and returns the bytes the operation moved::

    async def workload(driver: GenericDriver, rng: random.Random) -> int:
        message = rng.randbytes(64)
        used = await driver.request(0, out=message, in_sizes=64)
        assert used.valid == message, "the echo differs"   # a verify failure
        return 2 * len(message)

Each call is one operation of the run, timed and counted beside the built-in ones: ``--depth``
calls at once per device, ``--concurrency`` in all. Every exception counts as an error of the
operation: an ``AssertionError`` as a verify failure; a timeout (``--timeout``), a broken
session or a device that failed (``VirtioError``, a refused register access) also takes the
device out of the run, as the built-in workload does.

Which devices: those of the type the function names in a ``device_type`` attribute (a
:class:`viowire.device.Device` subclass, a type name or ``package.module:Class``), else every
device of the platform (a private server of ``--device`` serves only those asked for).

The driver: the type's own ``driver`` class if it declares one, else
:class:`~viowire.client.drivers.generic.GenericDriver` for the type (or for whatever the device
is, when no type here has its ID). When the type's sample request names a ``receive_queue``,
buffers are kept posted there (``SampleRequest.receive_size`` bytes), so that the workload reads
what arrives with ``driver.receive(queue)``.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from viowire import registry
from viowire.client.connection import DeviceInfo, ProtocolError
from viowire.client.drivers.base import VirtioDriver
from viowire.client.drivers.generic import GenericDriver
from viowire.client.errors import RequestError, VirtioError
from viowire.client.mmio import VirtioMmioDevice
from viowire.device import Device
from viowire.load.stats import error_kind
from viowire.options import UsageError

RECEIVE_BUFFERS = 16  # posted on a receive queue per device, at least --depth


@dataclass(frozen=True)
class Workload:
    """The function ``--workload`` names, and the devices it drives."""

    reference: str
    function: Callable[[Any, random.Random], Any]
    device_type: type[Device] | None  # None: every device of the platform

    @property
    def op(self) -> str:
        """Its name in the summary's operations."""
        return getattr(self.function, "__name__", "workload")

    @property
    def kind(self) -> str:
        """Its devices' name in the summary: the type's name, or ``device`` for any."""
        if self.device_type is None:
            return "device"
        return self.device_type.type_name or self.device_type.__qualname__

    @classmethod
    def load(cls, reference: str) -> Workload:
        """Import ``package.module:function``; a UsageError says what is wrong with it."""
        function = _import(reference)
        if not callable(function):
            raise UsageError(
                f"--workload {reference}: {type(function).__name__} is not a function: name "
                "an async def workload(driver, rng) -> int"
            )
        wanted = getattr(function, "device_type", None)
        device_type = None
        if isinstance(wanted, str):
            try:
                device_type = registry.lookup(wanted, f"{wanted} (device_type of {reference})")
            except registry.DeviceTypeError as exc:
                raise UsageError(f"--workload {reference}: {exc}") from None
        elif wanted is not None:
            try:
                device_type = registry.check_class(wanted, f"device_type of {reference}")
            except registry.DeviceTypeError as exc:
                raise UsageError(f"--workload {reference}: {exc}") from None
        return cls(reference, function, device_type)

    def drives(self, info: DeviceInfo) -> bool:
        return self.device_type is None or info.device_id == self.device_type.device_id

    async def attach(self, mmio: VirtioMmioDevice, info: DeviceInfo, depth: int) -> VirtioDriver:
        """Bring the device up with its driver (see the module's docstring)."""
        known = registry.by_device_id(info.device_id)
        device_type = self.device_type or known
        own = None
        if known is not None and device_type is known:  # its own driver, if it has one
            own = registry.driver_for(info.device_id)
        if own is not None:
            driver: VirtioDriver = await own.attach(mmio)
        else:
            driver = await GenericDriver.attach(mmio, device_type=device_type)
        sample = None if device_type is None else device_type.sample_request
        if isinstance(driver, GenericDriver) and sample and sample.receive_queue is not None:
            queue = sample.receive_queue
            count = min(driver.vqs[queue].num, max(RECEIVE_BUFFERS, depth))
            await driver.post(queue, sample.receive_size, count)
        return driver

    async def run(self, driver: VirtioDriver, rng: random.Random) -> int:
        """One operation; the bytes it moved."""
        moved = self.function(driver, rng)
        if inspect.isawaitable(moved):
            moved = await moved
        if moved is None:
            return 0
        if isinstance(moved, bool) or not isinstance(moved, int) or moved < 0:
            raise TypeError(
                f"{self.reference} returned {moved!r}: return the bytes the operation moved "
                "(an int, 0 or more), or None"
            )
        return moved


def failure(exc: BaseException) -> tuple[str, bool]:
    """How an operation's exception counts: its error kind, and whether the device leaves the
    run (its state is unknown: a timeout, a broken session or device)."""
    if isinstance(exc, AssertionError):
        return "verify:workload", False
    leaves = isinstance(exc, TimeoutError | ConnectionError | ProtocolError)
    leaves |= isinstance(exc, VirtioError) and not isinstance(exc, RequestError)
    return error_kind(exc), leaves


def _import(reference: str) -> Any:
    module_name, sep, attr = reference.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--workload {reference!r}: give package.module:function")
    try:
        # as --device finds package.module:Class: sys.path, then the current directory
        module = registry.import_module(module_name)
    except ModuleNotFoundError as exc:
        raise UsageError(
            f"--workload {reference}: no module named {exc.name or module_name!r} (set "
            "PYTHONPATH, or run from the directory that holds it)"
        ) from None
    except Exception as exc:
        raise UsageError(
            f"--workload {reference}: importing {module_name} raised {type(exc).__name__}: {exc}"
        ) from exc
    obj: Any = module
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(
                f"--workload {reference}: module {module_name} has no {attr!r}"
            ) from None
    return obj
