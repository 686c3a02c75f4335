"""Generate docs/protocol.md from messages.py, so the specification cannot drift from the code.

``python -m viowire.protocol.doc`` prints the specification, ``--write`` stores it in
docs/protocol.md and ``--check`` exits 1 when the stored copy is stale. Field tables come from
the same derivation the fast codec uses (``codec.layout``); construct definitions and enum
comments are quoted from the source of messages.py, the one place they are written.
"""

from __future__ import annotations

import ast
import inspect
import io
import sys
import textwrap
import tokenize
from collections.abc import Iterator
from pathlib import Path

from construct import Construct, Struct

from viowire.protocol import messages as m
from viowire.protocol.codec import HEADER, FieldSpec, encode, layout

DOC_PATH = Path(__file__).resolve().parents[2] / "docs" / "protocol.md"
T = m.MsgType

# How each request is answered. Not in messages.py because no code needs it; a new message type
# stops doc generation until it is described here.
ANSWERS: dict[m.MsgType, str] = {
    T.HELLO: "HELLO_REPLY",
    T.HELLO_REPLY: "— (reply)",
    T.ERROR: "— (reply)",
    T.OK: "— (reply)",
    T.AUTH: "AUTH_REPLY",
    T.AUTH_REPLY: "— (reply)",
    T.MMIO_READ: "MMIO_READ_REPLY",
    T.MMIO_READ_REPLY: "— (reply)",
    T.MMIO_WRITE: "OK, none if POSTED",
    T.PLATFORM_QUERY: "PLATFORM_INFO",
    T.PLATFORM_INFO: "— (reply)",
    T.MEM_REGISTER: "OK",
    T.MEM_UNREGISTER: "OK",
    T.MEM_READ: "MEM_READ_REPLY",
    T.MEM_READ_REPLY: "— (reply)",
    T.MEM_WRITE: "OK, none if POSTED",
    T.IRQ: "never (event)",
    T.NOTIFY_CHANNEL: "OK",
}

