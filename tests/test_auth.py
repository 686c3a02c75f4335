"""Authentication, TLS and same-host trust from proof, end to end over real sockets.

TLS (``tls://``, server certificate, mutual TLS) and the shared-secret token (AUTH, an HMAC over
both nonces), the listener policy (no non-loopback listener that authenticates nobody, Unix
sockets 0600, no takeover of a live server's socket), and MEMORY_SHM granted only on proof.
Certificates are made at test time with the ``openssl`` command (the venv has no
``cryptography`` package; the command is on every CI image and needs no dependency).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import ssl
import stat
import subprocess
from pathlib import Path

import pytest
from cli_run import serve, viowire
from servers import small_platform, url_of
from test_bad_input import (
    TIMEOUT,
    RawPeer,
    hello_msg,
    mem_register,
    raw_frame,
    shm_path,  # noqa: F401 (a fixture)
    shm_segment,
)

from viowire import auth, tls
from viowire.auth import AuthError, ClientCredentials
from viowire.client.connection import ProtocolError, connect
from viowire.client.drivers.blk import BlockDriver
from viowire.protocol import messages as m
from viowire.protocol.codec import encode
from viowire.protocol.hostid import host_id
from viowire.samehost import SHM_DIR
from viowire.server.app import Security, Server
from viowire.virtio.constants import DeviceId

TOKEN = b"0123456789abcdef-test-token"
MAGIC = 0x74726976  # "virt"
RAM = 1 << 20


# -- certificates -----------------------------------------------------------------------------
def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=30)


def _ca(directory: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-subj", f"/CN={name}", "-days", "2",
        cwd=directory,
    )  # fmt: skip


def _signed(directory: Path, name: str, ca: str, extensions: str) -> None:
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=directory,
    )  # fmt: skip
    (directory / f"{name}.ext").write_text(extensions)
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-CAcreateserial", "-out", f"{name}.pem", "-days", "2", "-extfile", f"{name}.ext",
        cwd=directory,
    )  # fmt: skip


@pytest.fixture(scope="module")
def pki(tmp_path_factory) -> dict[str, str]:
    """A CA; a server certificate for 127.0.0.1 and localhost; a client certificate; and the
    same client made by another CA (which the server does not trust)."""
    d = tmp_path_factory.mktemp("pki")
    _ca(d, "ca")
    _ca(d, "other-ca")
    _signed(d, "server", "ca", "subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    _signed(d, "client", "ca", "extendedKeyUsage=clientAuth\n")
    _signed(d, "stranger", "other-ca", "extendedKeyUsage=clientAuth\n")
    return {name: str(d / name) for name in ("ca", "other-ca", "server", "client", "stranger")}


@contextlib.asynccontextmanager
async def started(urls: list[str], security: Security):
    server = Server(small_platform(), security=security)
    await server.start(urls)
    try:
        yield server
    finally:
        await server.close()


async def works(url: str, credentials: ClientCredentials, memory: str = "proxied") -> None:
    """A session that reaches its devices: a register read, and blk data both ways (guest RAM
    crosses the connection in proxied mode)."""
    async with await connect(url, memory=memory, ram_size=RAM, credentials=credentials) as conn:
        platform = await conn.platform()
        assert await conn.mmio_read(platform[0].base, 4) == MAGIC
        entry = next(d for d in platform if d.device_id == DeviceId.BLOCK)
        blk = await BlockDriver.attach(await conn.attach(entry))
        data = os.urandom(4096)
        await asyncio.wait_for(blk.write(0, data), TIMEOUT)
        assert await asyncio.wait_for(blk.read(0, 4096), TIMEOUT) == data
        await blk.detach()


# == TLS ========================================================================================
async def test_tls_session_and_a_client_that_does_not_trust_the_server(pki, tmp_path):
    context = tls.server_context(pki["server"] + ".pem", pki["server"] + ".key")
    async with started(["tls://127.0.0.1:0"], Security(tls=context)) as server:
        url = url_of(server, "tls")
        assert url.startswith("tls://127.0.0.1:")
        await works(url, ClientCredentials(tls_ca=pki["ca"] + ".pem"))
        with pytest.raises(ssl.SSLCertVerificationError):
            await connect(url, credentials=ClientCredentials(tls_ca=pki["other-ca"] + ".pem"))
        with pytest.raises(ssl.SSLCertVerificationError):  # the system's CAs do not know ours
            await connect(url, credentials=ClientCredentials())
        # A client speaking plain TCP to it gets no session, and the server goes on.
        with pytest.raises((ConnectionError, ProtocolError, asyncio.TimeoutError)):
            port = url.rsplit(":", 1)[1]
            await asyncio.wait_for(
                connect(f"tcp://127.0.0.1:{port}", credentials=ClientCredentials()), TIMEOUT
            )
        await works(url, ClientCredentials(tls_ca=pki["ca"] + ".pem"))


async def test_mutual_tls_needs_a_client_certificate_of_its_ca(pki):
    context = tls.server_context(pki["server"] + ".pem", pki["server"] + ".key", pki["ca"] + ".pem")
    security = Security(tls=context, client_certs=True)
    async with started(["tls://127.0.0.1:0"], security) as server:
        url = url_of(server, "tls")
        ca = pki["ca"] + ".pem"
        for refused in (
            ClientCredentials(tls_ca=ca),  # no client certificate (the error says to give one)
            ClientCredentials(  # one the server's CA did not sign
                tls_ca=ca, tls_cert=pki["stranger"] + ".pem", tls_key=pki["stranger"] + ".key"
            ),
        ):
            with pytest.raises((ssl.SSLError, ConnectionError)):
                await asyncio.wait_for(connect(url, credentials=refused), TIMEOUT)
        good = ClientCredentials(
            tls_ca=ca, tls_cert=pki["client"] + ".pem", tls_key=pki["client"] + ".key"
        )
        await works(url, good)
        assert not server.sessions or all(s.platform is not None for s in server.sessions)


def test_tls_configuration_errors_name_the_file(pki, tmp_path):
    with pytest.raises(tls.TlsConfigError, match=r"no-such\.pem"):
        tls.server_context(str(tmp_path / "no-such.pem"), pki["server"] + ".key")
    with pytest.raises(tls.TlsConfigError, match="do not load as a PEM pair"):
        tls.server_context(pki["server"] + ".pem", pki["client"] + ".key")
    with pytest.raises(tls.TlsConfigError, match="both --tls-cert and --tls-key"):
        tls.client_context(cert=pki["client"] + ".pem")


@pytest.mark.parametrize("client_loop", ["uvloop", "asyncio"])
def test_tls_and_token_from_the_command_line_on_both_loops(pki, tmp_path, client_loop):
    """``serve`` runs on uvloop (its default; the in-process tests above serve TLS on asyncio's
    loop), the client on each loop."""
    token = tmp_path / "token"
    token.write_bytes(TOKEN + b"\n")
    args = ["--listen", "tls://127.0.0.1:0", "--tls-cert", pki["server"] + ".pem"]
    args += ["--tls-key", pki["server"] + ".key", "--token-file", str(token)]
    with serve(*args) as served:
        url = served.url("tls")
        result = viowire(
            "--loop", client_loop, "io", url, "--tls-ca", pki["ca"] + ".pem", "--token-file",
            str(token), "--device", "0", "-c", "write -P 0xa5 0 4096", "-c", "read -P 0xa5 0 4096",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        # The token from the environment instead; without one, a clear refusal.
        env = {**os.environ, "VIOWIRE_TOKEN": TOKEN.decode(), "VIOWIRE_TLS_CA": pki["ca"] + ".pem"}
        result = viowire("--loop", client_loop, "probe", url, env=env)
        assert result.returncode == 0, result.stderr
        assert result.stdout.count("virtio-blk") == 2
        env.pop("VIOWIRE_TOKEN")
        result = viowire("--loop", client_loop, "probe", url, env=env)
        assert result.returncode == 1
        assert "requires a token: give --token-file FILE or set VIOWIRE_TOKEN" in result.stderr


# == the token's proof, bound to the TLS connection ==============================================
async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


@contextlib.asynccontextmanager
async def relay(target: str, terminate: ssl.SSLContext | None, ca: str):
    """A man in the middle on 127.0.0.1 that passes bytes on to ``target`` (a tls:// URL). With
    ``terminate`` it ends the client's TLS with that context (a certificate the client trusts)
    and opens its own TLS to the server, seeing and relaying every frame, AUTH included;
    without, it relays the TLS bytes themselves (a TCP proxy: TLS stays end to end)."""
    host, port = target.removeprefix("tls://").rsplit(":", 1)
    upstream = tls.client_context(ca) if terminate is not None else None
    pumps: set[asyncio.Task] = set()

    async def relay_one(reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection(
            host, int(port), ssl=upstream, server_hostname=host if upstream else None
        )
        for pair in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(_pump(*pair))
            pumps.add(task)
            task.add_done_callback(pumps.discard)

    listener = await asyncio.start_server(relay_one, "127.0.0.1", 0, ssl=terminate)
    try:
        yield f"tls://127.0.0.1:{listener.sockets[0].getsockname()[1]}"
    finally:
        listener.close()
        for task in list(pumps):
            task.cancel()
        await asyncio.gather(*pumps, return_exceptions=True)
        await listener.wait_closed()


async def test_a_relay_that_terminates_tls_cannot_pass_the_token_proof_on(pki):
    """The client's AUTH is made for its TLS connection to the relay, and the server checks it
    on the relay's connection to it: another channel binding, so AUTH_FAILED, although the relay
    changed no byte. The same relay without terminating TLS (a TCP proxy) lets the client in:
    what fails the first is the binding, not the relay."""
    context = tls.server_context(pki["server"] + ".pem", pki["server"] + ".key")
    credentials = ClientCredentials(token=TOKEN, tls_ca=pki["ca"] + ".pem")
    async with started(["tls://127.0.0.1:0"], Security(token=TOKEN, tls=context)) as server:
        target = url_of(server, "tls")
        async with relay(target, None, pki["ca"] + ".pem") as proxy:
            await works(proxy, credentials)
        async with relay(target, context, pki["ca"] + ".pem") as mitm:
            with pytest.raises(AuthError, match="bound to the TLS connection"):
                await connect(mitm, credentials=credentials)
        await works(target, credentials)  # and the server goes on


# == the token ==================================================================================
@pytest.fixture
async def token_server(tmp_path):
    urls = ["tcp://127.0.0.1:0", f"unix://{tmp_path}/viowire.sock"]
    async with started(urls, Security(token=TOKEN)) as server:
        yield server


@pytest.mark.parametrize("scheme", ["tcp", "unix"])
async def test_token_right_wrong_and_missing(token_server, scheme, caplog):
    url = url_of(token_server, scheme)
    await works(
        url, ClientCredentials(token=TOKEN), memory="shared" if scheme == "unix" else "proxied"
    )
    with pytest.raises(AuthError, match="wrong token"):
        await connect(url, credentials=ClientCredentials(token=b"x" * len(TOKEN)))
    assert any("AUTH_FAILED" in r.getMessage() for r in caplog.records)
    with pytest.raises(AuthError, match="requires a token"):
        await connect(url, credentials=ClientCredentials())
    await works(url, ClientCredentials(token=TOKEN))


async def auth_frame(peer: RawPeer, reply: object, token: bytes, request_id: int) -> bytes:
    nonce = auth.new_nonce()
    mac = auth.client_mac(token, reply.nonce, nonce)
    return encode(m.Auth(nonce=nonce, mac=mac, shm_proof=bytes(32)), request_id, 0)


async def test_no_device_before_auth_and_a_request_before_it_is_refused(token_server):
    peer = await RawPeer.connect(token_server, "tcp")
    try:
        reply = await peer.request(hello_msg())
        assert isinstance(reply, m.HelloReply) and reply.auth == m.AuthMethod.TOKEN
        (session,) = token_server.sessions
        assert session.platform is None  # nothing was built for an unauthenticated peer
        message = await peer.request_error(
            m.MmioRead(addr=0x1000_1000, width=4), m.ErrorCode.AUTH_FAILED
        )
        assert "requires a token" in message
        await peer.expect_closed()
        assert session.platform is None
    finally:
        await peer.aclose()


async def test_a_replayed_auth_is_refused(token_server):
    """An AUTH recorded on one connection proves nothing on the next: the server's nonce is new."""
    first = await RawPeer.connect(token_server, "tcp")
    second = await RawPeer.connect(token_server, "tcp")
    try:
        recorded = await auth_frame(first, await first.request(hello_msg()), TOKEN, 7)
        await first.send(recorded)
        answer = await first.reply()
        assert answer.type == m.MsgType.AUTH_REPLY and answer.request_id == 7
        assert (await first.mmio_read(0x1000_1000)) == MAGIC
        reply = await second.request(hello_msg())
        assert isinstance(reply, m.HelloReply)
        await second.send(recorded)
        error = await second.reply()
        assert error.type == m.MsgType.ERROR and error.request_id == 7
        assert m.Error(*_error_fields(error)).code == m.ErrorCode.AUTH_FAILED
        await second.expect_closed()
        assert (await first.mmio_read(0x1000_1000)) == MAGIC
    finally:
        await first.aclose()
        await second.aclose()


def _error_fields(frame) -> tuple:
    from viowire.protocol.codec import decode_body

    error = decode_body(frame.type, frame.body)
    return error.code, error.message


async def test_a_peer_that_never_authenticates_is_dropped(token_server, monkeypatch):
    monkeypatch.setattr("viowire.server.session.HELLO_TIMEOUT", 0.2)
    peer = await RawPeer.connect(token_server, "tcp")
    try:
        assert isinstance(await peer.request(hello_msg()), m.HelloReply)
        await peer.expect_fatal(m.ErrorCode.BAD_STATE)
    finally:
        await peer.aclose()


async def test_other_sessions_keep_working_while_bad_clients_fail_auth(token_server):
    url = url_of(token_server, "tcp")
    good = ClientCredentials(token=TOKEN)
    async with await connect(url, memory="proxied", ram_size=RAM, credentials=good) as conn:
        base = (await conn.platform())[0].base
        reads = 0

        async def keep_reading() -> None:
            nonlocal reads
            while True:
                assert await conn.mmio_read(base, 4) == MAGIC
                reads += 1
                await asyncio.sleep(0)

        async def bad_client(i: int) -> None:
            wrong = ClientCredentials(token=b"%016d-wrong" % i)
            with pytest.raises(AuthError):
                await connect(url, credentials=wrong)

        reader = asyncio.create_task(keep_reading())
        try:
            async with asyncio.timeout(TIMEOUT * 2):
                for round_ in range(5):
                    before = reads
                    await asyncio.gather(*(bad_client(round_ * 10 + i) for i in range(10)))
                    while reads < before + 2:
                        await asyncio.sleep(0.001)
        finally:
            reader.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reader
        assert reads >= 10
        await works(url, good)


async def test_an_old_client_is_told_the_version(token_server):
    peer = await RawPeer.connect(token_server, "tcp")
    try:
        message = await peer.request_error(hello_msg(version=1), m.ErrorCode.UNSUPPORTED)
        assert "speaks 2" in message and "upgrade the client" in message
    finally:
        await peer.aclose()


def test_token_sources(tmp_path):
    path = tmp_path / "token"
    path.write_text(TOKEN.decode() + "\n")
    assert auth.token_from(str(path), env={}) == TOKEN
    assert auth.token_from(env={"VIOWIRE_TOKEN_FILE": str(path)}) == TOKEN
    assert auth.token_from(env={"VIOWIRE_TOKEN": TOKEN.decode()}) == TOKEN
    assert auth.token_from(env={}) is None
    path.write_text("short")
    with pytest.raises(AuthError, match="at least 16"):
        auth.token_from(str(path), env={})
    with pytest.raises(AuthError, match="cannot read the token file"):
        auth.token_from(str(tmp_path / "missing"), env={})


def test_token_on_the_command_line_is_refused(tmp_path):
    for args in (
        ["serve", "--token", "s3cret-s3cret-s3cret"],
        ["probe", "--token", "x", "tcp://127.0.0.1:1"],
    ):
        result = viowire(*args)
        assert result.returncode == 2
        assert "--token is refused" in result.stderr and "--token-file FILE" in result.stderr
        assert "s3cret" not in result.stderr


# == the listener policy =========================================================================
def test_a_non_loopback_listener_needs_authentication_or_insecure(pki):
    exposed = ["tcp://0.0.0.0:7000"]
    with pytest.raises(ValueError, match="--insecure"):
        Security().check(exposed)
    context = tls.server_context(pki["server"] + ".pem", pki["server"] + ".key")
    with pytest.raises(ValueError, match="--tls-client-ca"):  # TLS alone lets anyone in
        Security(tls=context).check(["tls://0.0.0.0:7000"])
    Security(tls=context, client_certs=True).check(["tls://0.0.0.0:7000"])
    Security(token=TOKEN).check(exposed)
    Security(insecure=True).check(exposed)
    Security().check(["tcp://127.0.0.1:7000", "tcp://[::1]:7000", "tcp://localhost:7000"])
    with pytest.raises(ValueError, match="needs --tls-cert"):
        Security().check(["tls://127.0.0.1:7000"])


def test_serve_refuses_an_exposed_listener_in_one_line(tmp_path):
    """Refused before anything is bound (so this test binds nothing off loopback)."""
    result = viowire("serve", "--listen", "tcp://0.0.0.0:7000")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "refusing to listen on tcp://0.0.0.0:7000" in lines[0]
    assert "--insecure" in lines[0] and "--token-file" in lines[0]


def test_unix_sockets_are_0600_unless_told(tmp_path):
    with serve("--listen", f"unix://{tmp_path}/a.sock"):
        assert stat.S_IMODE(os.stat(tmp_path / "a.sock").st_mode) == 0o600
    with serve("--listen", f"unix://{tmp_path}/b.sock", "--socket-mode", "0660"):
        assert stat.S_IMODE(os.stat(tmp_path / "b.sock").st_mode) == 0o660
    result = viowire("serve", "--listen", f"unix://{tmp_path}/c.sock", "--socket-mode", "rw")
    assert result.returncode == 2 and "octal permission bits" in result.stderr


def test_a_live_server_is_not_taken_over_and_a_stale_socket_is_reclaimed(tmp_path):
    path = tmp_path / "s.sock"
    with serve("--listen", f"unix://{path}", "--device", "rng") as first:
        second = viowire("serve", "--listen", f"unix://{path}", "--device", "rng", timeout=10)
        assert second.returncode == 1
        assert "another server is listening there" in second.stderr
        probe = viowire("probe", f"unix://{path}")  # the first one still serves
        assert probe.returncode == 0 and "virtio-rng" in probe.stdout, probe.stderr
        assert first.proc.poll() is None
    # The first server was killed (SIGKILL): its socket file stayed, and nobody listens on it.
    assert stat.S_ISSOCK(os.stat(path).st_mode)
    with serve("--listen", f"unix://{path}", "--device", "rng"):
        probe = viowire("probe", f"unix://{path}")
        assert probe.returncode == 0, probe.stderr


# == same-host trust from proof ==================================================================
def proof_files() -> set[str]:
    return {n for n in os.listdir(SHM_DIR) if n.startswith("viowire-proof-")}


async def test_shm_is_refused_to_a_tcp_peer_that_only_echoes_the_host_id(server, shm_path):  # noqa: F811
    """The attack of issue 12: HELLO_REPLY shows the host id; echoing it grants nothing. A peer
    that cannot read the proof file (another host, another container's /dev/shm) keeps proxied."""
    peer = await RawPeer.connect(server, "tcp")
    try:
        reply = await peer.request(hello_msg(host_id=host_id()))
        assert reply.host_id == host_id() and not reply.features & m.ProtoFeature.MEMORY_SHM
        assert reply.shm_proof in proof_files()
        guess = auth.new_nonce()
        answer = await peer.request(m.Auth(nonce=bytes(32), mac=bytes(32), shm_proof=guess))
        assert not answer.features & m.ProtoFeature.MEMORY_SHM
        # The session's own proof file is gone once answered: only it, as other test runs on the
        # machine make and remove theirs in the same /dev/shm meanwhile.
        assert reply.shm_proof not in proof_files()
        peer.session_id = reply.session_id
        segment = shm_segment(shm_path, owner=peer)
        await peer.request_error(
            mem_register(0x8000_0000, 4096, m.MemoryKind.SHM, segment), m.ErrorCode.UNSUPPORTED
        )
        assert await peer.mmio_read(0x1000_1000) == MAGIC  # the session itself goes on
    finally:
        await peer.aclose()


async def test_a_proof_file_is_removed_when_the_peer_leaves(server):
    peer = await RawPeer.connect(server, "tcp")
    try:
        reply = await peer.request(hello_msg())
        assert reply.shm_proof in proof_files()
    finally:
        await peer.aclose()
    # this peer's own file (other test runs on the machine may make and remove theirs meanwhile)
    async with asyncio.timeout(TIMEOUT):
        while reply.shm_proof in proof_files():
            await asyncio.sleep(0.01)


async def test_shm_over_unix_without_proof_and_over_tcp_with_it(server, shm_path):  # noqa: F811
    peer = await RawPeer.connect(server, "unix")
    try:
        reply = await peer.request(hello_msg())
        assert reply.features & m.ProtoFeature.MEMORY_SHM and not reply.shm_proof  # SO_PEERCRED
        peer.session_id = reply.session_id
        segment = shm_segment(shm_path, owner=peer)
        await peer.expect_ok(mem_register(0x8000_0000, 4096, m.MemoryKind.SHM, segment))
    finally:
        await peer.aclose()
    async with await connect(url_of(server, "tcp"), memory="shared", ram_size=RAM) as conn:
        assert conn.memory_mode == "shared" and conn.ram.backing == "shm"  # proven by the file


async def test_a_session_maps_no_segment_but_its_own(server, shm_path):  # noqa: F811
    """Not another session's segment, not another session's proof file, not any viowire-* file."""
    victim = await RawPeer.connect(server, "unix")
    attacker = await RawPeer.connect(server, "unix")
    prover = await RawPeer.connect(server, "tcp")
    try:
        await victim.hello()
        await attacker.hello()
        theirs = shm_segment(shm_path, owner=victim)
        unowned = shm_segment(shm_path)
        proof = (await prover.request(hello_msg())).shm_proof
        for name in (theirs, unowned, proof):
            message = await attacker.request_error(
                mem_register(0x8000_0000, 4096, m.MemoryKind.SHM, name), m.ErrorCode.MEMORY_FAULT
            )
            assert "not one of this session's" in message
        await victim.expect_ok(mem_register(0x8000_0000, 4096, m.MemoryKind.SHM, theirs))
    finally:
        for peer in (victim, attacker, prover):
            await peer.aclose()


def test_a_server_cannot_make_a_client_send_another_file():
    from viowire.samehost import read_proof

    assert read_proof("../../etc/passwd") is None
    assert read_proof("viowire-proof-" + "0" * 31) is None
    assert read_proof("viowire-proof-" + "0" * 32) is None  # no such file


async def test_frames_before_hello_still_get_bad_state(token_server):
    peer = await RawPeer.connect(token_server, "tcp")
    try:
        await peer.send(raw_frame(m.MsgType.AUTH, bytes(96), 3))
        error = await peer.reply()
        assert _error_fields(error)[0] == m.ErrorCode.BAD_STATE
    finally:
        await peer.aclose()


async def test_the_client_checks_the_servers_proof(tmp_path):
    """Mutual: a peer that asks for the token but cannot prove it holds it (an impostor that
    answers AUTH_REPLY with any mac) is refused by the client, which sends it no more."""
    from viowire.protocol.codec import decode_body
    from viowire.protocol.framing import FrameReader

    seen: list[int] = []

    async def impostor(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frames = FrameReader()
        reply = m.HelloReply(
            version=m.PROTOCOL_VERSION, reserved=0, features=int(m.ProtoFeature.MEMORY_PROXIED),
            max_frame=m.DEFAULT_MAX_FRAME, max_inflight=8, session_id=1, host_id=bytes(16),
            auth=int(m.AuthMethod.TOKEN), nonce=bytes(32), name="impostor", shm_proof="",
        )  # fmt: skip
        while data := await reader.read(65536):
            for frame in frames.feed(data):
                seen.append(frame.type)
                if frame.type == m.MsgType.HELLO:
                    writer.write(encode(reply, frame.request_id, m.Flags.REPLY))
                elif frame.type == m.MsgType.AUTH:
                    assert decode_body(frame.type, frame.body).mac != TOKEN  # no secret sent
                    answer = m.AuthReply(features=reply.features, mac=bytes(32))
                    writer.write(encode(answer, frame.request_id, m.Flags.REPLY))
        writer.close()

    listener = await asyncio.start_server(impostor, "127.0.0.1", 0)
    try:
        port = listener.sockets[0].getsockname()[1]
        with pytest.raises(AuthError, match="did not prove it holds our token"):
            await connect(f"tcp://127.0.0.1:{port}", credentials=ClientCredentials(token=TOKEN))
        assert seen == [m.MsgType.HELLO, m.MsgType.AUTH]  # no MEM_REGISTER after that
    finally:
        listener.close()
        await listener.wait_closed()


def test_a_server_cannot_hang_a_client_with_a_fifo_for_a_proof():
    from viowire.samehost import read_proof

    name = "viowire-proof-" + os.urandom(16).hex()
    path = Path(SHM_DIR) / name
    os.mkfifo(path, 0o600)
    try:
        assert read_proof(name) is None  # returns at once: not opened blocking, not a file
    finally:
        path.unlink()


def test_workers_require_the_token_and_serve_tls_too(pki, tmp_path):
    """``--workers``: the supervisor binds, checks and hands the same Security to each worker."""
    token = tmp_path / "token"
    token.write_bytes(TOKEN)
    args = ["--workers", "2", "--listen", "tls://127.0.0.1:0", "--listen", f"unix://{tmp_path}/w"]
    args += ["--tls-cert", pki["server"] + ".pem", "--tls-key", pki["server"] + ".key"]
    with serve(*args, "--token-file", str(token), "--device", "rng") as served:
        assert stat.S_IMODE(os.stat(tmp_path / "w").st_mode) == 0o600
        for url in (served.url("tls"), served.url("unix")) * 2:
            ok = viowire("probe", url, "--tls-ca", pki["ca"] + ".pem", "--token-file", str(token))
            assert ok.returncode == 0 and "virtio-rng" in ok.stdout, ok.stderr
        refused = viowire("probe", served.url("unix"))
        assert refused.returncode == 1 and "requires a token" in refused.stderr
    exposed = viowire("serve", "--workers", "2", "--listen", "tcp://0.0.0.0:7000")
    assert exposed.returncode == 2 and "--insecure" in exposed.stderr
