"""Cutting long audio into pieces the model can handle.

The model was trained on short segments: decoding a minute in one pass loops.
Without a VAD, inputs longer than `max_seconds` are cut at the quietest moment
near each boundary, so no audio is dropped and words are rarely split.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SampleSpan:
    """A stretch of the input in samples (end exclusive): where a segment lies, not the segment itself."""

    start: int
    end: int

    def seconds(self, sample_rate: int) -> tuple[float, float]:
        return self.start / sample_rate, self.end / sample_rate


def split_at_quiet_points(
    wave: np.ndarray,
    sample_rate: int = 16000,
    max_seconds: float = 30.0,
    search_seconds: float = 5.0,
    frame_seconds: float = 0.05,
) -> list[SampleSpan]:
    """Contiguous spans covering the whole input, each at most `max_seconds` long.

    Each cut is placed at the lowest-energy frame within the last `search_seconds`
    before the limit, so every span stays within the limit and the spans tile the
    input exactly.
    """
    n = int(wave.shape[0])
    limit = int(round(max_seconds * sample_rate))
    if n <= limit:
        return [SampleSpan(0, n)]
    frame = max(1, int(round(frame_seconds * sample_rate)))
    search = min(int(round(search_seconds * sample_rate)), limit - frame)
    spans: list[SampleSpan] = []
    start = 0
    while n - start > limit:
        lo, hi = start + limit - search, start + limit
        cut = _quietest_frame_start(wave[lo:hi], frame) + lo
        spans.append(SampleSpan(start, cut))
        start = cut
    spans.append(SampleSpan(start, n))
    return spans


def _quietest_frame_start(window: np.ndarray, frame: int) -> int:
    """Offset of the middle of the lowest-energy frame; the latest one on ties (longer segments)."""
    usable = (window.shape[0] // frame) * frame
    if usable == 0:
        return window.shape[0]
    energy = np.square(window[:usable].astype(np.float64)).reshape(-1, frame).sum(axis=1)
    idx = len(energy) - 1 - int(np.argmin(energy[::-1]))
    return idx * frame + frame // 2
