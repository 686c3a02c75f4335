"""virtio-net's pieces on their own, no server: the receive filter (QEMU's receive_filter
rules), MAC table parsing (QEMU's virtio_net_handle_mac), flow steering, the transmit header
check, feature prerequisites, queue indexes, and a link's up/down state."""

from __future__ import annotations

import struct

import pytest

from viowire.device import ChainError
from viowire.server import link as links
from viowire.server.devices.net import NetDevice, RxFilter, Steering, flow_key
from viowire.server.link import Link
from viowire.virtio.mock import GuestRam, RingBuilder, serve
from viowire.virtio.net import (
    ctrl_queue,
    parse_mac_table,
    transmit_header_problem,
    without_orphans,
)

OWN = bytes.fromhex("020000000001")
OTHER = bytes.fromhex("020000000002")
GROUP = bytes.fromhex("01005e000001")
BCAST = b"\xff" * 6
CSUM, HOST_TSO4, HOST_ECN = 0, 11, 13
CTRL_VQ, CTRL_RX, CTRL_RX_EXTRA, MQ, CTRL_MAC_ADDR = 17, 18, 20, 22, 23


def table(*macs: bytes) -> bytes:
    return struct.pack("<I", len(macs)) + b"".join(macs)


def test_filter_after_reset_is_promiscuous():
    f = RxFilter()
    assert all(f.accepts(dst, OWN) for dst in (OWN, OTHER, GROUP, BCAST))


def test_filter_without_promisc_takes_own_and_broadcast():
    f = RxFilter()
    f.promisc = False
    assert [f.accepts(d, OWN) for d in (OWN, OTHER, GROUP, BCAST)] == [True, False, False, True]
    f.allmulti = True
    assert f.accepts(GROUP, OWN)
    f.nomulti = True  # over allmulti, but not broadcast (§5.1.6.5.1)
    assert not f.accepts(GROUP, OWN) and f.accepts(BCAST, OWN)
    f.nobcast = True
    assert not f.accepts(BCAST, OWN)
    f.nouni = True
    f.alluni = True  # nouni wins
    assert not f.accepts(OWN, OWN)


def test_filter_tables_and_overflow():
    f = RxFilter()
    f.promisc = False
    f.unicast, f.multicast = [OTHER], [GROUP]
    assert f.accepts(OTHER, OWN) and f.accepts(GROUP, OWN)
    assert not f.accepts(bytes.fromhex("01005e000002"), OWN)
    f.unicast = None  # overflowed: every unicast address
    assert f.accepts(bytes.fromhex("02aaaaaaaaaa"), OWN)


def test_mac_table_as_qemu_reads_it():
    assert parse_mac_table(table(OTHER) + table(GROUP)) == ([OTHER], [GROUP])
    assert parse_mac_table(table() + table()) == ([], [])
    many = [bytes([2, 0, 0, 0, 0, i]) for i in range(65)]
    assert parse_mac_table(table(*many) + table(GROUP)) == (None, [GROUP])
    # the multicast table gets what the unicast one left of the 64 entries
    assert parse_mac_table(table(*many[:60]) + table(*[GROUP] * 5)) == (many[:60], None)
    assert parse_mac_table(table(*many[:60]) + table(*[GROUP] * 4))[1] == [GROUP] * 4


@pytest.mark.parametrize(
    "data, words",
    [
        (b"", "unicast table has no entries"),
        (table() + b"\x00", "multicast table has no entries"),
        (struct.pack("<I", 2) + OTHER + table(), "says 2 entries"),
        (table() + table(GROUP) + b"x", "7 bytes follow"),
        (struct.pack("<I", 0xFFFFFFFF), "4294967295 entries"),
    ],
)
def test_mac_table_errors(data, words):
    with pytest.raises(ValueError, match=words):
        parse_mac_table(data)


def udp(src_mac, dst_mac, src_ip, dst_ip, sport, dport) -> bytes:
    ip = bytes([0x45, 0, 0, 28, 0, 0, 0, 0, 64, 17, 0, 0]) + src_ip + dst_ip
    return dst_mac + src_mac + b"\x08\x00" + ip + struct.pack(">HHHH", sport, dport, 8, 0)


def test_flow_key_is_the_same_both_ways_and_tells_flows_apart():
    a, b = bytes([10, 0, 0, 1]), bytes([10, 0, 0, 2])
    out = udp(OWN, OTHER, a, b, 1000, 53)
    back = udp(OTHER, OWN, b, a, 53, 1000)
    assert flow_key(out) == flow_key(back)
    assert flow_key(out) != flow_key(udp(OWN, OTHER, a, b, 1001, 53))
    plain = OTHER + OWN + b"\x88\xb5payload"
    assert flow_key(plain) == flow_key(OWN + OTHER + b"\x88\xb5other")


