"""The FastAPI app: routes, the Engine loaded in the background, admission, streaming, metrics.

`create_app(config, open_engine)` builds it; `open_engine()` runs on a thread after start-up, so
/health answers 503 (and transcription requests 503 with Retry-After) until the models are in.
`/` serves the page of `funasr_nano/server/ui` (`ServerConfig.ui`), a client of the public API only.

Whatever a request takes (its queue slot, its upload's temporary file, its sequences in the
scheduler) is given back on every path: answered, refused, timed out, client gone, and a streamed
response that fails before its first byte. Uploads are named after the server's process id, so a
server killed with SIGKILL has its leftovers removed by the next one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import re
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from funasr_nano.cli import one_line
from funasr_nano.config import TranscribeOptions
from funasr_nano.engine import Engine
from funasr_nano.output.results import Segment, Transcript
from funasr_nano.realtime.events import Error
from funasr_nano.realtime.settings import RealtimeConfig
from funasr_nano.realtime.websocket import AbortableConnections, add_realtime_route, offered_authorization
from funasr_nano.server import responses
from funasr_nano.server.errors import SERVER, ApiError, bad_request, error_response, install_handlers
from funasr_nano.server.limits import (
    SLOW_UPLOAD_SECONDS,
    Admission,
    Slot,
    UploadLimit,
    check_api_key,
    origin_allowed,
)
from funasr_nano.server.metrics import CONTENT_TYPE, Metrics
from funasr_nano.server.requests import TranscriptionRequest, parse_request
from funasr_nano.server.service import Limits, Running, TranscriptionService

log = logging.getLogger(__name__)
COPY_CHUNK = 1 << 20
UI_DIR = Path(__file__).resolve().parent / "ui"  # the page at /: static files, no build step
UPLOAD_PREFIX = "funasr-upload-"  # + the server's pid + "-": whose upload a temporary file is
_UPLOAD_NAME = re.compile(rf"^{UPLOAD_PREFIX}(\d+)-")
# Sent with every response; the page's policy allows only its own files and its own server.
SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"x-frame-options", b"DENY"),
                    (b"referrer-policy", b"no-referrer")]
PAGE_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
               "media-src 'self' blob:; connect-src 'self' blob:; worker-src 'self'; object-src 'none'; "
               "base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


@dataclass(frozen=True)
class ServerConfig:
    """The server's limits and names; `defaults` are the transcription options requests start from."""

    model_name: str = "fun-asr-nano"
    api_key: str | None = None
    max_upload_bytes: int = 25 * 2**20
    max_audio_seconds: float = 1800.0
    max_queue: int = 64
    timeout: float = 600.0
    max_prompt_chars: int = 200
    max_streams: int = 8  # real-time WebSocket sessions at once (/v1/realtime)
    upload_timeout: float = 120.0  # seconds to receive one request's body
    max_slow_uploads: int | None = None  # uploads still running after 2 s, at once (None: half of max_queue)
    # browser pages of other origins that may use the API (lower case, no trailing slash; "*": any);
    # a page's own origin always may, clients that send no Origin (curl, SDKs) too
    allowed_origins: tuple[str, ...] = ()
    ui: bool = True  # the page at / (funasr_nano/server/ui)
    defaults: TranscribeOptions = field(default_factory=TranscribeOptions)


class _State:
    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.admission = Admission(config.max_queue, config.max_slow_uploads)
        self.service: TranscriptionService | None = None
        self.load_error: str | None = None
        self.metrics = Metrics(lambda: self.service.engine.scheduler if self.service is not None else None)
        self.metrics.in_progress.set_function(lambda: self.admission.in_flight)


