"""``--metrics tcp://HOST:PORT``: Prometheus text exposition at ``/metrics``, from the event loop.

A minimal HTTP/1.x responder on the process's own loop: one request a connection, ``GET
/metrics`` answered with ``prometheus_client.generate_latest`` of a registry, anything else a
4xx and the connection closed. Scrapes are rare (seconds apart) and cheap, so no thread is
needed, and the counters are read on the loop that writes them: no lock, no torn read. A client
that sends nothing, or too much, is dropped after :data:`REQUEST_TIMEOUT` or
:data:`MAX_REQUEST` bytes; the device server never notices.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from prometheus_client.process_collector import ProcessCollector

from viowire.options import UsageError
from viowire.urls import Endpoint, parse_endpoint

log = logging.getLogger("viowire.metrics")

REQUEST_TIMEOUT = 5.0  # seconds for a scraper to send its request head
MAX_REQUEST = 8192  # bytes of request head (Prometheus sends a few hundred)
MAX_CONNECTIONS = 16  # at once; more are closed unanswered
PATH = "/metrics"


def registry_with(*collectors: object) -> CollectorRegistry:
    """A registry of ``collectors`` and the process's own (CPU, memory, descriptors)."""
    registry = CollectorRegistry(auto_describe=False)
    ProcessCollector(registry=registry)
    for collector in collectors:
        registry.register(collector)
    return registry


def parse_metrics_url(url: str) -> Endpoint:
    """``tcp://HOST:PORT``, or a :class:`UsageError` that says what to write."""
    try:
        endpoint = parse_endpoint(url)
    except ValueError as exc:
        raise UsageError(f"--metrics {exc}") from None
    if endpoint.scheme != "tcp":
        raise UsageError(f"--metrics {url!r}: use tcp://HOST:PORT (HTTP for a scraper)")
    return endpoint


class MetricsEndpoint:
    """Serves ``registry`` at ``http://HOST:PORT/metrics`` on the running loop."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.endpoint: Endpoint | None = None
        self._server: asyncio.base_events.Server | None = None
        self._connections: set[asyncio.Task] = set()

    async def start(self, url: str) -> Endpoint:
        """Listen on ``url`` (port 0: a free one; the endpoint says which)."""
        endpoint = parse_metrics_url(url)
        try:
            sock = socket.create_server(
                (endpoint.host, endpoint.port),
                family=socket.AF_INET6 if ":" in endpoint.host else socket.AF_INET,
            )
        except OSError as exc:
            reason = exc.strerror or exc
            raise UsageError(f"--metrics {url}: cannot listen there: {reason}") from None
        self._server = await asyncio.start_server(self._serve, sock=sock, limit=MAX_REQUEST)
        host, port = sock.getsockname()[:2]
        self.endpoint = Endpoint("tcp", host=host, port=port)
        return self.endpoint

    @property
    def url(self) -> str:
        """``http://HOST:PORT/metrics``, once listening."""
        return f"http://{str(self.endpoint).removeprefix('tcp://')}{PATH}"

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            for task in list(self._connections):
                task.cancel()
            await self._server.wait_closed()
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self._connections.add(task)
        try:
            if len(self._connections) > MAX_CONNECTIONS:
                return
            async with asyncio.timeout(REQUEST_TIMEOUT):
                status, body, content_type = await self._answer(reader)
                head = (
                    f"HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\n"
                    f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
                )
                writer.write(head.encode() + body)
                await writer.drain()
        except (TimeoutError, ConnectionError, asyncio.IncompleteReadError):
            pass  # a scraper that went away, or never spoke: nothing to answer
        except Exception:  # a bug here must not reach the loop the devices run on
            log.exception("metrics: internal error")
        finally:
            self._connections.discard(task)
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _answer(self, reader: asyncio.StreamReader) -> tuple[str, bytes, str]:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.LimitOverrunError:
            return _error("431 Request Header Fields Too Large", "request head too large")
        except asyncio.IncompleteReadError as exc:
            if not exc.partial:
                raise
            head = exc.partial  # a request line without the blank line: answer it anyway
        parts = head.split(b"\r\n", 1)[0].split()
        if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
            return _error("400 Bad Request", "not an HTTP/1.x request line")
        method, target = parts[0], parts[1].split(b"?", 1)[0]
        if target != PATH.encode():
            return _error("404 Not Found", f"metrics are at {PATH}")
        if method != b"GET":
            return _error("405 Method Not Allowed", f"GET {PATH}")
        return "200 OK", generate_latest(self.registry), CONTENT_TYPE_LATEST


def _error(status: str, message: str) -> tuple[str, bytes, str]:
    return status, f"{message}\n".encode(), "text/plain; charset=utf-8"


async def start_endpoint(url: str, *collectors: object) -> MetricsEndpoint:
    """A :class:`MetricsEndpoint` of ``collectors``, listening on ``url``."""
    endpoint = MetricsEndpoint(registry_with(*collectors))
    await endpoint.start(url)
    return endpoint
