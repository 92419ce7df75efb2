"""What keeps one server safe under load: the upload cap, the bounded queue, the API key.

- `UploadLimit` (ASGI middleware) refuses a body over `--max-upload-mb` with 413: at once when
  Content-Length says so, else as soon as the streamed body passes the cap (nothing more is read);
  and with 408 a body that, past its first UPLOAD_GRACE_SECONDS, has come slower on average than
  MIN_UPLOAD_BYTES_PER_SECOND (a byte a second would hold its slot until `--upload-timeout`);
- `Admission` bounds the requests accepted at once (`--max-queue`): one more gets 503 with
  Retry-After before its upload is read; while the models load or the server shuts down, 503 too.
  Of those, at most `max_slow_uploads` may still be receiving their upload SLOW_UPLOAD_SECONDS
  after they began, so that slow senders (which `--upload-timeout` ends) can never hold the whole
  queue while quick uploads never meet the limit; Retry-After is the time the queue needs to
  drain at the rate requests have been finishing;
- `check_api_key` compares the `Authorization: Bearer` token in constant time (`secrets.compare_digest`);
- `origin_allowed` lets a browser page of another origin use the API only when `--allowed-origins`
  names it (a page can POST a form or open a WebSocket anywhere; its Origin header says where from).
"""

from __future__ import annotations

import contextlib
import math
import secrets
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from funasr_nano.server.errors import AUTHENTICATION, ApiError, busy

SLOW_UPLOAD_SECONDS = 2.0  # an upload still running after this counts against max_slow_uploads
UPLOAD_GRACE_SECONDS = 10.0
MIN_UPLOAD_BYTES_PER_SECOND = 4096  # 32 kbit/s: slower than any network a client uploads audio over


def upload_too_large(limit_bytes: int) -> ApiError:
    return ApiError(413, f"upload larger than this server's limit of {limit_bytes / 2**20:g} MB (--max-upload-mb)",
                    code="upload_too_large", param="file")


class UploadLimit:
    """Caps request bodies on the given path prefix (the transcription endpoint)."""

    def __init__(self, app: ASGIApp, max_bytes: int, prefix: str = "/v1/audio/") -> None:
        self.app, self.max_bytes, self.prefix = app, max_bytes, prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefix):
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and length.isdigit() and int(length) > self.max_bytes:
            await upload_too_large(self.max_bytes).response()(scope, receive, send)
            return
        seen = 0
        start = time.monotonic()

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise upload_too_large(self.max_bytes)
                elapsed = time.monotonic() - start
                if (message.get("more_body") and elapsed > UPLOAD_GRACE_SECONDS
                        and seen < MIN_UPLOAD_BYTES_PER_SECOND * elapsed):
                    raise ApiError(408, f"the upload is too slow ({seen / elapsed:.0f} bytes/s after {elapsed:.0f} s)",
                                   code="upload_timeout", param="file")
            return message

        await self.app(scope, limited, send)


RETRY_AFTER_UNKNOWN = 5  # seconds, before any request has finished to measure the drain rate
RETRY_AFTER_MAX = 3600
RATE_WINDOW = 32  # finished requests the drain rate is measured over


@dataclass
class Admission:
    """Requests accepted and not yet answered, at most `max_queue`; `draining` once shutdown began.

    Used from the event loop only (no lock needed).
    """

    max_queue: int
    max_slow_uploads: int | None = None  # slow uploads at once (see SLOW_UPLOAD_SECONDS); None: half the queue
    in_flight: int = 0
    slow_uploads: int = 0
    draining: bool = False
    ready: bool = False
    _finished: deque[float] = field(default_factory=lambda: deque(maxlen=RATE_WINDOW))

    @property
    def slow_upload_limit(self) -> int:
        return self.max_slow_uploads if self.max_slow_uploads is not None else max(1, self.max_queue // 2)

    def enter(self) -> Slot:
        """A slot for one request, or ApiError 503 (loading, shutting down, queue full) with Retry-After."""
        if self.draining:
            raise busy("the server is shutting down; retry on another replica", "shutting_down", retry_after=5)
        if not self.ready:
            raise busy("the models are still loading; retry shortly", "model_loading", retry_after=5)
        if self.in_flight >= self.max_queue:
            raise busy(f"the server is busy: {self.in_flight} requests in progress (--max-queue {self.max_queue})",
                       "queue_full", retry_after=self.retry_after())
        self.in_flight += 1
        return Slot(self)

    def retry_after(self) -> int:
        """Seconds until the requests in flight are likely done, at the rate recent ones finished."""
        if len(self._finished) < 2 or self._finished[-1] <= self._finished[0]:
            return RETRY_AFTER_UNKNOWN
        per_second = (len(self._finished) - 1) / (self._finished[-1] - self._finished[0])
        return max(1, min(RETRY_AFTER_MAX, math.ceil(self.in_flight / per_second)))

    def _release(self) -> None:
        self.in_flight -= 1
        self._finished.append(time.monotonic())


class Slot:
    """One admitted request; `release()` (idempotent) frees its place in the queue."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    @contextlib.contextmanager
    def slow_upload(self) -> Iterator[None]:
        """While a slow upload goes on: ApiError 503 when `slow_upload_limit` others already do."""
        admission = self._admission
        assert admission is not None
        if admission.slow_uploads >= admission.slow_upload_limit:
            raise busy(f"the server is busy: {admission.slow_uploads} slow uploads in progress; retry shortly",
                       "too_many_slow_uploads", retry_after=RETRY_AFTER_UNKNOWN)
        admission.slow_uploads += 1
        try:
            yield
        finally:
            admission.slow_uploads -= 1

    def release(self) -> None:
        if self._admission is not None:
            self._admission._release()
            self._admission = None


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """Nothing when no key is set or the Bearer token matches; ApiError 401 otherwise."""
    if not api_key:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                       type=AUTHENTICATION)


def origin_allowed(origin: str | None, host: str | None, allowed: tuple[str, ...]) -> bool:
    """Whether a request may be served: no Origin (not a browser), the page's own origin (Origin's
    host equals the Host header), an origin `allowed` names, or any with `*`."""
    if origin is None or "*" in allowed:
        return True
    origin = origin.strip().rstrip("/").lower()
    if origin in allowed:
        return True
    return host is not None and urlsplit(origin).netloc == host.strip().lower()
