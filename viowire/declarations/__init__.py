"""Declared devices: where a virtio-mmio window is, before anyone has looked inside it.

Linux learns about virtio-mmio devices in three equivalent ways (virtio.md §7.1): a static platform
device table, a device-tree node with ``compatible = "virtio,mmio"``, or the
``virtio_mmio.device=`` kernel parameter. Each says only where a register window is and which
interrupt it raises; what sits there is found by probing it (magic, version, device id). This
package reads and writes all three as :class:`Declaration` values, so the client can be told
about devices in exactly the forms a guest kernel accepts. One module per form:

- ``model``: :class:`Declaration` and :class:`DeclarationError`, and what the two device-tree
  forms share: which nodes are devices, and the one platform tree both builders write;
- ``cmdline``: the kernel's ``virtio_mmio.device=`` parameter, read and written as the kernel does;
- ``dts``: device tree source, a robust subset of dtc's language;
- ``fdt``: flattened device trees (FDT v16/v17), hostile blobs included;
- ``platform``: the server's static platform table.
"""

# ``X as X``: importable before the split, though not in __all__ (the tests reach the three
# private ones to compare the parsers with dtc).
from viowire.declarations.cmdline import CMDLINE_EXAMPLE as CMDLINE_EXAMPLE
from viowire.declarations.cmdline import (
    CMDLINE_SYNTAX,
    assign_ids,
    format_cmdline,
    format_kernel_params,
    parse_cmdline,
    parse_cmdline_device,
)
from viowire.declarations.cmdline import PLATFORM_DEVID_AUTO as PLATFORM_DEVID_AUTO
from viowire.declarations.dts import _DtsParser as _DtsParser
from viowire.declarations.dts import build_dts, parse_dts
from viowire.declarations.fdt import FDT_LAST_COMPATIBLE as FDT_LAST_COMPATIBLE
from viowire.declarations.fdt import FDT_MAGIC as FDT_MAGIC
from viowire.declarations.fdt import FDT_VERSION as FDT_VERSION
from viowire.declarations.fdt import _fdt_blocks as _fdt_blocks
from viowire.declarations.fdt import _fdt_tree as _fdt_tree
from viowire.declarations.fdt import build_dtb, parse_dtb
from viowire.declarations.model import INT_MAX as INT_MAX
from viowire.declarations.model import INT_MIN as INT_MIN
from viowire.declarations.model import MAX_DEPTH as MAX_DEPTH
from viowire.declarations.model import U32 as U32
from viowire.declarations.model import U64 as U64
from viowire.declarations.model import Declaration, DeclarationError
from viowire.declarations.platform import declarations_from_platform

__all__ = [
    "CMDLINE_SYNTAX",
    "Declaration",
    "DeclarationError",
    "assign_ids",
    "build_dtb",
    "build_dts",
    "declarations_from_platform",
    "format_cmdline",
    "format_kernel_params",
    "parse_cmdline",
    "parse_cmdline_device",
    "parse_dtb",
    "parse_dts",
]
