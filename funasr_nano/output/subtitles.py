"""Subtitles (SRT, WebVTT) from a transcript: sentence-level cues of bounded duration.

Each segment's text is cut into sentences at 。！？.!? (and, for a sentence that would last
longer than `max_cue_seconds`, at ，,、；; too, then into equal runs of characters). Times
come from the segment (VAD or fixed cuts): a segment's span is shared out in proportion to
the characters of each piece (spaces excluded), so cues tile each segment, never overlap and
never run backwards. Where a segment carries `char_times` (the start time of every character
of its text, from CTC forced alignment: `funasr_nano/alignment.py`) a cue starts at its first
character's time instead.

With diarization each cue carries a speaker: that of the segment's sentence it overlaps most (the
sentences' speakers come from the CTC-aligned times), else the segment's. SRT writes it as a
`Speaker 1: ` prefix, WebVTT as a voice tag, `<v Speaker 1>` (speakers numbered from 1 there).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

DEFAULT_MAX_CUE_SECONDS = 6.0
_SENTENCE_END = re.compile(r"(?<=[。！？!?])|(?<=\.)(?=\s|$)")
_CLAUSE_END = re.compile(r"(?<=[，,、；;：:])")


@dataclass(frozen=True)
class Cue:
    start: float
    end: float
    text: str
    speaker: int | None = None  # 0-based, as in the JSON; rendered from 1


def speaker_name(speaker: int) -> str:
    """How outputs name a speaker: `Speaker 1` for the first voice heard (speaker 0)."""
    return f"Speaker {speaker + 1}"


def _cue_speaker(seg: object, start: float, end: float) -> int | None:
    """The speaker of the sentence of `seg` the cue overlaps most, else the segment's own."""
    best, speaker = 0.0, getattr(seg, "speaker", None)
    for sentence in getattr(seg, "sentences", None) or []:
        if getattr(sentence, "speaker", None) is None:
            continue
        overlap = min(end, sentence.end) - max(start, sentence.start)
        if overlap > best:
            best, speaker = overlap, sentence.speaker
    return speaker


def _weight(text: str) -> int:
    return max(1, sum(1 for ch in text if not ch.isspace()))


def _split(text: str, pattern: re.Pattern[str]) -> list[str]:
    return [p.strip() for p in pattern.split(text) if p.strip()]


def split_sentences(text: str) -> list[str]:
    """Sentences of `text`, each keeping its closing mark."""
    return _split(text, _SENTENCE_END)


def _chop(piece: str, max_chars: int) -> list[str]:
    """`piece` in runs of at most `max_chars` characters (spaces not counted), cut at spaces when it has words."""
    max_chars = max(1, max_chars)
    words = piece.split()
    if len(words) == 1:  # no spaces (CJK): cut anywhere
        return [piece[i : i + max_chars] for i in range(0, len(piece), max_chars)]
    out: list[str] = []
    for word in words:
        if out and _weight(out[-1]) + _weight(word) <= max_chars:
            out[-1] = f"{out[-1]} {word}"
        else:
            out.extend(_chop(word, max_chars) if _weight(word) > max_chars else [word])
    return out


def _pieces(text: str, seconds: float, max_cue_seconds: float) -> list[str]:
    """Sentences, cut further where one would last longer than `max_cue_seconds` at the segment's pace."""
    total = _weight(text)
    pace = seconds / total  # seconds per character
    out: list[str] = []
    for sentence in split_sentences(text):
        if _weight(sentence) * pace <= max_cue_seconds:
            out.append(sentence)
            continue
        for clause in _split(sentence, _CLAUSE_END):
            dur = _weight(clause) * pace
            if dur <= max_cue_seconds:
                # glue short clauses back together while the cue stays short enough
                if out and out[-1] and _weight(out[-1]) * pace + dur <= max_cue_seconds and \
                        out[-1][-1] in "，,、；;：:":
                    out[-1] = _join(out[-1], clause)
                else:
                    out.append(clause)
            else:
                out.extend(_chop(clause, int(max_cue_seconds / pace)))
    return out


def _join(a: str, b: str) -> str:
    if a and b and a[-1].isascii() and b[0].isascii():
        return f"{a} {b}"
    return a + b


def segment_cues(start: float, end: float, text: str, max_cue_seconds: float = DEFAULT_MAX_CUE_SECONDS,
                 char_times: Sequence[float] | None = None) -> list[Cue]:
    """Cues tiling [start, end] for one segment's text.

    `char_times`, when given, holds one start time per character of `text` as passed (before
    whitespace is normalized); a list of another length is ignored (proportional times).
    """
    if char_times is not None and len(char_times) != len(text):
        char_times = None
    positions = [i for i, ch in enumerate(text) if not ch.isspace()]  # k-th non-space character -> index
    text = " ".join(text.split())
    if not text or end <= start:
        return []
    pieces = _pieces(text, end - start, max_cue_seconds)
    weights = [_weight(p) for p in pieces]
    total = sum(weights)
    bounds = [start]
    acc = 0
    for w in weights[:-1]:
        acc += w
        if char_times is not None and acc < len(positions):
            t = float(char_times[positions[acc]])
        else:
            t = start + (end - start) * acc / total
        bounds.append(min(end, max(bounds[-1], t)))
    bounds.append(end)
    return [Cue(a, b, p) for a, b, p in zip(bounds, bounds[1:], pieces)]


def transcript_cues(segments, max_cue_seconds: float = DEFAULT_MAX_CUE_SECONDS) -> list[Cue]:
    """Cues of every segment (objects with start, end, text and optionally char_times), in time order.

    Times are rounded to milliseconds; a cue that rounds to no duration is merged into its neighbour.
    """
    cues: list[Cue] = []
    for seg in segments:
        for cue in segment_cues(seg.start, seg.end, seg.text, max_cue_seconds, getattr(seg, "char_times", None)):
            a, b = round(cue.start, 3), round(cue.end, 3)
            if cues and a < cues[-1].end:
                a = cues[-1].end
            if b <= a:
                if cues and cues[-1].end >= a:
                    cues[-1] = Cue(cues[-1].start, cues[-1].end, _join(cues[-1].text, cue.text), cues[-1].speaker)
                continue
            cues.append(Cue(a, b, cue.text, _cue_speaker(seg, cue.start, cue.end)))
    return cues


def _timestamp(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, rest = divmod(ms, 3_600_000)
    m, rest = divmod(rest, 60_000)
    s, ms = divmod(rest, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def _clean(text: str) -> str:
    return " ".join(text.replace("-->", "->").split())


def render_srt(cues: Sequence[Cue]) -> str:
    def line(c: Cue) -> str:
        return _clean(c.text) if c.speaker is None else f"{speaker_name(c.speaker)}: {_clean(c.text)}"

    blocks = [
        f"{i}\n{_timestamp(c.start, ',')} --> {_timestamp(c.end, ',')}\n{line(c)}\n"
        for i, c in enumerate(cues, 1)
    ]
    return "\n".join(blocks)


def render_vtt(cues: Sequence[Cue]) -> str:
    def escape(text: str) -> str:
        return _clean(text).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")

    def line(c: Cue) -> str:
        return escape(c.text) if c.speaker is None else f"<v {speaker_name(c.speaker)}>{escape(c.text)}"

    blocks = [f"{_timestamp(c.start, '.')} --> {_timestamp(c.end, '.')}\n{line(c)}\n" for c in cues]
    return "WEBVTT\n\n" + "\n".join(blocks)
