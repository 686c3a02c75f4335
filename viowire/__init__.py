"""viowire: virtio-mmio devices as network services."""

__version__ = "0.1.0"
