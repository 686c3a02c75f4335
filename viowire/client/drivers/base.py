"""The virtio core's probe flow (Linux ``virtio_dev_probe``), shared by every device driver.

A driver is written only against :class:`~viowire.client.mmio.VirtioMmioDevice`'s operations. It
declares its ``device_id`` and the device feature bits it implements (``feature_table``);
:meth:`VirtioDriver.attach` runs the spec's initialisation sequence (SPEC §3.1.1) around the
driver's own :meth:`setup`.

Drivers do not subclass this directly: :class:`~viowire.client.drivers.generic.GenericDriver`
adds the queues, requests, receive buffers and config space every device type uses, and the
blk and rng drivers are built on it.
"""

from __future__ import annotations

import contextlib
from typing import Any, Self

from viowire.client.errors import DeviceNeedsResetError, WrongDeviceTypeError
from viowire.client.mmio import VirtioMmioDevice
from viowire.virtio.constants import Feature, Status

# The ring features viowire's virtqueue implements; every other transport bit is dropped
# (Linux: vring_transport_features).
TRANSPORT_FEATURES = (
    1 << Feature.RING_INDIRECT_DESC
    | 1 << Feature.RING_EVENT_IDX
    | 1 << Feature.VERSION_1
    | 1 << Feature.RING_RESET
)


def bits(*numbers: int) -> int:
    """A feature mask from bit numbers."""
    mask = 0
    for number in numbers:
        mask |= 1 << number
    return mask


class VirtioDriver:
    """Base class of device drivers: negotiation, status handshake, unwinding on failure."""

    # Class attributes that a driver instance may override (GenericDriver's arguments).
    device_id: int | None = None  # the device type driven; None: whatever the device is
    feature_table: int = 0  # device-type feature bits this driver implements (Linux)

    def __init__(self, dev: VirtioMmioDevice, *, exclude_features: int = 0) -> None:
        """``exclude_features``: bits not to accept even if offered (e.g. to test fallbacks)."""
        self.dev = dev
        self.exclude_features = exclude_features
        self._undo_config: Any = None

    @classmethod
    async def attach(cls, dev: VirtioMmioDevice, **opts: Any) -> Self:
        """Probe ``dev`` and bring it to DRIVER_OK with this driver; ``opts`` go to __init__.

        Raises :class:`NoDeviceError` for an empty slot (nothing else touched) and
        :class:`WrongDeviceTypeError` for another device type. Any later failure sets FAILED,
        deletes the queues and re-raises.
        """
        driver = cls(dev, **opts)
        await dev.probe()
        driver.claim(dev.device_id)
        try:
            await driver._initialise()
        except BaseException:
            await driver._unwind()
            raise
        return driver

    def claim(self, device_id: int) -> None:
        """Refuse a device of another type than this driver's ``device_id`` (None: take it)."""
        if self.device_id is None:
            self.device_id = device_id
        elif device_id != self.device_id:
            raise WrongDeviceTypeError(self.dev.name, device_id, self.device_id)

    async def _initialise(self) -> None:
        dev = self.dev
        await dev.reset()
        await dev.add_status(Status.ACKNOWLEDGE)
        await dev.add_status(Status.DRIVER)
        await dev.finalize_features(self.negotiate(await dev.get_features()))
        await dev.features_ok()
        await self.setup()
        await self._driver_ok()
        self._undo_config = dev.on_config_change(self._on_config_change)
        await self.device_ready()

    async def _driver_ok(self) -> None:
        """Status |= DRIVER_OK, refusing a device that already asks for a reset.

        A device that hit an error during setup sets DEVICE_NEEDS_RESET but sends no config
        interrupt before DRIVER_OK (QEMU), so going live would leave every request hanging.
        """
        status = await self.dev.get_status()
        if status & Status.DEVICE_NEEDS_RESET:
            raise DeviceNeedsResetError(self.dev.name, status)
        await self.dev.set_status(status | Status.DRIVER_OK)

    def negotiate(self, offered: int) -> int:
        """The driver's table and the ring bits viowire implements, intersected with the offer."""
        return offered & (self.feature_table | TRANSPORT_FEATURES) & ~self.exclude_features

    async def _unwind(self) -> None:
        """virtio_dev_probe's error path: Status |= FAILED, then the queues go."""
        with contextlib.suppress(Exception):
            await self.dev.fail()
        with contextlib.suppress(Exception):
            await self.dev.del_vqs()

    async def setup(self) -> None:
        """Driver-specific initialisation before DRIVER_OK: read config, create queues."""

    async def device_ready(self) -> None:
        """Called once the device is live (DRIVER_OK): make buffers available and notify, which
        a modern device ignores before DRIVER_OK (Linux fills receive queues from here on)."""

    async def config_changed(self) -> None:
        """Called on each configuration-change interrupt after DRIVER_OK (re-read config)."""

    async def _on_config_change(self, dev: VirtioMmioDevice) -> None:
        await self.config_changed()

    async def reinitialise(self) -> None:
        """Recover a device that set DEVICE_NEEDS_RESET (or that this driver gave up on):
        reset it, drop the queues (what was in flight fails), and run the whole initialisation
        again, as Linux does when it restores a device."""
        if self._undo_config is not None:
            self._undo_config()
            self._undo_config = None
        try:
            await self.dev.reset()
        finally:
            await self.dev.del_vqs()
        try:
            await self._initialise()
        except BaseException:
            await self._unwind()
            raise

    @property
    def needs_reset(self) -> bool:
        """The device reported DEVICE_NEEDS_RESET; :meth:`reinitialise` recovers it."""
        return self.dev.needs_reset

    async def detach(self) -> None:
        """Reset the device (it stops using the rings), delete the queues, free the buffers."""
        if self._undo_config is not None:
            self._undo_config()
            self._undo_config = None
        try:
            await self.dev.reset()
        finally:
            try:
                await self.dev.del_vqs()
            finally:
                self.free_buffers()

    def free_buffers(self) -> None:
        """Give back the DMA buffers a driver keeps for reuse (after the queues are gone)."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.detach()

    @property
    def negotiated_features(self) -> int:
        """What the driver accepted (the class's ``feature_table`` is what it could accept)."""
        return self.dev.negotiated_features

    @property
    def status(self) -> int:
        """The status byte as last read or written (``await dev.get_status()`` re-reads it)."""
        return self.dev.status

    def has_feature(self, bit: int) -> bool:
        return self.dev.has_feature(bit)