INTRO = """\
# The viowire protocol, version {version}

> Generated from `viowire/protocol/messages.py` by `python -m viowire.protocol.doc --write`.
> Do not edit by hand: change messages.py (the single source of truth) and regenerate.

viowire carries virtio-mmio devices over a byte stream. The **client** owns the guest: its
physical address space and RAM. The **server** owns the devices: it answers the client's
register reads and writes (MMIO_READ / MMIO_WRITE), reads and writes guest RAM to process
virtqueues (directly from shared memory, or by asking the client with MEM_READ / MEM_WRITE),
and signals interrupts (IRQ).

## 1. Transport and framing

The transport is any reliable, ordered byte stream: a Unix stream socket, TCP, or TLS (1.2 or
later) over TCP (`tls://HOST:PORT`; the frames are the TLS application data, and a server may
require a client certificate). **All integers are little-endian** and unsigned; there is no
padding or alignment anywhere. Each message is one frame: a {header_size}-byte header followed
by the body.

{header_table}

* `length` counts the bytes that follow the length field: `8 + len(body)`. It is never less
  than 8.
* A frame, including its 4-byte length field, is at most `max_frame` bytes: {max_frame}
  ({max_frame_hex}) until the handshake ends, then the value in HELLO_REPLY. Every peer
  accepts frames of at least {min_max_frame} bytes: a HELLO offering a smaller `max_frame` gets
  ERROR UNSUPPORTED.
* `reserved` is 0.
* A receiver that sees a length below 8, a frame above `max_frame` or a nonzero `reserved`
  cannot find the next frame boundary: it sends ERROR (MALFORMED_FRAME or FRAME_TOO_LARGE,
  request_id 0, flags 0) and closes the connection.
* The body layout depends on `type` alone (section 5). A body that is shorter or longer than its
  type needs, or holds invalid UTF-8, is answered with ERROR BAD_MESSAGE; an unknown type with
  ERROR UNKNOWN_TYPE. The connection stays open, since the framing is intact.

Example, an MMIO_READ of 4 bytes at 0x10000070 with request_id 7:

```
{example}
```

## 2. Requests, replies and pipelining

Both sides send requests: the client sends MMIO and memory-registration requests, the server
sends MEM_READ / MEM_WRITE (proxied memory) and IRQ events.

* **Each side numbers its own requests.** `request_id` is chosen by the sender of a request
  and is unique among that sender's requests still awaiting a reply (a wrapping counter that
  skips 0 works). The two directions' numbers are independent: a frame with the REPLY flag is
  matched against the receiver's own outstanding requests, a frame without it is a new request.
* **A reply** carries the request's `request_id` and the REPLY flag. Requests are applied in
  the order they arrive; a sender may pipeline up to `max_inflight` requests that await a reply
  and must match replies by id, not by order.
* **max_inflight.** The viowire server answers each request as it reads it, in order, before it
  reads the next: no handler waits for guest memory, a device or another request (a QueueNotify
  is answered, then served; see below). So no client request ever waits in the server behind
  the window, and the server never answers TOO_MANY_IN_FLIGHT; that code is kept for a
  receiver that would have to queue requests. A client that pipelines past its window is
  slowed by its transport instead: the server stops reading a connection whose replies it
  cannot send (section 9). In the other direction the server keeps at most `max_inflight` of
  its own MEM_READs outstanding; more wait in the server until a reply comes.
* **POSTED** requests (flag POSTED) get no reply when they succeed, and only once POSTED_WRITES
  is negotiated: before that a POSTED request is not applied and is answered with ERROR
  UNSUPPORTED (REPLY, its `request_id`). The server, too, posts its MEM_WRITEs only with
  POSTED_WRITES; without it the client answers each MEM_WRITE with OK. If a posted request fails
  the receiver still sends ERROR with its `request_id`. A sender that does not need to match
  such errors may use request_id 0.
* **Order of a notification's effects.** A QueueNotify MMIO_WRITE is answered (OK, unless
  POSTED) as the notification is taken, and the queue is served afterwards: the OK leaves
  before every MEM_READ, MEM_WRITE and IRQ frame the notification causes, and says nothing
  about buffers. The driver learns of used buffers from IRQ (or the used ring), and a client
  must answer MEM_READs while it waits for any reply. The server sends a request's MEM_WRITEs
  (data, used-ring entry, used index) before the IRQ that announces them, so a client that
  applies frames in order sees the memory before the interrupt.
* **Register accesses.** A virtio-mmio register (offsets 0x000-0x0ff of a device window) is an
  aligned 32-bit access. An MMIO_READ of width 1, 2 or 8, or at an offset that is not a
  multiple of 4, is answered with value 0; such an MMIO_WRITE is answered OK (unless POSTED)
  and ignored; the device logs it. The configuration space (offset 0x100 on) takes widths 1,
  2, 4 and 8 at any offset, little-endian; bytes past the device's structure read 0xff. A
  width other than 1, 2, 4 or 8 gets ERROR BAD_WIDTH; an address in no window, or an access
  that runs past the end of its window, ERROR BUS_ERROR.
* **Events** (IRQ) use request_id 0 and get no reply of any kind.
* **ERROR** answers any failed request, with the REPLY flag and the request's id. Nobody
  answers a frame that carries REPLY, not even with ERROR: an unexpected or undecodable reply
  is logged and dropped, so errors never ping-pong.
* **ERROR with request_id 0 and flags 0** is its sender's last frame: it closes the connection
  next (section 1, section 9). The receiver answers nothing and fails every request it still
  awaits a reply to with that ERROR's code and message, rather than only with "connection
  closed". Either side may send it.
* **A requester may stop waiting.** The viowire client fails a request not answered within
  30 s, and the server a MEM_READ not answered within 10 s (the device sees a guest-memory
  error); a reply that comes later matches nothing and is dropped as above. An implementation
  should do likewise rather than wait forever on a peer that has stopped answering.

viowire keeps all of this in one sans-IO state machine that both of its ends use
(`viowire/protocol/session.py`): it is fed the bytes the peer sent and says what each frame is
(a request of the peer's; an answer, matched to the request it answers; an answer to nothing
awaited, late or unknown; an answer to a posted request, recognised by its id range; the peer's
closing ERROR), keeps the sender's own requests awaiting replies within `max_inflight` with
their deadlines (`protocol/outstanding.py`), and applies the limits the handshake settled.

## 3. Handshake

1. The client's first frame is HELLO (flags 0, any nonzero request_id): `magic` =
   {magic:#010x} (the bytes "{magic_text}" on the wire), `version` = {version}, the features it
   supports, the largest `max_frame` and `max_inflight` it accepts, its `host_id` and a `name`
   for logs.
2. The server answers HELLO_REPLY (REPLY, same request_id): `features` = the intersection of
   both offers, `max_frame` and `max_inflight` = the smaller of both offers, a `session_id`
   that names the session in the server's logs, its own `host_id` and `name`, `auth` (what it
   requires before anything else), a fresh 32-byte `nonce`, and `shm_proof` (section 4). From
   this frame on both sides use these values. A wrong magic or an unsupported version gets
   ERROR UNSUPPORTED instead.
3. If `auth` has TOKEN, the client's next request must be AUTH, proving that it holds the
   shared-secret token without sending it: `mac` = HMAC-SHA256(token, "viowire-auth client\\0"
   ‖ server nonce ‖ client nonce ‖ binding), with 32 fresh random bytes of its own as `nonce`.
   The server answers AUTH_REPLY with its own proof, HMAC-SHA256(token, "viowire-auth
   server\\0" ‖ server nonce ‖ client nonce ‖ binding), which the client checks (so it knows the
   server holds the token too). `binding` is the TLS channel binding below, and empty (no bytes
   at all) on a connection without TLS. A wrong `mac`, or any other request before AUTH, gets
   ERROR AUTH_FAILED (as a reply to that request) and the connection is closed. The server
   builds no device of the session before the token is proven. A recorded AUTH is worth nothing
   on another connection: the server's nonce is new each time. The token travels nowhere; TLS
   protects the rest of the traffic.
4. If `auth` is 0 the session is open with HELLO_REPLY. The client may still send AUTH (all-zero
   `mac`) as its first request after HELLO_REPLY, to claim MEMORY_SHM with the proof of
   section 4; AUTH at any other time gets ERROR BAD_STATE.
5. Any other request before HELLO gets ERROR BAD_STATE, and so does a second HELLO. A peer that
   has not finished the handshake (HELLO, and AUTH where required) within 10 s is sent ERROR
   BAD_STATE and disconnected.

**Channel binding.** Over TLS, `binding` ties both proofs to that one TLS connection, so that
a man in the middle who terminates the client's TLS (with a certificate the client wrongly
trusts) and opens his own to the server cannot relay the AUTH (the two connections' bindings
differ, and the server answers AUTH_FAILED) nor the AUTH_REPLY. `binding` is the verify_data of
the client's Finished message of the TLS handshake (a full handshake; of the server's Finished
in a resumed one), as both ends' TLS libraries hold it once the handshake is done: under TLS 1.2
this is RFC 5929 `tls-unique` (12 bytes); under TLS 1.3 it is the client's Finished verify_data
(as long as the cipher suite's hash: 32 or 48 bytes). That is what Python 3.11's ssl module
offers (`SSLObject.get_channel_binding("tls-unique")`, on either version; OpenSSL:
`SSL_get_finished` at the client, `SSL_get_peer_finished` at the server). It has no RFC 5705
keying-material exporter, so the binding RFC 9266 defines for TLS 1.3, `tls-exporter`, is out
of its reach. The limits this leaves: RFC 8446 does not define `tls-unique` for TLS 1.3, so a
peer in another language needs its TLS library's Finished message (Go's `TLSUnique` and
rustls give none under TLS 1.3); under TLS 1.2 `tls-unique` is sound only with the extended
master secret (RFC 7627), which OpenSSL negotiates by default but Python cannot confirm, so
prefer TLS 1.3. A proxy that terminates TLS between client and server fails AUTH by design:
end TLS in the server itself. Without a token (all-zero `mac`) there is nothing to bind.

`host_id` is the 16 bytes of the kernel boot id (`/proc/sys/kernel/random/boot_id` parsed as a
UUID), or 16 zero bytes when unknown. It is a hint for logs and for the server's choice to
offer a proof file; it proves nothing (a peer can echo the id HELLO_REPLY shows it).

**Version 2** (this one) added AUTH and AUTH_REPLY, the HELLO_REPLY fields `auth`, `nonce` and
`shm_proof`, ERROR AUTH_FAILED and LIMIT_EXCEEDED (section 9), and grants MEMORY_SHM only on
proof (section 4) instead of for equal host ids. HELLO's layout is unchanged, so a version 1
peer is told, with ERROR UNSUPPORTED, which version the other side speaks. Within version 2,
before any release, the AUTH and AUTH_REPLY proofs gained their last input, `binding`: on
connections without TLS it is empty and the proofs are as they were; over TLS a peer that
leaves it out fails AUTH.

## 4. Guest memory

After the handshake the client describes guest RAM with MEM_REGISTER, one region per frame.
`kind` picks how the server reaches it, and needs the matching feature (else ERROR UNSUPPORTED):

* **PROXIED** (MEMORY_PROXIED): the server has no mapping and reads and writes guest RAM by
  sending MEM_READ and MEM_WRITE requests to the client. Works over any transport, also between
  hosts.
* **MEMFD** (MEMORY_MEMFD, Unix sockets only): the client passes a file descriptor holding the
  region (a memfd) as SCM_RIGHTS ancillary data in the `sendmsg` call that carries the
  MEM_REGISTER frame; the server maps `size` bytes from `offset` in it. Each MEM_REGISTER of kind
  MEMFD takes the oldest descriptor received and not yet used.
* **SHM** (MEMORY_SHM, same host, e.g. over TCP): `name` names a POSIX shared-memory segment
  (under `/dev/shm` on Linux) that the server opens and maps from `offset`. The name must start
  with `viowire-` and the session id as 16 lowercase hex digits and a dash
  (`viowire-%016x-`, e.g. `viowire-00003039000000a1-guest`): a session maps only segments named
  for it, never another session's or any other file (else ERROR MEMORY_FAULT). The segment must
  belong to the server's user and be closed to others (mode 0600).

  MEMORY_SHM is granted only where the peer has proven it sees the server's `/dev/shm` as the
  server's user (or root). Over a Unix socket the kernel vouches for the peer (SO_PEERCRED): it
  is in HELLO_REPLY's features when the peer runs as the server's user or root. Over TCP the
  server may instead name, in HELLO_REPLY `shm_proof`, a file it has just created under
  `/dev/shm` with mode 0600, holding 32 random bytes; a client that can read it sends those
  bytes as AUTH `shm_proof`, and AUTH_REPLY's features then include MEMORY_SHM. The file is
  removed at AUTH or when the connection ends. A peer on another host, in another container
  (its own `/dev/shm`) or under another user cannot read it and keeps proxied memory.

Guest addresses and lengths are untrusted: a range outside registered memory is answered with
ERROR MEMORY_FAULT. A region must not overlap a device window (PLATFORM_INFO lists them): guest
RAM and the windows share one physical address space, and such a MEM_REGISTER gets ERROR
MEMORY_FAULT.

**Proxied traffic and max_frame.** The server cuts its MEM_READ and MEM_WRITE traffic so that
every frame it sends, and every MEM_READ_REPLY the client owes, fits `max_frame`: a list of
ranges goes out in several frames, in order, and a range longer than a frame's room is split
into consecutive pieces. Applying the frames in order gives the memory one large write would.
Consecutive MEM_WRITEs may be gathered into one frame (its ranges are then those of several
writes, in order).

**A MEM_WRITE the client refuses.** A client that cannot apply a MEM_WRITE (posted or not)
answers ERROR with its `request_id`, e.g. MEMORY_FAULT. The bytes may have been a request's
data, a block device's status byte or a used-ring entry, of any device of the session (one frame
gathers the writes of several), so no completion the devices reported can be trusted: every
device of the session that the driver has started (Status not 0) enters DEVICE_NEEDS_RESET
(virtio 1.2 §2.1.2) and, when modern and DRIVER_OK, raises a configuration change interrupt.
The driver must reset the device; requests it had not seen completed are lost, never reported
as successful. (IOERR in a block status byte was not chosen: that byte itself travels in
MEM_WRITE.) The server's MEM_WRITE request ids have bit 31 set and its MEM_READ ids bit 31
clear.

**The lifetime of a session's devices.** Every session gets its own instance of the server's
platform: its devices are built when the session opens (with HELLO_REPLY, or AUTH_REPLY where a
token is required) and are destroyed when its connection ends, for whatever reason. Nothing a
session did (device status, queues, RAM-disk contents, registered memory) is seen by another
session or by a later connection. A disk backed by a file is the exception: the file is the
server's and outlives the sessions.

## 5. Message types

{type_table}
"""


