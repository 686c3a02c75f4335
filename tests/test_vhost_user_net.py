"""virtio-net through viowire's vhost-user back-end: frames between front-ends on one in-server
link, a real Linux guest pinging a peer on it, and two guests pinging each other.

The peer is a host on the link written here (:class:`NetPeer`): the Python front-end drives a
second ``--device net,link=NAME`` of the same ``viowire vhost-user`` process, as a driver drives
its rings, and answers ARP requests for its address and ICMP echo requests to it. Nothing here
touches the host's network: the link is a switch inside the viowire process, the guest has no
other NIC, so no frame can leave the machine.
"""

from __future__ import annotations

import asyncio
import contextlib
import struct
from collections.abc import AsyncIterator

import guest
import pytest

from viowire.server.devices.net import NetDevice
from viowire.vhost_user import protocol as p
from viowire.vhost_user.backend import PROTOCOL_FEATURES
from viowire.vhost_user.frontend import Frontend, FrontendRing
from viowire.vhost_user.server import Listener
from viowire.virtio.constants import Feature
from viowire.virtio.net import HEADER_SIZE_MRG, RECEIVEQ, TRANSMITQ, NetFeature, parse_mac
from viowire.virtio.ring import VIRTQ_DESC_F_WRITE

TIMEOUT = 5.0
RING = 64
BUFFER = HEADER_SIZE_MRG + 1514  # a whole frame of a 1500-byte MTU after the 12-byte header
ETH_ARP, ETH_IPV4 = 0x0806, 0x0800
ARP_REQUEST, ARP_REPLY = 1, 2
ICMP_ECHO_REPLY, ICMP_ECHO_REQUEST = 0, 8

PEER_MAC = parse_mac("02:76:77:aa:00:01")
GUEST_MAC = "52:54:00:76:77:02"
PEER_IP, GUEST_IP = "10.205.0.1", "10.205.0.2"
"""A private subnet that exists only on the in-process link (see the module docstring)."""


def ip(text: str) -> bytes:
    return bytes(int(part) for part in text.split("."))


def checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ethernet(dst: bytes, src: bytes, ethertype: int, payload: bytes) -> bytes:
    return dst + src + struct.pack("!H", ethertype) + payload


def arp(oper: int, sha: bytes, spa: bytes, tha: bytes, tpa: bytes) -> bytes:
    return struct.pack("!HHBBH", 1, ETH_IPV4, 6, 4, oper) + sha + spa + tha + tpa


def ipv4(src: bytes, dst: bytes, proto: int, payload: bytes, ident: int = 0) -> bytes:
    length = 20 + len(payload)
    head = struct.pack("!BBHHHBBH4s4s", 0x45, 0, length, ident, 0, 64, proto, 0, src, dst)
    return head[:10] + struct.pack("!H", checksum(head)) + head[12:] + payload


def icmp_echo(kind: int, ident: int, seq: int, data: bytes) -> bytes:
    head = struct.pack("!BBHHH", kind, 0, 0, ident, seq)
    return head[:2] + struct.pack("!H", checksum(head + data)) + head[4:] + data


