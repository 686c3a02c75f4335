"""What can go wrong while driving a virtio-mmio device, one exception per cause.

Each error names the device (``virtio-mmio@0x10001000``) and, where one register tells the story,
that register by its spec name and offset, then says what to do about it. The kernel reports the
same conditions as bare errno values (-ENODEV, -ENOENT, -EINVAL); here they are precise classes.
"""

from __future__ import annotations

from viowire.virtio.blk import BlkStatus, BlkType
from viowire.virtio.constants import Reg, device_name

_ACRONYMS = {"ID", "PFN", "ACK", "SHM"}


def register_name(reg: Reg | int) -> str:
    """The spec's name and offset of a register, e.g. ``QueueNumMax (0x034)``."""
    reg = Reg(reg)
    words = (w if w in _ACRONYMS else w.capitalize() for w in reg.name.split("_"))
    return f"{''.join(words)} ({reg.value:#05x})"


class VirtioError(Exception):
    """Base class: a virtio device could not be driven. ``device`` and ``register`` say where."""

    def __init__(self, device: str, message: str, register: Reg | int | None = None) -> None:
        self.device = device
        self.register = None if register is None else Reg(register)
        where = device if register is None else f"{device}: {register_name(register)}"
        super().__init__(f"{where}: {message}")


# -- probe (virtio_mmio_probe) -------------------------------------------------------------------


class WrongMagicError(VirtioError):
    """MagicValue is not "virt": there is no virtio-mmio device at this address."""

    def __init__(self, device: str, value: int) -> None:
        self.value = value
        super().__init__(
            device,
            f"reads {value:#010x}, expected 0x74726976 ('virt'): no virtio-mmio device here; "
            "check the base address in the platform table",
            Reg.MAGIC_VALUE,
        )


class UnsupportedVersionError(VirtioError):
    """Version is neither 1 (legacy) nor 2 (modern)."""

    def __init__(self, device: str, version: int) -> None:
        self.version = version
        super().__init__(
            device,
            f"is {version}; this driver speaks 1 (legacy) and 2 (virtio 1.x): "
            "configure the device for one of those",
            Reg.VERSION,
        )


class NoDeviceError(VirtioError):
    """DeviceID 0: an empty placeholder slot. Not a failure: the caller skips it silently."""

    def __init__(self, device: str) -> None:
        super().__init__(
            device,
            "is 0: an empty placeholder slot, skip it (no other register touched)",
            Reg.DEVICE_ID,
        )


class WrongDeviceTypeError(VirtioError):
    """The device is of another type than the driver that was asked to drive it."""

    def __init__(self, device: str, device_id: int, wanted: int) -> None:
        self.device_id = device_id
        super().__init__(
            device,
            f"is {device_id} ({device_name(device_id)}) but this driver drives {wanted} "
            f"({device_name(wanted)}): attach the matching driver",
            Reg.DEVICE_ID,
        )


# -- status and features (virtio_dev_probe) ------------------------------------------------------


class ResetTimeoutError(VirtioError):
    """Status did not read back 0 after the driver wrote 0 (SPEC §2.4.2 says poll for it)."""

    def __init__(self, device: str, status: int, timeout: float) -> None:
        self.status = status
        super().__init__(
            device,
            f"still reads {status:#04x} {timeout:g} s after writing 0 (reset): "
            "the device is stuck; restart it on the server",
            Reg.STATUS,
        )


class MissingVersion1Error(VirtioError):
    """A version 2 device did not offer VIRTIO_F_VERSION_1 (Linux refuses it with -EINVAL)."""

    def __init__(self, device: str) -> None:
        super().__init__(
            device,
            "version 2 devices must offer VIRTIO_F_VERSION_1 (bit 32); "
            "fix the device's feature table or present it as version 1",
            Reg.DEVICE_FEATURES,
        )


class FeaturesRefusedError(VirtioError):
    """FEATURES_OK read back clear: the device refused the feature subset the driver chose."""

    def __init__(self, device: str, features: int, status: int) -> None:
        self.features = features
        self.status = status
        super().__init__(
            device,
            f"FEATURES_OK reads back clear (status {status:#04x}) after accepting features "
            f"{features:#x}: the device refused them; attach with fewer features",
            Reg.STATUS,
        )


class ConfigUnstableError(VirtioError):
    """Configuration space kept changing while it was read (no two consistent reads)."""

    def __init__(self, device: str, offset: int, length: int, attempts: int, register: Reg) -> None:
        super().__init__(
            device,
            f"config bytes {offset:#x}+{length} changed on each of {attempts} reads; "
            "the device is updating its configuration continuously",
            register,
        )


# -- virtqueues (vm_setup_vq / vring_create_virtqueue) -------------------------------------------


class QueueError(VirtioError):
    """Base class for one virtqueue; ``index`` is the queue's number."""

    def __init__(self, device: str, index: int, message: str, register: Reg | None = None) -> None:
        self.index = index
        super().__init__(device, f"virtqueue {index}: {message}", register)


