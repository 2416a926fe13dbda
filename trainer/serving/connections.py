"""Connections: a cap, a deadline for each request's head, a drain on shutdown, and a quiet log.

aiohttp alone keeps every connection it accepts (1,000 idle sockets exhaust `ulimit -n 1024`) and waits
for a request head as long as its keep-alive timeout. `ConnectionGuard` hooks the runner's server
(its `connection_made`/`connection_lost` callbacks) and its middleware marks when a request is being
handled, so it can refuse connections past serve.max_connections with a 503, close a connection that
has not sent a complete request head within serve.idle_timeout_s, and, on shutdown, wait for the
requests being handled while closing the idle connections."""
import asyncio
import errno
import json
import logging
import os
import resource
import sys
import time
from typing import Any

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestPayloadError

log = logging.getLogger("trainer.serve")


def _raw_response(status: str, message: str) -> bytes:
    body = json.dumps({"error": message}).encode()
    return (f"HTTP/1.1 {status}\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: 1\r\nConnection: close\r\n\r\n").encode() + body


RESERVED_FILES = 32  # for what the process opens besides connections: the model, logs, threads' pipes
MAX_BACKLOG = 128  # aiohttp's default listen backlog
ACCEPT_TURNS = 4  # turns of the event loop between accepting a socket and closing a refused one


def fit_to_file_limit(max_connections: int) -> tuple[int, int]:
    """(max_connections, listen backlog) that cannot run the process out of file descriptors.

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
    backlog = max(8, min(MAX_BACKLOG, (available - max_connections) // ACCEPT_TURNS))
    if max_connections + ACCEPT_TURNS * backlog > available:
        fitted = max(1, available - ACCEPT_TURNS * backlog)
        log.warning("serve.max_connections=%d lowered to %d: this process may open only %d files (ulimit -n)",
                    max_connections, fitted, soft)
        max_connections = fitted
    return max_connections, backlog


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
    """The event loop's exception handler: running out of file descriptors while accepting (asyncio
    pauses accepting for a second and retries) is one short warning, not a traceback per socket."""
    error = context.get("exception")
    if isinstance(error, OSError) and error.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
        log.warning("accepting connections paused for a second: %s", error.strerror)
    else:
        loop.default_exception_handler(context)


class ConnectionGuard:
    def __init__(self, max_connections: int, idle_timeout_s: float) -> None:
        self.max_connections, self.idle_timeout_s = max_connections, idle_timeout_s
        self.open: dict[Any, tuple[asyncio.Transport, asyncio.TimerHandle | None]] = {}
        self.busy: set[Any] = set()  # connections whose request is being handled
        self.stopping = False

    def attach(self, server: web.Server) -> None:
        """Hooks the server's per-connection callbacks (instance attributes shadow its methods)."""
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            if self.stopping or len(self.open) >= self.max_connections:
                transport.write(_raw_response("503 Service Unavailable", "too many connections; try again"
                                              if not self.stopping else "the server is stopping"))
                # closed on the next turn of the loop: aiohttp's handler starts right after this returns
                # and must find its connection still open
                asyncio.get_running_loop().call_soon(transport.close)
                return
            self.open[handler] = (transport, None)
            self._arm(handler)

        def connection_lost(handler: Any, exc: BaseException | None = None) -> None:
            self._disarm(handler)
            self.open.pop(handler, None)
            self.busy.discard(handler)
            lost(handler, exc)

        server.connection_made, server.connection_lost = connection_made, connection_lost  # type: ignore[method-assign]

    def _arm(self, handler: Any) -> None:
        """The connection has idle_timeout_s to deliver its next request head."""
        self._disarm(handler)
        if handler in self.open:
            timer = asyncio.get_running_loop().call_later(self.idle_timeout_s, self._expire, handler)
            self.open[handler] = (self.open[handler][0], timer)

    def _disarm(self, handler: Any) -> None:
        transport, timer = self.open.get(handler, (None, None))
        if timer is not None:
            timer.cancel()
            self.open[handler] = (transport, None)

    def _expire(self, handler: Any) -> None:
        if handler in self.open and handler not in self.busy:
            self.open[handler][0].close()  # idle, or too slow to send a request head: a clean close

    @web.middleware
    async def middleware(self, request: web.Request, handler: Any) -> web.StreamResponse:
        """Outermost: marks the connection busy while its request is handled."""
        connection = request.protocol
        self._disarm(connection)
        self.busy.add(connection)
        try:
            response = await handler(request)
            if self.stopping:
                response.force_close()  # answered; no keep-alive while draining
            return response
        finally:
            self.busy.discard(connection)
            if not self.stopping:
                self._arm(connection)

    async def drain(self, timeout_s: float) -> int:
        """Stop taking requests: close idle connections, wait for those being handled (up to
        timeout_s), and return how many were still being handled then."""
        self.stopping = True
        deadline = time.monotonic() + timeout_s
        await asyncio.sleep(0)  # requests whose head has just been parsed start being handled
        while True:
            for handler, (transport, _) in list(self.open.items()):
                if handler not in self.busy:
                    self._disarm(handler)
                    transport.close()
            if not self.busy or time.monotonic() >= deadline:
                return len(self.busy)
            await asyncio.sleep(0.05)


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
