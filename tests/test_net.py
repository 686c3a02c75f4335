"""virtio-net (issue 10, first slice): the learning switch on its own, then net devices of
different client sessions on one real server (Unix socket) talking over in-server links.

Header sizes are the spec's numbers (§5.1.6: 10 bytes legacy without MRG_RXBUF, 12 with
VERSION_1), written out here rather than taken from viowire.virtio.net, as an independent check.
"""

from __future__ import annotations

from viowire.server.link import Link

A, B, C = (
    bytes.fromhex("020000000001"),
    bytes.fromhex("020000000002"),
    bytes.fromhex("020000000003"),
)
BROADCAST = b"\xff" * 6
ETHERTYPE = b"\x88\xb5"  # IEEE local experimental


def frame(dst: bytes, src: bytes, payload: bytes = b"hello") -> bytes:
    return dst + src + ETHERTYPE + payload


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def switch(**kw):
    link = Link("test", **kw)
    got: dict[str, list[bytes]] = {"a": [], "b": [], "c": []}
    ports = {name: link.attach(name, got[name].append) for name in got}
    return link, ports, got


def test_switch_floods_broadcast_never_back_to_sender():
    _, ports, got = switch()
    ports["a"].send(frame(BROADCAST, A))
    assert got == {"a": [], "b": [frame(BROADCAST, A)], "c": [frame(BROADCAST, A)]}


def test_switch_learns_and_forwards_unicast_to_one_port():
    link, ports, got = switch()
    ports["a"].send(frame(BROADCAST, A))
    ports["b"].send(frame(A, B, b"reply"))
    assert got["a"] == [frame(A, B, b"reply")]
    assert got["c"] == [frame(BROADCAST, A)]  # the broadcast only, not the reply
    assert link.forwarded == 1


def test_switch_floods_unknown_unicast_and_multicast():
    _, ports, got = switch()
    ports["a"].send(frame(C, A))
    group = bytes.fromhex("01005e000001")
    ports["a"].send(frame(group, A))
    assert got["b"] == got["c"] == [frame(C, A), frame(group, A)]


def test_switch_filters_frame_for_senders_own_side():
    link, ports, got = switch()
    ports["a"].send(frame(BROADCAST, A))
    ports["a"].send(frame(A, A))
    assert got["a"] == [] and len(got["b"]) == 1 and link.filtered == 1


def test_switch_ages_out_learned_macs():
    clock = Clock()
    _, ports, got = switch(clock=clock, aging=300.0)
    ports["a"].send(frame(BROADCAST, A))
    clock.now = 299.0
    ports["b"].send(frame(A, B))
    assert got["c"] == [frame(BROADCAST, A)]  # still learned: unicast to a only
    clock.now = 299.0 + 300.0  # a silent for 300 s since its last frame
    ports["b"].send(frame(A, B, b"again"))
    assert got["c"][-1] == frame(A, B, b"again")  # aged out: flooded


def test_switch_detach_forgets_port_and_its_macs():
    link, ports, got = switch()
    ports["a"].send(frame(BROADCAST, A))
    ports["a"].detach()
    ports["b"].send(frame(A, B))
    assert got["a"] == [] and got["c"] == [frame(BROADCAST, A), frame(A, B)]
    assert A not in link.table


def test_switch_table_is_bounded_and_never_learns_group_sources():
    link, ports, _ = switch(max_entries=2)
    for i in range(10):
        ports["a"].send(frame(BROADCAST, bytes([2, 0, 0, 0, 1, i])))
    ports["a"].send(frame(BROADCAST, bytes.fromhex("010000000009")))
    assert len(link.table) == 2
    assert bytes.fromhex("010000000009") not in link.table


def test_switch_drops_runt_frames():
    _, ports, got = switch()
    ports["a"].send(BROADCAST + A)  # 12 bytes: no ethertype
    assert got == {"a": [], "b": [], "c": []}