class QueueResetError(QueueError):
    """A virtqueue reset (SPEC §2.6.1) that cannot be done or did not finish."""

    def __init__(self, device: str, index: int, message: str) -> None:
        super().__init__(device, index, message, Reg.QUEUE_RESET)


class QueueInUseError(QueueError):
    """The queue is already live (v1 QueuePFN or v2 QueueReady non-zero): -ENOENT in Linux."""

    def __init__(self, device: str, index: int, register: Reg, value: int) -> None:
        super().__init__(
            device,
            index,
            f"already in use (reads {value:#x}); another driver owns it, or the device was not "
            "reset: detach that driver or reset the device first",
            register,
        )


class QueueUnavailableError(QueueError):
    """QueueNumMax is 0: the device has no such queue."""

    def __init__(self, device: str, index: int) -> None:
        super().__init__(
            device,
            index,
            "reads 0: the device has no such queue; ask for fewer queues",
            Reg.QUEUE_NUM_MAX,
        )


class BadQueueSizeError(QueueError):
    """A split ring size must be a power of two no larger than 32768 ("Bad virtqueue length")."""

    def __init__(self, device: str, index: int, size: int, register: Reg | None) -> None:
        self.size = size
        super().__init__(
            device,
            index,
            f"size {size} is not a power of two in 1..32768, which a split ring needs: "
            "fix the device's queue size",
            register,
        )


class QueueMemoryError(QueueError, MemoryError):
    """Not even a one-entry ring fits in the free guest RAM (-ENOMEM)."""

    def __init__(self, device: str, index: int, size: int) -> None:
        super().__init__(
            device,
            index,
            f"no guest RAM for the ring even after shrinking from {size} entries: "
            "free buffers or start the client with more guest RAM",
        )


class PfnTooLargeError(QueueError):
    """A legacy ring above 16 TiB: QueuePFN is 32 bits (Linux: "platform bug", -E2BIG)."""

    def __init__(self, device: str, index: int, gpa: int) -> None:
        super().__init__(
            device,
            index,
            f"ring at {gpa:#x} needs a page number above 32 bits: legacy virtio-mmio cannot "
            "use RAM above 16 TiB; place guest RAM lower",
            Reg.QUEUE_PFN,
        )


class QueueFullError(QueueError):
    """Not enough free descriptors for a chain (-ENOSPC); ``submit`` waits instead."""

    def __init__(self, device: str, index: int, needed: int, free: int, size: int) -> None:
        super().__init__(
            device,
            index,
            f"a chain of {needed} descriptors does not fit ({free} of {size} free); "
            "wait for completions, or use submit(), which waits",
        )


class QueueDeletedError(QueueError):
    """The queue was deleted (or the device reset) while the request was in flight."""

    def __init__(self, device: str, index: int) -> None:
        super().__init__(
            device, index, "deleted while requests were in flight; they were not completed"
        )


# -- runtime ------------------------------------------------------------------------------------


class DeviceNeedsResetError(VirtioError):
    """The device set DEVICE_NEEDS_RESET: in-flight requests will not complete."""

    def __init__(self, device: str, status: int) -> None:
        self.status = status
        super().__init__(
            device,
            f"DEVICE_NEEDS_RESET is set (status {status:#04x}): the device hit an error and "
            "stopped; detach and attach the driver again to reset it",
            Reg.STATUS,
        )


class DeviceBrokenError(QueueError):
    """The device broke the ring protocol (bad used id, used length, used index); queue stopped."""

    def __init__(self, device: str, index: int, reason: str) -> None:
        self.reason = reason
        super().__init__(
            device,
            index,
            f"{reason}; the device broke the ring protocol, this queue is stopped: "
            "detach and attach the driver again",
        )


class RequestError(VirtioError):
    """A block request completed with status IOERR or UNSUPP."""

    def __init__(
        self, device: str, request_type: int, sector: int, sectors: int, status: int
    ) -> None:
        self.request_type = request_type
        self.sector = sector
        self.status = status
        kind = _enum_name(BlkType, request_type)
        what = _enum_name(BlkStatus, status)
        advice = {
            BlkStatus.IOERR: "the device reported an I/O error; check its backing store",
            BlkStatus.UNSUPP: "the device does not support this request type",
        }.get(status, "unknown status byte")
        super().__init__(
            device,
            f"virtio-blk {kind} request at sector {sector} ({sectors} sectors) failed with "
            f"status {what}: {advice}",
        )


class ReadOnlyError(VirtioError):
    """A write to a block device that offered VIRTIO_BLK_F_RO."""

    def __init__(self, device: str) -> None:
        super().__init__(
            device,
            "the disk is read-only (VIRTIO_BLK_F_RO): writes are refused",
            Reg.DEVICE_FEATURES,
        )


def _enum_name(enum_type: type, value: int) -> str:
    try:
        return enum_type(value).name
    except ValueError:
        return str(value)