def generate() -> str:
    """The whole specification as Markdown."""
    source = inspect.getsource(m)
    definitions = _definitions(source)
    names = _named_constructs(source)
    parts = [_intro()]
    parts += [_message(t, definitions[t.name], names) for t in m.SCHEMAS]
    parts.append(_shared_structures(definitions, names))
    parts.append(_enumerations(source))
    parts.append(_constants())
    parts.append(_limits())
    return "\n".join(parts)


def _intro() -> str:
    return INTRO.format(
        version=m.PROTOCOL_VERSION,
        header_size=m.HEADER_SIZE,
        header_table=_field_table(m.Header, {}),
        max_frame=m.DEFAULT_MAX_FRAME,
        max_frame_hex=hex(m.DEFAULT_MAX_FRAME),
        magic=m.HELLO_MAGIC,
        magic_text=m.HELLO_MAGIC.to_bytes(4, "little").decode("ascii"),
        example=_example(),
        min_max_frame=m.MIN_MAX_FRAME,
        type_table=_type_table(),
    )


LIMITS = """\
## 9. Limits and fairness

A server takes what its configuration allows, per server process (each `serve --workers`
process has all of them) and per session. A request a limit refuses gets ERROR LIMIT_EXCEEDED
whose message names the limit and the `serve` option that sets it:

* a session that would pass the session limit, or whose devices would pass a device limit,
  has the request that opens it (HELLO, or AUTH where a token is required) answered with
  ERROR LIMIT_EXCEEDED, and is closed. A session counts from then on: a peer that cannot prove
  the token never takes a session's place;
* connections still in their handshake are capped at the same number as sessions, apart: one
  beyond is sent ERROR LIMIT_EXCEEDED (request_id 0, flags 0) and closed;
* a MEM_REGISTER beyond the region or mapped-bytes limit gets ERROR LIMIT_EXCEEDED, and the
  session goes on.

RAM disks are charged as they fill, a page at its first write, and given back when the session
ends: a disk's pages take memory only once written, so a large sparse disk costs what is
written. A block write that would pass a RAM-disk limit is not applied and completes with
VIRTIO_BLK_S_IOERR, as on thin-provisioned storage whose pool is full; the server logs which
limit refused it. Rewriting pages already written costs nothing.

{limits_table}

**Descriptor chains** are bounded as virtio 1.2 §2.7.5.3 bounds them: a chain in the descriptor
table has at most Queue Size descriptors (a longer walk is a loop), an indirect table at most
32768 entries, and indirect tables do not nest. A ring or chain that breaks a rule puts its
device in DEVICE_NEEDS_RESET; the session goes on.

**Fairness.** The server answers a session's frames in slices of at most {slice}. A read of
at most {slice} frames is answered as it arrives; a session with more waits its turn: the
sessions with more to answer are served round-robin, at most {turn} slices per turn of the
server's event loop. So however many clients pipeline thousands of requests, a turn stays
short, and a session with a few frames to send is answered within about one turn. A listener
accepts up to {accepts} waiting connections per turn, so a new client's connection does not
queue behind a burst of others for more than a few turns. The server stops reading a session's
connection while frames it sent wait to be answered, and while its replies wait unsent above
its transport's high-water mark (the client is not reading them): nothing more from that
client is read or answered until it reads, and no other session is paused with it.

Log lines about a peer's bad input are rate-limited per session: a burst of 20, then 2 a
second, the next line let through saying how many were dropped.
"""


