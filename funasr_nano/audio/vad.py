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
the quietest moment of its last seconds (the rule of `funasr_nano.audio.segments`). Audio is only kept
for the segment in progress, so an hours-long stream needs bounded memory.
"""

from __future__ import annotations

import copy
import importlib.util
import shutil
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from funasr_nano.audio.segments import SampleSpan, split_at_quiet_points

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
        from funasr_nano.models.encoder import open_session

        self.path = Path(path)
        self.silence_floor = silence_floor  # windows quieter than this (peak) skip the model; 0: never
        self.session = open_session(self.path, threads=threads)
        names = {i.name for i in self.session.get_inputs()}
        if not {"input", "state", "sr"} <= names:
            raise VadError(f"{self.path}: not a Silero VAD v5/v6 model (inputs {sorted(names)})")
        self._sr = np.array(SAMPLE_RATE, dtype=np.int64)
        self.reset()

    def stream(self) -> SileroVad:
        """A fresh stream on the same model: its own recurrent state, context and pending samples.

        The state belongs to one audio stream, so concurrent transcriptions each take their own
        (sharing one would carry one file's state into another's windows); the ONNX Runtime session,
        which may run from several threads at once, is shared.
        """
        other = copy.copy(self)
        other.reset()
        return other

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


@dataclass(frozen=True)
class SpeechStarted:
    """Speech has gone on for `min_speech_seconds`: a segment will follow; `sample` is its padded start."""

    sample: int


@dataclass(frozen=True)
class SpeechSegment:
    """A closed segment: its span in samples of the whole stream and its audio.

    `cut`: closed at `max_segment_seconds` while the speech goes on (the next segment starts there).
    """

    span: SampleSpan
    audio: np.ndarray
    cut: bool = False


class SpeechSegmenter:
    """Turns a stream of audio blocks into speech segments with their audio, keeping only what is pending.

    Push-based at its core, for live audio: `push(block)` returns what the block completed
    (`SpeechStarted`, `SpeechSegment`), `finish()` ends the stream, `commit()` closes the speech in
    progress on request, `open_segment()` is the audio of the speech in progress. `segments(blocks)`
    wraps it for a whole input; both give the same spans whatever the block sizes.
    """

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
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self.vad.reset()
        self._buf = np.zeros(0, np.float32)  # audio from sample `_buf_start` on
        self._buf_start = 0
        self.total = 0  # samples received
        self._win = 0  # windows classified
        self._start: int | None = None  # unpadded start of the speech in progress (samples)
        self._silence_from: int | None = None  # where the current run of low probabilities began
        self._announced = False  # SpeechStarted given for the speech in progress

    @property
    def in_speech(self) -> bool:
        """Whether a segment is open and announced (`SpeechStarted` given, not yet closed)."""
        return self._start is not None and self._announced

    def open_segment(self) -> tuple[int, np.ndarray] | None:
        """(padded start, audio so far) of the announced speech in progress; None outside speech."""
        if not self.in_speech:
            return None
        assert self._start is not None
        lo = max(0, self._start - self.pad)
        return lo, self._buf[lo - self._buf_start:]

    def segments(self, blocks: Iterable[np.ndarray]) -> Iterator[tuple[SampleSpan, np.ndarray]]:
        """(span in samples of the whole stream, its audio) for each speech segment, in order."""
        self.reset()
        iterator = iter(blocks)
        pending = next(iterator, None)
        while pending is not None:
            block = pending
            pending = next(iterator, None)
            for event in self.push(block, last=pending is None):
                if isinstance(event, SpeechSegment):
                    yield event.span, event.audio
        for event in self.finish():
            if isinstance(event, SpeechSegment):
                yield event.span, event.audio

    def push(self, block: np.ndarray, last: bool = False) -> list[SpeechStarted | SpeechSegment]:
        """Feed the next block; `last`: the stream ends with it (its partial window is classified too)."""
        o = self.options
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        self._buf = np.concatenate([self._buf, block]) if len(self._buf) else block
        self.total += len(block)
        total = self.total
        out: list[SpeechStarted | SpeechSegment] = []
        for p in self.vad.feed(block, last=last):
            w0 = self._win * WINDOW
            w1 = min(total, w0 + WINDOW)
            self._win += 1
            if self._start is None:
                if p >= o.threshold:
                    self._start, self._silence_from, self._announced = w0, None, False
                continue
            elif p < o.neg_threshold:
                if self._silence_from is None:
                    self._silence_from = w0
                if w1 - self._silence_from >= self.min_silence:
                    segment = self._close(self._start, self._silence_from, total)
                    self._start, self._silence_from = None, None
                    if segment is not None:
                        out.append(segment)
                    continue
            elif p >= o.threshold:
                self._silence_from = None
            # announced once it is long enough never to be dropped as too short
            if not self._announced and self._silence_from is None and w1 - self._start >= self.min_speech:
                self._announced = True
                out.append(SpeechStarted(max(0, self._start - self.pad)))
            # too long: cut at the quietest moment before the limit, go on from there
            while self._start is not None and w1 - max(0, self._start - self.pad) >= self.limit:
                lo = max(0, self._start - self.pad)
                piece = self._buf[lo - self._buf_start: lo - self._buf_start + self.limit + 1]
                cut = lo + split_at_quiet_points(piece, self.sr, self.limit / self.sr)[0].end
                out.append(SpeechSegment(SampleSpan(lo, cut), self._audio(lo, cut), cut=True))
                self._start = cut + self.pad  # no padding inside a cut segment
                self._announced = False
                if self._silence_from is not None and self._silence_from < self._start - self.pad:
                    self._silence_from = self._start - self.pad
        self._forget()
        return out

    def finish(self) -> list[SpeechStarted | SpeechSegment]:
        """End of the stream: the speech in progress becomes the last segment (if long enough)."""
        if self._start is None:
            return []
        end = self._silence_from if self._silence_from is not None else self.total
        segment = self._close(self._start, end, self.total)
        self._start, self._silence_from = None, None
        return [segment] if segment is not None else []

    def commit(self) -> SpeechSegment | None:
        """Close the speech in progress now (a client's commit); None when there is none long enough."""
        segment = self.finish()
        self._forget()
        return segment[0] if segment else None  # type: ignore[return-value]

    def _close(self, start: int, end: int, total: int) -> SpeechSegment | None:
        self._announced = False
        if end - start < self.min_speech:
            return None
        span = SampleSpan(max(0, start - self.pad), min(total, end + self.pad))
        return SpeechSegment(span, self._audio(span.start, span.end))

    def _audio(self, lo: int, hi: int) -> np.ndarray:
        return self._buf[lo - self._buf_start: hi - self._buf_start].copy()

    def _forget(self) -> None:
        """Drop audio no segment can need any more."""
        total = self.total
        keep_from = total - self.pad - WINDOW if self._start is None else max(0, self._start - self.pad)
        keep_from = max(self._buf_start, min(keep_from, total))
        self._buf = self._buf[keep_from - self._buf_start:]
        self._buf_start = keep_from


def speech_spans(wave: np.ndarray, vad: SileroVad, options: VadOptions = VadOptions(),
                 sample_rate: int = SAMPLE_RATE) -> list[SampleSpan]:
    """Speech segments of a whole waveform (samples, end exclusive); [] when there is no speech."""
    return [span for span, _ in SpeechSegmenter(vad, options, sample_rate).segments([wave])]
