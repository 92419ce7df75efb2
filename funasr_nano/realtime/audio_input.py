"""Live audio in: PCM16 bytes to float samples, any accepted rate to the model's 16 kHz, and manual turns."""

from __future__ import annotations

import numpy as np

from funasr_nano.audio.segments import SampleSpan, split_at_quiet_points
from funasr_nano.audio.vad import SpeechSegment
from funasr_nano.realtime.settings import MODEL_RATE


def pcm16_samples(data: bytes) -> np.ndarray:
    """Little-endian 16-bit mono PCM as float32 in [-1, 1) (the scale libsndfile gives a 16-bit WAV)."""
    if len(data) % 2:
        raise ValueError(f"PCM16 audio needs an even number of bytes, got {len(data)}")
    return np.frombuffer(data, dtype="<i2").astype(np.float32) / 32768.0


class StreamResampler:
    """Any accepted input rate to 16 kHz with soxr's streaming resampler; 16 kHz passes through untouched."""

    def __init__(self, rate: int) -> None:
        self.rate = int(rate)
        self._stream = None
        if self.rate != MODEL_RATE:
            import soxr

            self._stream = soxr.ResampleStream(self.rate, MODEL_RATE, 1, dtype="float32", quality="HQ")

    def __call__(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        if self._stream is None:
            return samples
        return self._stream.resample_chunk(np.ascontiguousarray(samples, dtype=np.float32), last=last)


class ManualTurns:
    """Segments without a VAD (OpenAI's `turn_detection: null`): everything between two commits.

    The same interface as `funasr_nano.audio.vad.SpeechSegmenter`'s push side. A turn longer than
    `max_segment_seconds` is cut at its quietest moment before the limit, like offline audio.
    """

    def __init__(self, max_segment_seconds: float) -> None:
        self.limit = int(round(max_segment_seconds * MODEL_RATE))
        self._parts: list[np.ndarray] = []
        self._start = 0  # stream sample where the open turn starts
        self._length = 0
        self.total = 0

    @property
    def in_speech(self) -> bool:
        return self._length > 0

    def open_segment(self) -> tuple[int, np.ndarray] | None:
        if not self._length:
            return None
        audio = np.concatenate(self._parts)
        self._parts = [audio]
        return self._start, audio

    def push(self, block: np.ndarray, last: bool = False) -> list[SpeechSegment]:
        self._parts.append(np.asarray(block, dtype=np.float32).reshape(-1))
        self._length += len(block)
        self.total += len(block)
        out: list[SpeechSegment] = []
        while self._length > self.limit:
            audio = np.concatenate(self._parts)
            cut = split_at_quiet_points(audio[: self.limit + 1], MODEL_RATE, self.limit / MODEL_RATE)[0].end
            out.append(SpeechSegment(SampleSpan(self._start, self._start + cut), audio[:cut].copy(), cut=True))
            self._parts, self._start, self._length = [audio[cut:]], self._start + cut, len(audio) - cut
        return out

    def finish(self) -> list[SpeechSegment]:
        segment = self.commit()
        return [segment] if segment is not None else []

    def commit(self) -> SpeechSegment | None:
        if not self._length:
            return None
        audio = np.concatenate(self._parts)
        segment = SpeechSegment(SampleSpan(self._start, self._start + len(audio)), audio)
        self._parts, self._start, self._length = [], self._start + len(audio), 0
        return segment
