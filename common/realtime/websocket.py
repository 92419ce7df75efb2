"""The WebSocket endpoint `/v1/realtime?intent=transcription` on a FastAPI app: a thin loop over `protocol.handle`.

    app = FastAPI()
    add_realtime_route(app, engine)        # the engine the HTTP routes use: one scheduler for all

Each connection gets a `RealtimeSession`; client messages go through `protocol.handle` (answers sent
at once), the session's events come from its thread through an asyncio queue, so the event loop
never waits for a model. A disconnect closes the session: its queued audio is dropped and its
unfinished finals are cancelled (their sequences freed). `max_sessions` refuses connections beyond
that many at once (error `too_many_sessions`, then close), the other side of back-pressure.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable

from fastapi import WebSocket, WebSocketDisconnect  # the server's extras (requirements-server.txt)

from common.realtime import protocol
from common.realtime.events import Error, ServerEvent, SessionCreated
from common.realtime.session import RealtimeSession
from common.realtime.settings import DEFAULT_CONFIG, RealtimeConfig

log = logging.getLogger(__name__)

PATH = "/v1/realtime"
REALTIME_SUBPROTOCOL = "realtime"
KEY_SUBPROTOCOL_PREFIX = "openai-insecure-api-key."  # OpenAI's way to pass a key from a browser
POLICY_VIOLATION = 1008  # WebSocket close code: the request is refused
TRY_AGAIN_LATER = 1013


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
                       max_sessions: int | None = None, authorize: Callable[[WebSocket], str | None] | None = None
                       ) -> None:
    """Mount the realtime transcription WebSocket on `app` (FastAPI), sessions decoding on `engine`.

    `engine` is the Engine, or a function giving it (None while the models load: the connection
    gets a `model_loading` error). `authorize(websocket)` returns None to let a client in, else the
    message of an `invalid_api_key` error (the server's API key).
    """
    live: set[RealtimeSession] = set()
    engine_now = engine if callable(engine) else (lambda: engine)

    @app.websocket(path)
    async def realtime_transcription(websocket: WebSocket, intent: str = "transcription") -> None:
        # A browser cannot set headers on a WebSocket: it offers subprotocols instead ("realtime", and
        # OpenAI's "openai-insecure-api-key.KEY" for the key); the handshake must pick one it offered.
        offered = websocket.scope.get("subprotocols") or []
        await websocket.accept(subprotocol=REALTIME_SUBPROTOCOL if REALTIME_SUBPROTOCOL in offered else None)
        refusal = authorize(websocket) if authorize is not None else None
        if refusal is not None:
            await _send(websocket, Error("invalid_api_key", refusal, kind="invalid_request_error"))
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
        if max_sessions is not None and len(live) >= max_sessions:
            await _send(websocket, Error("too_many_sessions", f"the server is at its limit of {max_sessions} real-time "
                                         "sessions; try again later", kind="server_error"))
            await websocket.close(TRY_AGAIN_LATER)
            return
        loop = asyncio.get_running_loop()
        outbox: asyncio.Queue[ServerEvent] = asyncio.Queue()

        def from_session(event: ServerEvent) -> None:  # on the session's thread
            try:
                loop.call_soon_threadsafe(outbox.put_nowait, event)
            except RuntimeError:  # the loop has gone (server shutting down)
                pass

        session = await asyncio.to_thread(RealtimeSession, current, None, config, from_session)
        live.add(session)
        outbox.put_nowait(SessionCreated(session.id, session.settings))
        sender = asyncio.create_task(_send_all(websocket, outbox))
        try:
            while True:
                message = await websocket.receive()
                if message["type"] == "websocket.disconnect":
                    break
                text = message.get("text")
                if text is None:
                    outbox.put_nowait(Error("invalid_event", "binary frames are not part of the protocol: send JSON "
                                            "text events (audio base64 in input_audio_buffer.append)"))
                    continue
                for event in protocol.handle(session, text):
                    outbox.put_nowait(event)
        except WebSocketDisconnect:
            pass
        finally:
            live.discard(session)
            await asyncio.to_thread(session.close)
            await _drain(outbox, sender)


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
