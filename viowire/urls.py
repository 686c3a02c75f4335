"""Endpoint addresses: ``tcp://HOST:PORT``, ``tls://HOST:PORT`` and ``unix:///PATH``."""

from __future__ import annotations

import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

INET_SCHEMES = ("tcp", "tls")  # TCP, in the clear or under TLS


@dataclass(frozen=True)
class Endpoint:
    scheme: str  # "tcp", "tls" or "unix"
    host: str = ""
    port: int = 0
    path: str = ""

    @property
    def inet(self) -> bool:
        """A TCP endpoint (``tcp://`` or ``tls://``), as opposed to a Unix socket."""
        return self.scheme in INET_SCHEMES

    def __str__(self) -> str:
        if self.scheme == "unix":
            return f"unix://{self.path}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


def parse_endpoint(url: str, *, tls: bool = False) -> Endpoint:
    """Parse ``tcp://127.0.0.1:7000`` or ``unix:///run/viowire.sock`` (and ``tls://HOST:PORT``
    where the caller can speak TLS: ``tls=True``); errors say what to write."""
    also = " (or tls://HOST:PORT)" if tls else ""
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
    if parts.scheme == "tcp" or (tls and parts.scheme == "tls"):
        try:
            port = parts.port
        except ValueError:
            port = None
        if not parts.hostname or port is None:
            raise ValueError(
                f"{url!r}: a {parts.scheme.upper()} URL needs a host and a port, e.g. "
                f"{parts.scheme}://127.0.0.1:7000"
            )
        return Endpoint(parts.scheme, host=parts.hostname, port=port)
    raise ValueError(f"{url!r}: use tcp://HOST:PORT or unix:///PATH{also}")


def is_loopback(host: str) -> bool:
    """Whether every address ``host`` names is a loopback address (127.0.0.0/8, ::1). A name is
    resolved; one that does not resolve is not loopback."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, proto=socket.IPPROTO_TCP)
    except OSError:
        return False
    return bool(infos) and all(ipaddress.ip_address(i[4][0]).is_loopback for i in infos)
