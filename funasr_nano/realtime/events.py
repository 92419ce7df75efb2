"""What a real-time session tells its client: one small dataclass per server event.

Each maps 1:1 to an event of OpenAI's realtime transcription protocol (its `type` below);
`funasr_nano.realtime.protocol.render` writes the JSON. Items are the segments: every segment gets an
`item_id` when the VAD (or a commit) opens it, and the client sees, in this order for one item:
`SpeechStarted` (VAD only), any number of `TranscriptionDelta` (partial text from the CTC head),
`SpeechStopped` (VAD only), `Committed`, then `TranscriptionCompleted` (the LLM's final text, which
replaces the partial text) or `TranscriptionFailed`. Items complete in the order they were committed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from funasr_nano.realtime.settings import SessionSettings


@dataclass(frozen=True)
class SessionCreated:
    type: ClassVar[str] = "session.created"
    session_id: str
    settings: SessionSettings


@dataclass(frozen=True)
class SessionUpdated:
    type: ClassVar[str] = "session.updated"
    session_id: str
    settings: SessionSettings
    reply_type: str = "session.updated"  # "transcription_session.updated" for the beta event's client


@dataclass(frozen=True)
class SpeechStarted:
    type: ClassVar[str] = "input_audio_buffer.speech_started"
    item_id: str
    audio_start_ms: int  # from the start of the session's audio (padded start of the segment)


@dataclass(frozen=True)
class SpeechStopped:
    type: ClassVar[str] = "input_audio_buffer.speech_stopped"
    item_id: str
    audio_end_ms: int


@dataclass(frozen=True)
class Committed:
    type: ClassVar[str] = "input_audio_buffer.committed"
    item_id: str
    previous_item_id: str | None


@dataclass(frozen=True)
class TranscriptionDelta:
    """New partial text of an open item.

    `delta` only ever appends (OpenAI's meaning: concatenated deltas are the text so far); when the
    CTC head revises earlier words, `delta` is empty and `partial` (our addition: the whole partial
    text now) says what to show. Either way `TranscriptionCompleted.transcript` replaces it all.
    """

    type: ClassVar[str] = "conversation.item.input_audio_transcription.delta"
    item_id: str
    delta: str
    partial: str


@dataclass(frozen=True)
class TranscriptionCompleted:
    """The final text of an item. `speaker` (our addition, sessions with `diarize` only): who spoke it, 0 for
    the first voice of the stream, assigned online as the item ends (`funasr_nano.speakers.online`). OpenAI's
    clients keep an extra field of an event they parse, and ignore it otherwise."""

    type: ClassVar[str] = "conversation.item.input_audio_transcription.completed"
    item_id: str
    transcript: str
    audio_start_ms: int
    audio_end_ms: int
    speaker: int | None = None


@dataclass(frozen=True)
class TranscriptionFailed:
    type: ClassVar[str] = "conversation.item.input_audio_transcription.failed"
    item_id: str
    code: str
    message: str


@dataclass(frozen=True)
class Error:
    """A problem with one client event (the session goes on) or with the session's pace.

    `code` values: see `funasr_nano.realtime.protocol` (bad frames) and `funasr_nano.realtime.session`
    (`falling_behind`, `input_audio_buffer_commit_empty`).
    """

    type: ClassVar[str] = "error"
    code: str
    message: str
    param: str | None = None
    event_id: str | None = None  # the client event it answers, when it had one
    kind: str = "invalid_request_error"  # OpenAI's error.type; "server_error" for ours


@dataclass(frozen=True)
class Cleared:
    """The audio appended and not yet committed was dropped (`input_audio_buffer.clear`)."""

    type: ClassVar[str] = "input_audio_buffer.cleared"


ServerEvent = (SessionCreated | SessionUpdated | SpeechStarted | SpeechStopped | Committed | TranscriptionDelta
               | TranscriptionCompleted | TranscriptionFailed | Error | Cleared)

__all__ = ["Cleared", "Committed", "Error", "ServerEvent", "SessionCreated", "SessionUpdated", "SpeechStarted", "SpeechStopped",
           "TranscriptionCompleted", "TranscriptionDelta", "TranscriptionFailed"]
