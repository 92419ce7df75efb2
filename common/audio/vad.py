"""Voice activity detection with Silero VAD (ONNX, no torch): where the speech is in a long input.

The model is the `silero_vad.onnx` shipped in the PyPI package `silero-vad`. That package
imports torch, so inference never imports it: the exporter copies the ONNX file into the model
folder (`copy_vad_model`), and `find_vad_model` looks there first, then in the installed
package's data folder (located with `importlib.util.find_spec`, which does not import it).

The model (v5/v6) takes 512 new samples at 16 kHz per call, preceded by the last 64 samples of
the previous call (zeros at the start), plus its recurrent state (2, 1, 128); it returns the
speech probability of the window and the next state. Windows are 32 ms.

From the probabilities to segments (`SpeechSegmenter`, one pass, streaming):
speech starts at a window with p >= threshold, and ends once p stays below `threshold - 0.15`
for `min_silence_seconds`; segments shorter than `min_speech_seconds` are dropped, the rest are
padded by `pad_seconds` on each side, and a segment reaching `max_segment_seconds` is cut at
the quietest moment of its last seconds (the rule of `common.audio.segments`). Audio is only kept
for the segment in progress, so an hours-long stream needs bounded memory.
"""

from __future__ import annotations

import importlib.util
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.audio.segments import SampleSpan, split_at_quiet_points

VAD_FILE = "silero_vad.onnx"
SAMPLE_RATE = 16000
WINDOW = 512  # samples per model call at 16 kHz (32 ms)
CONTEXT = 64  # samples of the previous call the model sees again


class VadError(RuntimeError):
    """The VAD model is missing or unusable (one line for the user)."""


@dataclass(frozen=True)
class VadOptions:
    threshold: float = 0.5
    min_silence_seconds: float = 0.3
    min_speech_seconds: float = 0.25
    pad_seconds: float = 0.1
    max_segment_seconds: float = 30.0

    @property
    def neg_threshold(self) -> float:
        return max(0.01, self.threshold - 0.15)


def _package_model() -> Path | None:
    """silero_vad/data/silero_vad.onnx of the installed package, found without importing it (torch)."""
    try:
        spec = importlib.util.find_spec("silero_vad")
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        path = Path(location) / "data" / VAD_FILE
        if path.is_file():
            return path
    return None


def find_vad_model(model_dir: Path | str | None = None) -> Path | None:
    """The model folder's copy first, then the installed package's; None when neither exists."""
    if model_dir is not None and (Path(model_dir) / VAD_FILE).is_file():
        return Path(model_dir) / VAD_FILE
    return _package_model()


def copy_vad_model(out_dir: Path | str) -> Path | None:
    """Copy the package's silero_vad.onnx into `out_dir` (export time); None when the package is absent."""
    src = _package_model()
    if src is None:
        return None
    dst = Path(out_dir) / VAD_FILE
    dst.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dst)
    return dst


class SileroVad:
    """Speech probability per 32 ms window, streaming: `reset()`, then `feed()` blocks in order."""

    def __init__(self, path: Path | str, *, threads: int = 1, silence_floor: float = 1e-4) -> None:
        from common.models.encoder import open_session

        self.path = Path(path)
        self.silence_floor = silence_floor  # windows quieter than this (peak) skip the model; 0: never
        self.session = open_session(self.path, threads=threads)
        names = {i.name for i in self.session.get_inputs()}
        if not {"input", "state", "sr"} <= names:
            raise VadError(f"{self.path}: not a Silero VAD v5/v6 model (inputs {sorted(names)})")
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def reset(self) -> None:
        self._state = np.zeros((2, 1, 128), np.float32)
        self._context = np.zeros(CONTEXT, np.float32)
        self._pending = np.zeros(0, np.float32)

    def feed(self, samples: np.ndarray, last: bool = False) -> np.ndarray:
        """Probabilities of every complete window in the stream so far; with `last`, the tail too (zero-padded)."""
        x = np.concatenate([self._pending, np.asarray(samples, dtype=np.float32).reshape(-1)])
        n_full = len(x) // WINDOW
        if last and len(x) % WINDOW:
            x = np.concatenate([x, np.zeros(WINDOW - len(x) % WINDOW, np.float32)])
            n_full += 1
        probs = np.empty(n_full, np.float32)
        buf = np.empty((1, CONTEXT + WINDOW), np.float32)
        run = self.session.run
        for i in range(n_full):
            window = x[i * WINDOW : (i + 1) * WINDOW]
            if self.silence_floor > 0 and float(np.abs(window).max()) < self.silence_floor:
                # digital silence: no speech, and no model call (hours of it cost nothing); the
                # model starts afresh after it, as at the start of a file
                probs[i] = 0.0
                self._state = np.zeros_like(self._state)
                self._context = window[-CONTEXT:].copy()
                continue
            buf[0, :CONTEXT] = self._context
            buf[0, CONTEXT:] = window
            out, self._state = run(None, {"input": buf, "state": self._state, "sr": self._sr})
            probs[i] = out[0, 0]
            self._context = buf[0, -CONTEXT:].copy()
        self._pending = x[n_full * WINDOW :].copy()
        return probs

    def probabilities(self, wave: np.ndarray) -> np.ndarray:
        """One probability per 512-sample window of the whole waveform (the last window zero-padded)."""
        self.reset()
        probs = self.feed(wave, last=True)
        self.reset()
        return probs


