"""A Linux TAP interface from Python: open ``/dev/net/tun`` as IFF_TAP | IFF_NO_PI, read and
write whole Ethernet frames (no header before them), set the MAC, MTU, link and carrier.

Shared by the server (a TAP as a port of a link, :mod:`viowire.server.tap`) and the client
(``viowire net-attach``, :mod:`viowire.client.netattach`). The descriptor is nonblocking: a
read with nothing queued returns None, a write the kernel cannot take now is dropped (the
caller counts it); nothing here waits. A TAP this module creates is not persistent, so the
kernel removes the interface when its descriptor closes; one that existed before (``ip tuntap
add``) stays.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct

TUN_PATH = "/dev/net/tun"
IFNAMSIZ = 16  # the kernel's limit, with the terminating NUL
# <linux/if_tun.h>: _IOW('T', 202, int) and _IOW('T', 226, int); the flags of struct ifreq
TUNSETIFF = 0x400454CA
TUNSETCARRIER = 0x400454E2
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
# <linux/sockios.h> and <net/if.h>
SIOCGIFFLAGS, SIOCSIFFLAGS = 0x8913, 0x8914
SIOCSIFMTU = 0x8922
SIOCSIFHWADDR = 0x8924
IFF_UP = 0x1
ARPHRD_ETHER = 1
CAP_NET_ADMIN = 12
READ_SIZE = 65536 + 64  # more than any frame of a 65535-byte MTU: a read is never cut short

NEEDS_CAP = (
    "creating or opening a TAP needs CAP_NET_ADMIN: run as root, or give the capability "
    "(setcap cap_net_admin+ep on the Python binary; in a container: cap_add NET_ADMIN and "
    "user root), or create it for this user first: ip tuntap add mode tap user $USER name {name}"
)


class TapError(OSError):
    """A TAP that cannot be had; the message names it and says what to do."""

    def __str__(self) -> str:
        return self.strerror or super().__str__()


def check_ifname(text: object) -> str:
    """An interface name Linux accepts (1..15 bytes, no '/', ':' or white space)."""
    name = str(text).strip()
    if not name or len(name.encode()) >= IFNAMSIZ:
        raise ValueError(f"interface name {name!r} must have 1..{IFNAMSIZ - 1} characters")
    if name in (".", "..") or any(c in name for c in "/: \t\n"):
        raise ValueError(f"interface name {name!r} may not contain '/', ':' or white space")
    return name


def has_cap_net_admin() -> bool:
    """Whether this process holds CAP_NET_ADMIN (its effective set, from /proc)."""
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> CAP_NET_ADMIN & 1)
    except OSError:
        pass
    return os.geteuid() == 0


def exists(name: str) -> bool:
    """Whether an interface called ``name`` exists in this network namespace."""
    try:
        socket.if_nametoindex(name)
    except OSError:
        return False
    return True


class Tap:
    """One open TAP interface; ``created``: this process made it (and closing removes it)."""

    def __init__(self, fd: int, name: str, created: bool) -> None:
        self.fd, self.name, self.created = fd, name, created

    @classmethod
    def open(cls, name: str) -> Tap:
        """Attach to the TAP ``name``, creating it if absent; OSError with what to do if not."""
        name = check_ifname(name)
        existed = exists(name)
        try:
            fd = os.open(TUN_PATH, os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            raise TapError(
                errno.ENOENT,
                f"tap {name}: no {TUN_PATH} (modprobe tun; in a container: devices {TUN_PATH})",
            ) from None
        except PermissionError:
            raise TapError(errno.EPERM, f"tap {name}: " + NEEDS_CAP.format(name=name)) from None
        try:
            ifr = struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI)
            fcntl.ioctl(fd, TUNSETIFF, ifr)
        except OSError as exc:
            os.close(fd)
            raise _explain(exc, name, existed) from None
        return cls(fd, name, created=not existed)

    # -- frames ---------------------------------------------------------------------------------
    def read(self) -> bytes | None:
        """One frame the kernel sent out of the interface, or None if none is waiting."""
        try:
            return os.read(self.fd, READ_SIZE)
        except (BlockingIOError, InterruptedError):
            return None

    def write(self, frame: bytes) -> bool:
        """Hand one frame to the kernel as received on the interface; False if it was not
        taken (the interface is down, or its queue is full): the caller counts a drop."""
        try:
            return os.write(self.fd, frame) == len(frame)
        except OSError:  # EAGAIN (full), EIO (down), EINVAL (malformed): a NIC drops too
            return False

    # -- the interface --------------------------------------------------------------------------
    def set_mac(self, mac: bytes) -> None:
        self._ifreq(SIOCSIFHWADDR, struct.pack("H6s8x", ARPHRD_ETHER, mac))

    def set_mtu(self, mtu: int) -> None:
        self._ifreq(SIOCSIFMTU, struct.pack("i", mtu))

    def set_up(self) -> None:
        flags = struct.unpack_from("H", self._ifreq(SIOCGIFFLAGS, bytes(2)))[0]
        self._ifreq(SIOCSIFFLAGS, struct.pack("H", flags | IFF_UP))

    def set_carrier(self, on: bool) -> None:
        """Carrier on or off (TUNSETCARRIER, Linux 4.19+): ``ip link`` shows NO-CARRIER."""
        fcntl.ioctl(self.fd, TUNSETCARRIER, struct.pack("i", int(on)))

    def _ifreq(self, request: int, data: bytes) -> bytes:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            ifr = struct.pack("16s", self.name.encode()) + data.ljust(24, b"\0")
            return fcntl.ioctl(sock.fileno(), request, ifr)[16:]

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return f"<Tap {self.name} fd={self.fd}{' created' if self.created else ''}>"


def _explain(exc: OSError, name: str, existed: bool) -> TapError:
    if exc.errno == errno.EPERM:
        return TapError(exc.errno, f"tap {name}: " + NEEDS_CAP.format(name=name))
    if exc.errno == errno.EBUSY:
        return TapError(exc.errno, f"tap {name}: another process has it open (one at a time)")
    if exc.errno == errno.EINVAL and existed:
        return TapError(exc.errno, f"tap {name}: an interface of that name exists and is not a TAP")
    return TapError(exc.errno, f"tap {name}: {exc.strerror}")
