"""A finished transcript in the response format asked for, and the streamed events (OpenAI's shapes).

- `json`: `{"text", "usage": {"type": "duration", "seconds"}}`; `text`: the text and a newline;
- `srt` / `vtt`: the 03 scripts' subtitle writers (`common.output.writers`);
- `verbose_json`: `task, language, duration, text, segments[{id, seek, start, end, text, tokens,
  temperature}]` (segments are the VAD's; avg_logprob and friends are not computed and not sent),
  plus `words[{word, start, end}]` per character from the CTC alignment when word granularity is
  asked for;
- stream: `transcript.text.delta` events as segments are decoded, then `transcript.text.done`.
  Two additions OpenAI's clients ignore (extra fields): each delta event carries the `segment`
  it comes from (`{id, start, end, text}`; a delta may be empty while `join_texts` holds a first
  segment back), and the done event lists those `segments`; when the request's format is
  timestamped (srt, vtt, verbose_json), the done event also carries `documents`: the srt, vtt
  and verbose_json bodies the same request would get unstreamed, so a client (the page at `/`)
  gets every download from one decoding.
"""

from __future__ import annotations

import json
import logging
import math

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from common.engine import join_texts
from common.output.alignment import proportional_char_times
from common.output.results import Segment, Transcript
from common.output.writers import render_srt_file, render_vtt_file
from common.server.requests import TranscriptionRequest

log = logging.getLogger(__name__)


def usage(transcript: Transcript) -> dict[str, object]:
    """OpenAI's duration-based usage record (billing by audio seconds, rounded up)."""
    return {"type": "duration", "seconds": math.ceil(transcript.duration)}


def words(segments: list[Segment]) -> list[dict[str, object]]:
    """Each non-blank character and its span: its start to the next character's (or the segment's end).

    Starts come from the CTC forced alignment; a segment whose text cannot be aligned (more
    characters than the audio has frames) has its span shared out by characters, as its sentences do.
    """
    out: list[dict[str, object]] = []
    for segment in segments:
        times = segment.char_times
        if times is None or len(times) != len(segment.text):
            times = proportional_char_times(segment.text, segment.start, segment.end)
        for i, char in enumerate(segment.text):
            if char.isspace():
                continue
            end = times[i + 1] if i + 1 < len(times) else segment.end
            out.append({"word": char, "start": round(times[i], 3), "end": round(max(end, times[i]), 3)})
    return out


def verbose_json(transcript: Transcript, request: TranscriptionRequest) -> dict[str, object]:
    body: dict[str, object] = {
        "task": "transcribe",
        "language": request.language_code,
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
        "segments": [{"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
                      "tokens": list(s.token_ids), "temperature": 0.0}
                     for i, s in enumerate(transcript.segments)],
        "usage": usage(transcript),
    }
    if request.words:
        body["words"] = words(transcript.segments)
    return body


def render(transcript: Transcript, request: TranscriptionRequest) -> Response:
    fmt = request.response_format
    headers = {"openai-model": request.model}
    if fmt == "json":
        return JSONResponse({"text": transcript.text, "usage": usage(transcript)}, headers=headers)
    if fmt == "verbose_json":
        return JSONResponse(verbose_json(transcript, request), headers=headers)
    if fmt == "text":
        return PlainTextResponse(transcript.text + "\n", headers=headers)
    if fmt == "srt":
        return PlainTextResponse(render_srt_file(transcript), headers=headers, media_type="application/x-subrip")
    return PlainTextResponse(render_vtt_file(transcript), headers=headers, media_type="text/vtt")


class DeltaText:
    """Text deltas whose concatenation is exactly the transcript's text (`common.engine.join_texts`).

    join_texts strips the segments it joins but keeps a lone segment untouched, so a first segment
    with surrounding blanks is held back until a second one (or the end) says which it will be.
    """

    def __init__(self) -> None:
        self.parts: list[str] = []
        self.sent = ""

    def add(self, text: str) -> str:
        self.parts.append(text)
        if len(self.parts) == 1 and text != text.strip():
            return ""
        return self._advance()

    def finish(self) -> str:
        return self._advance()

    def _advance(self) -> str:
        full = join_texts(self.parts) if self.parts else ""
        if not full.startswith(self.sent):  # cannot happen with join_texts' rule; never send a wrong text
            log.error("streamed text is not a prefix of the joined text")
            return ""
        delta, self.sent = full[len(self.sent):], full
        return delta


def sse(event: dict[str, object]) -> bytes:
    """One Server-Sent Event carrying a JSON object, as OpenAI's streams do (`data: {...}`)."""
    return f"data: {json.dumps(event, ensure_ascii=False)}\n\n".encode()


def segment_record(index: int, segment: Segment) -> dict[str, object]:
    """What the stream says about one segment: verbose_json's id, times and text."""
    return {"id": index, "start": segment.start, "end": segment.end, "text": segment.text}


def delta_event(delta: str, segment: dict[str, object] | None = None) -> bytes:
    event: dict[str, object] = {"type": "transcript.text.delta", "delta": delta}
    if segment is not None:
        event["segment"] = segment
    return sse(event)


def done_event(transcript: Transcript, request: TranscriptionRequest) -> bytes:
    event: dict[str, object] = {
        "type": "transcript.text.done", "text": transcript.text, "usage": usage(transcript),
        "segments": [segment_record(i, s) for i, s in enumerate(transcript.segments)],
    }
    if request.timestamps:
        event["documents"] = {"srt": render_srt_file(transcript), "vtt": render_vtt_file(transcript),
                              "verbose_json": verbose_json(transcript, request)}
    return sse(event)
