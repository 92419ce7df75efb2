"""FunASR's FSMN-VAD (the official pipeline's `vad_model="fsmn-vad"`) on onnxruntime, streamed, no torch.

The export (`funasr_nano/export/export_fsmn_vad.py`) writes `fsmn_vad.onnx` (the FSMN scorer, its
four memory caches as explicit inputs and outputs) and `fsmn_vad.json` (the release's frontend
settings, end-point settings and CMVN) into the model folder. Everything else is numpy here:

- frontend (funasr's `WavFrontendOnline` as the release configures it): Kaldi fbank of each 25 ms
  frame (`funasr_nano.audio.features.fbank`, kaldi-native-fbank as funasr runs it), LFR 5/1 (each
  row the frame with 2 before and 2 after, the first frame repeated at the start, the last at the
  end), CMVN from am.mvn; and each frame's energy in dB, which funasr computes beside the scores;
- end-point detection: funasr's `FsmnVADStreaming` state machine (`funasr/models/
  fsmn_vad_streaming/model.py`), frame by frame, reproduced exactly: a 200 ms window votes a
  frame speech or silence from its silence score, a segment starts 400 ms before the window turns
  to speech (never before the end of the last one), and ends after a silence whose length the
  official offline call sets per 60 s chunk of the input (`DEFAULT_SILENCE_SCHEDULE`: 2 s while no
  speech crossed the chunk's start, 200 ms then 100 ms for speech that goes on across chunks), or
  at `max_single_segment_time` (30 s as the official pipeline passes it), or at the end of input.

funasr's offline call feeds the input in 60 s chunks (`chunk_size` 60000) and changes the silence
rule between chunks, so where those chunks fall matters; this module finds funasr's chunk edges
from the sample count alone, whatever the blocks it is given, so any block sizes give funasr's
segments exactly. Memory is bounded: only the audio of the open segment (at most 30 s), a few
frames of context and the four caches are kept.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from funasr_nano.audio.features import FrontendConfig, fbank, num_fbank_frames
from funasr_nano.audio.segments import SampleSpan
from funasr_nano.audio.vad import SpeechSegment, SpeechStarted, VadError

log = logging.getLogger(__name__)

FSMN_VAD_FILE = "fsmn_vad.onnx"
FSMN_SETTINGS_FILE = "fsmn_vad.json"
FSMN_RELEASE_ID = "iic/speech_fsmn_vad_zh-cn-16k-common-pytorch"
SAMPLE_RATE = 16000
OFFICIAL_MAX_SEGMENT_MS = 30000  # AutoModel(..., vad_kwargs={"max_single_segment_time": 30000})
OFFICIAL_CHUNK_MS = 60000  # FsmnVADStreaming.inference's default chunk_size for a whole input
# (speech so far in ms, end silence in ms): funasr's DEFAULT_SILENCE_SCHEDULE for whole inputs
DEFAULT_SILENCE_SCHEDULE: tuple[tuple[float, int], ...] = (
    (10000, 2000), (20000, 1000), (30000, 800), (40000, 600), (50000, 400), (60000, 200), (math.inf, 100))
DYNAMIC_SPEECH_NOISE_THRES = 0.5  # what funasr's dynamic schedule sets, whatever config.yaml says

_START_NOT_DETECTED, _IN_SPEECH, _END_DETECTED = 1, 2, 3
# the window detector's transitions (funasr's AudioChangeState)
_SPEECH2SPEECH, _SPEECH2SIL, _SIL2SIL, _SIL2SPEECH = 0, 1, 2, 3


def find_fsmn_vad_model(model_dir: Path | str | None) -> Path | None:
    """The model folder's fsmn_vad.onnx when it and its settings are there; None otherwise."""
    if model_dir is None:
        return None
    path = Path(model_dir) / FSMN_VAD_FILE
    return path if path.is_file() and (Path(model_dir) / FSMN_SETTINGS_FILE).is_file() else None