def test_steering_follows_transmit_pair_and_is_bounded():
    s = Steering(size=2)
    frames = [OTHER + OWN + bytes([0x88, i]) for i in range(3)]
    s.learn(frames[0], 3)
    assert s.pick(frames[0][6:12] + frames[0][0:6] + frames[0][12:], 4) == 3  # the reply
    assert s.pick(frames[0], 2) in (0, 1)  # pair 3 is not in use: hashed instead
    s.learn(frames[1], 1)
    s.learn(frames[2], 2)
    assert len(s.flows) == 2 and flow_key(frames[0]) not in s.flows


@pytest.mark.parametrize(
    "flags, gso, features, problem",
    [
        (0, 0, 0, None),
        (2, 0, 0, None),  # DATA_VALID: not acted on, ignored
        (1, 0, 0, "NEEDS_CSUM"),
        (1, 0, 1 << CSUM, None),
        (0, 1, 0, "TCPV4"),
        (0, 1, 1 << HOST_TSO4, None),
        (0, 0x81, 1 << HOST_TSO4, "ECN"),
        (0, 0x81, 1 << HOST_TSO4 | 1 << HOST_ECN, None),
        (0, 2, 0xFFFF_FFFF, "not a GSO type"),
    ],
)
def test_transmit_header_problem(flags, gso, features, problem):
    found = transmit_header_problem(bytes([flags, gso]) + bytes(10), features)
    assert found is None if problem is None else problem in found


def test_features_without_their_prerequisite_are_dropped():
    everything = sum(1 << b for b in (CTRL_VQ, CTRL_RX, CTRL_RX_EXTRA, MQ, CTRL_MAC_ADDR))
    assert without_orphans(everything) == everything
    assert without_orphans(everything & ~(1 << CTRL_VQ)) == 0
    assert without_orphans(everything & ~(1 << CTRL_RX)) == everything & ~(
        1 << CTRL_RX | 1 << CTRL_RX_EXTRA
    )


def test_control_queue_index():
    assert ctrl_queue(0, 4) is None
    assert ctrl_queue(1 << CTRL_VQ, 4) == 2  # N = 1 without MQ
    assert ctrl_queue(1 << CTRL_VQ | 1 << MQ, 4) == 8


def test_link_down_tells_ports_and_forwards_nothing():
    link = Link("units")
    heard: dict[str, list[bool]] = {"a": [], "b": []}
    got: list[bytes] = []
    a = link.attach("a", got.append, heard["a"].append)
    link.attach("b", got.append, heard["b"].append)
    link.set_up(False)
    link.set_up(False)  # no change, no word
    assert heard == {"a": [False], "b": [False]}
    a.send(BCAST + OWN + b"\x88\xb5")
    assert got == []
    late: list[bool] = []
    link.attach("c", got.append, late.append)
    assert late == [False]  # plugged into a down link: told at once
    link.set_up(True)
    assert heard["a"] == [False, True] and late == [False, True]


def test_a_down_link_outlives_its_ports():
    port = links.attach("units-down", "a", lambda frame: None)
    links.link("units-down").set_up(False)
    links.release(port)
    assert not links.link("units-down").up  # the same link, still down
    links.link("units-down").set_up(True)
    links.release(links.attach("units-down", "b", lambda frame: None))
    assert "units-down" not in links._links


async def test_transmit_on_a_mock_ring_reaches_the_link():
    """NetDevice.handle() on viowire.virtio.mock's ring, no transport (no features: the
    10-byte legacy header): a frame goes to the link, a header asking for an offload does not,
    a chain shorter than the header is malformed."""
    dev = NetDevice(link="units-mock")
    got: list[bytes] = []
    port = links.attach("units-mock", "listener", got.append)
    try:
        ring = RingBuilder(GuestRam(), 16)
        ring.device_queue(1)  # transmitq0
        frame = BCAST + OWN + b"\x88\xb5hello"
        ring.add_chain([bytes(10), frame], [])
        ring.add_chain([bytes([1]) + bytes(9), frame], [])  # NEEDS_CSUM without CSUM
        assert [written for _, written in await serve(dev, ring)] == [0, 0]
        assert got == [frame] and (dev.tx_frames, dev.tx_errors) == (1, 1)
        ring.add_chain([bytes(9)], [])
        with pytest.raises(ChainError, match="shorter than the 10-byte virtio_net_hdr"):
            await serve(dev, ring)
    finally:
        dev.close()
        links.release(port)
