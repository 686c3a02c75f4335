"""Message traces: --trace FILE records every frame of both ends, viowire trace decodes it."""

from __future__ import annotations

import asyncio
import re
import shutil
import signal
import struct
import subprocess
import time
from pathlib import Path

import pytest

from tests.cli_run import run, serve, viowire
from tests.servers import running_server, url_of
from viowire.client.connection import connect
from viowire.protocol import messages as m
from viowire.protocol.codec import encode
from viowire.trace import dissector, recorder, show
from viowire.trace.format import RECORD, End, Event

_LINE_FIELDS = 6  # time, session, direction, end, type, #id


def _frames(path: Path, end: str) -> list[tuple[str, str, str]]:
    """(direction, type, request id) of each message ``end`` recorded, from ``trace show``."""
    result = viowire("trace", "show", str(path), "--end", end)
    assert result.returncode == 0, result.stderr
    rows = [line.split()[:_LINE_FIELDS] for line in result.stdout.splitlines()]
    return [(row[2], row[4], row[5]) for row in rows]


def test_serve_and_client_traces_hold_the_same_frames_both_ways(tmp_path):
    server_trace, client_trace = tmp_path / "server.vwt", tmp_path / "client.vwt"
    sock = tmp_path / "s.sock"
    with serve("--listen", f"unix://{sock}", "--device", "blk,size=1M", "--trace",
               str(server_trace)) as served:  # fmt: skip
        probe = viowire("probe", served.url("unix"), "--trace", str(client_trace))
        assert probe.returncode == 0, probe.stderr
        served.proc.send_signal(signal.SIGTERM)  # a server stopped this way closes its trace
        served.proc.wait(timeout=10)
    at_server, at_client = _frames(server_trace, "server"), _frames(client_trace, "client")
    assert at_client == at_server
    kinds = {(direction, kind) for direction, kind, _ in at_server}
    assert {("C->S", "HELLO"), ("S->C", "HELLO_REPLY"), ("C->S", "MEM_REGISTER")} <= kinds
    assert {("C->S", "PLATFORM_QUERY"), ("C->S", "MMIO_READ"), ("S->C", "MMIO_READ_REPLY")} <= kinds
    # the client learns its session id from HELLO_REPLY; show names its HELLO by it as well
    sessions = {line.split()[1] for line in viowire("trace", "show", str(client_trace)).stdout
                .splitlines()}  # fmt: skip
    server_sessions = {line.split()[1] for line in
                       viowire("trace", "show", str(server_trace)).stdout.splitlines()}  # fmt: skip
    assert sessions == server_sessions and len(sessions) == 1


def test_show_filters_by_type_and_session(tmp_path):
    trace = tmp_path / "t.vwt"
    result = viowire("--trace", str(trace), "probe", "--device", "rng")
    assert result.returncode == 0, result.stderr
    reads = viowire("trace", "show", str(trace), "--type", "mmio_read").stdout.splitlines()
    everything = viowire("trace", "show", str(trace)).stdout.splitlines()
    assert reads and len(reads) < len(everything)
    assert all(line.split()[4] == "MMIO_READ" for line in reads)
    session = everything[-1].split()[1]
    mine = viowire("trace", "show", str(trace), "--session", session).stdout.splitlines()
    assert len(mine) == len(everything)  # one session, both ends, from the client's HELLO on
    other = viowire("trace", "show", str(trace), "--session", "1234").stdout.splitlines()
    assert mine and not other
    wrong = viowire("trace", "show", str(trace), "--type", "MMIO_REED")
    assert wrong.returncode == 2 and "MMIO_READ" in wrong.stderr and "Traceback" not in wrong.stderr


def test_show_refuses_a_file_that_is_no_trace(tmp_path):
    bad = tmp_path / "not-a-trace"
    bad.write_bytes(b"hello")
    result = viowire("trace", "show", str(bad))
    assert result.returncode == 2 and "not a viowire trace" in result.stderr


def test_frames_split_over_reads_are_whole_and_bad_framing_is_named(tmp_path):
    path = tmp_path / "t.vwt"
    frame = encode(m.MmioRead(addr=0x10000070, width=4), request_id=7)
    rec = recorder.Recorder(path)
    stream = rec.stream(End.SERVER, 5, "peer")
    stream.received(frame[:5])  # one frame over three reads, then two in one read
    stream.received(frame[5:9])
    stream.received(frame[9:] + frame + frame[:3])
    stream.received(frame[3:])
    stream.sent(b"\x02\x00\x00\x00" + bytes(8))  # a length below the header: framing is lost
    stream.closed()
    rec.close()
    trace = show.read(path)
    found = list(show.messages(trace.records))
    assert [msg.message for msg in found[:3]] == [m.MmioRead(addr=0x10000070, width=4)] * 3
    assert all(msg.to_server and msg.session == 5 for msg in found[:3])
    assert found[3].frame is None and "framing error" in found[3].problem
    assert len(found) == 4
    line = show.format_message(found[0], trace.monotonic_ns)
    assert "C->S" in line and "MMIO_READ #7" in line and "addr=0x10000070 width=4" in line


