"""Endpoint addresses: ``tcp://HOST:PORT`` and ``unix:///PATH``."""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import urlsplit


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "tcp" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"tcp://{host}:{self.port}"


def parse_endpoint(url: str) -> Endpoint:
    """Parse ``tcp://127.0.0.1:7000`` or ``unix:///run/viowire.sock``; errors say what to write."""
    try:
        parts = urlsplit(url)
    except ValueError as exc:  # e.g. an unclosed [ of an IPv6 address
        raise ValueError(f"{url!r}: {exc}, e.g. tcp://[::1]:7000") from None
    if parts.scheme == "unix":
        path = parts.netloc + parts.path
        if not path:
            raise ValueError(
                f"{url!r}: a Unix socket URL needs a path, e.g. unix:///tmp/viowire.sock"
            )
        return Endpoint("unix", path=path)
    if parts.scheme == "tcp":
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ValueError(
                f"{url!r}: a TCP URL needs a host and a port, e.g. tcp://127.0.0.1:7000"
            )
        return Endpoint("tcp", host=parts.hostname, port=port)
    raise ValueError(f"{url!r}: use tcp://HOST:PORT or unix:///PATH")