def _limits() -> str:
    # The server's defaults, read where they are defined (the doc generator may look anywhere).
    from viowire.server.app import ACCEPTS_PER_TURN
    from viowire.server.limits import GIB, OPTIONS, Limits
    from viowire.server.session import SLICE_FRAMES, SLICES_PER_TURN

    rows = ["| `serve` option | limit | default |", "|---|---|---|"]
    defaults = Limits()
    for option in OPTIONS:
        value = getattr(defaults, option.field)
        shown = f"{value // GIB} GiB" if option.is_size and value % GIB == 0 else str(value)
        rows.append(f"| `{option.flag}` | {option.help} | {shown} |")
    return LIMITS.format(
        limits_table="\n".join(rows),
        slice=SLICE_FRAMES,
        turn=SLICES_PER_TURN,
        accepts=ACCEPTS_PER_TURN,
    )


def _example() -> str:
    frame = encode(m.MmioRead(addr=0x10000070, width=4), request_id=7)
    lines, offset = [], 0
    for spec in layout(m.Header) + layout(m.SCHEMAS[T.MMIO_READ]):
        lines.append(f"{frame[offset : offset + spec.size].hex(' '):24} {spec.name}")
        offset += spec.size
    return "\n".join(lines)


def _type_table() -> str:
    rows = ["| code | message | answered by | summary |", "|---|---|---|---|"]
    for t in m.MsgType:
        if t not in ANSWERS:
            raise LookupError(f"say how MsgType.{t.name} is answered in doc.ANSWERS")
        summary = m.DOCS[t].split(". ")[0].rstrip(".")
        rows.append(
            f"| `{t.value:#04x}` | [{t.name}](#{t.name.lower()}) | {ANSWERS[t]} | {summary} |"
        )
    return "\n".join(rows)


