"""Speaker turns from clustered windows, and a speaker for each segment and sentence.

funasr (`funasr/models/campplus/utils.py`, `postprocess` and `distribute_spk`, called by
`AutoModel.inference_with_vad`) turns the windows' labels into turns and the turns into a speaker
per sentence; the same steps here:

1. labels renumbered by first appearance in time (the first voice heard is speaker 0);
2. consecutive windows of one speaker that touch or overlap merged into one turn;
3. where two turns overlap (windows overlap by 0.75 s), the boundary put in the middle;
4. turns shorter than 0.7 s (times rounded to 10 ms first) given to the neighbour closer in time,
   then merged again;
5. each sentence (start, end) gets the speaker of the turn it overlaps most, with funasr's
   bookkeeping exactly: a turn of the speaker already chosen adds its overlap to that speaker's
   best overlap, so a speaker who holds a sentence in several pieces keeps it; no overlap at all
   gives speaker 0.

For Fun-ASR-Nano funasr's "sentences" are the VAD segments (it has timestamps, so it runs no
punctuation model and falls back to `spk_mode="vad_segment"`): our segments get their speaker
exactly that way, and our sentences (CTC-aligned, finer) get theirs by the same rule.

`Diarizer` collects the windows' embeddings segment by segment while the transcription streams
(the samples are not kept: 192 floats per 0.75 s of speech) and clusters them once at the end.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import numpy as np

from funasr_nano.speakers.clustering import SpeakerCount, cluster_speakers

if TYPE_CHECKING:
    from funasr_nano.audio.segments import SampleSpan
    from funasr_nano.output.results import Segment

log = logging.getLogger(__name__)

MIN_TURN_SECONDS = 0.7  # funasr smooth()'s mindur
OVERLAP_EPSILON = 1e-4  # funasr postprocess(): turns overlap when one ends this much after the next starts


@dataclass
class Turn:
    """A stretch of one speaker (seconds)."""

    start: float
    end: float
    speaker: int


def first_appearance(labels: Sequence[int]) -> np.ndarray:
    """funasr's correct_labels: renumber so that labels appear in the order 0, 1, 2, ..."""
    mapping: dict[int, int] = {}
    return np.array([mapping.setdefault(int(label), len(mapping)) for label in labels], dtype=np.int64)


def _merge_consecutive(turns: list[Turn]) -> list[Turn]:
    """funasr's merge_seque: a turn joins the previous one when it has the same speaker and does not start
    after the previous one ends."""
    out = [turns[0]]
    for turn in turns[1:]:
        if turn.speaker != out[-1].speaker or turn.start > out[-1].end:
            out.append(turn)
        else:
            out[-1].end = turn.end
    return out


def _smooth(turns: list[Turn], min_seconds: float = MIN_TURN_SECONDS) -> list[Turn]:
    """funasr's smooth: short turns take the speaker of the nearer neighbour (earlier decisions seen by later
    ones, as funasr loops), then same-speaker neighbours merge."""
    if len(turns) < 2:
        return turns
    for i, turn in enumerate(turns):
        turn.start, turn.end = round(turn.start, 2), round(turn.end, 2)
        if turn.end - turn.start < min_seconds:
            if i == 0:
                turn.speaker = turns[i + 1].speaker
            elif i == len(turns) - 1:
                turn.speaker = turns[i - 1].speaker
            elif turn.start - turns[i - 1].end <= turns[i + 1].start - turn.end:
                turn.speaker = turns[i - 1].speaker
            else:
                turn.speaker = turns[i + 1].speaker
    return _merge_consecutive(turns)


