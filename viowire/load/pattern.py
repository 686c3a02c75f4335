"""Self-describing block contents, so every read of a block can be checked exactly.

A written block starts with a 40-byte header (magic, run seed, device, offset, generation) and
is filled with the BLAKE2b digest of that header, repeated. The load generator remembers the
generation it last wrote to each (device, block), rebuilds the bytes it expects and compares
whole blocks; a block never written must read as zeroes. On a mismatch the header of what came
back says what went wrong: a lost write, a stale generation, a block that belongs elsewhere
(misdirected), or a corrupted body.

No I/O here: this is pure bytes in, verdict out.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Collection

MAGIC = b"VWLOAD01"
HEADER = struct.Struct("<8sQIIQQ")  # magic, seed, device, reserved, offset, generation
_DIGEST = 64


class BlockPattern:
    """The contents of generation ``g`` of the block at ``offset`` of device ``device``."""

    def __init__(self, seed: int, block_size: int) -> None:
        if block_size < HEADER.size:
            raise ValueError(f"block size {block_size} is below the {HEADER.size}-byte header")
        self.seed = seed & 0xFFFF_FFFF_FFFF_FFFF
        self.block_size = block_size
        self.zeroes = bytes(block_size)
        self._fill = block_size - HEADER.size
        self._repeats = -(-self._fill // _DIGEST)

    def make(self, device: int, offset: int, generation: int) -> bytes:
        """The bytes of that generation (generation 0: never written, all zeroes)."""
        if generation == 0:
            return self.zeroes
        header = HEADER.pack(MAGIC, self.seed, device, 0, offset, generation)
        body = hashlib.blake2b(header, digest_size=_DIGEST).digest() * self._repeats
        return header + body[: self._fill]

    def matches(self, data: bytes, device: int, offset: int, generations: Collection[int]) -> bool:
        """Whether ``data`` is exactly one of ``generations`` of that block."""
        return any(data == self.make(device, offset, g) for g in generations)

    def diagnose(
        self, data: bytes, device: int, offset: int, generations: Collection[int]
    ) -> tuple[str, str]:
        """(kind, detail) of a block that matched none of ``generations``."""
        want = "/".join(str(g) for g in sorted(generations))
        if len(data) != self.block_size:
            return "length", f"read {len(data)} bytes, expected {self.block_size}"
        if data == self.zeroes:
            return "lost", f"reads as zeroes; generation {want} was written"
        if data[: len(MAGIC)] != MAGIC:
            if set(generations) == {0}:
                return "unexpected", "never written, yet holds data"
            return "garbage", f"no block header; expected generation {want}"
        _, seed, dev, _, off, gen = HEADER.unpack_from(data)
        if (seed, dev, off) != (self.seed, device, offset):
            return "misdirected", (
                f"holds the block of device {dev} offset {off:#x} (run seed {seed:#x}); "
                f"expected device {device} offset {offset:#x} generation {want}"
            )
        if gen not in generations:
            return "stale", f"holds generation {gen}; expected {want}"
        good = self.make(device, offset, gen)
        at = next(i for i, (a, b) in enumerate(zip(data, good, strict=True)) if a != b)
        return "corrupt", f"generation {gen}: byte {at} is {data[at]:#04x}, not {good[at]:#04x}"