def _message(t: m.MsgType, definition: str, names: dict[int, str]) -> str:
    schema = m.SCHEMAS[t]
    table = _field_table(schema, names) if schema.subcons else "Empty body (0 bytes)."
    cls = m.MESSAGE_CLASSES[t].__name__
    doc = m.DOCS[t][0].upper() + m.DOCS[t][1:]
    return (
        f"### {t.name}\n\nType `{t.value:#04x}`, Python class `{cls}`.\n\n{doc}\n\n"
        f"{table}\n\n```python\n{definition}\n```\n"
    )


def _field_table(schema: Construct, names: dict[int, str]) -> str:
    rows = ["| offset | size | type | field |", "|---|---|---|---|"]
    offset: int | None = 0
    for spec, sub in zip(layout(schema), schema.subcons, strict=True):
        size = spec.size
        where = str(offset) if offset is not None else "variable"
        rows.append(
            f"| {where} | {size if size is not None else 'variable'} | "
            f"{_type_text(spec, sub.subcon, names)} | `{spec.name}` |"
        )
        offset = offset + size if offset is not None and size is not None else None
    return "\n".join(rows)


def _type_text(spec: FieldSpec, con: Construct, names: dict[int, str]) -> str:
    prefix = FieldSpec("", "int", spec.fmt).type_name if spec.fmt else ""
    if spec.kind == "text":
        return f"{prefix} n, then n bytes of UTF-8" + _link(names.get(id(con)))
    if spec.kind == "array":
        element = con.subcons[1].subcon.subcon  # PrefixedArray: FocusedSeq(count, items=Array)
        size = sum(e.size or 0 for e in spec.elements)
        fields = ", ".join(f"{e.type_name} {e.name}" for e in spec.elements)
        return f"{prefix} count, then count elements of {size} bytes: {{{fields}}}" + _link(
            names.get(id(element))
        )
    if spec.kind == "greedy":
        return "bytes to the end of the body"
    return spec.type_name