@dataclass(frozen=True)
class EndpointOptions:
    """funasr's VADXOptions fields the end-point detection reads (values from the release's model_conf)."""

    max_end_silence_time: int = 800
    max_start_silence_time: int = 3000
    detect_mode: int = 1  # 1: many utterances (the release); 0: stop after the first
    window_size_ms: int = 200
    sil_to_speech_time_thres: int = 150
    speech_to_sil_time_thres: int = 150
    speech_2_noise_ratio: float = 1.0
    do_extend: int = 1
    lookback_time_start_point: int = 200
    lookahead_time_end_point: int = 100
    max_single_segment_time: int = OFFICIAL_MAX_SEGMENT_MS
    snr_thres: float = -100.0
    noise_frame_num_used_for_snr: int = 100
    decibel_thres: float = -100.0
    speech_noise_thres: float = 0.6
    fe_prior_thres: float = 1e-4
    sil_pdf_ids: tuple[int, ...] = (0,)
    frame_in_ms: int = 10
    frame_length_ms: int = 25
    # funasr's offline call: chunk length and the silence schedule it applies per chunk (dynamic_silence,
    # on unless a caller passes max_end_silence_time to generate())
    chunk_ms: int = OFFICIAL_CHUNK_MS
    dynamic_silence: bool = True
    silence_schedule: tuple[tuple[float, int], ...] = DEFAULT_SILENCE_SCHEDULE

    @classmethod
    def from_model_conf(cls, conf: dict[str, Any], **overrides: Any) -> EndpointOptions:
        """The release's model_conf (unknown keys ignored), then `overrides` (e.g. max_single_segment_time)."""
        names = set(cls.__dataclass_fields__)
        values = {k: v for k, v in conf.items() if k in names}
        if "sil_pdf_ids" in values:
            values["sil_pdf_ids"] = tuple(int(i) for i in values["sil_pdf_ids"])
        values.update(overrides)
        return cls(**values)


@dataclass(frozen=True)
class FsmnSettings:
    """fsmn_vad.json: what the export took from the release besides the weights."""

    frontend: FrontendConfig
    cmvn: np.ndarray  # (2, 400): shift, scale
    model_conf: dict[str, Any] = field(default_factory=dict)
    source: str = ""

    @classmethod
    def load(cls, path: Path | str) -> FsmnSettings:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
        frontend = FrontendConfig.from_dict(data["frontend_conf"])
        if frontend.lfr_n != 1:
            raise VadError(f"{path}: lfr_n={frontend.lfr_n}; the FSMN-VAD frontend here supports lfr_n 1 only")
        cmvn = np.asarray(data["cmvn"], dtype=np.float32)
        return cls(frontend, cmvn, dict(data.get("model_conf", {})), str(data.get("source", "")))


class FsmnVad:
    """The ONNX session and the release settings, opened once per engine and shared by every stream."""

    def __init__(self, path: Path | str, *, threads: int = 1) -> None:
        from funasr_nano.models.encoder import open_session

        self.path = Path(path)
        self.settings = FsmnSettings.load(self.path.with_name(FSMN_SETTINGS_FILE))
        self.session = open_session(self.path, threads=threads)
        names = [i.name for i in self.session.get_inputs()]
        if not names or names[0] != "feats":
            raise VadError(f"{self.path}: not an FSMN-VAD export (inputs {names})")
        self.cache_shapes = [tuple(int(d) for d in i.shape) for i in self.session.get_inputs()[1:]]
        self.cache_names = names[1:]

    def new_caches(self) -> list[np.ndarray]:
        return [np.zeros(shape, np.float32) for shape in self.cache_shapes]

    def scores(self, feats: np.ndarray, caches: list[np.ndarray]) -> tuple[np.ndarray, list[np.ndarray]]:
        """(T, output_dim) posteriors of `feats` (T, 400) and the caches after them."""
        feeds = {"feats": feats[None].astype(np.float32, copy=False)}
        feeds.update(zip(self.cache_names, caches, strict=True))
        out = self.session.run(None, feeds)
        return out[0][0], list(out[1:])


