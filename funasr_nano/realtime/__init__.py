"""Real-time transcription: live audio in, speech events, partial text (CTC head) and final text (LLM) out.

`session.RealtimeSession` is the stream (independent of any transport), `protocol` speaks OpenAI's
realtime transcription events over it, `websocket.add_realtime_route` mounts the WebSocket endpoint
on a FastAPI app.
"""

from funasr_nano.realtime.events import ServerEvent
from funasr_nano.realtime.session import RealtimeSession
from funasr_nano.realtime.settings import RealtimeConfig, SessionSettings

__all__ = ["RealtimeConfig", "RealtimeSession", "ServerEvent", "SessionSettings"]
