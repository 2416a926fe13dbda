"""Connections: a cap that evicts before it refuses, deadlines for request heads, a drain on shutdown,
JSON for the errors aiohttp answers itself, and a quiet log.

aiohttp alone keeps every connection it accepts (1,000 idle sockets exhaust `ulimit -n 1024`) and waits
for a request head as long as its keep-alive timeout. `ConnectionGuard` hooks the runner's server (its
`connection_made`/`connection_lost` callbacks, and each connection's `data_received` and
`handle_error`) and its middleware marks when a request is being handled. So a connection idle between
requests has serve.idle_timeout_s to start its next one, a started request head must be complete within
serve.head_timeout_s, and at serve.max_connections a new connection first closes the oldest idle one
(then the oldest still sending a head): slow or idle clients cannot lock valid ones out. Only when every
open connection has a request being handled is a new one answered 503 with Retry-After. On shutdown it
waits for the requests being handled while closing the idle connections."""

import asyncio
import errno
import json
import logging
import os
import resource
import sys
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

log = logging.getLogger("trainer.serve")


def _raw_response(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (
        f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Retry-After: 1\r\nConnection: close\r\n\r\n"
    ).encode() + body


RESERVED_FILES = 32  # for what the process opens besides connections: the model, logs, threads' pipes
MAX_BACKLOG = 128  # aiohttp's default listen backlog
ACCEPT_TURNS = 4  # turns of the event loop between accepting a socket and closing a refused one
MOST_CONNECTIONS = 10_000  # serve.max_connections=0 (auto): what the file limit allows, at most this
AUTO_BACKLOG = 1024  # ...with a listen queue that takes a burst of new clients without SYN retries (1 s each)


def fit_to_file_limit(max_connections: int) -> tuple[int, int]:
    """(max_connections, listen backlog) that cannot run the process out of file descriptors;
    `max_connections` 0 sizes the cap to the file limit.

    asyncio accepts up to `backlog` sockets each time the listening socket is ready, and a refused one
    is closed about four turns of the loop later (the accept task, connection_made, our close, the
    transport's close), so at the peak the process holds its own files, max_connections connections
    and about four backlogs more. The soft limit is first raised to the hard one; if that is still too
    little, the backlog shrinks, then max_connections (with a warning naming `ulimit -n`)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > soft:
        try:
            soft = min(hard, 1 << 20) if hard != resource.RLIM_INFINITY else max(soft, 1 << 16)
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        except (ValueError, OSError):
            soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    try:
        open_now = len(os.listdir("/proc/self/fd"))
    except OSError:
        open_now = 64
    available = soft - open_now - RESERVED_FILES
    if max_connections == 0:  # auto: all the file limit allows besides a full backlog's bursts
        backlog = max(8, min(AUTO_BACKLOG, available // (4 * ACCEPT_TURNS)))
        return max(1, min(MOST_CONNECTIONS, available - ACCEPT_TURNS * backlog)), backlog
    backlog = max(8, min(MAX_BACKLOG, (available - max_connections) // ACCEPT_TURNS))
    if max_connections + ACCEPT_TURNS * backlog > available:
        fitted = max(1, available - ACCEPT_TURNS * backlog)
        log.warning(
            "serve.max_connections=%d lowered to %d: this process may open only %d files (ulimit -n)",
            max_connections,
            fitted,
            soft,
        )
        max_connections = fitted
    return max_connections, backlog


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler: running out of file descriptors while accepting (asyncio
    pauses accepting for a second and retries) is one short warning, not a traceback per socket."""
    error = context.get("exception")
    if isinstance(error, OSError) and error.errno in (
        errno.EMFILE,
        errno.ENFILE,
        errno.ENOBUFS,
        errno.ENOMEM,
    ):
        log.warning("accepting connections paused for a second: %s", error.strerror)
    else:
        loop.default_exception_handler(context)


@dataclass
class Connection:
    transport: asyncio.Transport
    timer: asyncio.TimerHandle | None = None
    head_started: bool = False  # bytes of a request head have arrived, and its handling has not begun


class ConnectionGuard:
    def __init__(self, max_connections: int, idle_timeout_s: float, head_timeout_s: float) -> None:
        self.max_connections, self.idle_timeout_s, self.head_timeout_s = (
            max_connections,
            idle_timeout_s,
            head_timeout_s,
        )
        self.open: dict[Any, Connection] = {}  # in the order they were opened
        self.busy: set[Any] = set()  # connections whose request is being handled
        self.stopping = False
        self.handler_class: type | None = None

    def attach(self, server: web.Server) -> None:
        """Hooks the server's per-connection callbacks (instance attributes shadow its methods)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            if not self.stopping and len(self.open) >= self.max_connections:
                self._evict_one()
            if self.stopping or len(self.open) >= self.max_connections:
                transport.write(
                    _raw_response(
                        "503 Service Unavailable",
                        "too many connections; try again" if not self.stopping else "the server is stopping",
                    )
                )
                # closed on the next turn of the loop: aiohttp's handler starts right after this returns
                # and must find its connection still open
                asyncio.get_running_loop().call_soon(transport.close)
                return
            self.open[handler] = Connection(transport)
            self._watch(handler)
            self._arm(handler, self.idle_timeout_s)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self._disarm(handler)
            self.open.pop(handler, None)
            self.busy.discard(handler)
            lost(handler, exc)

        server.connection_made, server.connection_lost = connection_made, connection_lost  # type: ignore[method-assign]

    def _watch(self, handler: Any) -> None:
        """The first bytes of a request head start its deadline, and aiohttp's own error answers are
        JSON: the connection's handler becomes a subclass that adds both. (aiohttp's RequestHandler has
        __slots__, so its methods cannot be replaced on the instance; a subclass with empty __slots__ has
        the same layout, which is what lets the class of a live instance change.)"""
        if self.handler_class is None:
            guard = self

            class GuardedHandler(type(handler)):  # type: ignore[misc, valid-type]
                __slots__ = ()

                def data_received(self, data: bytes) -> None:
                    guard.bytes_arrived(self)
                    super().data_received(data)

                def handle_error(
                    self,
                    request: Any,
                    status: int = 500,
                    exc: BaseException | None = None,
                    message: str | None = None,
                ) -> web.StreamResponse:
                    return json_error(self, request, status, exc)

            self.handler_class = GuardedHandler
        handler.__class__ = self.handler_class

    def bytes_arrived(self, handler: Any) -> None:
        connection = self.open.get(handler)
        if connection is not None and not connection.head_started and handler not in self.busy:
            connection.head_started = True
            self._arm(handler, self.head_timeout_s)

    def _evict_one(self) -> None:
        """Closes the oldest idle connection, else the oldest still sending its request head."""
        waiting = [(handler, c) for handler, c in self.open.items() if handler not in self.busy]
        victims = [pair for pair in waiting if not pair[1].head_started] or waiting
        if victims:
            handler, connection = victims[0]
            self._disarm(handler)
            self.open.pop(handler)
            connection.transport.close()

    def _arm(self, handler: Any, seconds: float) -> None:
        self._disarm(handler)
        if handler in self.open:
            self.open[handler].timer = asyncio.get_running_loop().call_later(seconds, self._expire, handler)

    def _disarm(self, handler: Any) -> None:
        connection = self.open.get(handler)
        if connection is not None and connection.timer is not None:
            connection.timer.cancel()
            connection.timer = None

    def _expire(self, handler: Any) -> None:
        if handler in self.open and handler not in self.busy:
            self.open[handler].transport.close()  # idle, or too slow to send a request head: a clean close

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Outermost: marks the connection busy while its request is handled."""
        connection = request.protocol
        self._disarm(connection)
        self.busy.add(connection)
        if connection in self.open:
            self.open[connection].head_started = False
        try:
            response = await handler(request)
            if self.stopping:
                response.force_close()  # answered; no keep-alive while draining
            return response
        finally:
            self.busy.discard(connection)
            if not self.stopping:
                self._arm(connection, self.idle_timeout_s)

    async def drain(self, timeout_s: float) -> int:
        """Stop taking requests: close idle connections, wait for those being handled (up to
        timeout_s), and return how many were still being handled then."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(0)  # requests whose head has just been parsed start being handled
        while True:
            for handler, connection in list(self.open.items()):
                if handler not in self.busy:
                    self._disarm(handler)
                    connection.transport.close()
            if not self.busy or time.monotonic() >= deadline:
                return len(self.busy)
            await asyncio.sleep(0.05)


def json_error(
    handler: Any, request: web.BaseRequest, status: int, exc: BaseException | None
) -> web.StreamResponse:
    """What aiohttp answers itself (a request it cannot parse: a bad Content-Length, a header over 8 KiB,
    an unknown method; a handler's timeout), as JSON like every other error, naming no client bytes."""
    if status >= 500:
        handler.log_exception(
            "Error handling request", exc_info=exc
        )  # ours: keeps its traceback (QuietServerLog)
    elif exc is not None:
        handler.logger.info("rejected a request: %s", type(exc).__name__)
    if request.writer.output_size > 0:  # the answer has begun: the connection is broken, as aiohttp says
        raise ConnectionError("Response is sent already, cannot send another response with the error message")
    try:
        reason = HTTPStatus(status).phrase
    except ValueError:
        reason = "Error"
    message = (
        f"malformed HTTP request ({type(exc).__name__}): check the request line, headers and Content-Length"
        if status == 400 and exc is not None
        else reason
    )
    response = web.json_response({"error": message}, status=status)
    response.force_close()
    return response


class QuietServerLog(logging.LoggerAdapter):
    """aiohttp's server logger, for the low-level handler: a malformed request (the parser's 400, or a
    body that does not decompress, which aiohttp drains after we have answered) or a client that went
    away is one short line at INFO, with no traceback and none of the client's bytes; anything else is
    our fault and keeps its traceback."""

    def __init__(self) -> None:
        super().__init__(logging.getLogger("aiohttp.server"), {})

    def exception(self, msg: object, *args: object, exc_info: Any = True, **kwargs: Any) -> None:
        error = exc_info if isinstance(exc_info, BaseException) else sys.exc_info()[1]
        if isinstance(error, (HttpProcessingError, RequestPayloadError, ConnectionError)):
            self.logger.info("rejected a request: %s", type(error).__name__)
        else:
            self.logger.error(msg, *args, exc_info=exc_info, **kwargs)
