"""What keeps one server safe under load: the upload cap, the bounded queue, the API key.

- `UploadLimit` (ASGI middleware) refuses a body over `--max-upload-mb` with 413: at once when
  Content-Length says so, else as soon as the streamed body passes the cap (nothing more is read);
- `Admission` bounds the requests accepted at once (`--max-queue`): one more gets 503 with
  Retry-After before its upload is read; while the models load or the server shuts down, 503 too;
- `check_api_key` compares the `Authorization: Bearer` token in constant time (`secrets.compare_digest`).
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.server.errors import AUTHENTICATION, ApiError, busy


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

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise upload_too_large(self.max_bytes)
            return message

        await self.app(scope, limited, send)


@dataclass
class Admission:
    """Requests accepted and not yet answered, at most `max_queue`; `draining` once shutdown began."""

    max_queue: int
    in_flight: int = 0
    draining: bool = False
    ready: bool = False

    def enter(self) -> Slot:
        """A slot for one request, or ApiError 503 (loading, shutting down, queue full) with Retry-After."""
        if self.draining:
            raise busy("the server is shutting down; retry on another replica", "shutting_down", retry_after=5)
        if not self.ready:
            raise busy("the models are still loading; retry shortly", "model_loading", retry_after=5)
        if self.in_flight >= self.max_queue:
            raise busy(f"the server is busy: {self.in_flight} requests in progress (--max-queue {self.max_queue})",
                       "queue_full")
        self.in_flight += 1
        return Slot(self)


class Slot:
    """One admitted request; `release()` (idempotent) frees its place in the queue."""

    def __init__(self, admission: Admission) -> None:
        self._admission: Admission | None = admission

    def release(self) -> None:
        if self._admission is not None:
            self._admission.in_flight -= 1
            self._admission = None


def check_api_key(authorization: str | None, api_key: str | None) -> None:
    """Nothing when no key is set or the Bearer token matches; ApiError 401 otherwise."""
    if not api_key:
        return
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'", code="invalid_api_key",
                       type=AUTHENTICATION)
