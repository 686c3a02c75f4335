"""Self-describing Ethernet frames, so every frame a net device receives can be checked exactly.

A load frame is an Ethernet header (destination, source, ethertype 0x88B5, IEEE's local
experimental type) and a payload that starts with a 34-byte header (magic, run seed, sender,
receiver, sequence number within the sender's flow, frame length) and is filled with the
BLAKE2b digest of that header, repeated: the checksum and the pattern in one. The receiver
rebuilds the frame from its header and compares whole frames; a frame that is not the run's
(another protocol, another run, flooded to us for another MAC) is *foreign*, not an error.

No I/O here: bytes in, verdict out (the flows that use it: :mod:`viowire.load.net`).
"""

from __future__ import annotations

import hashlib
import struct
from dataclasses import dataclass

from viowire.virtio.net import BROADCAST, ETH_HEADER

MAGIC = b"VWNET001"
ETHERTYPE = b"\x88\xb5"  # IEEE 802 local experimental ethertype 1
HEADER = struct.Struct("<8sQIIQH")  # magic, seed, sender, receiver, seq, frame length
ANYONE = 0xFFFF_FFFF  # the receiver of a probe: a broadcast that asks who is on the link
MIN_FRAME = 60  # Ethernet's minimum without the FCS; holds the Ethernet and load headers
_DIGEST = 64


@dataclass(frozen=True, slots=True)
class Verdict:
    """What a received frame is: ``kind`` is ``ok``, ``foreign`` (not for this check: ignore),
    ``probe`` (a broadcast asking who is on the link), or an error (``misdirected``,
    ``length``, ``corrupt``); ``sender`` and ``seq`` are from the frame's header (-1 where it
    has none)."""

    kind: str
    sender: int = -1
    seq: int = -1
    detail: str = ""


FOREIGN = Verdict("foreign")


class FramePattern:
    """Frames of ``size`` bytes (Ethernet header included) of the run with ``seed``."""

    def __init__(self, seed: int, size: int) -> None:
        if size < MIN_FRAME:
            raise ValueError(f"a load frame is at least {MIN_FRAME} bytes, not {size}")
        self.seed = seed & 0xFFFF_FFFF_FFFF_FFFF
        self.size = size
        self._fill = size - ETH_HEADER - HEADER.size
        self._repeats = -(-self._fill // _DIGEST)

    def make(self, dst: bytes, src: bytes, sender: int, receiver: int, seq: int) -> bytes:
        """Frame ``seq`` of the flow from device ``sender`` to device ``receiver``."""
        header = HEADER.pack(MAGIC, self.seed, sender, receiver, seq, self.size)
        body = hashlib.blake2b(header, digest_size=_DIGEST).digest() * self._repeats
        return dst + src + ETHERTYPE + header + body[: self._fill]

    def check(self, frame: bytes, mac: bytes, receiver: int) -> Verdict:
        """The verdict on ``frame`` as received by device ``receiver``, whose MAC is ``mac``."""
        if len(frame) < ETH_HEADER + HEADER.size or frame[12:14] != ETHERTYPE:
            return FOREIGN
        magic, seed, sender, to, seq, length = HEADER.unpack_from(frame, ETH_HEADER)
        dst = bytes(frame[:6])
        if magic != MAGIC or seed != self.seed or (dst != mac and dst != BROADCAST):
            return FOREIGN  # another run's, or flooded to every port for another MAC
        if to == ANYONE and dst == BROADCAST:
            return Verdict("probe", sender, seq)
        if to != receiver:
            return Verdict(
                "misdirected", sender, seq, f"frame {seq} of device {sender} for device {to}"
            )
        if length != self.size or len(frame) != self.size:
            return Verdict(
                "length", sender, seq, f"frame {seq}: {len(frame)} bytes, sent {self.size}"
            )
        good = self.make(dst, bytes(frame[6:12]), sender, receiver, seq)
        if frame != good:
            at = next(i for i, (a, b) in enumerate(zip(frame, good, strict=True)) if a != b)
            return Verdict(
                "corrupt",
                sender,
                seq,
                f"frame {seq} of device {sender}: byte {at} is {frame[at]:#04x}, not "
                f"{good[at]:#04x}",
            )
        return Verdict("ok", sender, seq)


def announce(mac: bytes) -> bytes:
    """A frame from ``mac`` to itself: the switch learns where ``mac`` is and, the destination
    being on the sender's own side, delivers it nowhere (so no flood reaches anyone)."""
    return (mac + mac + ETHERTYPE + MAGIC).ljust(MIN_FRAME, b"\0")