def frame_decibels(frames: np.ndarray) -> np.ndarray:
    """Each (copied, contiguous) frame's energy as funasr's ComputeDecibel computes it, in float32."""
    return 10 * np.log10(np.sum(np.square(frames), axis=1) + 0.000001)


class FsmnFrontend:
    """funasr's WavFrontendOnline for the VAD, streaming: samples in, (LFR + CMVN rows, frame dB) out.

    A row needs the 2 frames after it, so rows come 2 frames behind the audio until `finish`,
    which repeats the last frame for the final rows as funasr does.
    """

    def __init__(self, cfg: FrontendConfig, cmvn: np.ndarray, backend: str = "auto") -> None:
        self.cfg = cfg
        self.shift_cmvn = cmvn[0, : cfg.feature_dim].astype(np.float32)
        self.scale_cmvn = cmvn[1, : cfg.feature_dim].astype(np.float32)
        self.ctx = (cfg.lfr_m - 1) // 2
        self.backend = backend
        self.reset()

    def reset(self) -> None:
        self._pending = np.zeros(0, np.float32)  # samples from frame `frames` on
        self.frames = 0  # fbank frames computed
        self.rows = 0  # LFR rows given out
        self._fb = np.zeros((0, self.cfg.n_mels), np.float32)  # fbank frames from `_fb_start` on
        self._fb_start = 0
        self._db = np.zeros(0, np.float32)  # dB of frames from `rows` on

    def push(self, samples: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        cfg = self.cfg
        x = np.concatenate([self._pending, np.asarray(samples, np.float32).reshape(-1)])
        n = num_fbank_frames(len(x), cfg)
        if n:
            used = x[: (n - 1) * cfg.frame_shift + cfg.frame_length]
            idx = (np.arange(n) * cfg.frame_shift)[:, None] + np.arange(cfg.frame_length)[None, :]
            self._db = np.concatenate([self._db, frame_decibels(used[idx])])
            self._fb = np.concatenate([self._fb, fbank(used, cfg, backend=self.backend)])
            self.frames += n
            x = x[n * cfg.frame_shift:]
        self._pending = x.copy()
        return self._rows(self.frames - self.ctx)

    def finish(self) -> tuple[np.ndarray, np.ndarray]:
        return self._rows(self.frames)

    def _rows(self, last: int) -> tuple[np.ndarray, np.ndarray]:
        first = self.rows
        k = max(0, last - first)
        m, dim = self.cfg.lfr_m, self.cfg.feature_dim
        if k == 0:
            return np.zeros((0, dim), np.float32), np.zeros(0, np.float32)
        idx = np.arange(first, last)[:, None] + np.arange(-self.ctx, m - self.ctx)[None, :]
        np.clip(idx, 0, self.frames - 1, out=idx)
        feats = self._fb[idx - self._fb_start].reshape(k, dim)
        feats = (feats + self.shift_cmvn) * self.scale_cmvn
        db, self._db = self._db[:k], self._db[k:]
        self.rows = last
        keep = max(self._fb_start, last - self.ctx)
        self._fb = self._fb[keep - self._fb_start:]
        self._fb_start = keep
        return np.ascontiguousarray(feats, dtype=np.float32), db


class _WindowDetector:
    """funasr's WindowDetector: a window of frame votes turns silence to speech and back."""

    def __init__(self, o: EndpointOptions) -> None:
        self.size = int(o.window_size_ms / o.frame_in_ms)
        self.to_speech = int(o.sil_to_speech_time_thres / o.frame_in_ms)
        self.to_sil = int(o.speech_to_sil_time_thres / o.frame_in_ms)
        self.reset()

    def reset(self) -> None:
        self.votes = [0] * self.size
        self.total = 0
        self.pos = 0
        self.speech = False

    def detect(self, speech: bool) -> int:
        vote = 1 if speech else 0
        self.total += vote - self.votes[self.pos]
        self.votes[self.pos] = vote
        self.pos = (self.pos + 1) % self.size
        if not self.speech and self.total >= self.to_speech:
            self.speech = True
            return _SIL2SPEECH
        if self.speech and self.total <= self.to_sil:
            self.speech = False
            return _SPEECH2SIL
        return _SPEECH2SPEECH if self.speech else _SIL2SIL


class EndpointDetector:
    """funasr's FsmnVADStreaming end-point detection, one frame at a time; `events` collects its results.

    Events: ("start", start_frame) when a segment opens; ("end", start_ms, end_ms, cut) when it
    closes (`cut`: at max_single_segment_time). Frame t covers t * 10 ms; a segment's end is one
    frame past its last frame, as funasr reports it.
    """

    def __init__(self, options: EndpointOptions) -> None:
        self.o = options
        self.window = _WindowDetector(options)
        self.latency = self.window.size + (int(options.lookback_time_start_point / options.frame_in_ms)
                                           if options.do_extend else 0)
        self.events: list[tuple] = []
        # funasr's Stats that outlive a segment
        self.frames = 0
        self.buf_start_frame = 0  # data_buf_start_frame: a segment never starts before it
        self.noise_db = -100.0
        self.ends = 0  # number_end_time_detected
        self.max_end_sil = options.max_end_silence_time - options.speech_to_sil_time_thres
        self.speech_noise_thres = options.speech_noise_thres
        # the offline call's per-chunk schedule
        self.accumulated_ms = 0.0
        self.in_speech_across = False
        self.ended_in_chunk = False
        self.seg: list[int] | None = None  # [start_ms, end_ms] of the segment being written
        self._reset_detection()

    def _reset_detection(self) -> None:
        self.silence_run = 0
        self.latest_speech = 0
        self.latest_silence = -1
        self.start_frame = -1
        self.end_frame = -1
        self.state = _START_NOT_DETECTED
        self.window.reset()

    # -------------------------------------------------------------- the offline call's chunks

    def chunk_start(self) -> None:
        """A new 60 s chunk of funasr's offline call begins: its silence rule for the chunk."""
        o = self.o
        if self.ended_in_chunk:  # the chunk before gave segments: the schedule starts over
            self.accumulated_ms, self.in_speech_across = 0.0, False
        self.ended_in_chunk = False
        if not o.dynamic_silence:
            return
        if self.state == _IN_SPEECH or self.in_speech_across:
            self.accumulated_ms += o.chunk_ms
            self.in_speech_across = True
        for limit_ms, silence_ms in o.silence_schedule:
            if self.accumulated_ms <= limit_ms:
                self.max_end_sil = max(silence_ms - o.speech_to_sil_time_thres, 0)
                self.speech_noise_thres = DYNAMIC_SPEECH_NOISE_THRES
                break

    # -------------------------------------------------------------- frames

    def frame(self, sil_score: float, decibel: float, final: bool = False) -> None:
        t = self.frames
        self.frames += 1
        self._detect(self._is_speech(sil_score, decibel), t, final)

    def _is_speech(self, sil: float, decibel: float) -> bool:
        """funasr's GetFrameState: the frame's vote, and the running noise level of silent frames."""
        o = self.o
        if decibel < o.decibel_thres:
            return False
        snr = decibel - self.noise_db
        # funasr compares exp(log(1 - sil)) with exp(log(sil) * ratio) + threshold in float64; the same
        # operations give the same doubles (a probability of exactly 0 or 1, where its log raises, counts as 0)
        noise = math.exp(math.log(sil) * o.speech_2_noise_ratio) if sil > 0 else 0.0
        speech = math.exp(math.log(1.0 - sil)) if sil < 1.0 else 0.0
        if speech >= noise + self.speech_noise_thres:
            return snr >= o.snr_thres and decibel >= o.decibel_thres
        if self.noise_db < -99.9:
            self.noise_db = decibel
        else:
            n = o.noise_frame_num_used_for_snr
            self.noise_db = (decibel + self.noise_db * (n - 1)) / n
        return False

    def _pop_till(self, frame: int) -> None:
        self.buf_start_frame = max(self.buf_start_frame, frame)

    def _write(self, frame: int, start: bool = False, end: bool = False) -> None:
        """funasr's PopDataToOutputBuf for one frame: it extends (or, at a start, opens) the segment."""
        self._pop_till(frame)
        ms = self.o.frame_in_ms
        if self.seg is None or start:
            self.seg = [frame * ms, frame * ms]
        self.buf_start_frame += 1
        self.seg[1] = (frame + 1) * ms

    def _voice(self, frame: int) -> None:
        self.latest_speech = frame
        self._write(frame)

    def _voice_start(self, frame: int) -> None:
        if self.start_frame == -1:
            self.start_frame = frame
        if self.state == _START_NOT_DETECTED:
            self._write(self.start_frame, start=True)
            self.events.append(("start", self.start_frame))

    def _voice_end(self, frame: int, cut: bool = False) -> None:
        for t in range(self.latest_speech + 1, frame):
            self._voice(t)
        if self.end_frame == -1:
            self.end_frame = frame
        self._write(self.end_frame, end=True)
        assert self.seg is not None
        self.events.append(("end", self.seg[0], self.seg[1], cut))
        self.ended_in_chunk = True
        self.seg = None
        self.ends += 1
        self.state = _END_DETECTED

    def _too_long(self, t: int) -> bool:
        return t - self.start_frame + 1 > self.o.max_single_segment_time / self.o.frame_in_ms

    def _in_speech_frame(self, t: int, final: bool) -> None:
        """The speech-like transitions inside a segment: cut when too long, else the frame joins it."""
        if self._too_long(t):
            self._voice_end(t, cut=True)
        elif not final:
            self._voice(t)
        else:
            self._voice_end(t)

    def _detect(self, speech: bool, t: int, final: bool) -> None:
        """funasr's DetectOneFrame."""
        o = self.o
        change = self.window.detect(speech and 1.0 > o.fe_prior_thres)
        if change == _SIL2SPEECH:
            self.silence_run = 0
            if self.state == _START_NOT_DETECTED:
                start = max(self.buf_start_frame, t - self.latency)
                self._voice_start(start)
                self.state = _IN_SPEECH
                for f in range(start + 1, t + 1):
                    self._voice(f)
            elif self.state == _IN_SPEECH:
                for f in range(self.latest_speech + 1, t):
                    self._voice(f)
                self._in_speech_frame(t, final)
        elif change in (_SPEECH2SIL, _SPEECH2SPEECH):
            self.silence_run = 0
            if self.state == _IN_SPEECH:
                self._in_speech_frame(t, final)
        elif change == _SIL2SIL:
            self.silence_run += 1
            ms = o.frame_in_ms
            if self.state == _START_NOT_DETECTED:
                timeout = o.detect_mode == 0 and self.silence_run * ms > o.max_start_silence_time
                if timeout or (final and self.ends == 0):
                    # funasr's "zero length" decision: no segment, the detection starts over
                    for f in range(self.latest_silence + 1, t):
                        self.latest_silence = f
                        if self.state == _START_NOT_DETECTED:
                            self._pop_till(f)
                    if self.start_frame == -1:
                        self.start_frame = 0
                    if self.end_frame == -1:
                        self.end_frame = 0
                    self.ends += 1
                    self.state = _END_DETECTED
                elif t >= self.latency:
                    self.latest_silence = t - self.latency
                    self._pop_till(t - self.latency)
            elif self.state == _IN_SPEECH:
                if self.silence_run * ms >= self.max_end_sil:
                    back = int(self.max_end_sil / ms)
                    if o.do_extend:
                        back = max(0, back - int(o.lookahead_time_end_point / ms) - 1)
                    self._voice_end(t - back)
                elif self._too_long(t):
                    self._voice_end(t, cut=True)
                elif o.do_extend and not final:
                    if self.silence_run <= int(o.lookahead_time_end_point / ms):
                        self._voice(t)
                elif final:
                    self._voice_end(t)
        if self.state == _END_DETECTED and o.detect_mode == 1:
            self._reset_detection()


class FsmnSegmenter:
    """Audio blocks in, speech segments out: `funasr_nano.audio.vad.SpeechSegmenter`'s interface on FSMN-VAD.

    `push(block)` returns what the block completed (`SpeechStarted` when the detector opens a
    segment, `SpeechSegment` when it closes one), `finish()` ends the stream, `commit()` closes
    the speech in progress on request, `open_segment()` is the audio of the speech in progress;
    `segments(blocks)` wraps it for a whole input. Spans are funasr's [start_ms, end_ms] in
    samples (x16), the end clipped to the input, as funasr's pipeline slices the audio.
    """

    def __init__(self, vad: FsmnVad, options: EndpointOptions | None = None,
                 sample_rate: int = SAMPLE_RATE) -> None:
        if sample_rate != SAMPLE_RATE:
            raise VadError(f"FSMN-VAD runs at {SAMPLE_RATE} Hz, not {sample_rate}")
        self.vad = vad
        self.options = options or EndpointOptions.from_model_conf(
            vad.settings.model_conf, max_single_segment_time=OFFICIAL_MAX_SEGMENT_MS)
        self.sr = sample_rate
        self.frontend = FsmnFrontend(vad.settings.frontend, vad.settings.cmvn)
        self.reset()

    def reset(self) -> None:
        """Start a new stream."""
        self.frontend.reset()
        self.detector = EndpointDetector(self.options)
        self._caches = self.vad.new_caches()
        self._buf = np.zeros(0, np.float32)  # audio from sample `_buf_start` on
        self._buf_start = 0
        self.total = 0
        self._chunks = 1  # funasr's chunks begun (the first at frame 0)
        self._next_chunk_row = self._chunk_row(1)
        self._finished = False
        self._open: int | None = None  # start sample of the announced segment in progress

    @property
    def _chunk_samples(self) -> int:
        return int(self.options.chunk_ms * self.sr / 1000)

    def _chunk_row(self, i: int) -> int:
        """The first frame funasr's offline call processes in its chunk i (i >= 1): the frontend gives out
        the rows of the frames that chunk completes, less the 2 that wait for their right context."""
        return max(0, num_fbank_frames(i * self._chunk_samples, self.frontend.cfg) - self.frontend.ctx)

    @property
    def in_speech(self) -> bool:
        return self._open is not None

    def open_segment(self) -> tuple[int, np.ndarray] | None:
        """(start, audio so far) of the speech in progress; None outside speech."""
        if self._open is None:
            return None
        return self._open, self._buf[self._open - self._buf_start:]

    def segments(self, blocks: Iterable[np.ndarray]) -> Iterator[tuple[SampleSpan, np.ndarray]]:
        """(span in samples of the whole stream, its audio) for each speech segment, in order."""
        self.reset()
        for block in blocks:
            for event in self.push(block):
                if isinstance(event, SpeechSegment):
                    yield event.span, event.audio
        for event in self.finish():
            if isinstance(event, SpeechSegment):
                yield event.span, event.audio

    def push(self, block: np.ndarray, last: bool = False) -> list[SpeechStarted | SpeechSegment]:
        """Feed the next block; `last`: the stream ends with it."""
        block = np.asarray(block, dtype=np.float32).reshape(-1)
        self._buf = np.concatenate([self._buf, block]) if len(self._buf) else block
        self.total += len(block)
        feats, db = self.frontend.push(block)
        out = self._run(feats, db, final=False)
        if last:
            out += self.finish()
        self._forget()
        return out

    def finish(self) -> list[SpeechStarted | SpeechSegment]:
        """End of the stream: the last frames (the final one as funasr's is_final frame) and the open segment."""
        if self._finished:
            return []
        self._finished = True
        feats, db = self.frontend.finish()
        out = self._run(feats, db, final=True)
        seg = self.detector.seg
        if seg is not None:  # opened on the very last frame: funasr reports it as it stands
            self.detector.seg = None
            out.append(self._segment(seg[0], seg[1], False))
        return out

    def commit(self) -> SpeechSegment | None:
        """Close the speech in progress now (a client's commit); None when there is none.

        Not part of funasr's detection: the detector starts afresh after it, as after a segment end.
        """
        if self._open is None:
            return None
        seg = self._segment_from(self._open, self.total, False)
        self.detector.seg = None
        self.detector.state = _END_DETECTED
        self.detector.buf_start_frame = max(self.detector.buf_start_frame, self.detector.frames)
        self.detector._reset_detection()
        self._open = None
        self._forget()
        return seg

    def _run(self, feats: np.ndarray, db: np.ndarray, final: bool) -> list[SpeechStarted | SpeechSegment]:
        n = len(feats)
        if n == 0:
            return []
        scores, self._caches = self.vad.scores(feats, self._caches)
        ids = self.options.sil_pdf_ids
        if len(ids) == 1:
            sil = scores[:, ids[0]].tolist()
        else:
            sil = [sum(float(row[i]) for i in ids) for row in scores]
        dbs = db.tolist()
        det = self.detector
        out: list[SpeechStarted | SpeechSegment] = []
        for i in range(n):
            # a chunk exists only where the input reaches its first sample (a stream ending just short of
            # it leaves its last frames in the chunk before)
            if det.frames == self._next_chunk_row and self._chunks * self._chunk_samples <= self.total:
                det.chunk_start()
                self._chunks += 1
                self._next_chunk_row = self._chunk_row(self._chunks)
            if det.frames == 0:
                det.chunk_start()
            det.frame(sil[i], dbs[i], final and i == n - 1)
            if det.events:
                out += self._events(det.events)
                det.events = []
        return out

    def _events(self, events: list[tuple]) -> list[SpeechStarted | SpeechSegment]:
        out: list[SpeechStarted | SpeechSegment] = []
        for event in events:
            if event[0] == "start":
                self._open = event[1] * (self.sr * self.options.frame_in_ms // 1000)
                out.append(SpeechStarted(self._open))
            else:
                _, start_ms, end_ms, cut = event
                out.append(self._segment(start_ms, end_ms, cut))
        return out

    def _segment(self, start_ms: int, end_ms: int, cut: bool) -> SpeechSegment:
        per_ms = self.sr // 1000
        return self._segment_from(start_ms * per_ms, min(end_ms * per_ms, self.total), cut)

    def _segment_from(self, lo: int, hi: int, cut: bool) -> SpeechSegment:
        self._open = None
        lo = max(lo, self._buf_start)
        audio = self._buf[lo - self._buf_start: hi - self._buf_start].copy()
        return SpeechSegment(SampleSpan(lo, max(lo, hi)), audio, cut=cut)

    def _forget(self) -> None:
        """Drop audio no segment can need: a segment starts at most `latency` frames before the current one."""
        frame_samples = self.sr * self.options.frame_in_ms // 1000
        if self._open is not None:
            keep_from = self._open
        else:
            keep_from = (self.detector.frames - self.detector.latency - 1) * frame_samples
        keep_from = max(self._buf_start, min(keep_from, self.total))
        self._buf = self._buf[keep_from - self._buf_start:]
        self._buf_start = keep_from


def fsmn_speech_spans(wave: np.ndarray, vad: FsmnVad, options: EndpointOptions | None = None,
                      block_samples: int | None = None) -> list[SampleSpan]:
    """Speech segments of a whole waveform (samples, end exclusive), fed in blocks of `block_samples`."""
    wave = np.asarray(wave, np.float32).reshape(-1)
    step = block_samples or max(1, len(wave))
    blocks = [wave[i:i + step] for i in range(0, len(wave), step)] or [wave]
    return [span for span, _ in FsmnSegmenter(vad, options).segments(blocks)]