def test_a_trace_cut_short_keeps_what_came_before(tmp_path):
    path = tmp_path / "t.vwt"
    rec = recorder.Recorder(path)
    rec.stream(End.CLIENT).sent(encode(m.Ok(), request_id=3, flags=1))
    rec.close()
    whole = path.read_bytes()
    cut = RECORD.pack(1, 1, End.CLIENT, Event.SENT, 0, 100) + b"\x00" * 10  # killed mid-write
    path.write_bytes(whole + cut)
    found = list(show.messages(show.read(path).records))
    assert [msg.message for msg in found] == [m.Ok()]
    path.write_bytes(whole + bytes(RECORD.size))  # event 0: not a record this format writes
    with pytest.raises(show.TraceError, match="damaged trace"):
        list(show.read(path).records)


async def test_tracing_off_leaves_no_stream_on_either_end(tmp_path):
    assert recorder.active() is None
    async with running_server(tmp_path) as server:
        conn = await connect(url_of(server, "unix"))
        try:
            (session,) = server.sessions
            assert conn.trace is None and session.trace is None
        finally:
            await conn.close()


async def test_recording_in_process_names_both_ends(tmp_path):
    path = tmp_path / "t.vwt"
    recorder.start(path)
    try:
        async with running_server(tmp_path) as server:
            conn = await connect(url_of(server, "tcp"), memory="proxied")
            try:
                await asyncio.wait_for(conn.platform(), 10)
            finally:
                await conn.close()
    finally:
        recorder.stop()
    found = list(show.messages(show.read(path).records))
    ends = {(msg.end, type(msg.message).__name__) for msg in found}
    assert (End.CLIENT, "PlatformInfo") in ends and (End.SERVER, "PlatformQuery") in ends
    assert len({msg.session for msg in found if msg.session}) == 1


def test_the_dissector_covers_every_message_and_field():
    lua = dissector.generate()
    for msg_type, schema in m.SCHEMAS.items():
        assert f"bodies[{msg_type.value}] = function(tvb, tree)  -- {msg_type.name}" in lua
        for sub in schema.subcons:
            assert f'F["{msg_type.name.lower()}.{sub.name}"] = ProtoField.' in lua
    # every block the generator opens it closes (no Lua here to parse it)
    code = re.sub(r'"[^"]*"|--.*$', "", lua, flags=re.MULTILINE)
    opened = len(re.findall(r"\bfunction\b|\bdo$|\bthen\b", code, re.MULTILINE))
    assert opened == len(re.findall(r"\bend\b", code)) > len(m.SCHEMAS)
    assert 'DissectorTable.get("tcp.port"):add(7000, viowire)' in lua
    assert "wtap.USER0" in lua


def test_pcap_holds_one_packet_per_frame(tmp_path):
    trace, pcap = tmp_path / "t.vwt", tmp_path / "t.pcap"
    assert viowire("--trace", str(trace), "probe", "--device", "rng").returncode == 0
    result = viowire("trace", "pcap", str(trace), str(pcap), "--end", "client")
    assert result.returncode == 0, result.stderr
    shown = viowire("trace", "show", str(trace), "--end", "client").stdout.splitlines()
    data = pcap.read_bytes()
    magic, _, _, _, _, _, linktype = struct.unpack_from("<IHHiIII", data)
    assert (magic, linktype) == (0xA1B23C4D, dissector.LINKTYPE_USER0)
    offset, types = 24, []
    while offset < len(data):
        _, _, kept, whole = struct.unpack_from("<IIII", data, offset)
        packet = data[offset + 16 : offset + 16 + kept]
        assert kept == whole == len(packet)
        to_server = packet[0]
        types.append(("C->S" if to_server else "S->C", m.MsgType(packet[16]).name))
        offset += 16 + kept
    assert types == [(line.split()[2], line.split()[4]) for line in shown]
    assert f"{len(shown)} messages" in result.stdout


def test_serve_with_workers_refuses_a_trace(tmp_path):
    result = viowire("serve", "--workers", "2", "--trace", str(tmp_path / "t"))
    assert result.returncode == 2 and "--workers 1" in result.stderr


