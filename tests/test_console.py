"""virtio-console (§5.3): the spec's numbers, then devices of a real server (Unix socket) driven
by the real client driver, over every backend, both versions, single port and MULTIPORT.

Queue indexes, offsets and message bytes are the spec's, written out here rather than taken
from viowire.virtio.console, as an independent check.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import struct

import pytest
from servers import running_server, url_of

from viowire.client.connection import connect
from viowire.client.drivers.console import ConsoleDriver
from viowire.client.errors import DeviceNeedsResetError
from viowire.server import chardev
from viowire.server.devices.console import ConsoleDevice
from viowire.server.platform import DeviceSpec, PlatformError, PlatformSpec
from viowire.virtio import console as spec
from viowire.virtio.constants import Status

TIMEOUT = 10.0
CONSOLE = 3  # §5: virtio-console's device ID
SIZE, MULTIPORT, EMERG_WRITE = 1 << 0, 1 << 1, 1 << 2
VERSIONS = pytest.mark.parametrize("version", [1, 2])


# -- the spec's numbers ---------------------------------------------------------------------------


def test_queue_layout_is_the_spec_table():
    # §5.3.2: 0 receiveq(port0), 1 transmitq(port0), 2/3 control, 4/5 port1, 6/7 port2
    assert [(spec.receiveq(p), spec.transmitq(p)) for p in range(3)] == [(0, 1), (4, 5), (6, 7)]
    assert [spec.port_of_queue(q) for q in range(8)] == [
        (0, False), (0, True), None, None, (1, False), (1, True), (2, False), (2, True)
    ]  # fmt: skip
    assert spec.num_queues(3, multiport=True) == 8
    assert spec.num_queues(1, multiport=False) == 2


def test_control_message_bytes():
    msg = spec.ControlMessage(1, 3, 1)  # PORT_READY(1) for port 1
    assert msg.encode() == b"\x01\x00\x00\x00\x03\x00\x01\x00"
    assert spec.ControlMessage.decode(msg.encode() + b"xy") == spec.ControlMessage(1, 3, 1, b"xy")
    with pytest.raises(ValueError, match="shorter than its 8-byte header"):
        spec.ControlMessage.decode(b"\x01\x00\x00\x00\x03\x00\x01")
    assert spec.resize_message(0, 132, 43).encode() == struct.pack("<IHHHH", 0, 5, 0, 132, 43)
    assert spec.name_message(2, "agent").encode() == struct.pack("<IHH", 2, 7, 1) + b"agent"
    assert spec.decode_name(b"agent\0") == "agent"  # QEMU's NUL, which the spec does not send


def test_config_space_offsets():
    dev = ConsoleDevice(cols=132, rows=43, ports="a:echo")
    # cols @0, rows @2, max_nr_ports @4, emerg_wr @8 (reads 0)
    assert dev.config_space() == struct.pack("<HHII", 132, 43, 2, 0)
    assert dev.device_features(2) == SIZE | MULTIPORT | EMERG_WRITE
    assert ConsoleDevice(emerg_write=False).device_features(1) == SIZE
    assert ConsoleDevice().num_queues == 2 and dev.num_queues == 6


@pytest.mark.parametrize(
    "text, words",
    [
        ("console,backend=serial", "is not one of echo, pty"),
        ("console,backend=tcp:localhost", "tcp:HOST:PORT"),
        ("console,backend=exec:", "name a program"),
        ("console,ports=agent", "NAME:BACKEND"),
        ("console,ports=a:echo;a:echo", "same name"),
        ("console,ports=a:echo,multiport=off", "needs MULTIPORT"),
        ("console,max_ports=2", "needs MULTIPORT"),
        ("console,ports=a:echo;b:echo,max_ports=2", "fewer than the 3 ports"),
        ("console,cols=70000", "0..65535"),
    ],
)
def test_bad_options_say_what_to_write(text, words):
    with pytest.raises(PlatformError, match=re.escape(words)):
        DeviceSpec.parse(text).instantiate("test")


# -- end to end -----------------------------------------------------------------------------------


class Setup:
    """A real server with the given console devices, one client session, drivers by slot."""

    def __init__(self, server, conn) -> None:
        self.server, self.conn = server, conn

    async def attach(self, slot: int = 0, **opts) -> ConsoleDriver:
        infos = [d for d in await self.conn.platform() if d.device_id == CONSOLE]
        async with asyncio.timeout(TIMEOUT):
            return await ConsoleDriver.attach(await self.conn.attach(infos[slot]), **opts)

    def device(self, slot: int = 0) -> ConsoleDevice:
        session = next(s for s in self.server.sessions if s.session_id == self.conn.session_id)
        return session.platform.slots[slot].device.backend


@pytest.fixture
async def console(tmp_path):
    async with contextlib.AsyncExitStack() as stack:

        async def start(*specs: str) -> Setup:
            platform = PlatformSpec([DeviceSpec.parse(text) for text in specs])
            server = await stack.enter_async_context(running_server(tmp_path, platform))
            conn = await stack.enter_async_context(await connect(url_of(server, "unix")))
            return Setup(server, conn)

        yield start


async def read_exactly(port, n: int) -> bytes:
    data = b""
    async with asyncio.timeout(TIMEOUT):
        while len(data) < n:
            chunk = await port.read()
            assert chunk, f"the port ended after {data!r}"
            data += chunk
    return data


async def wait_until(predicate) -> None:
    async with asyncio.timeout(TIMEOUT):
        while not predicate():
            await asyncio.sleep(0.005)


@VERSIONS
async def test_single_port_echo(console, version):
    s = await console(f"console,version={version}")
    drv = await s.attach()
    assert not drv.multiport and drv.has_feature(0) and drv.size == (80, 24)
    assert drv.vqs and len(drv.vqs) == 2  # without MULTIPORT: port 0's pair only
    port = await drv.port(0)
    assert port.console and port.host_connected
    await port.write(b"hello, console\n")
    assert await read_exactly(port, 15) == b"hello, console\n"
    await drv.detach()


@VERSIONS
async def test_multiport_handshake_names_and_open_state(console, version):
    s = await console(f"console,version={version},name=hvc,ports=org.example.agent:echo;two:echo")
    drv = await s.attach()
    assert drv.multiport and drv.max_nr_ports == 3 and len(drv.vqs) == 8
    async with asyncio.timeout(TIMEOUT):
        agent = await drv.port("org.example.agent")
        console_port, two = await drv.port("hvc"), await drv.port("two")
        for port in (console_port, agent, two):
            await port.wait_host(True)  # the device's PORT_OPEN(1): its backend is open
    assert (console_port.id, agent.id, two.id) == (0, 1, 2)
    assert console_port.console and not agent.console and not two.console
    dev = s.device()
    # the console port was opened by the driver on CONSOLE_PORT; generic ports when used
    await wait_until(lambda: dev.ports[0].guest_connected)
    assert all(p.ready for p in dev.ports.values())
    assert not dev.ports[1].guest_connected
    await agent.open()
    await agent.write(b"to the agent")
    assert await read_exactly(agent, 12) == b"to the agent"
    assert dev.ports[1].guest_connected and dev.control_errors == 0
    await agent.close()
    await wait_until(lambda: not dev.ports[1].guest_connected)
    await drv.detach()


@VERSIONS
async def test_exec_backend_runs_a_program_and_its_end_closes_the_port(console, version):
    s = await console(
        f"console,version={version},backend=exec:cat,ports=once:exec:sh -c 'echo bye; exit 0'"
    )
    drv = await s.attach()
    port = await drv.port(0)
    await port.write(b"cat me\n")
    assert await read_exactly(port, 7) == b"cat me\n"
    once = await drv.port("once")
    await once.open()
    assert await read_exactly(once, 4) == b"bye\n"
    async with asyncio.timeout(TIMEOUT):
        await once.wait_host(False)  # PORT_OPEN(0): the program ended
    await once.write(b"nobody hears this")  # discarded, as QEMU does, and completed
    await drv.detach()


async def test_unix_and_tcp_backends_connect_to_a_listener(console, tmp_path):
    got: dict[str, asyncio.Queue] = {"unix": asyncio.Queue(), "tcp": asyncio.Queue()}

    def serve(kind):
        async def on_connect(reader, writer):
            writer.write(f"hello from {kind}\n".encode())
            await writer.drain()
            await got[kind].put(await reader.readexactly(5))
            writer.close()

        return on_connect

    path = str(tmp_path / "host.sock")
    unix = await asyncio.start_unix_server(serve("unix"), path)
    tcp = await asyncio.start_server(serve("tcp"), "127.0.0.1", 0)
    tcp_port = tcp.sockets[0].getsockname()[1]
    async with unix, tcp:
        s = await console(f"console,backend=unix:{path},ports=t:tcp:127.0.0.1:{tcp_port}")
        drv = await s.attach()
        for key, kind in ((0, "unix"), ("t", "tcp")):
            port = await drv.port(key)
            await port.open()
            line = f"hello from {kind}\n".encode()
            assert await read_exactly(port, len(line)) == line
            await port.write(b"ahoy!")
            async with asyncio.timeout(TIMEOUT):
                assert await got[kind].get() == b"ahoy!"
            async with asyncio.timeout(TIMEOUT):
                await port.wait_host(False)  # the listener closed its end
                await port.write(b"into the void")  # discarded, completed
        assert not s.device().transport.status & Status.DEVICE_NEEDS_RESET
        await drv.detach()


@pytest.mark.parametrize("backend", ["unix:{tmp}/nobody.sock", "exec:{tmp}/no-such-program"])
async def test_a_backend_that_cannot_open_is_logged(console, tmp_path, caplog, backend):
    s = await console(f"console,backend={backend.format(tmp=tmp_path)}")
    drv = await s.attach()
    port = await drv.port(0)
    async with asyncio.timeout(TIMEOUT):
        await port.write(b"lost")  # completed, discarded
    assert "cannot be opened" in caplog.text
    assert not s.device().ports[0].host_connected
    await drv.detach()


async def test_pty_backend_path_is_logged_and_carries_bytes_both_ways(console, caplog):
    caplog.set_level(logging.WARNING, logger="viowire.console")
    s = await console("console,backend=pty")
    drv = await s.attach()
    port = await drv.port(0)
    await wait_until(lambda: "terminal /dev/pts/" in caplog.text)
    path = re.search(r"terminal (/dev/pts/\d+)", caplog.text).group(1)
    fd = os.open(path, os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
    try:
        os.write(fd, b"typed on the host\n")
        assert await read_exactly(port, 18) == b"typed on the host\n"  # raw: no CR added
        await port.write(b"from the guest")
        data = b""
        async with asyncio.timeout(TIMEOUT):
            while len(data) < 14:
                with contextlib.suppress(BlockingIOError):
                    data += os.read(fd, 100)
                await asyncio.sleep(0.005)
        assert data == b"from the guest"
    finally:
        os.close(fd)
    await drv.detach()


async def test_pty_program_runs_on_its_own_terminal(console):
    s = await console("console,backend=pty:sh -c 'tty; stty -a | grep -o icanon'")
    drv = await s.attach()
    port = await drv.port(0)
    out = b""
    async with asyncio.timeout(TIMEOUT):
        while b"icanon" not in out:
            out += await port.read()
    # the program's stdout is a terminal (a real one: ONLCR makes \r\n, canonical mode is on)
    assert re.match(rb"/dev/pts/\d+\r\n", out), out
    await drv.detach()


@VERSIONS
async def test_resize_is_a_config_change_and_a_resize_message(console, version):
    s = await console(f"console,version={version}", f"console,version={version},ports=a:echo")
    single, multi = await s.attach(0), await s.attach(1)
    for slot, drv in ((0, single), (1, multi)):
        await drv.port(0)
        if drv.multiport:
            await wait_until(lambda: s.device(1).ports[0].ready)
        events = drv.resizes()
        s.device(slot).resize(132, 43)
        async with asyncio.timeout(TIMEOUT):
            assert await anext(events) == (0, 132, 43)
            if drv.multiport:  # the config change and RESIZE both say so, in either order
                assert await anext(events) == (0, 132, 43)
        assert drv.size == (132, 43)
        assert await drv.config() == {
            "cols": 132, "rows": 43, **({"max_nr_ports": 2} if drv.multiport else {}),
            "emerg_wr": 0,
        }  # fmt: skip
    assert (await multi.port(0)).size == (132, 43)
    await single.detach()
    await multi.detach()


@VERSIONS
async def test_emergency_write_reaches_port0_even_before_setup(console, version):
    s = await console(f"console,version={version}")
    infos = [d for d in await s.conn.platform() if d.device_id == CONSOLE]
    dev = await s.conn.attach(infos[0])
    await dev.probe()
    await dev.config_write(8, b"E\0\0\0")  # no feature negotiated, no queue: §5.3.5.1 MUST
    drv = await ConsoleDriver.attach(dev)
    await drv.emergency_write("!")
    port = await drv.port(0)
    assert await read_exactly(port, 2) == b"E!"  # the echo backend held them for the guest
    await drv.detach()


async def test_backend_is_not_read_without_guest_buffers(console):
    lines = 200_000  # ~1.3 MB, far more than the driver's buffers and the pipe hold
    s = await console(f"console,backend=exec:seq {lines}")
    drv = await s.attach()
    port = await drv.port(0)
    dev = s.device()
    posted = 16  # the driver's receive buffers, of 4 KiB, posted again only once read
    await wait_until(lambda: dev.ports[0].rx_buffers == posted)
    await asyncio.sleep(0.05)  # a device that kept reading would go on meanwhile
    assert dev.ports[0].rx_buffers == posted and dev.ports[0].rx_bytes <= posted * 4096
    assert len(dev.ports[0].pending) <= 4096  # at most one buffer's worth read ahead
    assert dev.ports[0].chardev.process.poll() is None  # seq waits on its full pipe
    expected = "".join(f"{i}\n" for i in range(1, lines + 1)).encode()
    assert await read_exactly(port, len(expected)) == expected
    await drv.detach()


async def test_guest_writes_wait_for_a_full_backend(console):
    s = await console("console")  # echo: holds 64 KiB for the guest to read back
    drv = await s.attach()
    port = await drv.port(0)
    dev = s.device()
    data = bytes(range(256)) * 4096  # 1 MiB
    writing = asyncio.create_task(port.write(data))
    echo = dev.ports[0].chardev
    await wait_until(lambda: len(echo._data) >= chardev.ECHO_LIMIT)
    assert not writing.done()  # the transmit chain waits for the backend
    assert len(echo._data) <= chardev.ECHO_LIMIT + 4096
    assert await read_exactly(port, len(data)) == data
    async with asyncio.timeout(TIMEOUT):
        await writing
    await drv.detach()


async def test_bad_control_messages_are_logged_and_ignored(console, caplog):
    s = await console("console,ports=a:echo")
    drv = await s.attach()
    port = await drv.port("a")
    dev = s.device()
    bad = [
        b"\x01\x00\x00\x00\x06\x00",  # 6 bytes: shorter than the header
        struct.pack("<IHH", 9, 6, 1),  # PORT_OPEN for a port that does not exist
        struct.pack("<IHH", 1, 4, 1),  # CONSOLE_PORT: the device's to send
        struct.pack("<IHH", 1, 99, 0),  # no such event
        struct.pack("<IHH", 1, 3, 0),  # PORT_READY(0): the driver failed
    ]
    async with asyncio.timeout(TIMEOUT):
        for msg in bad:
            await drv.request(3, out=msg)
    assert dev.control_errors == len(bad)
    assert "no port 9" in caplog.text and "shorter than its 8-byte header" in caplog.text
    assert not dev.transport.status & Status.DEVICE_NEEDS_RESET
    await port.open()
    await port.write(b"still fine")
    assert await read_exactly(port, 10) == b"still fine"
    await drv.detach()


async def test_malformed_transmit_chain_needs_reset_other_session_fine(console):
    s = await console("console", "console,ports=a:echo")
    broken, other = await s.attach(0), await s.attach(1)
    with pytest.raises(DeviceNeedsResetError):
        async with asyncio.timeout(TIMEOUT):
            await broken.request(1, out=b"x", in_sizes=4)  # device-writable on a transmitq
    assert s.device(0).transport.status & Status.DEVICE_NEEDS_RESET
    with pytest.raises(DeviceNeedsResetError):
        async with asyncio.timeout(TIMEOUT):
            await other.request(3, out=b"x", in_sizes=4)  # control transmitq: the same rule
    assert s.device(1).transport.status & Status.DEVICE_NEEDS_RESET
    # another session's devices of the same types are untouched
    async with await connect(url_of(s.server, "unix")) as conn:
        fresh = Setup(s.server, conn)
        drv = await fresh.attach(1)
        port = await drv.port("a")
        await port.open()
        await port.write(b"ok")
        assert await read_exactly(port, 2) == b"ok"
        await drv.detach()
    for drv in (broken, other):  # and the broken ones recover with a reset
        await drv.reinitialise()
        port = await drv.port(0)
        async with asyncio.timeout(TIMEOUT):
            await port.wait_host(True)  # with MULTIPORT: the handshake ran again
        await port.write(b"back")
        assert await read_exactly(port, 4) == b"back"
        await drv.detach()


async def test_device_readable_receive_buffer_needs_reset(console):
    from viowire.client.drivers.generic import GenericDriver

    s = await console("console")
    infos = [d for d in await s.conn.platform() if d.device_id == CONSOLE]
    drv = await GenericDriver.attach(await s.conn.attach(infos[0]), device_type=ConsoleDevice)
    with pytest.raises(DeviceNeedsResetError):
        async with asyncio.timeout(TIMEOUT):
            await drv.request(0, out=b"x", in_sizes=4)  # a readable part on a receiveq
    assert s.device().transport.status & Status.DEVICE_NEEDS_RESET
    await drv.detach()


async def test_reset_keeps_what_the_backend_wrote(console):
    s = await console("console")
    drv = await s.attach()
    port = await drv.port(0)
    await port.write(b"before reset")
    await wait_until(lambda: s.device().ports[0].rx_bytes == 12)
    await drv.detach()  # the bytes are in a buffer the driver never read: gone with the ring
    drv = await s.attach()
    port = await drv.port(0)
    await port.write(b"after")
    assert await read_exactly(port, 5) == b"after"
    await drv.detach()


# -- viowire conform's console checks ------------------------------------------------------------


class MisnumberedConsole(ConsoleDevice):
    """Says max_nr_ports 1 but announces port 1 too: conform must FAIL it."""

    def config_space(self) -> bytes:
        return struct.pack("<HHII", self.cols, self.rows, 1, 0)


class NulNamedConsole(ConsoleDevice):
    """Names a port with a NUL inside: conform must FAIL it."""

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self.ports[1].name = "a\0b"


CONSOLE_CHECKS = ("console.config", "console.multiport-handshake", "console.port-names")


@VERSIONS
async def test_conform_passes_viowire_console_devices(tmp_path, version):
    from test_any_device import conform, fails

    specs = (f"console,version={version},name=hvc,ports=agent:echo;shell:exec:cat",)
    specs += (f"console,version={version}",)
    multi, single = (await conform(tmp_path, *specs)).values()
    assert not fails(multi) and not fails(single), (fails(multi), fails(single))
    assert [multi[c].verdict.name for c in CONSOLE_CHECKS] == ["PASS"] * 3
    assert "port 0 'hvc', port 1 'agent', port 2 'shell'" in multi["console.port-names"].detail
    assert "ports 0 console open, 1 open, 2 open" in multi["console.multiport-handshake"].detail
    assert [single[c].verdict.name for c in CONSOLE_CHECKS] == ["PASS", "SKIP", "SKIP"]
    for id_ in ("io.requests", "io.indirect", "driver.linux-flow"):
        assert multi[id_].verdict.name == single[id_].verdict.name == "PASS", id_


@pytest.mark.parametrize(
    "cls, check, words",
    [
        (MisnumberedConsole, "console.multiport-handshake", "not below max_nr_ports 1"),
        (NulNamedConsole, "console.port-names", "holds a NUL"),
    ],
)
async def test_conform_fails_a_console_that_breaks_the_handshake(tmp_path, cls, check, words):
    from test_any_device import conform

    (results,) = (await conform(tmp_path, f"test_console:{cls.__name__},ports=a:echo")).values()
    assert results[check].verdict.name == "FAIL" and words in results[check].detail


async def test_without_multiport_negotiated_only_port0_exists(console):
    from viowire.client.drivers.generic import GenericDriver

    s = await console("console,ports=a:echo", "console,ports=a:echo")
    drv = await s.attach(0, exclude_features=MULTIPORT)  # Linux without the feature
    assert not drv.multiport and len(drv.vqs) == 2 and list(drv.ports) == [0]
    port = await drv.port(0)
    await port.write(b"single")
    assert await read_exactly(port, 6) == b"single"
    infos = [d for d in await s.conn.platform() if d.device_id == CONSOLE]
    raw = await GenericDriver.attach(await s.conn.attach(infos[1]), queues=6)  # no features
    await raw.post(4, 64, 1)  # port 1's receiveq, and its transmitq: not without MULTIPORT
    async with asyncio.timeout(TIMEOUT):
        await raw.request(5, out=b"to port 1")
    dev = s.device(1)
    assert dev.ports[1].pump is None and dev.ports[1].tx_bytes == 0
    await raw.detach()
    await drv.detach()


async def test_random_control_messages_never_break_the_device(console):
    import random

    rng = random.Random(20261207)  # a fixed seed: the same messages every run
    s = await console("console,ports=a:echo;b:echo")
    drv = await s.attach()
    dev = s.device()
    async with asyncio.timeout(TIMEOUT):
        for _ in range(300):
            kind = rng.random()
            if kind < 0.3:  # any bytes at all
                msg = rng.randbytes(rng.randrange(1, 40))
            else:  # a header with a random id (often a real port) and event
                port_id = rng.choice([0, 1, 2, 3, 31, 0xFFFFFFFF, rng.getrandbits(32)])
                msg = struct.pack("<IHH", port_id, rng.randrange(10), rng.randrange(3))
                msg += rng.randbytes(rng.randrange(0, 8))
            await drv.request(3, out=msg)
    assert not dev.transport.status & Status.DEVICE_NEEDS_RESET
    assert len(dev._outbox) <= dev._outbox_limit  # what the driver made it say stays bounded
    port = await drv.port("b")
    await port.open()
    await port.write(b"alive")
    assert await read_exactly(port, 5) == b"alive"
    await drv.detach()


async def test_a_driver_without_size_gets_no_resize(console):
    s = await console("console,ports=a:echo")
    drv = await s.attach(exclude_features=SIZE)
    assert drv.multiport and drv.size is None
    await drv.port(0)
    await wait_until(lambda: s.device().ports[0].ready)
    s.device().resize(100, 30)
    s.device().ports[1].console = True  # the message for port 0 would come before this one
    await drv.send_control(1, 3, 1)  # PORT_READY again: CONSOLE_PORT for port 1 follows
    port1 = await drv.port(1)
    await wait_until(lambda: port1.console)
    assert (await drv.port(0)).size is None and drv._resizes.empty()
    await drv.detach()
