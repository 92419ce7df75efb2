"""OpenAI's realtime transcription protocol over a `RealtimeSession`, independent of the transport.

Client events (JSON text messages) that are understood:
- `session.update` (GA shape: `session.audio.input.{format, transcription, turn_detection}`) or the
  beta `transcription_session.update` (`session.{input_audio_format, input_audio_transcription,
  turn_detection}`); fields not given keep their values. Must come before any audio.
  * format: `{"type": "audio/pcm", "rate": R}` with R from 8000 to 48000 (16000 is used as sent,
    other rates are resampled with soxr); the beta `"pcm16"` is OpenAI's 24 kHz PCM16. With no
    format ever given, the session takes 16 kHz.
  * transcription: `language` (zh/en/ja or their names, empty for auto), `prompt` (hotwords,
    comma-separated: the model's prompt takes a hotword list, not free text), `model` (echoed),
    and ours, `diarize` (true/false): a `speaker` on each completed event (online assignment,
    `funasr_nano.speakers.online`; `invalid_value` on a server without campplus.onnx).
  * turn_detection: `{"type": "server_vad", "threshold", "silence_duration_ms", "prefix_padding_ms"}`
    (Silero VAD; the defaults are the offline CLI's, 0.5 / 300 ms / 100 ms), or null: no VAD, each
    `input_audio_buffer.commit` ends a segment.
- `input_audio_buffer.append` `{"audio": base64 PCM16 mono little-endian}`.
- `input_audio_buffer.commit`: ends the segment in progress now.
- `input_audio_buffer.clear`: drops the audio appended and not yet committed (the speech in
  progress, if any: it gets no final); answered with `input_audio_buffer.cleared`.

Every bad frame gets one `error` event (`error.code` below) and the session goes on:
`invalid_json` (also: nested too deeply), `invalid_event` (not an object, no type), `unknown_event`
(a type not listed above), `invalid_value` (a setting out of range or of the wrong type, a prompt
over the server's `max_prompt_chars`), `invalid_base64`, `invalid_audio` (odd byte count),
`session_not_configured` (audio or commit before `session.update`). The session itself
adds `input_audio_buffer_commit_empty`, `falling_behind` and `server_error`.

`handle(session, message)` applies one client message and returns the events to send now; the
session's own events (speech, deltas, finals) come through its `on_event`. `render(event)` gives a
server event's JSON object.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import json
import uuid
from dataclasses import dataclass
from typing import Any

from funasr_nano.audio.vad import VadOptions
from funasr_nano.models.prompt import (
    LANGUAGES,
    MLT_LANGUAGES,
    NANO,
    LanguageError,
    PromptOptions,
    parse_hotwords,
    resolve_language,
)
from funasr_nano.realtime.events import (
    Committed,
    Error,
    ServerEvent,
    SessionCreated,
    SessionUpdated,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
)
from funasr_nano.realtime.settings import MAX_RATE, MIN_RATE, SessionSettings
from funasr_nano.speakers.embeddings import SPK_MODEL_FILE, find_speaker_model

BETA_PCM16_RATE = 24000  # OpenAI's "pcm16": 24 kHz mono little-endian
UPDATE_TYPES = {"session.update": "session.updated",
                "transcription_session.update": "transcription_session.updated"}


class ProtocolError(ValueError):
    """A client event that cannot be applied: becomes one `error` event."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


@dataclass(frozen=True)
class SessionUpdate:
    settings: SessionSettings
    reply_type: str
    event_id: str | None = None


@dataclass(frozen=True)
class AudioAppend:
    audio: bytes
    event_id: str | None = None


@dataclass(frozen=True)
class AudioCommit:
    event_id: str | None = None


@dataclass(frozen=True)
class AudioClear:
    event_id: str | None = None


ClientEvent = SessionUpdate | AudioAppend | AudioCommit | AudioClear
CLIENT_EVENT_TYPES = (*UPDATE_TYPES, "input_audio_buffer.append", "input_audio_buffer.commit",
                      "input_audio_buffer.clear")


def _loads(message: str | bytes) -> Any:
    """json.loads, with a message nested deeper than Python's recursion limit as ProtocolError."""
    try:
        return json.loads(message)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ProtocolError("invalid_json", f"not a JSON message: {exc}") from None
    except RecursionError:
        raise ProtocolError("invalid_json", "not a JSON message: nested too deeply") from None