def _link(name: str | None) -> str:
    return f" ([{name}](#{name.lower()}))" if name else ""


# --- quoting messages.py -------------------------------------------------------------------


def _module_assignments(source: str) -> Iterator[tuple[str, ast.stmt]]:
    for node in ast.parse(source).body:
        if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name):
            yield node.targets[0].id, node
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            yield node.target.id, node


def _span(source: str, first: ast.AST, last: ast.AST) -> str:
    """The source text from ``first`` to the end of ``last``, with its own indentation removed."""
    lines = source.splitlines()[first.lineno - 1 : last.end_lineno]
    lines[-1] = lines[-1][: last.end_col_offset]
    lines[0] = " " * first.col_offset + lines[0][first.col_offset :]
    return textwrap.dedent("\n".join(lines))


def _definitions(source: str) -> dict[str, str]:
    """Source text of each SCHEMAS entry (by MsgType name) and each named module-level construct."""
    found: dict[str, str] = {}
    for name, node in _module_assignments(source):
        if name == "SCHEMAS" and isinstance(node.value, ast.Dict):
            for key, schema in zip(node.value.keys, node.value.values, strict=True):
                found[key.attr] = _span(source, key, schema)
        elif isinstance(getattr(m, name, None), Construct):
            found[name] = _span(source, node, node)
    missing = [t.name for t in m.SCHEMAS if t.name not in found]
    if missing:
        raise LookupError(f"no construct definition found in messages.py for {missing}")
    return found


