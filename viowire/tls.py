"""TLS for ``tls://`` endpoints: the server's and the client's ``ssl.SSLContext``.

TLS 1.2 at least; the client checks the server's certificate against ``--tls-ca`` (or the system's
CAs) and its name against the URL's host. With ``--tls-client-ca`` the server asks every client for
a certificate that CA signed (mutual TLS) and refuses the handshake without one.
"""

from __future__ import annotations

import ssl


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
