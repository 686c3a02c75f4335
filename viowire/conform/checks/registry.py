"""The registry of conformance checks: every check, in report order. Each drives one device
through a correct flow or a deliberate violation and reports what it saw.

Which outcomes are good is decided per check, from the spec where it speaks and from the
reference (QEMU, Linux) where it does not:

- identification, flows, values: PASS.
- register misuse the driver MUST NOT commit (§4.2.2.2: wrong widths, misaligned accesses,
  reserved offsets, writes to read-only and reads of write-only registers; unoffered or late
  features, §2.2.2, §3.1.1): REJECT, i.e. refused with the device still healthy. DEVICE_NEEDS_RESET
  for a register access is a FAIL (the reference's rule: ignore and log, never fault). An 8-byte
  access may also act as the two aligned 32-bit accesses a bus splits it into (QEMU's does).
- queue configuration the device cannot honour (QueueNum above QueueNumMax, not a power of 2, 0;
  addresses written while QueueReady is 1): REJECT or WEDGED. Running the ring with the bad value
  is a FAIL: the device keeps using a broken ring.
- structurally broken rings (loops, next or head beyond the table, bad or nested indirect tables,
  readable after writable, more than 2^32 bytes, avail.idx ahead by more than the queue size):
  WEDGED. §2.1.2: a device SHOULD set DEVICE_NEEDS_RESET when it needs a reset, and MUST then
  send a configuration change notification; a modern device that goes silent instead leaves its
  driver waiting forever, so there REJECT is a FAIL. A legacy driver cannot see
  DEVICE_NEEDS_RESET, so a legacy device may go silent (REJECT). Using the chain is a FAIL.
- driver errors on a well-formed ring with one sensible reading (a buffer outside RAM, INDIRECT
  without the feature or together with NEXT, a zero-length buffer): as above, but serving the
  chain without harm is tolerated (PASS).

Every check runs from a reset; afterwards the runner resets again, verifies the reset, audits
guest memory, and after a violation runs a correct I/O round (see :mod:`viowire.conform.runner`).
"""

from __future__ import annotations

from viowire.conform import net
from viowire.conform.checks import (
    access,
    config,
    console,
    devices,
    driver,
    features,
    identity,
    interrupts,
    io,
    notify,
    queue_sizes,
    queues,
    reset,
    rings,
    status,
    widths,
)
from viowire.conform.model import Check

CHECKS: list[Check] = [
    # identification (§4.2.2, §4.2.3.1.1)
    identity.magic,
    identity.version,
    identity.device_id,
    identity.vendor_id,
    # initialisation and status (§3.1, §2.1)
    status.init_flow,
    status.init_flow_legacy,
    status.status_state_machine,
    # features (§2.2, §6)
    features.features_version_1,
    features.features_legacy_word1,
    features.features_sel_above_1,
    features.features_mmio_transport_bits,
    features.features_unoffered_refused,
    features.features_after_features_ok,
    # I/O (§2.7, §5.2, §5.4)
    io.io_requests,
    devices.io_blk_read_write,
    devices.io_blk_status,
    devices.io_rng,
    *console.CHECKS,  # virtio-console's own (§5.3)
    *net.CHECKS,  # virtio-net's own (§5.1)
    io.io_indirect,
    # interrupts (§4.2.2.1, §2.7.7)
    interrupts.irq_ack_exact,
    interrupts.irq_event_idx,
    # configuration space (§2.5, §4.2.2)
    config.config_widths,
    config.config_generation,
    config.config_read_only,
    # register access rules (§4.2.2.2)
    widths.width_status,
    widths.width_queue_sel,
    widths.width_features_sel,
    widths.width_reads,
    widths.width_notify,
    widths.unaligned,
    access.undefined_offsets,
    access.read_only_writes,
    access.write_only_reads,
    access.shm_absent,
    # queue configuration (§4.2.3.2, §4.2.4, §2.7)
    queues.queue_ready_readback,
    queues.queue_legacy_pfn,
    queues.queue_legacy_layout,
    queue_sizes.queue_num_above_max,
    queue_sizes.queue_num_not_pow2,
    queue_sizes.queue_num_zero,
    queues.queue_nonexistent_sel,
    queues.queue_before_features_ok,
    queues.queue_write_while_ready,
    # notifications (§2.1.2, §4.2.3.3)
    notify.notify_before_driver_ok,
    notify.notify_nonexistent_queue,
    # malformed rings (§2.7.4 - §2.7.6)
    rings.ring_desc_loop,
    rings.ring_next_out_of_range,
    rings.ring_head_out_of_range,
    rings.ring_addr_outside_ram,
    rings.ring_zero_length,
    rings.ring_readable_after_writable,
    rings.ring_indirect_nested,
    rings.ring_indirect_bad_len,
    rings.ring_indirect_with_next,
    rings.ring_indirect_not_negotiated,
    rings.ring_avail_idx_jump,
    # reset (§2.4, §4.2.2.1)
    reset.reset_clears_state,
    reset.reset_ring_indices,
    reset.reset_in_flight,
    reset.reset_storm,
    # the driver viowire ships (Linux's sequence)
    driver.driver_linux_flow,
    # Last: QEMU 7.2's virtio-rng, given this chain, sets out to produce ~8 GiB of entropy (its
    # memory grows by hundreds of MB per second); run last, so that only this check is lost to
    # such a device.
    rings.ring_huge_length,
]
"""Every check, in report order."""