def _named_constructs(source: str) -> dict[int, str]:
    """id(construct) -> its name in messages.py, for the structures messages share."""
    return {
        id(getattr(m, name)): name
        for name, _ in _module_assignments(source)
        if isinstance(getattr(m, name, None), Construct)
    }


def _shared_structures(definitions: dict[str, str], names: dict[int, str]) -> str:
    parts = ["## 6. Shared structures\n"]
    for name in names.values():
        if name == "Header":
            continue
        con = getattr(m, name)
        if hasattr(con, "subcons"):
            table = _field_table(con, names)
        else:  # a field type such as Text: describe it as the only field of a Struct
            (spec,) = layout(Struct("value" / con))
            table = f"A string: {_type_text(spec, con, {})}, no terminator."
        table += "\n\n"
        parts.append(f"### {name}\n\n{table}```python\n{definitions[name]}\n```\n")
    return "\n".join(parts)


def _comments(source: str) -> dict[int, str]:
    """Line number -> the text of the comment on that line."""
    tokens = tokenize.generate_tokens(io.StringIO(source).readline)
    return {tok.start[0]: tok.string.lstrip("# ") for tok in tokens if tok.type == tokenize.COMMENT}


def _enumerations(source: str) -> str:
    comments = _comments(source)
    classes = {node.name: node for node in ast.parse(source).body if isinstance(node, ast.ClassDef)}
    parts = ["## 7. Enumerations\n"]
    for enum_cls in (m.ErrorCode, m.Flags, m.ProtoFeature, m.MemoryKind):
        node = classes[enum_cls.__name__]
        lines = {
            t.id: comments.get(stmt.lineno, "")
            for stmt in node.body
            if isinstance(stmt, ast.Assign)
            for t in stmt.targets
            if isinstance(t, ast.Name)
        }
        doc = ast.get_docstring(node)
        rows = ["| value | name | meaning |", "|---|---|---|"]
        rows += [
            f"| `{member.value:#x}` | {member.name} | {lines.get(member.name, '')} |"
            for member in enum_cls
        ]
        parts.append(
            f"### {enum_cls.__name__}\n\n" + (f"{doc}\n\n" if doc else "") + "\n".join(rows) + "\n"
        )
    return "\n".join(parts)


def _constants() -> str:
    rows = ["| name | value |", "|---|---|"]
    for name in (
        "PROTOCOL_VERSION",
        "HELLO_MAGIC",
        "HEADER_SIZE",
        "LENGTH_FIELD_SIZE",
        "DEFAULT_MAX_FRAME",
        "DEFAULT_MAX_INFLIGHT",
    ):
        value = getattr(m, name)
        rows.append(f"| `{name}` | {value} (`{value:#x}`) |")
    rows.append(f"| header `struct` format | `{HEADER.format}` |")
    return "## 8. Constants\n\n" + "\n".join(rows) + "\n"


def main(argv: list[str]) -> int:
    """Print the specification; ``--write`` stores it, ``--check`` fails when it is stale."""
    text = generate()
    if "--check" in argv:
        current = DOC_PATH.read_text(encoding="utf-8") if DOC_PATH.exists() else ""
        if current != text:
            print(
                f"{DOC_PATH} is out of date: run python -m viowire.protocol.doc --write",
                file=sys.stderr,
            )
            return 1
        return 0
    if "--write" in argv:
        DOC_PATH.parent.mkdir(exist_ok=True)
        DOC_PATH.write_text(text, encoding="utf-8")
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
