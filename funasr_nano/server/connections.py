"""Bounds on connections, below the app: a deadline for request headers, a cap on open connections.

uvicorn times out idle keep-alive connections, but not a client that opens a connection and sends
its request line and headers a byte at a time (slowloris): each such connection holds a file
descriptor for as long as the client likes, and at the process's descriptor limit the server can
accept nothing, not even `/health`. `protocol_class` gives uvicorn an HTTP protocol that closes a
connection whose request headers are not complete within `header_timeout` seconds of its start
(or of the previous response, on a kept-alive connection), and that closes at once any connection
beyond `max_connections`. `raise_descriptor_limit` lifts the soft descriptor limit so that the cap
is reached before the limit; `quiet_accept_errors` keeps asyncio's traceback per failed accept
(at the limit anyway) to one line a minute.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time

log = logging.getLogger(__name__)
DESCRIPTORS_SPARE = 256  # descriptors kept beyond the connection cap: models, uploads, logs, sockets


def protocol_class(header_timeout: float, max_connections: int) -> type[asyncio.Protocol]:
    """uvicorn's h11 protocol with the header deadline and the connection cap (uvicorn.Config(http=...))."""
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class BoundedH11Protocol(H11Protocol):
        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._header_timer: asyncio.TimerHandle | None = None
            if len(self.connections) > max_connections:
                log.warning("%d connections open (--max-connections %d): closing a new one", len(self.connections),
                            max_connections)
                transport.close()
                return
            self._arm()

        def _arm(self) -> None:
            """Start the deadline for the next request's headers (the cycle now current has ended)."""
            self._armed_cycle = self.cycle
            self._header_timer = self.loop.call_later(header_timeout, self._headers_late)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_late(self) -> None:
            self._header_timer = None
            if self.transport.is_closing() or self.transport.get_protocol() is not self:  # closed, or a WebSocket now
                return
            if self.cycle is self._armed_cycle:  # no new request's headers arrived in time
                log.info("request headers not complete within %g s: connection closed", header_timeout)
                self.transport.close()

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self._header_timer is not None and (self.cycle is not self._armed_cycle
                                                   or self.transport.get_protocol() is not self):
                self._disarm()  # a request's headers are in (or the connection became a WebSocket)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing() and (self.cycle is None or self.cycle.response_complete):
                self._disarm()
                self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return BoundedH11Protocol


def raise_descriptor_limit(max_connections: int) -> int:
    """Lift the soft RLIMIT_NOFILE towards the hard one so that `max_connections` fit beside the rest;
    the number of connections that fit (smaller than asked where the hard limit is too low)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = max_connections + DESCRIPTORS_SPARE
    if soft != resource.RLIM_INFINITY and soft < wanted:
        target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    if soft != resource.RLIM_INFINITY and soft < wanted:
        fitted = max(1, soft - DESCRIPTORS_SPARE)
        log.warning("the descriptor limit (%d) leaves room for %d connections, not %d (--max-connections)", soft,
                    fitted, max_connections)
        return fitted
    return max_connections


class _OncePerInterval(logging.Filter):
    """Lets one record of asyncio's failed accepts through per `interval` seconds, without its traceback."""

    def __init__(self, interval: float = 60.0) -> None:
        super().__init__()
        self.interval = interval
        self._last = -interval

    def filter(self, record: logging.LogRecord) -> bool:
        if "accept" not in str(record.msg):
            return True
        now = time.monotonic()
        if now - self._last < self.interval:
            return False
        self._last = now
        record.exc_info = None
        record.exc_text = None
        return True


def quiet_accept_errors() -> None:
    logging.getLogger("asyncio").addFilter(_OncePerInterval())


__all__ = ["protocol_class", "quiet_accept_errors", "raise_descriptor_limit"]