def create_app(config: ServerConfig, open_engine: Callable[[], Engine]) -> FastAPI:
    state = _State(config)

    def load() -> None:
        try:
            engine = open_engine()
        except Exception as exc:  # noqa: BLE001 - reported by /health and the log, the process stays up
            state.load_error = one_line(exc)
            log.error("loading the models failed: %s", state.load_error)
            return
        state.service = TranscriptionService(engine, config.defaults,
                                             Limits(config.max_audio_seconds, config.timeout),
                                             workers=config.max_queue)
        state.admission.ready = True
        log.info("models loaded in %.1f s; batch of %d sequences", engine.load_seconds, engine.scheduler.width)

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        remove_stale_uploads()
        loader = threading.Thread(target=load, name="model-loader", daemon=True)
        loader.start()
        yield
        state.admission.draining = True
        await asyncio.to_thread(loader.join)
        if state.service is not None:
            await asyncio.to_thread(state.service.close)
            await asyncio.to_thread(state.service.engine.close)

    # no /docs or /redoc: they load scripts and fonts from CDNs; /openapi.json is served below, keyed
    app = FastAPI(title="Fun-ASR-Nano transcription server", lifespan=lifespan, docs_url=None, redoc_url=None,
                  openapi_url=None)
    app.state.server = state
    install_handlers(app)
    app.add_middleware(UploadLimit, max_bytes=config.max_upload_bytes)
    app.add_middleware(OriginCheck, allowed=config.allowed_origins)
    if config.allowed_origins:  # so that the pages allowed can read the answers too
        app.add_middleware(CORSMiddleware, allow_origins=list(config.allowed_origins), allow_methods=["GET", "POST"],
                           allow_headers=["authorization", "content-type"])
    app.add_middleware(SecurityHeaders)
    app.add_middleware(AbortableConnections)

    def realtime_engine() -> Engine | None:
        return state.service.engine if state.service is not None and not state.admission.draining else None

    def realtime_authorize(websocket) -> Error | None:  # noqa: ANN001 - a FastAPI WebSocket
        if not origin_allowed(websocket.headers.get("origin"), websocket.headers.get("host"), config.allowed_origins):
            return Error("origin_not_allowed", "this server does not accept WebSocket connections from this page's "
                         "origin (--allowed-origins)")
        try:
            check_api_key(offered_authorization(websocket), config.api_key)
        except ApiError as exc:
            return Error(exc.code, exc.message)
        return None

    # live streams decode on the same engine and scheduler as the file requests (funasr_nano/realtime), from
    # the same defaults
    realtime = RealtimeConfig(options=config.defaults, max_prompt_chars=config.max_prompt_chars)
    add_realtime_route(app, realtime_engine, config=realtime, max_sessions=config.max_streams,
                       authorize=realtime_authorize)

    if config.ui:
        app.mount("/ui", StaticFiles(directory=UI_DIR), name="ui")

        @app.get("/", include_in_schema=False)
        async def page() -> FileResponse:
            return FileResponse(UI_DIR / "index.html", headers={"Cache-Control": "no-cache"})

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.load_error is not None:
            return error_response(503, f"loading the models failed: {state.load_error}", code="model_load_failed",
                                  type=SERVER)
        if state.admission.draining:
            return error_response(503, "shutting down", code="shutting_down", type=SERVER)
        if not state.admission.ready:
            return error_response(503, "the models are still loading", code="model_loading", type=SERVER,
                                  headers={"Retry-After": "5"})
        scheduler = state.service.engine.scheduler
        return JSONResponse({"status": "ok", "model": config.model_name,
                             "checkpoint": state.service.engine.settings.describe(),
                             "in_flight": state.admission.in_flight,
                             "diarization": state.service.speakers_available(),
                             "limits": {"max_upload_bytes": config.max_upload_bytes,
                                        "max_audio_seconds": config.max_audio_seconds},
                             "decoding": {"max_batch": scheduler.width,
                                          "kv_cache": "unified" if scheduler.unified else "split",
                                          "batch_invariant": scheduler.pad_lone_rows}})

    @app.get("/openapi.json", include_in_schema=False)
    async def openapi(request: Request) -> JSONResponse:
        check_api_key(request.headers.get("authorization"), config.api_key)
        return JSONResponse(app.openapi())

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_api_key(request.headers.get("authorization"), config.api_key)
        return JSONResponse({"object": "list", "data": [
            {"id": config.model_name, "object": "model", "created": 0, "owned_by": "funasr"}]})

    @app.post("/v1/audio/transcriptions")
    async def transcriptions(request: Request) -> Response:
        t0 = time.perf_counter()
        fmt = "unknown"
        owned = _Owned()
        try:
            check_api_key(request.headers.get("authorization"), config.api_key)
            owned.slot = state.admission.enter()
            req = await _receive_in_time(request, owned)
            fmt = req.response_format
            assert state.service is not None and owned.upload is not None
            if req.words and state.service.engine.ctc is None:
                raise bad_request("word timestamps need the model's CTC head (ctc.onnx), which this model folder "
                                  "lacks", param="timestamp_granularities[]", code="unsupported_value")
            if req.diarize:
                await asyncio.to_thread(state.service.open_speakers)  # 400 without CAM++ or the diarize extra
            options = state.service.options(prompt=req.prompt, timestamps=req.timestamps, diarize=req.diarize,
                                            speakers=req.speakers)
            owned.running = state.service.start(owned.upload, req.upload.filename or "upload", options)
            if req.stream:
                response = await _streamed(owned, req, t0)
                owned = _Owned()  # the stream owns them now
                return response
            return await _answer(request, owned.running, req, t0)
        except ApiError as exc:
            state.metrics.errors.labels(exc.code).inc()
            state.metrics.requests.labels(fmt, str(exc.status)).inc()
            return exc.response()
        except Exception:
            state.metrics.errors.labels("internal_error").inc()
            state.metrics.requests.labels(fmt, "500").inc()
            raise
        finally:
            owned.release()

    async def _receive_in_time(request: Request, owned: _Owned) -> TranscriptionRequest:
        """`_receive` within --upload-timeout, holding a slow-upload place once it has run SLOW_UPLOAD_SECONDS."""
        assert owned.slot is not None
        receiving = asyncio.ensure_future(_receive(request, owned))
        try:
            await asyncio.wait({receiving}, timeout=min(SLOW_UPLOAD_SECONDS, config.upload_timeout))
            if receiving.done():
                return receiving.result()
            with owned.slot.slow_upload():
                return await asyncio.wait_for(receiving, max(0.0, config.upload_timeout - SLOW_UPLOAD_SECONDS))
        except TimeoutError:
            raise ApiError(408, f"the upload took longer than {config.upload_timeout:g} s (--upload-timeout)",
                           code="upload_timeout", param="file") from None
        finally:
            if not receiving.done():
                receiving.cancel()
                await asyncio.gather(receiving, return_exceptions=True)

    async def _receive(request: Request, owned: _Owned) -> TranscriptionRequest:
        """The request's fields checked and its upload saved to a temporary file that `owned` holds
        (so that it is removed even when the deadline cancels this halfway)."""
        async with request.form(max_files=1, max_fields=50) as form:
            model = state.service.engine.settings if state.service is not None else None
            languages = {"languages": model.languages, "checkpoint": model.checkpoint} if model is not None else {}
            req = parse_request(form, default_model=config.model_name, max_prompt_chars=config.max_prompt_chars,
                                **languages)
            suffix = Path(req.upload.filename or "").suffix[:16]
            fd, name = tempfile.mkstemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-", suffix=suffix)
            owned.upload = Path(name)
            with os.fdopen(fd, "wb") as out:
                while chunk := await req.upload.read(COPY_CHUNK):
                    await asyncio.to_thread(out.write, chunk)
        return req

    async def _finish(running: Running) -> Transcript:
        """The transcript within the timeout; ApiError 504 (and the request's sequences freed) past it."""
        assert running.future is not None
        try:
            return await asyncio.wait_for(asyncio.shield(running.future), config.timeout)
        except TimeoutError:
            running.cancel()
            raise ApiError(504, f"transcription took longer than {config.timeout:g} s (--timeout)", code="timeout",
                           type=SERVER) from None
        except asyncio.CancelledError:
            running.cancel()
            raise

    def _done(fmt: str, transcript: Transcript, t0: float) -> None:
        m = state.metrics
        m.requests.labels(fmt, "200").inc()
        m.audio_seconds.inc(transcript.duration)
        m.tokens.inc(transcript.n_tokens)
        m.latency.observe(time.perf_counter() - t0)

    async def _answer(request: Request, running: Running, req: TranscriptionRequest, t0: float) -> Response:
        """The whole response once decoded; a client that disconnects first cancels its segments."""
        work = asyncio.ensure_future(_finish(running))
        gone = asyncio.ensure_future(_disconnected(request))
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            work.cancel()
            running.cancel()
            log.info("client went away: its segments are cancelled")
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
            raise ApiError(499, "client closed the request", code="client_closed")
        gone.cancel()
        transcript = work.result()
        _done(req.response_format, transcript, t0)
        return responses.render(transcript, req)

    async def _streamed(owned: _Owned, req: TranscriptionRequest, t0: float) -> Response:
        """SSE from the first decoded segment on: a file that cannot be read, even past its header,
        still gets its status (400, 413) rather than an error event. Deltas, then done.

        The response releases what `owned` holds when it ends, however it ends (even when the
        HTTP layer fails before the body starts, and the body's own `finally` never runs)."""
        running = owned.running
        assert running is not None and running.future is not None
        try:
            first = await asyncio.wait_for(running.segments.get(), config.timeout)
            if first is None:  # the run is over: the transcript (no segments: silence) or its error
                await _finish(running)
        except BaseException as exc:  # the caller removes the upload and frees the slot
            running.cancel()
            if isinstance(exc, TimeoutError):
                raise _stream_timed_out() from None
            raise

        async def segments() -> AsyncIterator[tuple[int, Segment]]:
            deadline = time.monotonic() + config.timeout
            segment, index = first, 0
            while segment is not None:
                yield index, segment
                segment = await asyncio.wait_for(running.segments.get(), max(0.0, deadline - time.monotonic()))
                index += 1

        async def events() -> AsyncIterator[bytes]:
            text = responses.DeltaText()
            try:
                async for index, segment in segments():
                    yield responses.delta_event(text.add(segment.text), responses.segment_record(index, segment))
                transcript = await _finish(running)
                if delta := text.finish():
                    yield responses.delta_event(delta)
                _done(req.response_format, transcript, t0)
                if req.response_format == "diarized_json":  # OpenAI's segment events: speakers known at the end
                    for index, segment in enumerate(transcript.segments):
                        yield responses.sse(responses.diarized_segment(index, segment))
                yield responses.done_event(transcript, req)
            except (ApiError, TimeoutError) as exc:
                running.cancel()
                error = exc if isinstance(exc, ApiError) else _stream_timed_out()
                state.metrics.errors.labels(error.code).inc()
                yield responses.sse({"type": "error", "error": {"message": error.message, "type": error.type,
                                                                "code": error.code}})
            finally:
                owned.release()  # cancels the run (a no-op once finished; the client went away otherwise)

        return _OwningStream(events(), owned.release, media_type="text/event-stream",
                             headers={"openai-model": req.model, "Cache-Control": "no-cache"})

    return app