def speaker_turns(windows: Sequence[tuple[float, float]], labels: Sequence[int]) -> list[Turn]:
    """funasr's postprocess: the windows (start, end seconds, in time order) and their cluster labels as turns."""
    if len(windows) != len(labels):
        raise ValueError(f"{len(windows)} windows but {len(labels)} labels")
    if not len(windows):
        return []
    renumbered = first_appearance(labels)
    turns = _merge_consecutive([Turn(float(s), float(e), int(k)) for (s, e), k in zip(windows, renumbered)])
    for prev, turn in zip(turns, turns[1:]):
        if prev.end > turn.start + OVERLAP_EPSILON:
            middle = (turn.start + prev.end) / 2
            turn.start = prev.end = middle
    return _smooth(turns)


def speaker_of(start: float, end: float, turns: Sequence[Turn]) -> int:
    """funasr's distribute_spk for one sentence (times in seconds; funasr compares milliseconds, the same
    order). Speaker 0 when no turn overlaps it."""
    start_ms, end_ms = start * 1000, end * 1000
    speaker, best = 0, 0.0
    for turn in turns:
        overlap = max(min(end_ms, turn.end * 1000) - max(start_ms, turn.start * 1000), 0)
        if overlap > best:
            best, speaker = overlap, turn.speaker
        if overlap > 0 and speaker == turn.speaker:
            best += overlap
    return int(speaker)


@dataclass
class Diarization:
    """The result: turns, the number of speakers, the seconds spent (embeddings and clustering)."""

    turns: list[Turn]
    speakers: int
    windows: int
    embed_seconds: float
    cluster_seconds: float

    def speaker_of(self, start: float, end: float) -> int:
        return speaker_of(start, end, self.turns)


@dataclass
class Diarizer:
    """One input's windows and embeddings, collected segment by segment, clustered once by `finish`."""

    embedder: object  # funasr_nano.speakers.embeddings.SpeakerEmbedder (or anything with its `segment`)
    count: SpeakerCount = SpeakerCount()
    sample_rate: int = 16000
    windows: list[tuple[float, float]] = field(default_factory=list)
    _parts: list[np.ndarray] = field(default_factory=list)
    embed_seconds: float = 0.0

    def add_segment(self, start_sample: int, wave: np.ndarray) -> None:
        """Embed a speech segment's windows (every VAD segment, as funasr does, decoded or not)."""
        t0 = time.perf_counter()
        windows, embeddings = self.embedder.segment(start_sample / self.sample_rate, wave, self.sample_rate)
        self.windows += windows
        self._parts.append(embeddings)
        self.embed_seconds += time.perf_counter() - t0

    def tap(self, pieces: Iterable[tuple[SampleSpan, np.ndarray]]) -> Iterator[tuple[SampleSpan, np.ndarray]]:
        """Pass the engine's (span, audio) pieces on, embedding each one's windows on the way."""
        for span, audio in pieces:
            self.add_segment(span.start, audio)
            yield span, audio

    def label(self, segments: Sequence[Segment]) -> Diarization:
        """Cluster everything collected and set each segment's and sentence's `speaker`."""
        found = self.finish()
        for segment in segments:
            segment.speaker = found.speaker_of(segment.start, segment.end)
            segment.sentences = [replace(s, speaker=found.speaker_of(s.start, s.end)) for s in segment.sentences]
        return found

    def embeddings(self) -> np.ndarray:
        if not self._parts:
            return np.zeros((0, 192), np.float32)
        return np.concatenate(self._parts)

    def finish(self) -> Diarization:
        t0 = time.perf_counter()
        embeddings = self.embeddings()
        order = np.argsort([s for s, _ in self.windows], kind="stable")  # funasr sorts the windows by start
        windows = [self.windows[i] for i in order]
        labels = cluster_speakers(embeddings[order], self.count) if len(windows) else np.zeros(0, np.int64)
        turns = speaker_turns(windows, labels)
        speakers = len({t.speaker for t in turns})
        seconds = time.perf_counter() - t0
        log.info("diarization: %d windows, %d speakers (embeddings %.2f s, clustering %.2f s)", len(windows),
                 speakers, self.embed_seconds, seconds)
        return Diarization(turns, speakers, len(windows), self.embed_seconds, seconds)
