"""What a load run does: the options of ``viowire load``, checked once, as one frozen value."""

from __future__ import annotations

import argparse
import secrets
from dataclasses import dataclass

from viowire.load.frames import MIN_FRAME
from viowire.options import UsageError
from viowire.units import format_size, parse_size
from viowire.virtio.blk import BLK_SECTOR_SIZE
from viowire.virtio.net import ETH_HEADER

OPS = ("blk-read", "blk-write", "rng", "net")
OP_KIND = {"blk-read": "blk", "blk-write": "blk", "rng": "rng", "net": "net"}
DEFAULT_MIX = "blk-read=60,blk-write=30,rng=10,net=30"
"""Without --mix, the operations of the kinds the server's platform has (at least one)."""
MAX_BLOCK = 1 << 20
MAX_FRAME = ETH_HEADER + 65535  # the largest MTU a virtio-net device can offer (a u16)


def parse_mix(text: str) -> dict[str, int]:
    """``blk-read=60,blk-write=30,net=10`` -> weights; omitted operations weigh 0."""
    weights = dict.fromkeys(OPS, 0)
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, value = part.partition("=")
        name = name.strip()
        if name not in weights:
            raise ValueError(f"--mix {text!r}: unknown operation {name!r} (use {', '.join(OPS)})")
        try:
            weight = int(value) if sep else -1
        except ValueError:
            weight = -1
        if weight < 0:
            raise ValueError(f"--mix {text!r}: give {name}=WEIGHT, a non-negative integer")
        weights[name] = weight
    if not any(weights.values()):
        raise ValueError(f"--mix {text!r}: at least one operation needs a weight above 0")
    return weights


@dataclass(frozen=True)
class LoadConfig:
    url: str
    sessions: int = 16
    devices: int | None = None  # None: every usable device of every session's platform
    duration: float | None = 10.0
    requests: int | None = None
    mix: tuple[tuple[str, int], ...] = tuple(parse_mix(DEFAULT_MIX).items())
    block_size: int = 4096
    span: int = 0  # bytes of each disk used from offset 0; 0 = the whole disk
    depth: int = 1
    concurrency: int = 256
    memory: str = "auto"
    seed: int = 0
    bringup_concurrency: int = 512
    timeout: float = 10.0
    progress: bool = True
    json: bool = False
    workload: str | None = None  # package.module:function instead of the mix (load/workload.py)
    mix_given: bool = False  # False: the default mix, narrowed to the platform's kinds
    frame_size: int = 1514  # bytes of each net frame, Ethernet header included
    allow_loss: bool = False  # frames a link dropped are counted, not errors
    timeseries: str | None = None  # a row a second to this file (load/timeseries.py)
    timeseries_format: str = "csv"  # csv or jsonl
    report: str | None = None  # an HTML page of the run (load/html.py)
    histogram_out: str | None = None  # the run in a mergeable form (load/merge.py)

    def __post_init__(self) -> None:
        positive = {
            "--sessions": self.sessions,
            "--depth": self.depth,
            "--concurrency": self.concurrency,
            "--bringup-concurrency": self.bringup_concurrency,
        }
        for name, value in positive.items():
            if value < 1:
                raise ValueError(f"{name} {value}: must be at least 1")
        if self.devices is not None and self.devices < 1:
            raise ValueError(f"--devices {self.devices}: must be at least 1")
        if (self.duration is None) == (self.requests is None):
            raise ValueError("give exactly one of --duration and --requests")
        if self.duration is not None and self.duration <= 0:
            raise ValueError(f"--duration {self.duration}: must be above 0")
        if self.requests is not None and self.requests < 1:
            raise ValueError(f"--requests {self.requests}: must be at least 1")
        if self.timeout <= 0:
            raise ValueError(f"--timeout {self.timeout}: must be above 0")
        bs = self.block_size
        if bs < BLK_SECTOR_SIZE or bs % BLK_SECTOR_SIZE or bs > MAX_BLOCK:
            raise ValueError(
                f"--block-size {format_size(bs)}: a multiple of {BLK_SECTOR_SIZE} bytes, "
                f"at most {format_size(MAX_BLOCK)}"
            )
        if self.span and self.span < bs * self.depth:
            raise ValueError(
                f"--span {format_size(self.span)} holds fewer than --depth {self.depth} blocks of "
                f"{format_size(bs)}: requests in flight on one disk never share a block"
            )

        if not MIN_FRAME <= self.frame_size <= MAX_FRAME:
            raise ValueError(
                f"--frame-size {self.frame_size}: an Ethernet frame of {MIN_FRAME} to "
                f"{MAX_FRAME} bytes, header included (1514 fills an MTU of 1500)"
            )

    @property
    def weights(self) -> dict[str, int]:
        return dict(self.mix)

    @property
    def kinds(self) -> tuple[str, ...]:
        """The device kinds the mix uses: only these are brought up."""
        return tuple(sorted({OP_KIND[op] for op, weight in self.mix if weight}))

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> LoadConfig:
        duration = args.duration
        if duration is None and args.requests is None:
            duration = cls.duration
        workload = getattr(args, "workload", None)
        if workload and args.mix is not None:
            raise UsageError(
                "--mix weighs the built-in blk, rng and net operations, --workload replaces them: "
                "give one of the two"
            )
        from viowire.load.timeseries import timeseries_format  # hdrh: for `viowire load` alone

        series = getattr(args, "timeseries", None)
        fmt = getattr(args, "timeseries_format", None)
        return cls(
            url=args.url,
            sessions=args.sessions,
            devices=args.devices,
            duration=duration,
            requests=args.requests,
            mix=tuple(parse_mix(args.mix or DEFAULT_MIX).items()),
            block_size=parse_size(args.block_size),
            span=parse_size(args.span),
            depth=args.depth,
            concurrency=args.concurrency,
            memory=args.memory or "auto",
            seed=secrets.randbits(32) if args.seed is None else args.seed,
            bringup_concurrency=args.bringup_concurrency,
            timeout=args.timeout,
            progress=not args.no_progress,
            json=args.json,
            workload=workload,
            mix_given=args.mix is not None,
            frame_size=parse_size(args.frame_size),
            allow_loss=args.allow_loss,
            timeseries=series,
            timeseries_format=timeseries_format(series, fmt) if series else "csv",
            report=getattr(args, "report", None),
            histogram_out=getattr(args, "histogram_out", None),
        )
