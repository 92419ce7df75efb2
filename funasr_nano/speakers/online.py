"""Speakers of a live stream, decided segment by segment as each one ends: online, not funasr's clustering.

Offline diarization (`funasr_nano.speakers.diarize`) waits for the whole input, then clusters every
window at once (spectral clustering, the count from the eigengap): a speaker heard late can still
split or merge earlier turns. A live stream cannot wait, so each final segment gets its speaker
the moment it ends, and keeps it:

1. the segment's embedding is the mean of its CAM++ windows (the offline windows: 1.5 s every
   0.75 s, a short segment one zero-padded window), L2-normalised;
2. it is compared (cosine) with each speaker seen so far in the stream, that speaker's running
   mean of the normalised segment embeddings assigned to it;
3. the closest speaker takes it when the cosine is at least `threshold`, and its mean moves
   towards it; otherwise it is a new speaker, numbered in order of appearance (0 first), unless
   `max_speakers` are already known: then the closest takes it whatever the cosine.

So the labels are those of a greedy, order-dependent assignment: they can differ from what
`--diarize` finds on a recording of the same stream (no merging or splitting after the fact, no
count from the eigengap, a threshold where the offline clustering has none), and a first segment
that is short or noisy makes a poorer reference than a cluster of many windows. What each
speaker holds is 192 floats and a count: memory does not grow with the stream.

The threshold. The CAM++ release's own verification threshold for a pair of utterances is 0.31
(`yesOrno_thr` in its configuration.json), and funasr merges offline clusters whose mean
embeddings reach 0.78 (`clustering.MERGE_THRESHOLD`). A segment against a speaker's running mean
lies between the two (a mean is less noisy than one utterance, a segment noisier than a cluster):
DEFAULT_THRESHOLD is 0.5, between them. It is not tuned on real speech here (the tests run
random-weight checkpoints); `RealtimeConfig.speaker_threshold` changes it per server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from funasr_nano.speakers.clustering import DEFAULT_MAX_SPEAKERS

log = logging.getLogger(__name__)

DEFAULT_THRESHOLD = 0.5  # cosine to a speaker's running mean at which a segment is that speaker's (see above)
DEFAULT_MAX_ONLINE_SPEAKERS = DEFAULT_MAX_SPEAKERS  # as the offline search: funasr's 15


def segment_embedding(embedder: object, wave: np.ndarray, sample_rate: int = 16000) -> np.ndarray | None:
    """The mean of a segment's CAM++ window embeddings, L2-normalised; None for a segment without samples.

    `embedder`: a `funasr_nano.speakers.embeddings.SpeakerEmbedder` (or anything with its `segment`)."""
    if wave.size == 0:
        return None
    _, embeddings = embedder.segment(0.0, np.asarray(wave, dtype=np.float32), sample_rate)
    if embeddings.shape[0] == 0:
        return None
    return _unit(embeddings.mean(axis=0))


def _unit(vector: np.ndarray) -> np.ndarray | None:
    norm = float(np.linalg.norm(vector))
    if not np.isfinite(norm) or norm == 0.0:
        return None
    return (vector / norm).astype(np.float32)


@dataclass
class OnlineSpeakers:
    """One stream's speakers: `assign(embedding)` gives a segment's speaker (see the module docstring)."""

    threshold: float = DEFAULT_THRESHOLD
    max_speakers: int = DEFAULT_MAX_ONLINE_SPEAKERS
    _sums: list[np.ndarray] = field(default_factory=list)  # per speaker: the sum of its unit embeddings
    _counts: list[int] = field(default_factory=list)
    _last: int | None = None  # the speaker of the last segment (a segment without samples gets it too)

    def __post_init__(self) -> None:
        if not -1.0 <= self.threshold <= 1.0:
            raise ValueError(f"speaker threshold {self.threshold} is not a cosine (-1 to 1)")
        if self.max_speakers < 1:
            raise ValueError(f"max_speakers must be at least 1, not {self.max_speakers}")

    @property
    def speakers(self) -> int:
        """How many speakers the stream has had so far."""
        return len(self._counts)

    def assign(self, embedding: np.ndarray | None) -> int:
        """The speaker of a segment whose (unit) embedding this is; None (no samples): the last speaker, or 0."""
        unit = None if embedding is None else _unit(np.asarray(embedding, dtype=np.float64))
        if unit is None:
            return 0 if self._last is None else self._last
        if not self._sums:
            return self._new(unit)
        means = np.stack([s / np.linalg.norm(s) for s in self._sums])
        scores = means @ unit
        best = int(np.argmax(scores))
        if scores[best] < self.threshold and self.speakers < self.max_speakers:
            speaker = self._new(unit)
        else:
            self._sums[best] = self._sums[best] + unit
            self._counts[best] += 1
            speaker = best
        log.debug("online speakers: cosines %s -> speaker %d", np.round(scores, 3).tolist(), speaker)
        self._last = speaker
        return speaker

    def _new(self, unit: np.ndarray) -> int:
        self._sums.append(unit.astype(np.float64))
        self._counts.append(1)
        self._last = len(self._counts) - 1
        return self._last