def parse(message: str | bytes, current: SessionSettings | None = None, *,
          max_prompt_chars: int | None = None, languages: dict[str, str] = LANGUAGES,
          checkpoint: str = NANO) -> ClientEvent:
    """One client message as a client event; `current` is what a session.update's missing fields keep;
    `languages`: those the model's `checkpoint` takes."""
    current = current or SessionSettings()
    data = _loads(message)
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        raise ProtocolError("invalid_event", "a client event is a JSON object with a string `type`", "type")
    kind, event_id = data["type"], data.get("event_id")
    event_id = event_id if isinstance(event_id, str) else None
    if kind in UPDATE_TYPES:
        session = data.get("session", {})
        if not isinstance(session, dict):
            raise ProtocolError("invalid_value", "`session` must be an object", "session")
        return SessionUpdate(_settings(session, current, max_prompt_chars, (languages, checkpoint)),
                             UPDATE_TYPES[kind], event_id)
    if kind == "input_audio_buffer.append":
        audio = data.get("audio")
        if not isinstance(audio, str):
            raise ProtocolError("invalid_value", "`audio` must be a base64 string of PCM16 audio", "audio")
        try:
            pcm = base64.b64decode(audio, validate=True)
        except (binascii.Error, ValueError):
            raise ProtocolError("invalid_base64", "`audio` is not valid base64", "audio") from None
        if len(pcm) % 2:
            raise ProtocolError("invalid_audio", f"PCM16 audio needs an even number of bytes, got {len(pcm)}", "audio")
        return AudioAppend(pcm, event_id)
    if kind == "input_audio_buffer.commit":
        return AudioCommit(event_id)
    if kind == "input_audio_buffer.clear":
        return AudioClear(event_id)
    raise ProtocolError("unknown_event", f"unknown or unsupported client event type {kind[:64]!r}; this server takes "
                        f"{', '.join(CLIENT_EVENT_TYPES)}", "type")


def handle(session, message: str | bytes) -> list[ServerEvent]:
    """Apply one client message to `session` (a RealtimeSession); the events to send back now."""
    try:
        model = session.engine.settings
        event = parse(message, session.settings, max_prompt_chars=session.config.max_prompt_chars,
                      languages=model.languages, checkpoint=model.checkpoint)
    except ProtocolError as exc:
        return [Error(exc.code, exc.message, exc.param, _event_id(message))]
    if isinstance(event, SessionUpdate):
        if event.settings.diarize and find_speaker_model(session.engine.settings.model_dir) is None:
            return [Error("invalid_value", f"speakers need CAM++ ({SPK_MODEL_FILE}), which this server's model folder "
                          "lacks: export it with funasr-nano export --spk-release-dir", "transcription.diarize",
                          event.event_id)]
        return [dataclasses.replace(e, reply_type=event.reply_type) if isinstance(e, SessionUpdated) else e
                for e in session.configure(event.settings)]
    if not session.configured:
        return [Error("session_not_configured", "send session.update with the transcription settings before audio",
                      None, event.event_id)]
    if isinstance(event, AudioAppend):
        return session.append(event.audio)
    if isinstance(event, AudioClear):
        return session.clear()
    return session.commit(event.event_id)


def render(event: ServerEvent) -> dict[str, Any]:
    """A server event as OpenAI's JSON object (with an `event_id`)."""
    out: dict[str, Any] = {"event_id": f"event_{uuid.uuid4().hex[:20]}", "type": event.type}
    if isinstance(event, (SessionCreated, SessionUpdated)):
        beta = isinstance(event, SessionUpdated) and event.reply_type.startswith("transcription_session")
        out["type"] = event.reply_type if isinstance(event, SessionUpdated) else event.type
        out["session"] = _session_json(event.session_id, event.settings, beta)
    elif isinstance(event, SpeechStarted):
        out.update(item_id=event.item_id, audio_start_ms=event.audio_start_ms)
    elif isinstance(event, SpeechStopped):
        out.update(item_id=event.item_id, audio_end_ms=event.audio_end_ms)
    elif isinstance(event, Committed):
        out.update(item_id=event.item_id, previous_item_id=event.previous_item_id)
    elif isinstance(event, TranscriptionDelta):
        out.update(item_id=event.item_id, content_index=0, delta=event.delta, partial=event.partial)
    elif isinstance(event, TranscriptionCompleted):
        out.update(item_id=event.item_id, content_index=0, transcript=event.transcript,
                   audio_start_ms=event.audio_start_ms, audio_end_ms=event.audio_end_ms)
        if event.speaker is not None:
            out["speaker"] = event.speaker
    elif isinstance(event, TranscriptionFailed):
        out.update(item_id=event.item_id, content_index=0,
                   error={"type": "transcription_error", "code": event.code, "message": event.message})
    elif isinstance(event, Error):
        out["error"] = {"type": event.kind, "code": event.code, "message": event.message, "param": event.param,
                        "event_id": event.event_id}
    return out


