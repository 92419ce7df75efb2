"""A finished transcript in the response format asked for, and the streamed events (OpenAI's shapes).

- `json`: `{"text", "usage": {"type": "duration", "seconds"}}`; `text`: the text and a newline;
- `srt` / `vtt`: the 03 scripts' subtitle writers (`funasr_nano.output.writers`);
- `verbose_json`: `task, language, duration, text, segments[{id, seek, start, end, text, tokens,
  temperature}]` (segments are the VAD's; avg_logprob and friends are not computed and not sent),
  plus `words[{word, start, end}]` (whole words in English, characters in Chinese and Japanese) from the
  CTC alignment when word granularity is asked for; `language`: the one asked for, else the text's;
  with diarization (`diarize=true`) each segment also has `speaker` (0 for the first voice heard,
  as the CLI's JSON) and the body `speakers`, the number found;
- `diarized_json` (OpenAI's shape for its diarizing model, `TranscriptionDiarized`): `task, duration,
  text, segments[{type: "transcript.text.segment", id, start, end, text, speaker}], usage`; speakers
  are labelled as OpenAI labels them without known speakers: `A`, `B`, ... in the order first heard;
- stream: `transcript.text.delta` events as segments are decoded, then `transcript.text.done`.
  Two additions OpenAI's clients ignore (extra fields): each delta event carries the `segment`
  it comes from (`{id, start, end, text}`; a delta may be empty while `join_texts` holds a first
  segment back), and the done event lists those `segments`; when the request's format is
  timestamped (srt, vtt, verbose_json), the done event also carries `documents`: the srt, vtt
  and verbose_json bodies the same request would get unstreamed, so a client (the page at `/`)
  gets every download from one decoding. With `diarized_json`, OpenAI's `transcript.text.segment`
  events (one per segment, with its speaker) come just before the done event: speakers are known
  only once the whole file is read and clustered, so they cannot come with the deltas.
"""

from __future__ import annotations

import json
import logging
import math

from fastapi.responses import JSONResponse, PlainTextResponse, Response

from funasr_nano.engine import join_texts
from funasr_nano.output.alignment import word_times
from funasr_nano.output.results import Segment, Transcript
from funasr_nano.output.writers import render_srt_file, render_vtt_file
from funasr_nano.server.requests import TranscriptionRequest

log = logging.getLogger(__name__)


def usage(transcript: Transcript) -> dict[str, object]:
    """OpenAI's duration-based usage record (billing by audio seconds, rounded up)."""
    return {"type": "duration", "seconds": math.ceil(transcript.duration)}


def words(segments: list[Segment]) -> list[dict[str, object]]:
    """Each word and its span (`funasr_nano.output.alignment.word_times`: whole words in English, characters in
    Chinese and Japanese), from the CTC forced alignment where the segment has it, else shared out."""
    return [{"word": w.word, "start": round(w.start, 3), "end": round(w.end, 3)}
            for s in segments for w in word_times(s.text, s.start, s.end, s.char_times)]


def speaker_label(speaker: int) -> str:
    """OpenAI's label for a speaker without known names: A, B, ..., Z, then AA, AB, ... (0 is A)."""
    label = ""
    n = speaker + 1
    while n:
        n, rest = divmod(n - 1, 26)
        label = chr(ord("A") + rest) + label
    return label


def verbose_json(transcript: Transcript, request: TranscriptionRequest) -> dict[str, object]:
    segments: list[dict[str, object]] = []
    for i, s in enumerate(transcript.segments):
        record: dict[str, object] = {"id": i, "seek": 0, "start": s.start, "end": s.end, "text": s.text,
                                     "tokens": list(s.token_ids), "temperature": 0.0}
        if s.speaker is not None:
            record["speaker"] = s.speaker
        segments.append(record)
    body: dict[str, object] = {
        "task": "transcribe",
        "language": transcript.language or request.language_code,  # asked for, else the text's (zh/en/ja)
        "duration": round(transcript.duration, 3),
        "text": transcript.text,
        "segments": segments,
        "usage": usage(transcript),
    }
    if transcript.speakers is not None:
        body["speakers"] = transcript.speakers
    if request.words:
        body["words"] = words(transcript.segments)
    return body


def diarized_segment(index: int, segment: Segment) -> dict[str, object]:
    """One segment as OpenAI's `TranscriptionDiarizedSegment` (and its stream's segment event)."""
    return {"type": "transcript.text.segment", "id": f"seg_{index}", "start": segment.start, "end": segment.end,
            "text": segment.text, "speaker": speaker_label(segment.speaker or 0)}


def diarized_json(transcript: Transcript) -> dict[str, object]:
    """OpenAI's `TranscriptionDiarized`: the text, the segments with their speakers, the duration."""
    return {"task": "transcribe", "duration": round(transcript.duration, 3), "text": transcript.text,
            "segments": [diarized_segment(i, s) for i, s in enumerate(transcript.segments)],
            "usage": usage(transcript)}


def render(transcript: Transcript, request: TranscriptionRequest) -> Response:
    fmt = request.response_format
    headers = {"openai-model": request.model}
    if fmt == "json":
        return JSONResponse({"text": transcript.text, "usage": usage(transcript)}, headers=headers)
    if fmt == "verbose_json":
        return JSONResponse(verbose_json(transcript, request), headers=headers)
    if fmt == "diarized_json":
        return JSONResponse(diarized_json(transcript), headers=headers)
    if fmt == "text":
        return PlainTextResponse(transcript.text + "\n", headers=headers)
    if fmt == "srt":
        return PlainTextResponse(render_srt_file(transcript), headers=headers, media_type="application/x-subrip")
    return PlainTextResponse(render_vtt_file(transcript), headers=headers, media_type="text/vtt")


class DeltaText:
    """Text deltas whose concatenation is exactly the transcript's text (`funasr_nano.engine.join_texts`).

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
    """What the stream says about one segment: verbose_json's id, times and text, and its speaker once known
    (in the done event's list: speakers are found when the whole file is read)."""
    record: dict[str, object] = {"id": index, "start": segment.start, "end": segment.end, "text": segment.text}
    if segment.speaker is not None:
        record["speaker"] = segment.speaker
    return record


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