class SpeechSegmenter:
    """Turns a stream of audio blocks into speech segments with their audio, keeping only what is pending."""

    def __init__(self, vad: SileroVad, options: VadOptions = VadOptions(), sample_rate: int = SAMPLE_RATE) -> None:
        if sample_rate != SAMPLE_RATE:
            raise VadError(f"Silero VAD runs at {SAMPLE_RATE} Hz, not {sample_rate}")
        self.vad = vad
        self.options = options
        self.sr = sample_rate
        sr = sample_rate
        self.min_silence = int(round(options.min_silence_seconds * sr))
        self.min_speech = int(round(options.min_speech_seconds * sr))
        # padding never bridges a gap the segmenter keeps: at most half the minimum silence
        self.pad = int(round(min(options.pad_seconds, options.min_silence_seconds / 2) * sr))
        self.limit = max(WINDOW * 4, int(round(options.max_segment_seconds * sr)))

    def segments(self, blocks: Iterable[np.ndarray]) -> Iterator[tuple[SampleSpan, np.ndarray]]:
        """(span in samples of the whole stream, its audio) for each speech segment, in order."""
        o = self.options
        self.vad.reset()
        buf = np.zeros(0, np.float32)  # audio from sample `buf_start` on
        buf_start = 0
        total = 0  # samples received
        win = 0  # windows classified
        start: int | None = None  # unpadded start of the speech in progress (samples)
        silence_from: int | None = None  # where the current run of low probabilities began
        iterator = iter(blocks)
        pending = next(iterator, None)
        while pending is not None:
            block = np.asarray(pending, dtype=np.float32).reshape(-1)
            pending = next(iterator, None)
            last = pending is None
            buf = np.concatenate([buf, block]) if len(buf) else block
            total += len(block)
            probs = self.vad.feed(block, last=last)
            for p in probs:
                w0 = win * WINDOW
                w1 = min(total, w0 + WINDOW)
                win += 1
                if start is None:
                    if p >= o.threshold:
                        start, silence_from = w0, None
                    continue
                if p < o.neg_threshold:
                    if silence_from is None:
                        silence_from = w0
                    if w1 - silence_from >= self.min_silence:
                        span = self._close(start, silence_from, total)
                        start, silence_from = None, None
                        if span is not None:
                            yield span, buf[span.start - buf_start : span.end - buf_start].copy()
                elif p >= o.threshold:
                    silence_from = None
                # too long: cut at the quietest moment before the limit, go on from there
                while start is not None and w1 - max(0, start - self.pad) >= self.limit:
                    lo = max(0, start - self.pad)
                    piece = buf[lo - buf_start : lo - buf_start + self.limit + 1]
                    cut = lo + split_at_quiet_points(piece, self.sr, self.limit / self.sr)[0].end
                    yield SampleSpan(lo, cut), buf[lo - buf_start : cut - buf_start].copy()
                    start = cut + self.pad  # no padding inside a cut segment
                    if silence_from is not None and silence_from < start - self.pad:
                        silence_from = start - self.pad
            # forget audio no segment can need any more
            keep_from = total - self.pad - WINDOW if start is None else max(0, start - self.pad)
            keep_from = max(buf_start, min(keep_from, total))
            buf = buf[keep_from - buf_start :]
            buf_start = keep_from
        if start is not None:
            end = silence_from if silence_from is not None else total
            span = self._close(start, end, total)
            if span is not None:
                yield span, buf[span.start - buf_start : span.end - buf_start].copy()

    def _close(self, start: int, end: int, total: int) -> SampleSpan | None:
        if end - start < self.min_speech:
            return None
        return SampleSpan(max(0, start - self.pad), min(total, end + self.pad))


def speech_spans(wave: np.ndarray, vad: SileroVad, options: VadOptions = VadOptions(),
                 sample_rate: int = SAMPLE_RATE) -> list[SampleSpan]:
    """Speech segments of a whole waveform (samples, end exclusive); [] when there is no speech."""
    return [span for span, _ in SpeechSegmenter(vad, options, sample_rate).segments([wave])]