def session_update(settings: SessionSettings) -> dict[str, Any]:
    """The `session.update` client event that asks a server for `settings` (GA shape)."""
    return {"type": "session.update", "session": _session_json(None, settings, beta=False)}


def parse_server_event(data: dict[str, Any]) -> ServerEvent | None:
    """The events a client shows, back from their JSON (deltas, finals, failures, errors); None for the rest."""
    kind = data.get("type")
    if kind == TranscriptionDelta.type:
        return TranscriptionDelta(data["item_id"], data.get("delta", ""), data.get("partial", data.get("delta", "")))
    if kind == TranscriptionCompleted.type:
        speaker = data.get("speaker")
        return TranscriptionCompleted(data["item_id"], data["transcript"], data.get("audio_start_ms", 0),
                                      data.get("audio_end_ms", 0),
                                      speaker if isinstance(speaker, int) and not isinstance(speaker, bool) else None)
    if kind == TranscriptionFailed.type:
        error = data.get("error") or {}
        return TranscriptionFailed(data["item_id"], error.get("code", ""), error.get("message", ""))
    if kind == "error":
        error = data.get("error") or {}
        return Error(error.get("code", ""), error.get("message", ""), error.get("param"), error.get("event_id"),
                     error.get("type", "invalid_request_error"))
    return None


def encode_audio(pcm16: bytes) -> str:
    """PCM16 bytes as the `audio` field of `input_audio_buffer.append` (clients)."""
    return base64.b64encode(pcm16).decode("ascii")


# ---------------------------------------------------------------------- settings <-> JSON


def _settings(session: dict[str, Any], current: SessionSettings, max_prompt_chars: int | None,
              languages: tuple[dict[str, str], str] = (LANGUAGES, NANO)) -> SessionSettings:
    """A session.update's `session` object over the current settings (GA or beta shape)."""
    audio_in = session.get("audio", {}).get("input", {}) if isinstance(session.get("audio"), dict) else {}
    if not isinstance(audio_in, dict):
        raise ProtocolError("invalid_value", "`session.audio.input` must be an object", "session.audio.input")
    rate = current.sample_rate
    if "format" in audio_in:
        rate = _rate(audio_in["format"])
    elif "input_audio_format" in session:
        if session["input_audio_format"] != "pcm16":
            raise ProtocolError("invalid_value", f"input_audio_format {session['input_audio_format']!r} is not "
                                "supported: pcm16 only", "session.input_audio_format")
        rate = BETA_PCM16_RATE
    transcription = audio_in.get("transcription", session.get("input_audio_transcription"))
    prompt, model, diarize = current.prompt, current.model, current.diarize
    if transcription is not None:
        if not isinstance(transcription, dict):
            raise ProtocolError("invalid_value", "transcription settings must be an object", "transcription")
        prompt, model = _prompt(transcription, prompt, max_prompt_chars, languages), _model(transcription.get("model"), model)
        diarize = transcription.get("diarize", diarize)
        if not isinstance(diarize, bool):
            raise ProtocolError("invalid_value", "`diarize` must be true or false", "transcription.diarize")
    vad = current.vad
    if "turn_detection" in audio_in or "turn_detection" in session:
        vad = _vad(audio_in["turn_detection"] if "turn_detection" in audio_in else session["turn_detection"])
    try:
        return SessionSettings(sample_rate=rate, prompt=prompt, vad=vad, model=model, diarize=diarize)
    except ValueError as exc:
        raise ProtocolError("invalid_value", str(exc), "format.rate") from None


def _rate(fmt: Any) -> int:
    if not isinstance(fmt, dict) or fmt.get("type") != "audio/pcm":
        raise ProtocolError("invalid_value", "audio format must be {\"type\": \"audio/pcm\", \"rate\": R} (PCM16 mono)",
                            "session.audio.input.format")
    rate = fmt.get("rate", 16000)
    if isinstance(rate, bool) or not isinstance(rate, int) or not MIN_RATE <= rate <= MAX_RATE:
        raise ProtocolError("invalid_value", f"audio rate {rate!r} is not accepted: {MIN_RATE}-{MAX_RATE} Hz",
                            "session.audio.input.format.rate")
    return rate


