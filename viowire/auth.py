"""The shared-secret token: where it comes from, and its proof in the handshake (sans-IO).

The token never crosses the wire. After HELLO_REPLY (which carries the server's fresh nonce), the
client sends AUTH with a fresh nonce of its own and ``HMAC-SHA256(token, CLIENT_LABEL | server
nonce | client nonce | channel binding)``; the server answers AUTH_REPLY with the same HMAC under
SERVER_LABEL, so the client learns the server holds the token too. A recorded AUTH proves nothing
on another connection: the server's nonce differs. Over TLS the channel binding
(:func:`viowire.tls.channel_binding`) ties both proofs to that TLS connection, so a man in the
middle who terminates TLS cannot relay them; elsewhere it is empty. docs/protocol.md, section 3,
is the specification. Links between servers (viowire.server.linkpeer) prove the same token the
same way, under labels of their own, so a proof made for one cannot serve the other.

A token comes from a file (``--token-file``, or ``VIOWIRE_TOKEN_FILE``) or from ``VIOWIRE_TOKEN``,
never from the command line, which every local user can read in ``ps`` and ``/proc/PID/cmdline``.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import secrets
import stat
from dataclasses import dataclass

from viowire.urls import Endpoint, is_loopback

NONCE_SIZE = 32
MAC_SIZE = 32
MIN_TOKEN_BYTES = 16
CLIENT_LABEL = b"viowire-auth client\x00"
SERVER_LABEL = b"viowire-auth server\x00"
LINK_CONNECT_LABEL = b"viowire-link connect\x00"  # the connect= end of a --link
LINK_LISTEN_LABEL = b"viowire-link listen\x00"  # the listen= end
TOKEN_ENV = "VIOWIRE_TOKEN"
TOKEN_FILE_ENV = "VIOWIRE_TOKEN_FILE"
NO_TOKEN_ON_COMMAND_LINE = (
    "--token is refused: a secret on the command line is readable by every local user (ps, "
    "/proc/PID/cmdline) and lands in shell history; put it in a file and give --token-file FILE, "
    f"or set {TOKEN_ENV}"
)


class AuthError(Exception):
    """Authentication that cannot succeed: a missing or wrong token, an unreadable token file."""


def new_nonce() -> bytes:
    return secrets.token_bytes(NONCE_SIZE)


def proof(
    token: bytes, label: bytes, server_nonce: bytes, client_nonce: bytes, binding: bytes = b""
) -> bytes:
    """``HMAC-SHA256(token, label | server_nonce | client_nonce | binding)``: proof of ``token``
    by the end ``label`` names, bound to both nonces and to the channel (``binding``: the TLS
    channel binding, empty without TLS). The nonces have a fixed size, so the binding, last,
    needs no length."""
    message = label + server_nonce + client_nonce + binding
    return hmac.new(token, message, hashlib.sha256).digest()


def client_mac(
    token: bytes, server_nonce: bytes, client_nonce: bytes, binding: bytes = b""
) -> bytes:
    """What the client sends in AUTH: proof it holds ``token``, bound to both nonces."""
    return proof(token, CLIENT_LABEL, server_nonce, client_nonce, binding)


def server_mac(
    token: bytes, server_nonce: bytes, client_nonce: bytes, binding: bytes = b""
) -> bytes:
    """What the server sends in AUTH_REPLY: its own proof (another label, so no reflection)."""
    return proof(token, SERVER_LABEL, server_nonce, client_nonce, binding)


def binding_hint(binding: bytes) -> str:
    """For a refused proof: where the channel was TLS, that a TLS proxy between the ends fails
    it too (it is bound to one TLS connection), so the user does not only suspect the token."""
    if not binding:
        return ""
    return "; over TLS the proof is bound to the TLS connection: a proxy ending TLS fails it"


def verify(expected: bytes, given: bytes) -> bool:
    """Constant-time comparison: the time taken tells nothing about how much of it matched."""
    return hmac.compare_digest(expected, given)


def exposed(endpoint: Endpoint, *, proven: bool, insecure: bool) -> bool:
    """The one rule for a socket that could reach past this host: a TCP ``endpoint`` (listened
    on or connected to) that is not loopback, where nobody's identity is ``proven`` (a token, or
    TLS certificates that name the other end) and the user did not say ``insecure``. Serve's
    listeners and its links (viowire.server.linkpeer) are refused on it, before any bind."""
    return endpoint.inet and not (proven or insecure or is_loopback(endpoint.host))


def read_token_file(path: str) -> bytes:
    """The token in ``path``, without its trailing newline; refuses one too short to be secret."""
    try:
        with open(path, "rb") as f:
            mode = os.fstat(f.fileno()).st_mode
            token = f.read(4096).strip()
    except OSError as exc:
        raise AuthError(f"cannot read the token file {path}: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode) and not stat.S_ISFIFO(mode):
        raise AuthError(f"the token file {path} is not a regular file")
    return _checked(token, f"the token in {path}")


def _checked(token: bytes, where: str) -> bytes:
    if len(token) < MIN_TOKEN_BYTES:
        raise AuthError(
            f"{where} has {len(token)} bytes; a token needs at least {MIN_TOKEN_BYTES} (make "
            "one with: openssl rand -hex 32 > token)"
        )
    return token


def token_from(token_file: str | None = None, env: dict[str, str] | None = None) -> bytes | None:
    """The token: ``token_file`` if given, else the file ``VIOWIRE_TOKEN_FILE`` names, else
    ``VIOWIRE_TOKEN``; None when none of them is set."""
    env = os.environ if env is None else env
    path = token_file or env.get(TOKEN_FILE_ENV)
    if path:
        return read_token_file(path)
    value = env.get(TOKEN_ENV)
    if value:
        return _checked(value.strip().encode(), f"${TOKEN_ENV}")
    return None


@dataclass(frozen=True)
class ClientCredentials:
    """What a client proves itself with: a token, and for ``tls://`` the CA that vouches for the
    server and the client's own certificate (mutual TLS). :meth:`from_env` is the default of
    :func:`viowire.client.connection.connect`; the command line sets the same variables."""

    token: bytes | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None

    @classmethod
    def from_env(cls, env: dict[str, str] | None = None) -> ClientCredentials:
        env = os.environ if env is None else env
        return cls(
            token=token_from(env=env),
            tls_ca=env.get(TLS_CA_ENV) or None,
            tls_cert=env.get(TLS_CERT_ENV) or None,
            tls_key=env.get(TLS_KEY_ENV) or None,
        )


TLS_CA_ENV = "VIOWIRE_TLS_CA"
TLS_CERT_ENV = "VIOWIRE_TLS_CERT"
TLS_KEY_ENV = "VIOWIRE_TLS_KEY"
