"""Ethernet, ARP and ICMP frames built and read by hand, for tests that talk to a real kernel
through a virtio-net device (written here, not taken from viowire, as an independent check)."""

from __future__ import annotations

import socket
import struct

BROADCAST = b"\xff" * 6
ETH_ARP, ETH_IPV4 = 0x0806, 0x0800


def checksum(data: bytes) -> int:
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    total = (total >> 16) + (total & 0xFFFF)
    total += total >> 16
    return ~total & 0xFFFF


def arp_request(mac: bytes, my_ip: str, their_ip: str) -> bytes:
    body = struct.pack(
        "!HHBBH6s4s6s4s", 1, ETH_IPV4, 6, 4, 1, mac, socket.inet_aton(my_ip), bytes(6),
        socket.inet_aton(their_ip),
    )  # fmt: skip
    return BROADCAST + mac + struct.pack("!H", ETH_ARP) + body


def arp_reply_of(frame: bytes) -> tuple[bytes, str] | None:
    """(sender MAC, sender IP) of an ARP reply, else None."""
    if len(frame) < 42 or ethertype(frame) != ETH_ARP:
        return None
    op, sha, spa = struct.unpack("!6xH6s4s", frame[14:32])
    return (sha, socket.inet_ntoa(spa)) if op == 2 else None


def echo_request(dst_mac: bytes, src_mac: bytes, src: str, dst: str, ident: int, seq: int,
                 payload: bytes) -> bytes:  # fmt: skip
    icmp = struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload
    icmp = icmp[:2] + struct.pack("!H", checksum(icmp)) + icmp[4:]
    iph = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, 20 + len(icmp), 1, 0, 64, 1, 0, socket.inet_aton(src),
        socket.inet_aton(dst),
    )  # fmt: skip
    iph = iph[:10] + struct.pack("!H", checksum(iph)) + iph[12:]
    return dst_mac + src_mac + struct.pack("!H", ETH_IPV4) + iph + icmp


def icmp_of(frame: bytes) -> tuple[str, int, int, int, bytes] | None:
    """(source IP, type, id, seq, payload) of an ICMP frame, else None."""
    if len(frame) < 42 or ethertype(frame) != ETH_IPV4 or frame[23] != 1:
        return None
    ihl = (frame[14] & 0xF) * 4
    kind, _, _, ident, seq = struct.unpack("!BBHHH", frame[14 + ihl : 14 + ihl + 8])
    return socket.inet_ntoa(frame[26:30]), kind, ident, seq, frame[14 + ihl + 8 :]


def ethertype(frame: bytes) -> int:
    return struct.unpack("!H", frame[12:14])[0]
