"""Same-host trust from proof, not from a claim: the shared-memory proof file, both ends.

A peer's boot id (HELLO ``host_id``) is a claim anyone can echo. What named shared memory needs
is a peer that sees the server's ``/dev/shm``, as its own user: so the server writes 32 random
bytes to a fresh file there, mode 0600, and names it in HELLO_REPLY; only a client that can read
that file can send the bytes back in AUTH. A Unix socket is proof by itself (the kernel reports
the peer's credentials, SO_PEERCRED). docs/protocol.md, sections 3 and 4, is the specification.
"""

from __future__ import annotations

import contextlib
import os
import re
import secrets
import stat
import struct

from viowire.auth import NONCE_SIZE

SHM_DIR = "/dev/shm"
PROOF_NAME = re.compile(r"viowire-proof-[0-9a-f]{32}")
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


class ShmProof:
    """The server's proof file for one session; :meth:`remove` it once answered or closed."""

    def __init__(self) -> None:
        self.name = f"viowire-proof-{secrets.token_hex(16)}"
        self.secret = secrets.token_bytes(NONCE_SIZE)
        self._path = os.path.join(SHM_DIR, self.name)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        fd = os.open(self._path, flags, 0o600)
        try:
            os.write(fd, self.secret)
        finally:
            os.close(fd)

    def remove(self) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self._path)


def read_proof(name: str) -> bytes | None:
    """The client's side: the bytes of the proof file ``name``, or None if this process cannot
    read it (another host, another /dev/shm, another user). Only a name of the proof's form is
    opened, only a regular file (a FIFO there would block), and only 32 bytes are read: a
    server cannot make a client send it any other file, nor hang it."""
    if not PROOF_NAME.fullmatch(name):
        return None
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(os.path.join(SHM_DIR, name), flags)
    except OSError:
        return None
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            return None
        data = os.read(fd, NONCE_SIZE + 1)
    except OSError:
        return None
    finally:
        os.close(fd)
    return data if len(data) == NONCE_SIZE else None


def peer_uid(transport: object) -> int | None:
    """The user id of a Unix-socket peer (SO_PEERCRED), or None for any other transport."""
    try:
        cred = transport.get_extra_info("peercred")
    except OSError:
        return None
    if isinstance(cred, bytes) and len(cred) == _PEERCRED.size:
        return _PEERCRED.unpack(cred)[1]
    return None


def trusted_uid(uid: int | None) -> bool:
    """A peer whose named segments the server may map: its own user, or root."""
    return uid is not None and uid in (0, os.geteuid())


def segment_prefix(session_id: int) -> str:
    """The names a session's SHM segments must start with: no session can name another's."""
    return f"viowire-{session_id:016x}-"