DISCONNECT_POLL_SECONDS = 0.25


class _Owned:
    """What one request holds: its queue slot, its upload's file, its run; `release()` frees them all
    (idempotent, from the event loop)."""

    def __init__(self) -> None:
        self.slot: Slot | None = None
        self.upload: Path | None = None
        self.running: Running | None = None

    def release(self) -> None:
        if self.running is not None:
            self.running.cancel()  # no-op once finished
            self.running = None
        if self.upload is not None:
            _remove(self.upload)
            self.upload = None
        if self.slot is not None:
            self.slot.release()
            self.slot = None


class _OwningStream(StreamingResponse):
    """A streamed response that calls `release` once sent, failed or abandoned, whether or not its
    body iterator ever started."""

    def __init__(self, content: AsyncIterator[bytes], release: Callable[[], None], **kwargs: object) -> None:
        super().__init__(content, **kwargs)
        self._release = release

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._release()


class SecurityHeaders:
    """SECURITY_HEADERS on every HTTP response, and the page's Content-Security-Policy on the page."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        page = scope["path"] == "/" or scope["path"].startswith("/ui/")

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", [])) + SECURITY_HEADERS
                if page:
                    headers.append((b"content-security-policy", PAGE_POLICY.encode()))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


class OriginCheck:
    """403 for an API request (/v1/...) that a page of another origin sends, unless allowed
    (`limits.origin_allowed`): a browser sends a form POST anywhere, with the user's network."""

    def __init__(self, app: ASGIApp, allowed: tuple[str, ...]) -> None:
        self.app, self.allowed = app, allowed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/v1/") and scope["method"] != "OPTIONS":
            headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
            if not origin_allowed(headers.get("origin"), headers.get("host"), self.allowed):
                error = ApiError(403, "this server does not serve pages of this origin (--allowed-origins)",
                                 code="origin_not_allowed")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


def remove_stale_uploads(folder: Path | None = None) -> int:
    """Remove the temporary uploads of server processes that no longer run (killed, crashed); how many."""
    removed = 0
    for path in Path(folder or tempfile.gettempdir()).glob(f"{UPLOAD_PREFIX}*"):
        match = _UPLOAD_NAME.match(path.name)
        if match is None or int(match.group(1)) == os.getpid() or _process_alive(int(match.group(1))):
            continue
        with contextlib.suppress(OSError):
            path.unlink()
            removed += 1
    if removed:
        log.info("removed %d uploads left by servers that were killed", removed)
    return removed


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _stream_timed_out() -> ApiError:
    return ApiError(504, "transcription timed out", code="timeout", type=SERVER)


async def _disconnected(request: Request) -> None:
    """Returns once the client has disconnected (checked every DISCONNECT_POLL_SECONDS).

    Polled rather than awaited on `receive()`: once the body is read, some servers' receive()
    answers at once with empty body messages, and a loop on it would spin the event loop.
    """
    while not await request.is_disconnected():
        await asyncio.sleep(DISCONNECT_POLL_SECONDS)


def _remove(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


__all__ = ["ServerConfig", "create_app", "remove_stale_uploads"]