class NetPeer:
    """A host on a link, behind a vhost-user net device that the Python front-end drives.

    Receive buffers are fixed: descriptor ``i`` of the receive ring always points at buffer
    ``i`` and goes back to the ring as soon as its frame is read, as a NIC driver's ring does.
    """

    def __init__(self, fe: Frontend, mac: bytes, address: str) -> None:
        self.fe, self.mac, self.ip = fe, mac, ip(address)
        self.rx: FrontendRing | None = None
        self.tx: FrontendRing | None = None
        self._rx_seen = 0
        self._tx_next = 0
        self._rx_buffers: list[int] = []
        self._tx_buffers: list[int] = []
        self.answered = 0

    async def start(self) -> None:
        offered = await self.fe.get_u64(p.Request.GET_FEATURES)
        await self.fe.handshake(offered & (PROTOCOL_FEATURES | 1 << Feature.VERSION_1))
        self.rx = await self.fe.start_ring(RECEIVEQ, RING)
        self.tx = await self.fe.start_ring(TRANSMITQ, RING)
        ram = self.fe.ram
        self._rx_buffers = [ram.alloc(BUFFER) for _ in range(RING)]
        self._tx_buffers = [ram.alloc(BUFFER) for _ in range(RING)]
        for index, gpa in enumerate(self._rx_buffers):
            self.rx.ring.set_desc(index, gpa, BUFFER, VIRTQ_DESC_F_WRITE)
        self.rx.ring.publish(*range(RING))
        self.rx.kick_now()

    async def receive(self, timeout: float = TIMEOUT) -> bytes:
        """The next frame from the link (its virtio_net_hdr stripped)."""
        ring = self.rx.ring
        async with asyncio.timeout(timeout):
            while ring.used_idx == self._rx_seen:
                await self.rx.wait_call(timeout)
        head, length = ring.used_elem(self._rx_seen)
        self._rx_seen = (self._rx_seen + 1) & 0xFFFF
        data = ring.ram.read(self._rx_buffers[head], length)
        ring.publish(head)  # the buffer goes back to the device at once
        self.rx.kick_now()
        return data[HEADER_SIZE_MRG:]

    def send(self, frame: bytes) -> None:
        """Put ``frame`` on the link (header: no offloads). The device transmits in order, so
        a slot comes back before the ring wraps to it as long as fewer than RING wait."""
        ring = self.tx.ring
        if (ring.avail_idx - ring.used_idx) & 0xFFFF >= RING:
            raise AssertionError("the device has not transmitted the last ring's worth of frames")
        slot = self._tx_next
        self._tx_next = (slot + 1) % RING
        gpa = self._tx_buffers[slot]
        data = bytes(HEADER_SIZE_MRG) + frame
        ring.ram.write(gpa, data)
        ring.set_desc(slot, gpa, len(data), 0)
        ring.publish(slot)
        self.tx.kick_now()

    def answer(self, frame: bytes) -> bytes | None:
        """The reply a host at our address gives to ``frame``: ARP who-has and ICMP echo."""
        if len(frame) < 14:
            return None
        src = frame[6:12]
        (ethertype,) = struct.unpack("!H", frame[12:14])
        body = frame[14:]
        if ethertype == ETH_ARP and len(body) >= 28:
            oper = struct.unpack("!H", body[6:8])[0]
            sha, spa, tpa = body[8:14], body[14:18], body[24:28]
            if oper == ARP_REQUEST and tpa == self.ip:
                return ethernet(src, self.mac, ETH_ARP, arp(ARP_REPLY, self.mac, self.ip, sha, spa))
        if ethertype == ETH_IPV4 and len(body) >= 28 and body[9] == 1 and body[16:20] == self.ip:
            ihl = (body[0] & 0x0F) * 4
            total = struct.unpack("!H", body[2:4])[0]
            message = body[ihl:total]
            if message[0] == ICMP_ECHO_REQUEST and checksum(message) == 0:
                ident, seq = struct.unpack("!HH", message[4:8])
                reply = icmp_echo(ICMP_ECHO_REPLY, ident, seq, message[8:])
                packet = ipv4(self.ip, body[12:16], 1, reply)
                return ethernet(src, self.mac, ETH_IPV4, packet)
        return None

    async def respond(self) -> None:
        """Answer every frame that asks us something, until cancelled."""
        while True:
            try:
                frame = await self.receive(timeout=3600)
            except TimeoutError:
                continue
            reply = self.answer(frame)
            if reply is not None:
                self.send(reply)
                self.answered += 1


@contextlib.asynccontextmanager
async def peer_on(path: str, mac: bytes, address: str) -> AsyncIterator[NetPeer]:
    """A :class:`NetPeer` on the vhost-user net socket ``path``, answering while in scope."""
    fe = await Frontend.connect(path, ram_size=1 << 21)
    try:
        peer = NetPeer(fe, mac, address)
        await peer.start()
        task = asyncio.get_running_loop().create_task(peer.respond())
        try:
            yield peer
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
    finally:
        fe.close()


@contextlib.asynccontextmanager
async def net_listener(tmp_path, name: str, link: str) -> AsyncIterator[Listener]:
    listener = Listener(str(tmp_path / f"{name}.sock"), NetDevice(link=link))
    await listener.start()
    try:
        yield listener
    finally:
        await listener.close()


async def test_two_front_ends_exchange_arp_and_ping_through_a_link(tmp_path):
    """One front-end asks who has the peer's address and pings it; the peer, behind another
    vhost-user net device on the same link, answers both."""
    me_mac, me_ip = parse_mac("02:76:77:aa:00:02"), ip("10.205.0.3")
    async with (
        net_listener(tmp_path, "a", "vu-test") as a,
        net_listener(tmp_path, "b", "vu-test") as b,
        peer_on(a.path, PEER_MAC, PEER_IP) as peer,
    ):
        fe = await Frontend.connect(b.path, ram_size=1 << 21)
        try:
            me = NetPeer(fe, me_mac, "10.205.0.3")
            await me.start()
            negotiated = b.connection.negotiated_features
            assert negotiated >> Feature.VERSION_1 & 1
            assert not negotiated >> NetFeature.MRG_RXBUF & 1  # the 12-byte header all the same
            who_has = arp(ARP_REQUEST, me_mac, me_ip, bytes(6), ip(PEER_IP))
            me.send(ethernet(b"\xff" * 6, me_mac, ETH_ARP, who_has))
            reply = await me.receive()
            assert reply[:12] == me_mac + PEER_MAC
            assert reply[14:][6:8] == b"\0\2" and reply[14:][14:18] == ip(PEER_IP)
            for seq in range(5):
                payload = bytes(range(seq, seq + 56))
                echo = icmp_echo(ICMP_ECHO_REQUEST, 0x4242, seq, payload)
                me.send(ethernet(PEER_MAC, me_mac, ETH_IPV4, ipv4(me_ip, ip(PEER_IP), 1, echo)))
                got = await me.receive()
                message = got[14 + 20 :]
                assert got[:6] == me_mac and got[14 + 12 : 14 + 20] == ip(PEER_IP) + me_ip
                assert message[0] == ICMP_ECHO_REPLY and checksum(message) == 0
                assert struct.unpack("!HH", message[4:8]) == (0x4242, seq)
                assert message[8:] == payload
            assert peer.answered == 6
        finally:
            fe.close()


