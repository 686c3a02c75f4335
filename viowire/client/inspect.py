"""``viowire probe``: what each device of a platform is, as lspci -v shows a PCI bus.

Probing reads registers and selects queues; it resets each device before and after, as the
kernel's probe does, and accepts no features, so it leaves every device as it found it: reset.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from viowire import registry
from viowire.client.connection import DeviceInfo
from viowire.client.errors import NoDeviceError
from viowire.client.mmio import VirtioMmioDevice
from viowire.client.target import devices, open_target
from viowire.declarations import Declaration
from viowire.virtio.config import decode_config
from viowire.virtio.constants import DeviceId, device_name, feature_names
from viowire.virtio.net import NetStatus, format_mac

MAX_QUEUES = 64


async def describe_device(dev: VirtioMmioDevice, info: DeviceInfo) -> dict[str, Any]:
    """A JSON-able description of one device window."""
    entry: dict[str, Any] = {
        "transport": dev.transport,
        "base": info.base,
        "size": info.size,
        "irq": info.irq,
        "version": info.version,
        "device_id": info.device_id,
        "name": device_name(info.device_id),
        "vendor_id": info.vendor_id,
    }
    try:
        await dev.probe()
    except NoDeviceError:
        entry.update(features=[], feature_bits=0, queues=[], config={})
        return entry
    await dev.reset()
    features = await dev.get_features()
    entry["version"] = dev.version
    entry["feature_bits"] = features
    entry["features"] = feature_names(features, registry.feature_bits(dev.device_id))
    entry["queues"] = await _queues(dev)
    device_class = registry.by_device_id(dev.device_id)  # a user's type: its own layout
    layout = None if device_class is None else device_class.config_layout
    entry["config"] = await decode_config(dev.device_id, features, dev.config_read_int, layout)
    await dev.reset()
    return entry


async def _queues(dev: VirtioMmioDevice) -> list[dict[str, int]]:
    queues = []
    for index in range(MAX_QUEUES):
        num_max = await dev.queue_num_max_of(index)
        if num_max == 0:
            break
        queues.append({"index": index, "num_max": num_max})
    return queues


async def describe_platform(
    url: str, *, memory: str = "auto", windows: Sequence[Declaration] = ()
) -> list[dict[str, Any]]:
    """Every device of ``url`` (or of the declared ``windows``), described."""
    async with await open_target(url, memory=memory, windows=windows) as target:
        return [
            await describe_device(await target.attach(info), info)
            for info in await devices(target, windows)
        ]


def as_declarations(described: list[dict[str, Any]]) -> list[Declaration]:
    """The device windows of a description, for device trees and kernel parameters."""
    return [Declaration(d["base"], d["size"], d["irq"]) for d in described]


def format_text(devices: list[dict[str, Any]]) -> str:
    lines = []
    for i, d in enumerate(devices):
        kind = "legacy" if d["version"] == 1 else "modern"
        if d.get("transport") == "vhost-user":
            lines.append(f"{i}: {d['name']} (DeviceID {d['device_id']}, from the URL's type=)")
            lines.append("\tTransport: vhost-user (no register window, no interrupt line)")
        else:
            lines.append(f"{i}: {d['base']:#010x} {d['name']} (DeviceID {d['device_id']})")
            lines.append(
                f"\tWindow: {d['base']:#x}-{d['base'] + d['size'] - 1:#x} "
                f"[size={d['size']:#x}], IRQ {d['irq']}"
            )
            lines.append(
                f"\tTransport: virtio-mmio Version {d['version']} ({kind}), "
                f"VendorID {d['vendor_id']:#010x}"
            )
        lines.append(
            f"\tFeatures: {d.get('feature_bits', 0):#018x} {' '.join(d['features']) or '(none)'}"
        )
        for q in d["queues"]:
            lines.append(f"\tQueue {q['index']}: QueueNumMax {q['num_max']}")
        for name, value in d["config"].items():
            lines.append(f"\tConfig {name}: {_config_text(d['device_id'], name, value)}")
        lines.append("")
    return "\n".join(lines).rstrip() + "\n" if lines else "(no devices)\n"


def _config_text(device_id: int, name: str, value: int) -> str:
    """A config field as a person reads it: a MAC as one, status flags by name, sectors in MiB
    (JSON keeps the integers, as the fields are read little-endian)."""
    if device_id == DeviceId.NET and name == "mac":
        return format_mac(value.to_bytes(6, "little"))
    if device_id == DeviceId.NET and name == "status":
        flags = [flag.name for flag in NetStatus if value & flag]
        return f"{value:#x} ({' '.join(flags) or 'link down'})"
    if name == "capacity":
        return f"{value} sectors ({value * 512 / (1 << 20):.1f} MiB)"
    return str(value)
