"""TLS for ``tls://`` endpoints: the server's and the client's ``ssl.SSLContext``.

TLS 1.2 at least; the client checks the server's certificate against ``--tls-ca`` (or the system's
CAs) and its name against the URL's host. With ``--tls-client-ca`` the server asks every client for
a certificate that CA signed (mutual TLS) and refuses the handshake without one.

:func:`channel_binding` names the TLS connection for the token's proofs (viowire.auth), so that a
proof made on one TLS connection is worth nothing on another: a man in the middle who terminates
TLS (with a certificate the client wrongly trusts) cannot relay it to the real server.

What Python 3.11 offers for that, precisely: ``ssl.CHANNEL_BINDING_TYPES == ['tls-unique']``
and ``SSLObject.get_channel_binding('tls-unique')``, nothing else; no ``export_keying_material``
(RFC 5705), so no RFC 9266 ``tls-exporter``, the binding defined for TLS 1.3 (CPython issue
gh-82133 asks for it, still open). So the binding is what ``get_channel_binding('tls-unique')``
returns, on TLS 1.2 and TLS 1.3 alike: the verify_data of the client's Finished message in a
full handshake (the server's in a resumed one, which viowire never asks for). Under TLS 1.2
that is RFC 5929 ``tls-unique`` (12 bytes). Under TLS 1.3 it is the same rule applied to TLS
1.3's Finished (32 or 48 bytes, the cipher suite's hash): both ends compute the same bytes and a
relay cannot make its two connections' agree, but RFC 8446 (appendix C.5) leaves tls-unique
undefined for TLS 1.3 (CPython gh-95341), and a peer written in another language needs its TLS
library's Finished message (OpenSSL: SSL_get_finished / SSL_get_peer_finished). Under TLS 1.2
tls-unique is sound only with the extended master secret (RFC 7627; the triple-handshake
attack): OpenSSL negotiates it by default, but Python cannot tell whether it did, so prefer TLS
1.3, which two viowire ends negotiate unless one is told otherwise.
"""

from __future__ import annotations

import ssl
from typing import Any

CHANNEL_BINDING_TYPE = "tls-unique"  # the one Python's ssl module offers (see above)


class TlsConfigError(ValueError):
    """A certificate, key or CA file that cannot be used; the message names the file."""


def server_context(cert: str, key: str, client_ca: str | None = None) -> ssl.SSLContext:
    """The listener's context: ``cert`` (a PEM chain) and ``key``; ``client_ca`` makes it mTLS."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    _load_chain(context, cert, key)
    if client_ca:
        _load_ca(context, client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def client_context(
    ca: str | None = None, cert: str | None = None, key: str | None = None
) -> ssl.SSLContext:
    """A client's context: verifies the server against ``ca`` (default: the system's CAs) and
    presents ``cert``/``key`` when given (for a server that asks, mutual TLS)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if ca:
        _load_ca(context, ca)
    if cert or key:
        if not (cert and key):
            raise TlsConfigError("a client certificate needs both --tls-cert and --tls-key")
        _load_chain(context, cert, key)
    return context


def _load_chain(context: ssl.SSLContext, cert: str, key: str) -> None:
    try:
        context.load_cert_chain(_readable(cert, "certificate"), _readable(key, "key"))
    except ssl.SSLError as exc:
        raise TlsConfigError(
            f"certificate {cert} and key {key} do not load as a PEM pair: {exc.reason or exc}"
        ) from None


def _load_ca(context: ssl.SSLContext, ca: str) -> None:
    try:
        context.load_verify_locations(cafile=_readable(ca, "CA"))
    except ssl.SSLError as exc:
        raise TlsConfigError(f"CA file {ca}: {exc.reason or exc}") from None


def _readable(path: str, what: str) -> str:
    try:
        with open(path, "rb"):
            return path
    except OSError as exc:
        raise TlsConfigError(f"cannot read the {what} file {path}: {exc.strerror}") from None


def channel_binding(transport: Any) -> bytes:
    """The channel binding of ``transport``'s TLS connection (see the module's docstring), or
    b"" when it is not TLS. Any asyncio (or uvloop) transport; both ends of one TLS connection
    get the same bytes once its handshake is done."""
    get_extra_info = getattr(transport, "get_extra_info", None)
    ssl_object = get_extra_info("ssl_object") if get_extra_info is not None else None
    if ssl_object is None:
        return b""
    return ssl_object.get_channel_binding(CHANNEL_BINDING_TYPE) or b""