@pytest.mark.parametrize("where", ["before", "after"])
def test_trace_option_in_front_of_or_after_the_command(tmp_path, where):
    trace = tmp_path / "t.vwt"
    options = ["--trace", str(trace)]
    argv = [*options, "probe", "--device", "rng"] if where == "before" else [
        "probe", "--device", "rng", *options]  # fmt: skip
    assert viowire(*argv).returncode == 0
    assert viowire("trace", "show", str(trace)).stdout.count("HELLO_REPLY") == 2


TSHARK = shutil.which("tshark")
needs_tshark = pytest.mark.skipif(
    TSHARK is None, reason="tshark not installed (scripts/install-test-tools installs it)"
)
_TSHARK_FIELDS = ["viowire.type", "viowire.request_id", "viowire.mmio_read.addr"]


def _tshark(pcap: Path, lua: Path, *options: str) -> list[list[str]]:
    """tshark's fields of each viowire frame in ``pcap``, with the generated dissector."""
    fields = [arg for name in _TSHARK_FIELDS for arg in ("-e", name)]
    tshark = [TSHARK, "-r", str(pcap), "-X", f"lua_script:{lua}", *options, "-T", "fields"]
    result = run([*tshark, *fields, "-E", "occurrence=a", "-E", "aggregator=,"], timeout=60)
    assert result.returncode == 0, result.stderr
    assert "Lua: Error" not in result.stderr and "Malformed" not in result.stdout
    rows = []
    for line in result.stdout.splitlines():
        types, ids, addrs = [*line.split("\t"), "", ""][:3]
        if not types:
            continue  # a TCP segment without viowire in it (an ACK)
        addresses = iter(addrs.split(","))
        for kind, request_id in zip(types.split(","), ids.split(","), strict=True):
            name = m.MsgType(int(kind)).name
            rows.append([name, request_id, next(addresses) if name == "MMIO_READ" else ""])
    return rows


def _shown(trace: Path, *options: str) -> list[list[str]]:
    """What ``trace show`` says of the same frames: type, request id, MMIO_READ address."""
    rows = []
    for line in viowire("trace", "show", str(trace), *options).stdout.splitlines():
        words = line.split()
        addr = next((w[5:] for w in words if w.startswith("addr=")), "")
        read = words[4] == "MMIO_READ"
        rows.append([words[4], words[5][1:], f"0x{int(addr, 16):016x}" if read else ""])
    return rows


@needs_tshark
def test_wireshark_dissects_a_trace_as_trace_show_does(tmp_path):
    trace, pcap, lua = tmp_path / "t.vwt", tmp_path / "t.pcap", tmp_path / "viowire.lua"
    assert viowire("--trace", str(trace), "probe", "--device", "blk,size=1M").returncode == 0
    assert viowire("trace", "pcap", str(trace), str(pcap), "--end", "server").returncode == 0
    lua.write_text(viowire("trace", "dissector").stdout)
    got = _tshark(pcap, lua)
    assert got == _shown(trace, "--end", "server")
    assert {"HELLO", "PLATFORM_INFO", "MMIO_WRITE", "MMIO_READ_REPLY"} <= {row[0] for row in got}


@needs_tshark
def test_wireshark_dissects_viowire_in_a_capture_of_loopback_tcp(tmp_path):
    """The dissector on real TCP segments (reassembled): a capture of 127.0.0.1 only."""
    capture, lua, trace = tmp_path / "lo.pcap", tmp_path / "viowire.lua", tmp_path / "c.vwt"
    lua.write_text(viowire("trace", "dissector").stdout)
    sock = tmp_path / "s.sock"
    with serve("--listen", f"unix://{sock}", "--listen", "tcp://127.0.0.1:0",
               "--device", "blk,size=1M") as served:  # fmt: skip
        url = served.url("tcp")
        port = url.rsplit(":", 1)[1]
        dumpcap = subprocess.Popen(
            [TSHARK, "-i", "lo", "-f", f"tcp port {port}", "-w", str(capture)],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        try:
            _wait_for_capture(dumpcap)
            probe = viowire("--trace", str(trace), "probe", url)
            assert probe.returncode == 0, probe.stderr
            time.sleep(0.5)  # the last segments reach the capture
        finally:
            dumpcap.send_signal(signal.SIGINT)
            dumpcap.communicate(timeout=20)
    got = _tshark(capture, lua, "-d", f"tcp.port=={port},viowire")
    assert got == _shown(trace, "--end", "client")


def _wait_for_capture(proc: subprocess.Popen) -> None:
    """tshark says 'Capturing on' on stderr once packets are being taken."""
    deadline = time.monotonic() + 20
    line = ""
    while "Capturing on" not in line:
        assert time.monotonic() < deadline and proc.poll() is None, "tshark did not start"
        line = proc.stderr.readline()
