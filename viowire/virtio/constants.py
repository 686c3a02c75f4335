"""Numbers from the virtio specification (v1.2/1.3, §2, §4.2, §5, §6) shared by both sides.

Names follow the spec and Linux's uapi headers so that grepping either finds the other.
"""

from __future__ import annotations

import enum

MAGIC_VALUE = 0x74726976  # "virt" read as a little-endian u32
VENDOR_ID_VIOWIRE = 0x52495756  # "VWIR"
PAGE_SIZE = 4096
DEFAULT_WINDOW_SIZE = 0x200  # QEMU's window: 0x100 of registers, 0x100 of config space
CONFIG_OFFSET = 0x100


class Reg(enum.IntEnum):
    """virtio-mmio register offsets (§4.2.2 modern, §4.2.4 legacy)."""

    MAGIC_VALUE = 0x000
    VERSION = 0x004
    DEVICE_ID = 0x008
    VENDOR_ID = 0x00C
    DEVICE_FEATURES = 0x010
    DEVICE_FEATURES_SEL = 0x014
    DRIVER_FEATURES = 0x020
    DRIVER_FEATURES_SEL = 0x024
    GUEST_PAGE_SIZE = 0x028  # legacy only
    QUEUE_SEL = 0x030
    QUEUE_NUM_MAX = 0x034
    QUEUE_NUM = 0x038
    QUEUE_ALIGN = 0x03C  # legacy only
    QUEUE_PFN = 0x040  # legacy only
    QUEUE_READY = 0x044  # modern only
    QUEUE_NOTIFY = 0x050
    INTERRUPT_STATUS = 0x060
    INTERRUPT_ACK = 0x064
    STATUS = 0x070
    QUEUE_DESC_LOW = 0x080
    QUEUE_DESC_HIGH = 0x084
    QUEUE_AVAIL_LOW = 0x090  # "QueueDriverLow" since 1.1
    QUEUE_AVAIL_HIGH = 0x094
    QUEUE_USED_LOW = 0x0A0  # "QueueDeviceLow" since 1.1
    QUEUE_USED_HIGH = 0x0A4
    SHM_SEL = 0x0AC
    SHM_LEN_LOW = 0x0B0
    SHM_LEN_HIGH = 0x0B4
    SHM_BASE_LOW = 0x0B8
    SHM_BASE_HIGH = 0x0BC
    QUEUE_RESET = 0x0C0
    CONFIG_GENERATION = 0x0FC
    CONFIG = 0x100


class Status(enum.IntFlag):
    """Device status bits (§2.1)."""

    ACKNOWLEDGE = 0x01
    DRIVER = 0x02
    DRIVER_OK = 0x04
    FEATURES_OK = 0x08
    DEVICE_NEEDS_RESET = 0x40
    FAILED = 0x80


class Interrupt(enum.IntFlag):
    """InterruptStatus bits (§4.2.2)."""

    VRING = 1 << 0  # used buffer notification
    CONFIG = 1 << 1  # configuration change notification


class DeviceId(enum.IntEnum):
    """Device types (§5): the ones viowire knows by name."""

    INVALID = 0
    NET = 1
    BLOCK = 2
    CONSOLE = 3
    ENTROPY = 4
    BALLOON = 5
    SCSI = 8
    NINEP = 9
    GPU = 16
    INPUT = 18
    VSOCK = 19
    CRYPTO = 20
    IOMMU = 23
    MEM = 24
    SOUND = 25
    FS = 26


DEVICE_NAMES: dict[int, str] = {
    DeviceId.NET: "virtio-net",
    DeviceId.BLOCK: "virtio-blk",
    DeviceId.CONSOLE: "virtio-console",
    DeviceId.ENTROPY: "virtio-rng",
    DeviceId.BALLOON: "virtio-balloon",
    DeviceId.SCSI: "virtio-scsi",
    DeviceId.NINEP: "virtio-9p",
    DeviceId.GPU: "virtio-gpu",
    DeviceId.INPUT: "virtio-input",
    DeviceId.VSOCK: "virtio-vsock",
    DeviceId.CRYPTO: "virtio-crypto",
    DeviceId.IOMMU: "virtio-iommu",
    DeviceId.MEM: "virtio-mem",
    DeviceId.SOUND: "virtio-snd",
    DeviceId.FS: "virtio-fs",
}


def device_name(device_id: int) -> str:
    """The conventional name of a device type, or ``virtio-<id>`` for one viowire does not know."""
    return DEVICE_NAMES.get(device_id, f"virtio-{device_id}")


class Feature(enum.IntEnum):
    """Transport and ring feature bits (§6)."""

    NOTIFY_ON_EMPTY = 24  # legacy only
    ANY_LAYOUT = 27  # legacy only
    RING_INDIRECT_DESC = 28
    RING_EVENT_IDX = 29
    VERSION_1 = 32
    ACCESS_PLATFORM = 33
    RING_PACKED = 34
    IN_ORDER = 35
    ORDER_PLATFORM = 36
    SR_IOV = 37
    NOTIFICATION_DATA = 38
    NOTIF_CONFIG_DATA = 39
    RING_RESET = 40


# Split virtqueue (§2.7): the numbers; the layout built from them is viowire/virtio/ring.py
VIRTQ_DESC_F_NEXT = 0x1
VIRTQ_DESC_F_WRITE = 0x2
VIRTQ_DESC_F_INDIRECT = 0x4
VIRTQ_AVAIL_F_NO_INTERRUPT = 0x1
VIRTQ_USED_F_NO_NOTIFY = 0x1
DESC_SIZE = 16
USED_ELEM_SIZE = 8
MAX_QUEUE_SIZE = 32768


def feature_names(bits: int, device_bits: type[enum.IntEnum] | None = None) -> list[str]:
    """Names of the set feature bits; ``device_bits`` names the device type's bits (0 to 23,
    a Device class's ``feature_bits``); unknown bits as ``bit N``."""
    device_enum = device_bits
    names = []
    for bit in range(64):
        if not bits >> bit & 1:
            continue
        if bit < 24 and device_enum is not None and bit in device_enum._value2member_map_:
            names.append(device_enum(bit).name)
        elif bit in Feature._value2member_map_:
            names.append(Feature(bit).name)
        else:
            names.append(f"bit {bit}")
    return names
