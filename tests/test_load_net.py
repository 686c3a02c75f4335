"""``viowire load`` with net devices: the frame pattern, the flow bookkeeping and the pairing on
their own, then whole runs against a real server (a Unix socket), with frames dropped,
corrupted and reordered on the server's side to see each one caught."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from servers import running_server, url_of
from test_load import LOAD_PLATFORM, assert_clean, parse, platform, run_load

from viowire import load
from viowire.client.connection import connect
from viowire.client.drivers.net import NetDriver
from viowire.load.frames import FramePattern, announce
from viowire.load.net import LOST, Flow, ring_pairs
from viowire.server.devices.net import NetDevice
from viowire.virtio.net import DEVICE_ID as NET

A, B = bytes.fromhex("020000000001"), bytes.fromhex("020000000002")
BROADCAST = b"\xff" * 6

# -- frames ------------------------------------------------------------------------------------


def test_frames_are_exact_and_say_what_went_wrong():
    pattern = FramePattern(seed=9, size=200)
    frame = pattern.make(B, A, 3, 4, 17)
    assert len(frame) == 200 and frame[:14] == B + A + b"\x88\xb5"
    assert pattern.check(frame, B, 4).kind == "ok"
    assert (pattern.check(frame, B, 4).sender, pattern.check(frame, B, 4).seq) == (3, 17)
    assert pattern.check(pattern.make(BROADCAST, A, 3, 4, 0), B, 4).kind == "ok"

    flipped = bytearray(frame)
    flipped[150] ^= 1
    verdict = pattern.check(bytes(flipped), B, 4)
    assert verdict.kind == "corrupt" and "byte 150" in verdict.detail
    assert pattern.check(frame[:199], B, 4).kind == "length"
    assert pattern.check(pattern.make(B, A, 3, 5, 17), B, 4).kind == "misdirected"
    # not the run's, or not for this device: ignored, not errors
    assert pattern.check(frame, A, 4).kind == "foreign"  # flooded, for another MAC
    assert pattern.check(FramePattern(10, 200).make(B, A, 3, 4, 17), B, 4).kind == "foreign"
    assert pattern.check(frame[:12] + b"\x08\x00" + frame[14:], B, 4).kind == "foreign"
    assert pattern.check(announce(B), B, 4).kind == "foreign"
    with pytest.raises(ValueError):
        FramePattern(1, 59)


async def test_a_flow_resolves_receipts_and_counts_what_the_link_dropped():
    flow = Flow("a", "b")
    loop = asyncio.get_running_loop()
    receipts = []
    for seq in range(4):
        receipts.append(loop.create_future())
        flow.pending[seq] = receipts[-1]
    flow.next_seq = 4
    assert flow.arrive(0, 100) is None and receipts[0].result() == 100
    assert flow.arrive(2, 300) is None  # 1 was dropped: a link keeps a flow's order
    assert receipts[1].result() == LOST and receipts[2].result() == 300
    assert (flow.received, flow.lost, flow.expected) == (2, 1, 3)
    assert "reordered" in flow.arrive(1, 400)
    assert "has sent only 4" in flow.arrive(9, 500)
    assert flow.arrive(3, 600) is None and (flow.received, flow.lost) == (3, 1)


def test_pairs_ring_each_slot_across_sessions_then_the_rest():
    # (session, slot, mac)
    devs = [(0, 1, b"a0"), (1, 1, b"a1"), (2, 1, b"a2"), (0, 2, b"b0"), (0, 3, b"c0")]
    pairs, alone, twins = ring_pairs(devs, lambda d: d[1], lambda d: d[:2], lambda d: d[2])
    assert [(s[2], r[2]) for s, r in pairs] == [
        (b"a0", b"a1"),
        (b"a1", b"a2"),
        (b"a2", b"a0"),
        (b"b0", b"c0"),  # slots used by one session: a ring of their own
        (b"c0", b"b0"),
    ]
    assert alone == twins == []
    # mac= in a spec: every session's device has it; one takes part, the others cannot
    same = [(0, 1, b"m"), (1, 1, b"m"), (0, 2, b"x0"), (1, 2, b"x1")]
    pairs, alone, twins = ring_pairs(same, lambda d: d[1], lambda d: d[:2], lambda d: d[2])
    assert [(s[2], r[2]) for s, r in pairs] == [(b"x0", b"x1"), (b"x1", b"x0")]
    assert alone == [(0, 1, b"m")] and twins == [(1, 1, b"m")]


# -- whole runs --------------------------------------------------------------------------------

NET_PLATFORM = (*LOAD_PLATFORM, "net,count=3")


def assert_net_clean(s: dict, flows: int) -> None:
    net = s["net"]
    assert net["flows"] == flows and net["unpaired"] == net["twins"] == 0
    assert net["sent"] == net["received"] > 0
    assert net["lost"] == net["late"] == 0 and net["loss_error"] is False
    ops = s["ops"]["net"]
    assert ops["requests"] == net["sent"] - flows  # frame 0 of each flow is the handshake
    assert ops["bytes"] == ops["requests"] * net["frame_size"] and ops["lost"] == 0
    lat = ops["latency_us"]
    assert 0 < lat["p50"] <= lat["p99"] <= lat["max"]
    assert ops["per_s"] > 0 and ops["bytes_per_s"] > 0


@pytest.mark.parametrize("memory", ["shared", "proxied"])
async def test_a_mixed_load_with_net_devices(tmp_path, capsys, memory):
    async with running_server(tmp_path, platform(*NET_PLATFORM)) as server:
        status, s = await run_load(
            capsys, url_of(server, "unix"), "--sessions", "2", "--requests", "400",
            "--depth", "2", "--memory", memory, "--seed", "3", "--span", "64K",
            "--no-progress",
        )  # fmt: skip
    assert status == 0, s["error_samples"]
    assert_clean(s, 400)
    assert s["devices_by_kind"] == {"blk": 16, "net": 6, "rng": 8}
    assert set(s["ops"]) == {"blk-read", "blk-write", "rng", "net"}
    assert_net_clean(s, 6)  # each slot: a ring over the two sessions
    assert s["net"]["foreign"] == 0  # every MAC was learned: nothing was flooded


async def test_net_only_server_with_the_default_mix_and_the_text_summary(tmp_path, capsys):
    async with running_server(tmp_path, platform("net,count=2", "net,version=1")) as server:
        url = url_of(server, "unix")
        args = parse(url, "--sessions", "1", "--requests", "200", "--frame-size", "64")
        status = await asyncio.wait_for(load.run(args), 20)
        out = capsys.readouterr().out
        assert status == 0, out
        assert "net        3 flows of 64-byte frames:" in out and "0 lost" in out
        assert (
            "result     OK: every request completed, every frame arrived intact and in order" in out
        )
        assert "read-back" not in out  # no disk: nothing to read back
        assert "  net " in out and "blk-read" not in out  # the mix, narrowed to what is served
        with pytest.raises(ValueError, match="no blk device"):
            await load.run(parse(url, "--requests", "10", "--mix", "blk-read=1"))


async def test_a_frame_too_large_for_the_mtu_is_a_clear_error(tmp_path, capsys):
    async with running_server(tmp_path, platform("net,mtu=100,count=2")) as server:
        status, s = await run_load(
            capsys, url_of(server, "unix"), "--sessions", "1", "--requests", "10", "--no-progress"
        )
    assert status == 1
    assert s["errors_by_kind"] == {"bringup:mtu-too-small": 2}
    assert "MTU 100 is below --frame-size 1514" in s["error_samples"][0]


def drop_one(monkeypatch, nth: int) -> list[bytes]:
    """The receiving device drops the ``nth`` load frame it is handed, as it drops a frame its
    full backlog has no room for (announce frames never reach a device: the switch filters
    them)."""
    deliver = NetDevice._deliver
    seen: list[bytes] = []

    def dropping(self, frame: bytes) -> None:
        seen.append(frame)
        if len(seen) == nth:
            self.rx_dropped += 1
            return
        deliver(self, frame)

    monkeypatch.setattr(NetDevice, "_deliver", dropping)
    return seen


@pytest.mark.parametrize("allow", [False, True])
async def test_a_dropped_frame_is_loss_an_error_unless_allowed(
    tmp_path, capsys, monkeypatch, allow
):
    seen = drop_one(monkeypatch, 10)
    async with running_server(tmp_path, platform("net,count=2")) as server:
        status, s = await run_load(
            capsys, url_of(server, "unix"), "--sessions", "1", "--requests", "100",
            "--depth", "2", "--no-progress", *(["--allow-loss"] if allow else []),
        )  # fmt: skip
    assert len(seen) > 10
    net = s["net"]
    assert (net["lost"], net["received"], net["sent"]) == (1, net["sent"] - 1, 102)
    assert s["ops"]["net"]["lost"] == 1 and s["verify_failures"] == 0
    if allow:
        assert status == 0 and s["ok"] and s["errors"] == 0
    else:
        assert status == 1 and s["errors_by_kind"] == {"lost": 1}
        assert "never arrived" in s["error_samples"][0]


async def test_the_last_frame_dropped_is_lost_after_the_timeout(tmp_path, capsys, monkeypatch):
    """Depth 1: no later frame tells the receiver of the gap; the sender stops waiting."""
    drop_one(monkeypatch, 5)
    async with running_server(tmp_path, platform("net,count=2")) as server:
        status, s = await run_load(
            capsys, url_of(server, "unix"), "--sessions", "1", "--requests", "20",
            "--timeout", "0.3", "--allow-loss", "--no-progress",
        )  # fmt: skip
    assert status == 0 and s["net"]["lost"] == 1 and s["devices_out"] == {}
    assert s["requests"] == s["completed"] == 20


async def test_a_corrupted_and_a_reordered_frame_are_caught(tmp_path, capsys, monkeypatch):
    deliver = NetDevice._deliver
    count = [0]
    held: list[tuple[NetDevice, bytes]] = []

    def meddle(self, frame: bytes) -> None:
        count[0] += 1
        if count[0] == 8:
            frame = frame[:100] + bytes([frame[100] ^ 0x20]) + frame[101:]
        if count[0] == 20:
            held.append((self, frame))  # overtaken by the next frame of this device
            return
        deliver(self, frame)
        if held and held[0][0] is self:
            deliver(*held.pop())

    monkeypatch.setattr(NetDevice, "_deliver", meddle)
    async with running_server(tmp_path, platform("net,count=2")) as server:
        status, s = await run_load(
            capsys, url_of(server, "unix"), "--sessions", "1", "--requests", "60",
            "--depth", "4", "--allow-loss", "--no-progress",
        )  # fmt: skip
    assert status == 1
    assert s["errors_by_kind"] == {"verify:net-corrupt": 1, "verify:net-order": 1}
    assert s["verify_failures"] == 2
    samples = "\n".join(s["error_samples"])
    assert "byte 100 is" in samples and "reordered" in samples
    assert s["net"]["lost"] == 1  # the overtaken frame was counted lost when the next came


async def test_devices_on_two_links_in_one_session(tmp_path, capsys):
    """One session rings its net devices in platform order: the pairs that straddle the two
    links find no partner, probe their links with a broadcast and are paired anew; the lone
    device of a link is left out, not an error. Two sessions pair each slot with itself."""
    spec = platform("net,link=a,count=3", "net,link=b,count=2", "net,link=c")
    async with running_server(tmp_path, spec) as server:
        url = url_of(server, "unix")
        status, s = await run_load(
            capsys, url, "--sessions", "1", "--requests", "100", "--timeout", "0.5",
            "--no-progress",
        )  # fmt: skip
        assert status == 0, s["error_samples"]
        assert (s["net"]["flows"], s["net"]["unpaired"]) == (5, 1)
        assert s["devices_out"] == {"no partner on its link": 1}
        assert s["net"]["sent"] == s["net"]["received"] == 105
        status, s = await run_load(
            capsys, url, "--sessions", "2", "--requests", "50", "--no-progress"
        )
    assert status == 0, s["error_samples"]
    assert_net_clean(s, 12)


async def test_a_shared_mac_leaves_the_copies_out(tmp_path, capsys):
    async with running_server(tmp_path, platform("net,mac=02:00:00:00:00:07", "net")) as server:
        status, s = await run_load(
            capsys, url_of(server, "unix"), "--sessions", "2", "--requests", "30",
            "--no-progress",
        )  # fmt: skip
    assert status == 0
    assert (s["net"]["flows"], s["net"]["twins"], s["net"]["unpaired"]) == (2, 1, 1)
    assert s["devices_out"] == {
        "no partner on its link": 1,
        "its MAC is another net device's too (mac= in its spec)": 1,
    }


async def test_a_partner_that_goes_away_ends_its_senders_flows(tmp_path, capsys):
    """The run is asked for an hour: it ends once one session is dropped mid-workload, its
    devices out after their errors and their partners' senders out with them, no request
    left unaccounted for."""
    async with running_server(tmp_path, platform("net,count=2")) as server:

        def busiest() -> list:
            return sorted(
                (s for s in server.sessions if s.platform is not None),
                key=lambda s: -sum(slot.device.backend.tx_frames for slot in s.platform.slots),
            )

        async def drop_one_session() -> None:
            while (
                not busiest()
                or sum(slot.device.backend.tx_frames for slot in busiest()[-1].platform.slots) < 50
            ):
                await asyncio.sleep(0.01)
            busiest()[0].transport.close()

        dropper = asyncio.create_task(drop_one_session())
        try:
            status, s = await run_load(
                capsys, url_of(server, "unix"), "--sessions", "2", "--duration", "3600",
                "--timeout", "0.5", "--allow-loss", "--no-progress",
            )  # fmt: skip
        finally:
            dropper.cancel()
        assert dropper.done() and not dropper.cancelled()
    assert status == 1
    assert s["requests"] == s["completed"] > 0 and s["lost"] == 0
    assert "ConnectionClosed" in s["errors_by_kind"]
    assert s["devices_out"].get("its partner stopped receiving") == 2
    assert sum(s["devices_out"].values()) == 4


async def test_bursts_of_broadcasts_on_the_link_lose_no_frame(tmp_path, capsys):
    """Another session floods the link with bursts of broadcasts (conform and the netpeers did,
    in the compose test): each burst reaches every load device at once, more frames than it
    has buffers posted. They wait for the driver to post its buffers again, as QEMU holds them
    (virtio_net_has_buffers), instead of a flow's frame being dropped in the crowd and its
    sender waiting --timeout for it."""
    async with running_server(tmp_path, platform("net,count=2")) as server:
        url = url_of(server, "unix")
        bursts = 0

        async def burst() -> None:
            nonlocal bursts
            async with await connect(url) as conn:
                info = next(d for d in await conn.platform() if d.device_id == NET)
                drv = await NetDriver.attach(await conn.attach(info))
                noise = BROADCAST + drv.mac + b"\x88\xb6" + bytes(1000)
                while True:  # until cancelled, after the run
                    await asyncio.gather(*(drv.send(noise) for _ in range(64)))
                    bursts += 1
                    await asyncio.sleep(0.05)

        burster = asyncio.create_task(burst())
        try:
            status, s = await run_load(
                capsys, url, "--sessions", "2", "--duration", "2", "--timeout", "1",
                "--no-progress",
            )  # fmt: skip
        finally:
            burster.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await burster
    assert bursts > 10 and s["net"]["foreign"] > 0  # the bursts reached the load's devices
    assert status == 0 and s["net"]["flows"] == 4
    assert s["net"]["lost"] == 0 and s["net"]["sent"] == s["net"]["received"]