MAX_MODEL_CHARS = 128


def _model(value: Any, current: str) -> str:
    if value is None or value == "":
        return current
    if not isinstance(value, str) or len(value) > MAX_MODEL_CHARS or not value.isprintable():
        raise ProtocolError("invalid_value", f"`model` must be a string of at most {MAX_MODEL_CHARS} printable "
                            "characters", "transcription.model")
    return value


def _prompt(transcription: dict[str, Any], current: PromptOptions, max_prompt_chars: int | None,
            languages: tuple[dict[str, str], str] = (LANGUAGES, NANO)) -> PromptOptions:
    language, hotwords = current.language, current.hotwords
    if "language" in transcription:
        value = transcription["language"]
        if value is not None and not isinstance(value, str):
            raise ProtocolError("invalid_value", "`language` must be a string (an ISO code such as zh, or empty "
                                "for automatic)", "transcription.language")
        try:
            language = resolve_language(value or None, *languages)
        except LanguageError as exc:
            raise ProtocolError("invalid_value", str(exc), "transcription.language") from None
    if "prompt" in transcription:
        value = transcription["prompt"]
        if value is not None and not isinstance(value, str):
            raise ProtocolError("invalid_value", "`prompt` must be a string of comma-separated hotwords",
                                "transcription.prompt")
        if max_prompt_chars is not None and value and len(value) > max_prompt_chars:
            raise ProtocolError("invalid_value", f"`prompt` holds {len(value)} characters; this server takes at most "
                                f"{max_prompt_chars} (--max-prompt-chars)", "transcription.prompt")
        hotwords = parse_hotwords(value or "")
    return dataclasses.replace(current, language=language, hotwords=hotwords)


def _vad(turn: Any) -> VadOptions | None:
    if turn is None:
        return None
    if not isinstance(turn, dict) or turn.get("type", "server_vad") != "server_vad":
        raise ProtocolError("invalid_value", "turn_detection must be {\"type\": \"server_vad\", ...} or null",
                            "turn_detection")
    defaults = VadOptions()
    try:
        threshold = float(turn.get("threshold", defaults.threshold))
        silence = float(turn.get("silence_duration_ms", defaults.min_silence_seconds * 1000)) / 1000
        padding = float(turn.get("prefix_padding_ms", defaults.pad_seconds * 1000)) / 1000
    except (TypeError, ValueError):
        raise ProtocolError("invalid_value", "turn_detection values must be numbers", "turn_detection") from None
    if not (0 < threshold < 1 and 0 < silence <= 10 and 0 <= padding <= 2):
        raise ProtocolError("invalid_value", "turn_detection: threshold in (0, 1), silence_duration_ms in (0, 10000], "
                            "prefix_padding_ms in [0, 2000]", "turn_detection")
    return VadOptions(threshold=threshold, min_silence_seconds=silence, pad_seconds=padding,
                      min_speech_seconds=defaults.min_speech_seconds)


def _session_json(session_id: str | None, settings: SessionSettings, beta: bool) -> dict[str, Any]:
    codes = {name: code for code, name in MLT_LANGUAGES.items()}
    transcription: dict[str, Any] = {"model": settings.model, "language": codes.get(settings.prompt.language or "", ""),
                                     "prompt": ",".join(settings.prompt.hotwords)}
    if settings.diarize:  # ours: said only when asked for, so OpenAI's own shape is unchanged otherwise
        transcription["diarize"] = True
    vad = settings.vad
    turn = None if vad is None else {"type": "server_vad", "threshold": vad.threshold,
                                     "silence_duration_ms": round(vad.min_silence_seconds * 1000),
                                     "prefix_padding_ms": round(vad.pad_seconds * 1000)}
    if beta:
        return {"id": session_id, "object": "realtime.transcription_session", "input_audio_format": "pcm16",
                "input_audio_transcription": transcription, "turn_detection": turn,
                "input_audio_sample_rate": settings.sample_rate}
    return {**({"id": session_id, "object": "realtime.session"} if session_id else {}), "type": "transcription",
            "audio": {"input": {"format": {"type": "audio/pcm", "rate": settings.sample_rate},
                                "transcription": transcription, "turn_detection": turn}}}


def _event_id(message: str | bytes) -> str | None:
    try:
        data = _loads(message)
    except ProtocolError:
        return None
    value = data.get("event_id") if isinstance(data, dict) else None
    return value if isinstance(value, str) else None
