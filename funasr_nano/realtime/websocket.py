"""The WebSocket endpoint `/v1/realtime?intent=transcription` on a FastAPI app: a thin loop over `protocol.handle`.

    app = FastAPI()
    add_realtime_route(app, engine)        # the engine the HTTP routes use: one scheduler for all

Each connection gets a `RealtimeSession`; client messages go through `protocol.handle` (answers sent
at once), the session's events come from its thread through an asyncio queue, so the event loop
never waits for a model. A disconnect closes the session: its queued audio is dropped and its
unfinished finals are cancelled (their sequences freed). `max_sessions` refuses connections beyond
that many at once (error `too_many_sessions`, then close), the other side of back-pressure: a place
is taken before anything is awaited, so simultaneous connects cannot all pass the count. The events
waiting to be sent are bounded (`MAX_UNSENT_EVENTS`): a client that does not read what it is sent
(while it sends, say, frame after invalid frame) is closed rather than buffered for.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import Callable

from fastapi import WebSocket, WebSocketDisconnect  # the server's extras (requirements-server.txt)

from funasr_nano.realtime import protocol
from funasr_nano.realtime.events import Error, ServerEvent, SessionCreated
from funasr_nano.realtime.session import RealtimeSession
from funasr_nano.realtime.settings import DEFAULT_CONFIG, RealtimeConfig

log = logging.getLogger(__name__)

PATH = "/v1/realtime"
REALTIME_SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."  # OpenAI's way to pass a key from a browser
POLICY_VIOLATION = 1008  # WebSocket close code: the request is refused
INTERNAL_ERROR = 1011
TRY_AGAIN_LATER = 1013
MAX_UNSENT_EVENTS = 256  # events queued for a client that is not reading them; then it is closed
ABORT_KEY = "funasr.abort"  # in the connection's scope: drops the TCP connection (see AbortableConnections)


class AbortableConnections:
    """ASGI middleware (outermost) that puts in each WebSocket's scope a way to drop its connection.

    A peer that reads nothing cannot be closed politely: the close frame waits behind the unsent
    data, and the transport's close() waits to flush it, so the connection (and its place under
    --max-connections) would stay as long as the peer likes. uvicorn's `send` is a method of its
    protocol object, whose transport can be aborted; other servers get no key and a plain close.
    """

    def __init__(self, app) -> None:  # noqa: ANN001 - an ASGI app
        self.app = app

    async def __call__(self, scope, receive, send) -> None:  # noqa: ANN001
        if scope["type"] == "websocket":
            transport = getattr(getattr(send, "__self__", None), "transport", None)
            if transport is not None and hasattr(transport, "abort"):
                scope = {**scope, ABORT_KEY: transport.abort}
        await self.app(scope, receive, send)


class _Outbox:
    """The events for one client, at most MAX_UNSENT_EVENTS unsent (used from the event loop only).

    Past that, `overflowed` is set and `on_overflow` called: the connection is dropped there and
    then where it can be (a peer that reads nothing may also send nothing more to be noticed by).
    """

    def __init__(self, on_overflow: Callable[[], None] | None = None) -> None:
        self.queue: asyncio.Queue[ServerEvent] = asyncio.Queue(MAX_UNSENT_EVENTS)
        self.overflowed = False
        self._on_overflow = on_overflow

    def put(self, event: ServerEvent) -> None:
        if self.overflowed:
            return
        try:
            self.queue.put_nowait(event)
        except asyncio.QueueFull:
            self.overflowed = True
            log.warning("a real-time client does not read its events (%d unsent): dropping it", MAX_UNSENT_EVENTS)
            if self._on_overflow is not None:
                self._on_overflow()
                while not self.queue.empty():  # nobody will read them: the sender stops writing to a dead socket
                    self.queue.get_nowait()


def offered_authorization(websocket: WebSocket) -> str | None:
    """The client's `Authorization` header, or for a browser, which cannot set one on a WebSocket,
    `Bearer KEY` from its `openai-insecure-api-key.KEY` subprotocol; never the URL (logs, histories)."""
    authorization = websocket.headers.get("authorization")
    if authorization:
        return authorization
    for offered in websocket.scope.get("subprotocols") or []:
        if offered.startswith(KEY_SUBPROTOCOL_PREFIX):
            return f"Bearer {offered[len(KEY_SUBPROTOCOL_PREFIX):]}"
    return None


def add_realtime_route(app, engine, *, config: RealtimeConfig = DEFAULT_CONFIG, path: str = PATH,
                       max_sessions: int | None = None, authorize: Callable[[WebSocket], Error | None] | None = None
                       ) -> None:
    """Mount the realtime transcription WebSocket on `app` (FastAPI), sessions decoding on `engine`.

    `engine` is the Engine, or a function giving it (None while the models load: the connection
    gets a `model_loading` error). `authorize(websocket)` returns None to let a client in, else the
    error event it gets before the connection is closed (a wrong API key, a page of another origin).
    """
    places = {"taken": 0}  # sessions open or being opened: checked and taken with no await between
    engine_now = engine if callable(engine) else (lambda: engine)

    @app.websocket(path)
    async def realtime_transcription(websocket: WebSocket, intent: str = "transcription") -> None:
        # A browser cannot set headers on a WebSocket: it offers subprotocols instead ("realtime", and
        # OpenAI's "openai-insecure-api-key.KEY" for the key); the handshake must pick one it offered.
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in offered else None)
        refusal = authorize(websocket) if authorize is not None else None
        if refusal is not None:
            await _send(websocket, refusal)
            await websocket.close(POLICY_VIOLATION)
            return
        current = engine_now()
        if current is None:
            await _send(websocket, Error("model_loading", "the models are still loading; try again shortly",
                                         kind="server_error"))
            await websocket.close(TRY_AGAIN_LATER)
            return
        if intent != "transcription":
            await _send(websocket, Error("invalid_intent", f"this endpoint serves intent=transcription, not {intent!r}",
                                         "intent"))
            await websocket.close(POLICY_VIOLATION)
            return
        if max_sessions is not None and places["taken"] >= max_sessions:
            await _send(websocket, Error("too_many_sessions", f"the server is at its limit of {max_sessions} real-time "
                                         "sessions; try again later", kind="server_error"))
            await websocket.close(TRY_AGAIN_LATER)
            return
        places["taken"] += 1
        try:
            await _serve(websocket, current, config)
        finally:
            places["taken"] -= 1


async def _serve(websocket: WebSocket, engine, config: RealtimeConfig) -> None:  # noqa: ANN001 - an Engine
    """One accepted connection's session, until the client leaves, overflows its outbox or the server stops."""
    loop = asyncio.get_running_loop()
    outbox = _Outbox(websocket.scope.get(ABORT_KEY))

    def from_session(event: ServerEvent) -> None:  # on the session's thread
        try:
            loop.call_soon_threadsafe(outbox.put, event)
        except RuntimeError:  # the loop has gone (server shutting down)
            pass

    try:
        session = await asyncio.to_thread(RealtimeSession, engine, None, config, from_session)
    except Exception:  # noqa: BLE001 - the detail (paths included) goes to the log, not the client
        log.exception("opening a real-time session failed")
        await _send(websocket, Error("server_error", "the session could not be opened (see the server's log)",
                                     kind="server_error"))
        await websocket.close(INTERNAL_ERROR)
        return
    outbox.put(SessionCreated(session.id, session.settings))
    sender = asyncio.create_task(_send_all(websocket, outbox.queue))
    try:
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                break
            text = message.get("text")
            if text is None:
                outbox.put(Error("invalid_event", "binary frames are not part of the protocol: send JSON "
                                 "text events (audio base64 in input_audio_buffer.append)"))
            else:
                for event in protocol.handle(session, text):
                    outbox.put(event)
            if outbox.overflowed:  # not dropped by on_overflow (no transport to abort): close politely
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(websocket.close(POLICY_VIOLATION, "events not read"), 1.0)
                break
    except WebSocketDisconnect:
        pass
    finally:
        await asyncio.to_thread(session.close)
        await _drain(outbox.queue, sender)


async def _send(websocket: WebSocket, event: ServerEvent) -> None:
    await websocket.send_text(json.dumps(protocol.render(event), ensure_ascii=False))


async def _send_all(websocket: WebSocket, outbox: asyncio.Queue) -> None:
    while True:
        event = await outbox.get()
        try:
            await _send(websocket, event)
        except Exception:  # noqa: BLE001 - the client has gone; the receive loop ends the session
            return


async def _drain(outbox: asyncio.Queue, sender: asyncio.Task) -> None:
    """Stop the sender once what is queued has been tried (the client may have gone already)."""
    for _ in range(50):
        if outbox.empty() or sender.done():
            break
        await asyncio.sleep(0.01)
    sender.cancel()
    try:
        await sender
    except (asyncio.CancelledError, Exception):  # noqa: BLE001
        pass
