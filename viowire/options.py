"""Command-line options every client command shares, written once (argparse)."""

from __future__ import annotations

import argparse
import os

from viowire import auth

TARGET_HELP = (
    "a viowire server, tcp://HOST:PORT, tls://HOST:PORT or unix:///PATH, or QEMU's devices "
    "through its qtest socket, qtest+unix:///PATH (QEMU started with -qtest "
    "unix:PATH,server=on,wait=off), or a vhost-user back-end's one device, "
    "vhost-user+unix:///PATH?type=TYPE (docs/vhost-user.md)"
)
DEVICE_TYPE = "TYPE[,KEY=VALUE...]"
TYPES_HELP = (
    "a device type and its options: blk,size=64M or blk,path=disk.img or rng, a type an "
    "installed package offers, or package.module:Class[,KEY=VALUE...] for a class of your own "
    "(viowire serve --list-devices lists the types and their options)"
)
OWN_SERVER_HELP = (
    "; or a device type and its options (blk,size=1M or rng or package.module:Class[,KEY=VALUE"
    "...]; viowire serve --list-devices lists them): the command starts a private server of "
    "such devices and runs on it (give no URL then)"
)


class UsageError(ValueError):
    """Command-line input that cannot work: exit status 2 and one line that says what to write."""


def add_memory_option(parser: argparse.ArgumentParser) -> None:
    """``--memory``, and the credentials (every client command that connects has both)."""
    parser.add_argument(
        "--memory",
        choices=("shared", "proxied"),
        default=None,
        help="guest memory mode (default: shared when the server is on this host, else proxied)",
    )
    add_client_auth_options(parser)


class RefuseToken(argparse.Action):
    """``--token`` exists only to say why it is refused (and so ``--token`` is no abbreviation
    of ``--token-file``)."""

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        parser.error(auth.NO_TOKEN_ON_COMMAND_LINE)


def add_token_options(parser: argparse.ArgumentParser, who: str) -> None:
    parser.add_argument(
        "--token-file",
        metavar="FILE",
        help=f"the shared-secret token {who} (at least 16 bytes; default: the file "
        f"${auth.TOKEN_FILE_ENV} names, or ${auth.TOKEN_ENV})",
    )
    parser.add_argument("--token", action=RefuseToken, help=argparse.SUPPRESS)


def add_client_auth_options(parser: argparse.ArgumentParser) -> None:
    """How a client proves itself: a token, and for tls:// the CA and a client certificate."""
    add_token_options(parser, "to prove to the server")
    parser.add_argument(
        "--tls-ca", metavar="FILE", help="tls://: the CA certificate(s) that signed the server's"
    )
    parser.add_argument(
        "--tls-cert", metavar="FILE", help="tls://: this client's certificate (mutual TLS)"
    )
    parser.add_argument("--tls-key", metavar="FILE", help="tls://: the key of --tls-cert")


def apply_client_auth_options(args: argparse.Namespace) -> None:
    """Hand the client's credentials to every connection this process (and its children) makes,
    through the environment :meth:`viowire.auth.ClientCredentials.from_env` reads."""
    for option, name in (
        ("token_file", auth.TOKEN_FILE_ENV),
        ("tls_ca", auth.TLS_CA_ENV),
        ("tls_cert", auth.TLS_CERT_ENV),
        ("tls_key", auth.TLS_KEY_ENV),
    ):
        value = getattr(args, option, None)
        if value:
            os.environ[name] = os.path.abspath(value)


def add_target_options(parser: argparse.ArgumentParser, *, url_optional: bool = False) -> None:
    """The URL, the memory mode, and device-tree declarations of the devices to use."""
    parser.add_argument("url", nargs="?" if url_optional else None, help=TARGET_HELP)
    add_memory_option(parser)
    parser.add_argument(
        "--from-dts", metavar="FILE", help="declare the devices from virtio,mmio nodes of a DTS"
    )
    parser.add_argument("--from-dtb", metavar="FILE", help="the same from a flattened device tree")


def add_device_types_option(parser: argparse.ArgumentParser, what: str, note: str = "") -> None:
    """``--device TYPE[,KEY=VALUE...]``, repeatable: devices for ``what`` to serve."""
    parser.add_argument(
        "--device",
        action="append",
        default=[],
        metavar=DEVICE_TYPE,
        help=f"{what} (repeatable): {TYPES_HELP}{note}",
    )


def names_device_type(text: str) -> bool:
    """``blk,size=1M`` or ``package.module:Class`` (a type to serve) rather than ``3`` (an index
    into a server's platform) or ``0x200@0x10001000:5`` (a window in the kernel's syntax)."""
    head = text.split(",", 1)[0].strip()
    if "@" in head:
        return False
    try:
        int(head, 0)
    except ValueError:
        return True
    return False


def socket_mode(text: str) -> int:
    """``--socket-mode 0660``: octal permission bits of a Unix socket file."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: octal permission bits, e.g. 0660") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"{text!r}: octal permission bits, e.g. 0660")
    return mode


def add_serve_security_options(parser: argparse.ArgumentParser) -> None:
    """What ``serve`` requires of its clients (viowire.server.app.Security)."""
    add_token_options(parser, "every client must prove in its handshake, on every listener")
    parser.add_argument(
        "--tls-cert", metavar="FILE", help="tls:// listeners: the server's certificate (PEM chain)"
    )
    parser.add_argument("--tls-key", metavar="FILE", help="tls:// listeners: its key")
    parser.add_argument(
        "--tls-client-ca",
        metavar="FILE",
        help="tls:// listeners: require a client certificate signed by this CA (mutual TLS)",
    )
    parser.add_argument(
        "--insecure",
        action="store_true",
        help="serve a non-loopback TCP listener without a token or client certificates: anyone "
        "who reaches it gets devices",
    )
    parser.add_argument(
        "--socket-mode",
        type=socket_mode,
        default=0o600,
        metavar="MODE",
        help="permission bits of Unix socket files, octal (default 0600: this user only; 0660 "
        "shares them with the group)",
    )