# -- a real Linux guest ------------------------------------------------------------------------
PINGS = 100

PING_SCRIPT = f"""
ip link set eth0 up
ip addr add {GUEST_IP}/24 dev eth0
echo "GUEST-MAC $(cat /sys/class/net/eth0/address)"
ping -c {PINGS} -i 0.02 -W 5 {PEER_IP} > /tmp/ping 2>&1
echo "PING-STATUS $?"
echo "PING-SUMMARY $(grep 'packets transmitted' /tmp/ping)"
"""


def vhost_user_net(name: str, path, mac: str) -> list[str]:
    return [
        "-chardev", f"socket,id={name},path={path}",
        "-netdev", f"vhost-user,chardev={name},id={name}-net",
        "-device", f"virtio-net-device,netdev={name}-net,mac={mac}",
    ]  # fmt: skip


@pytest.mark.skipif(guest.missing() is not None, reason=str(guest.missing()))
@pytest.mark.timeout(180)
async def test_linux_guest_pings_a_peer_through_viowire_net(tmp_path):
    """The guest's virtio_net on viowire's net device, a peer on the same link: 100 pings."""
    vm, peer_sock = tmp_path / "vm.sock", tmp_path / "peer.sock"
    command = guest.viowire_vhost_user([(vm, "net,link=vu-ping"), (peer_sock, "net,link=vu-ping")])
    async with (
        guest.process(command, [vm, peer_sock], tmp_path / "viowire.log"),
        peer_on(str(peer_sock), PEER_MAC, PEER_IP) as peer,
    ):
        run = await guest.run_guest(tmp_path, PING_SCRIPT, vhost_user_net("net0", vm, GUEST_MAC))
    log = (tmp_path / "viowire.log").read_text()
    assert run.status == 0, f"guest:\n{run.output}\nviowire:\n{log}"
    assert run.value("GUEST-MAC") == GUEST_MAC  # QEMU's mac=, as the net front-end gives it
    summary = run.value("PING-SUMMARY")
    assert f"{PINGS} packets transmitted, {PINGS} packets received, 0% packet loss" in summary, (
        f"{summary}\nguest:\n{run.output}"
    )
    assert run.value("PING-STATUS") == "0"
    assert peer.answered >= PINGS  # and the ARP replies
    assert "Traceback" not in log


TWO_GUESTS_SCRIPT = """
ip link set eth0 up
ip addr add {me}/24 dev eth0
i=0
until ping -c 1 -W 1 {peer} >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 60 ] || break; done
ping -c 50 -i 0.02 -W 5 {peer} > /tmp/ping 2>&1
echo "PING-SUMMARY $(grep 'packets transmitted' /tmp/ping)"
sleep 5
"""
"""Each guest waits until the other answers (they boot side by side), pings it 50 times, then
stays up 5 s more so that the other's pings still find it."""


@pytest.mark.skipif(guest.missing() is not None, reason=str(guest.missing()))
@pytest.mark.timeout(240)
async def test_two_linux_guests_ping_each_other_through_viowire_net(tmp_path):
    """Two guests, each on its own socket of one ``viowire vhost-user`` process, on one link:
    the kernel's virtio_net on both ends."""
    socks = [tmp_path / "a.sock", tmp_path / "b.sock"]
    addresses = ["10.205.0.2", "10.205.0.3"]
    command = guest.viowire_vhost_user([(sock, "net,link=vu-two") for sock in socks])
    async with guest.process(command, socks, tmp_path / "viowire.log"):
        for name in ("a", "b"):
            (tmp_path / name).mkdir()
        runs = await asyncio.gather(
            *(
                guest.run_guest(
                    tmp_path / name,
                    TWO_GUESTS_SCRIPT.format(me=me, peer=peer),
                    vhost_user_net("net0", sock, f"52:54:00:76:77:{n + 2:02x}"),
                )
                for n, (name, sock, me, peer) in enumerate(
                    zip("ab", socks, addresses, reversed(addresses), strict=True)
                )
            )
        )
    log = (tmp_path / "viowire.log").read_text()
    for run in runs:
        assert run.status == 0, f"guest:\n{run.output}\nviowire:\n{log}"
        summary = run.value("PING-SUMMARY")
        assert "50 packets transmitted, 50 packets received, 0% packet loss" in summary, summary
    assert "Traceback" not in log
