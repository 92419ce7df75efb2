"""The engine: audio -> features -> ONNX encoder -> prompt with audio rows -> llama.cpp -> text.

One `Engine` holds the loaded models and a decoding `Scheduler` that owns the llama.cpp
context; it lives as long as the models and may be shared by several threads. Build it from a
preset or from explicit paths:

    engine = Engine.from_preset("cpu-int8", model_dir="model-gguf")
    transcript = engine.transcribe("talk.mp3")                  # a typed Transcript
    for segment in engine.segments("long.mp3"):                 # or segment by segment, lazily
        print(segment.start, segment.text)

The defaults are the 03 scripts': Silero VAD, 4 segments decoded together, speculative decoding
when the model folder has the CTC head, a KV cache sized by `funasr_nano.presets.context_per_sequence`.
Messages (fallbacks, loops) go to the `funasr_nano` loggers; the CLI prints them as one line each.
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, CancelledError, Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from funasr_nano.audio.features import FrontendConfig, audio_token_count, compute_features
from funasr_nano.audio.fsmn_vad import EndpointOptions, FsmnSegmenter, FsmnVad, find_fsmn_vad_model
from funasr_nano.audio.load import AudioTooLong, iter_audio_blocks, load_audio
from funasr_nano.audio.segments import SampleSpan, split_at_quiet_points
from funasr_nano.audio.vad import SileroVad, SpeechSegmenter, VadOptions, find_vad_model
from funasr_nano.decoding import Decoded, Job, Prompt, RepetitionGuard, Scheduler, StopRule
from funasr_nano.decoding.prefix_store import PrefixStore
from funasr_nano.decoding.repetition import loop_message
from funasr_nano.decoding.scheduler import Observer, StreamResults
from funasr_nano.models.ctc import CTCModel
from funasr_nano.models.encoder import AudioEncoder, OnnxModelError
from funasr_nano.models.llm import DecoderOptions, LlamaDecoder
from funasr_nano.models.loading import in_background
from funasr_nano.models.prompt import PromptOptions, build_prompt
from funasr_nano.models.settings import ModelSettings
from funasr_nano.output.alignment import char_times, sentence_times
from funasr_nano.output.results import STAGES, Segment, Sentence, Timings, Transcript
from funasr_nano.presets import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_SEGMENT_SECONDS,
    PRESETS,
    context_per_sequence,
)
from funasr_nano.speakers.clustering import SpeakerCount
from funasr_nano.speakers.diarize import Diarization, Diarizer
from funasr_nano.speakers.embeddings import SpeakerEmbedder, find_speaker_model

log = logging.getLogger(__name__)

VAD_CHOICES = ("silero", "fsmn", "none")
VAD_BLOCK_SECONDS = 60.0  # audio decoded at a time on the VAD path; the segmenter holds about three blocks
# Segments quieter than this RMS (about -80 dBFS: digital silence, at most 16-bit dither) are not
# decoded: given nothing to hear, the real model hallucinates text or loops until max_new_tokens.
SILENCE_RMS = 1e-4
T = TypeVar("T")


@dataclass(frozen=True)
class TranscribeOptions:
    """Per-call choices; the defaults are the 03 scripts'."""

    prompt: PromptOptions = PromptOptions()
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_segment_seconds: float = DEFAULT_MAX_SEGMENT_SECONDS
    # "silero": decode only the speech Silero VAD finds (no speech: empty transcript), streaming the
    # file in blocks; "fsmn": the same with FunASR's FSMN-VAD, the official pipeline's segments exactly
    # (funasr_nano/audio/fsmn_vad.py); "none": the whole input, cut at quiet points into max_segment_seconds pieces.
    vad: str = "silero"
    vad_options: VadOptions | None = None  # None: VadOptions(max_segment_seconds=max_segment_seconds)
    guard: RepetitionGuard = RepetitionGuard()  # stops a segment caught in a decoding loop
    # verify the CTC head's greedy transcript as a draft (funasr_nano/decoding/speculation.py): same tokens,
    # fewer decoder passes; ignored (plain greedy) when the model folder has no CTC graph
    speculative: bool = True
    # per-sentence times: CTC forced alignment of each segment's text (funasr_nano/output/alignment.py) when the
    # model folder has the CTC graph, else the segment's span shared out by characters. Costs one more CTC
    # head run per segment, so only outputs that show times (json, srt, vtt) ask for it.
    timestamps: bool = False
    # Where a file's segments are prepared (features, encoder, draft). 0: on the decoding thread, each
    # when a sequence is free for it, so a lone caller's encoder never competes with its decoding.
    # N > 0: on the calling thread, up to N segments submitted ahead of their decoding: for many
    # concurrent callers (the server), whose loading, VAD and encoding then overlap the other callers'
    # decoding rounds instead of pausing them (the decoding thread does nothing else meanwhile).
    prepare_ahead: int = 0
    # Decoding stops with AudioTooLong once more audio than this has been decoded (None: no limit):
    # a server's bound on work, which a container header that lies about its length cannot lift.
    max_audio_seconds: float | None = None
    # who spoke when (funasr_nano/speakers/, docs/diarization.md): CAM++ embeddings of every VAD segment while the
    # input streams, clustered once it is read, so `segments()` yields segments whose `speaker` is set only when
    # the stream is exhausted (the transcript's are). Needs campplus.onnx (`funasr-nano export --spk-release-dir`).
    diarize: bool = False
    speakers: SpeakerCount = SpeakerCount()  # what is known of the number of speakers


@dataclass(frozen=True)
class BenchmarkHooks:
    """Switches for benchmarks on random weights (which never stop), in one place; not for users.

    `min_new_tokens`: every segment decodes at least this many tokens (stop tokens passed over);
    `tokens_per_second`: every segment decodes exactly this many tokens per second of its audio, as
    real speech would give (0: off); `refill=False`: a freed sequence waits until its whole group
    has ended (fixed groups, the comparison for continuous batching).
    """

    min_new_tokens: int = 0
    tokens_per_second: float = 0.0
    refill: bool = True

    def rule(self, options: TranscribeOptions, seconds: float) -> StopRule:
        """The stop rule of one segment of `seconds` of audio."""
        if self.tokens_per_second > 0:
            return StopRule.forced(max(1, round(self.tokens_per_second * seconds)))
        return StopRule(max(options.max_new_tokens, self.min_new_tokens), self.min_new_tokens, options.guard)


NO_HOOKS = BenchmarkHooks()


class CapacityError(ValueError):
    """A segment's prompt and new tokens do not fit the engine's context (one line); only that call fails."""


@dataclass
class PreparedPrompt:
    """One segment's prompt: the shared text before the audio, the audio rows, the text after them."""

    prefix: str
    prefix_ids: list[int]
    audio_rows: np.ndarray  # (n, hidden): adaptor output cut to the official count
    suffix_ids: list[int]
    encoder_out: np.ndarray | None = None  # (T, enc_dim): full encoder output, the CTC head's input

    @property
    def length(self) -> int:
        return len(self.prefix_ids) + self.audio_rows.shape[0] + len(self.suffix_ids)

    @property
    def prompt(self) -> Prompt:
        return Prompt(self.prefix, self.audio_rows, self.suffix_ids)


@dataclass
class _Piece:
    """One (span, audio) piece on its way through decoding: prompt until decoded, then its segment."""

    span: SampleSpan
    prepared: PreparedPrompt | None
    segment: Segment | None = None


def _timed(items: Iterator[T], clock: dict[str, float], stage: str) -> Iterator[T]:
    """`items`, adding the time spent producing each one to `clock[stage]` (lazy pipelines)."""
    while True:
        t0 = time.perf_counter()
        item = next(items, None)
        clock[stage] += time.perf_counter() - t0
        if item is None:
            return
        yield item


def is_digital_silence(wave: np.ndarray) -> bool:
    """Whether a segment holds nothing to transcribe (RMS below SILENCE_RMS); it gets empty text."""
    return wave.size == 0 or float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) < SILENCE_RMS


def clean_text(raw: str) -> str:
    """funasr's post-processing of the decoded text: `/sil` -> space, whitespace runs collapsed."""
    return re.sub(r"\s+", " ", raw.replace("/sil", " "))


def join_texts(parts: list[str]) -> str:
    """Join segment texts: a space between Latin-script words, nothing between CJK characters.

    A single segment is returned untouched, exactly as the official code would print it.
    """
    if len(parts) == 1:
        return parts[0]
    out = ""
    for part in (p.strip() for p in parts):
        if not part:
            continue
        if out and out[-1].isascii() and out[-1].isalnum() and part[0].isascii() and part[0].isalnum():
            out += " "
        elif out and out[-1] in ".,!?;:" and part[0].isascii():
            out += " "
        out += part
    return out


class SegmentStream:
    """The segments of one input as they are decoded, in input order; `transcript` once exhausted."""

    def __init__(self, segments: Iterator[Segment], finish: Callable[[list[Segment]], Transcript],
                 total: int = 0, cancel: Callable[[], None] | None = None) -> None:
        self._segments = segments
        self._cancel = cancel
        self.total = total  # segments expected (0: unknown while the VAD reads the input)
        self._finish = finish
        self.done: list[Segment] = []
        self.transcript: Transcript | None = None

    def __iter__(self) -> Iterator[Segment]:
        for segment in self._segments:
            self.done.append(segment)
            yield segment
        self.transcript = self._finish(self.done)

    def close(self) -> None:
        """Stop early: the segments not yet decoded are cancelled (from the iterating thread)."""
        close = getattr(self._segments, "close", None)
        if close is not None:
            close()

    def cancel(self) -> None:
        """From any thread, while another iterates: its segments' sequences are freed before the next
        round, and the iterating thread gets `concurrent.futures.CancelledError`."""
        if self._cancel is not None:
            self._cancel()


class PendingSegment:
    """One segment handed to `Engine.submit_segment`: its decoding in the scheduler, its Segment once done.

    `cancel()` stops the decoding (its sequence is freed before the scheduler's next round).
    """

    def __init__(self, future: Future | None, finish: Callable[[Decoded | None], Segment]) -> None:
        self._future = future  # None: nothing to decode (silence, shorter than one frame)
        self._finish = finish
        self._segment: Segment | None = None

    def done(self) -> bool:
        return self._future is None or self._future.done()

    def cancel(self) -> bool:
        return self._future is not None and self._future.cancel()

    def add_done_callback(self, fn: Callable[[PendingSegment], None]) -> None:
        """Call `fn(self)` once decoded, failed or cancelled (at once if already so; else on the scheduler's thread)."""
        if self._future is None:
            fn(self)
        else:
            self._future.add_done_callback(lambda _: fn(self))

    def result(self, timeout: float | None = None) -> Segment:
        """The Segment (raises what decoding raised, CancelledError once cancelled, TimeoutError)."""
        if self._segment is None:
            decoded = None if self._future is None else self._future.result(timeout)
            self._segment = self._finish(decoded)
        return self._segment


def _load_decoder(gguf: Path, options: DecoderOptions) -> LlamaDecoder:
    """llama.cpp's model and context, with the embedding table located (the prompt's text rows need it)."""
    decoder = LlamaDecoder(gguf, options)
    decoder.load_embedding_table()
    return decoder


class Engine:
    """Loaded models for one model folder (model-gguf/) and the scheduler that decodes for every caller."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        encoder_path: Path | str | None = None,
        gguf_path: Path | str | None = None,
        threads: int = 2,
        providers: list[str] | None = None,
        decoder_options: DecoderOptions | None = None,
        hooks: BenchmarkHooks = NO_HOOKS,
        observer: Observer | None = None,
        preload: TranscribeOptions | None = None,
        batch_invariant: bool = False,
    ) -> None:
        """Load the encoder and llama.cpp side by side (both release the GIL while loading); with
        `preload`, also the sessions those options will need (the VAD, the CTC head), which are
        otherwise opened on first use. `batch_invariant`: a segment's tokens never depend on the
        other segments, files or requests decoded with it (`funasr_nano.decoding.scheduler`)."""
        from funasr_nano.presets import GGUF_F16

        self.settings = ModelSettings.load(model_dir)
        self.frontend = FrontendConfig.from_dict(self.settings.frontend)
        self.hooks = hooks
        self.load_times: dict[str, float] = {}  # seconds per model loaded (encoder, llama.cpp, ctc, vad)
        self._vad: SileroVad | None | bool = None  # False: not found (said once)
        self._fsmn: FsmnVad | None | bool = None  # likewise for FSMN-VAD
        self._no_ctc_said = False
        self._threads, self._providers = threads, providers
        self._ctc: CTCModel | None | bool = None  # False: no CTC head in the model folder
        self._speakers: SpeakerEmbedder | None = None  # CAM++, opened on the first diarization
        self._speakers_lock = threading.Lock()  # server requests and live streams may ask at once: one session
        self._loading: dict[str, Future] = {}  # sessions being opened in the background, by name
        if preload is not None:
            self.preload(preload)
        t0 = time.perf_counter()
        options = decoder_options or DecoderOptions(threads=threads)
        gguf = Path(gguf_path) if gguf_path else Path(model_dir) / GGUF_F16
        decoder = in_background(lambda: _load_decoder(gguf, options), "llama.cpp", self.load_times)
        try:
            t1 = time.perf_counter()
            self.encoder = AudioEncoder(Path(encoder_path or self.settings.path("encoder")), threads=threads,
                                        providers=providers)
            self.load_times["encoder"] = time.perf_counter() - t1
        except BaseException:
            with contextlib.suppress(Exception):
                decoder.result().close()
            self._wait_for_loads()
            raise
        try:
            self.decoder = decoder.result()
        except BaseException:
            self._wait_for_loads()  # the VAD / CTC sessions loading beside it must not die with the process
            raise
        if self.decoder.n_embd != self.settings.adaptor_dim:
            self.decoder.close()
            self._wait_for_loads()
            raise ValueError(
                f"{self.decoder.path}: LLM width {self.decoder.n_embd} does not match the encoder's "
                f"adaptor output {self.settings.adaptor_dim}; export both from the same release"
            )
        self.scheduler = Scheduler(self.decoder, refill=hooks.refill, observer=observer,
                                   batch_invariant=batch_invariant, prefix_store=PrefixStore.for_decoder(self.decoder))
        self.load_seconds = time.perf_counter() - t0

    @classmethod
    def from_preset(
        cls,
        name: str = "cpu-int8",
        model_dir: Path | str = "model-gguf",
        *,
        threads: int = 2,
        batch_size: int = DEFAULT_BATCH_SIZE,
        max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS,
        max_segment_seconds: float = DEFAULT_MAX_SEGMENT_SECONDS,
        hotwords: str = "",
        encoder_path: Path | str | None = None,
        gguf_path: Path | str | None = None,
        hooks: BenchmarkHooks = NO_HOOKS,
        preload: TranscribeOptions | None = None,
        batch_invariant: bool = False,
        kv_unified: bool = False,
    ) -> Engine:
        """The models of a preset (`funasr_nano.presets.PRESETS`), the KV cache sized for these limits.

        `max_new_tokens`, `max_segment_seconds` and `hotwords` size each sequence's cache; calls may
        ask for less, not more. A GPU preset offloads what this machine can and logs what it cannot.
        `kv_unified`: one KV cache shared by all sequences, so a new segment's prompt joins the next
        decoding round instead of a pass of its own (many concurrent callers: the server); not with
        `batch_invariant`, which needs each sequence's cache laid out as when it is decoded alone.
        """
        if kv_unified and batch_invariant:
            raise ValueError("batch_invariant needs the split KV cache (kv_unified=False)")
        preset = PRESETS[name]
        model_dir = Path(model_dir)
        n_gpu_layers, providers = gpu_setup() if preset.gpu else (0, None)
        n_ctx = context_per_sequence(max(max_new_tokens, hooks.min_new_tokens), max_segment_seconds, hotwords)
        options = DecoderOptions(threads=threads, n_gpu_layers=n_gpu_layers, n_seq_max=batch_size, n_ctx=n_ctx,
                                 kv_unified=kv_unified)
        return cls(model_dir, encoder_path=encoder_path or model_dir / preset.encoder_file,
                   gguf_path=gguf_path or model_dir / preset.gguf_file, threads=threads, providers=providers,
                   decoder_options=options, hooks=hooks, preload=preload, batch_invariant=batch_invariant)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._wait_for_loads()
        self.scheduler.close()
        self.decoder.close()

    def preload(self, options: TranscribeOptions) -> None:
        """Start opening, in background threads, the sessions `options` will need (the VAD, the CTC head)."""
        wanted = {"vad": options.vad == "silero", "fsmn": options.vad == "fsmn",
                  "ctc": options.speculative or options.timestamps}
        openers = {"vad": self._open_vad, "fsmn": self._open_fsmn, "ctc": self._open_ctc}
        for name, opener in openers.items():
            if wanted[name] and name not in self._loading:
                self._loading[name] = in_background(opener, name, self.load_times)

    # ------------------------------------------------------------------ transcription

    def transcribe(self, audio: str | Path | np.ndarray, options: TranscribeOptions = TranscribeOptions(),
                   progress: Callable[[int, int], None] | None = None) -> Transcript:
        """Transcribe a file path or a 16 kHz mono float32 waveform. `progress(done, total)` per segment
        (total 0 while the VAD is still reading the input)."""
        stream = self.segments(audio, options)
        for _ in stream:
            if progress is not None:
                progress(len(stream.done), stream.total)
        assert stream.transcript is not None
        return stream.transcript

    def segments(self, audio: str | Path | np.ndarray, options: TranscribeOptions = TranscribeOptions()
                 ) -> SegmentStream:
        """The segments of one input, decoded lazily (several at once) and yielded in input order.

        Opening errors surface here; the transcript is `stream.transcript` once the stream is exhausted.
        """
        if options.vad not in VAD_CHOICES:
            raise ValueError(f"unknown VAD {options.vad!r}; choose from {', '.join(VAD_CHOICES)}")
        clock = dict.fromkeys(STAGES, 0.0)
        t_start = time.perf_counter()
        sr = self.frontend.sample_rate
        source = str(audio) if isinstance(audio, (str, Path)) else "<waveform>"
        vad = self._segmenter(options, sr)  # this input's own VAD state; None: no VAD
        n_samples = 0
        limit = options.max_audio_seconds
        if not isinstance(audio, (str, Path)) and limit is not None and np.size(audio) > limit * sr:
            raise AudioTooLong(source, limit)
        cancel = _Cancellation()
        if vad is not None:
            if isinstance(audio, (str, Path)):
                # opening errors surface here
                blocks = iter_audio_blocks(audio, VAD_BLOCK_SECONDS, sr, max_seconds=limit)
            else:
                blocks = iter([np.asarray(audio, dtype=np.float32).reshape(-1)])

            def counted(items: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
                nonlocal n_samples
                for block in items:
                    cancel.check()  # silence or noise yields no segment: stop between blocks too
                    n_samples += len(block)
                    yield block

            spans = vad.segments(counted(_timed(blocks, clock, "load_audio")))
            pieces: Iterator[tuple[SampleSpan, np.ndarray]] = _timed(spans, clock, "vad")
        else:
            wave = (load_audio(audio, sr, max_seconds=limit) if isinstance(audio, (str, Path))
                    else np.asarray(audio, dtype=np.float32))
            clock["load_audio"] = time.perf_counter() - t_start
            n_samples = wave.shape[0]
            cuts = split_at_quiet_points(wave, sr, options.max_segment_seconds)
            pieces = ((span, wave[span.start:span.end]) for span in cuts)
        diarizer = Diarizer(self.speaker_embedder(), options.speakers, sr) if options.diarize else None
        if diarizer is not None:
            pieces = diarizer.tap(pieces)

        def finish(segments: list[Segment]) -> Transcript:
            found: Diarization | None = diarizer.label(segments) if diarizer is not None else None
            if found is not None:
                clock["diarize"] = found.embed_seconds + found.cluster_seconds
            if vad is not None:
                clock["vad"] = max(0.0, clock["vad"] - clock["load_audio"])  # the VAD pulls the audio
            clock["total"] = time.perf_counter() - t_start
            return Transcript(
                source=source,
                text=join_texts([s.text for s in segments]) if segments else "",
                duration=n_samples / sr,
                segments=segments,
                timings=Timings.from_clock(clock),
                n_tokens=sum(len(s.token_ids) for s in segments),
                language=options.prompt.language,
                vad=options.vad if vad is not None else None,
                timestamps=self._timestamp_note() if options.timestamps else None,
                model=self.settings.describe(),
                speakers=found.speakers if found is not None else None,
            )

        total = 0 if vad is not None else len(cuts)
        decode = self._decode_ahead if options.prepare_ahead > 0 else self._decode_pieces
        return SegmentStream(decode(pieces, options, clock, cancel), finish, total, cancel)

    def prepare(self, wave: np.ndarray, prompt: PromptOptions, clock: dict[str, float] | None = None
                ) -> PreparedPrompt | None:
        """Features, encoder and prompt for one segment; None when it is shorter than one frame."""
        clock = clock if clock is not None else dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        feats = compute_features(wave, self.frontend)
        t1 = time.perf_counter()
        clock["features"] += t1 - t0
        if feats.shape[0] == 0:
            return None
        encoder_out, adaptor_out = self.encoder.run(feats)
        clock["encoder"] += time.perf_counter() - t1
        n_rows = audio_token_count(feats.shape[0]) if self.settings.use_low_frame_rate else feats.shape[0]
        parts = build_prompt(prompt, sys_prompt=self.settings.sys_prompt, do_think=self.settings.do_think)
        return PreparedPrompt(
            prefix=parts.before,
            prefix_ids=self.decoder.tokenize(parts.before),
            audio_rows=adaptor_out[:n_rows],
            suffix_ids=self.decoder.tokenize(parts.after),
            encoder_out=encoder_out,
        )

    def submit_segment(self, wave: np.ndarray, options: TranscribeOptions = TranscribeOptions(), *,
                       offset: int = 0) -> PendingSegment:
        """Decode one segment (16 kHz mono float32) on its own, alongside every other caller's work.

        For live audio, whose segments arrive one at a time: features and encoder run here, on the
        caller's thread, then the job joins the scheduler's batch with the other streams and files.
        The text is that of `transcribe(wave, TranscribeOptions(vad="none"))` for a segment within
        `max_segment_seconds`: the same features, prompt, job and text path. `offset`: where the
        segment starts in its stream (samples), for the Segment's times.
        """
        clock = dict.fromkeys(STAGES, 0.0)
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        span = SampleSpan(offset, offset + len(wave))
        prepared = None if is_digital_silence(wave) else self.prepare(wave, options.prompt, clock)
        if prepared is None:
            return PendingSegment(None, lambda _: Segment(*self._seconds(span), "", [], 0))
        future = self.scheduler.submit(self._job(prepared, options, len(wave) / self.frontend.sample_rate, clock))
        return PendingSegment(future, lambda decoded: self._segment(span, prepared, decoded, options, clock))

    def teacher_forced_logits(self, wave: np.ndarray, prompt: PromptOptions, tokens: list[int]) -> np.ndarray:
        """Logits after the prompt and after each of `tokens` fed in turn (parity tests)."""
        prepared = self.prepare(wave, prompt)
        if prepared is None:
            raise ValueError("audio shorter than one frame has no prompt")

        def forced(decoder: LlamaDecoder, prefixes) -> np.ndarray:
            rows = [prefixes.admit(prepared.prompt, 0)]
            pos = prepared.length
            for token in tokens:
                rows.append(np.array(decoder.step(token, pos), copy=True))
                pos += 1
            return np.stack(rows)

        return self.scheduler.call(forced)

    # ------------------------------------------------------------------ models loaded on first use

    @property
    def ctc(self) -> CTCModel | None:
        """The CTC head (drafts and alignment), loaded on first use; None without CTC weights."""
        if self._ctc is None:
            self._ctc = self._loaded("ctc", self._open_ctc) or False
        return self._ctc or None

    def timestamp_source(self) -> str:
        """Where sentence times come from: "ctc" (forced alignment) or "segments" (VAD/segment spans)."""
        return "ctc" if self.ctc is not None else "segments"

    def _timestamp_note(self) -> str:
        source = self.timestamp_source()
        if source == "segments" and not self._no_ctc_said:
            log.info("%s has no CTC head: sentence times are shared out over the VAD segments, not aligned to "
                     "the audio", self.settings.model_dir)
            self._no_ctc_said = True
        return source

    def _segmenter(self, options: TranscribeOptions, sr: int) -> SpeechSegmenter | FsmnSegmenter | None:
        """A segmenter for one input, on the engine's shared VAD session; None for --vad none or a missing model."""
        if options.vad == "silero":
            model = self.silero_vad()
            if model is None:
                return None
            vad_options = options.vad_options or VadOptions(max_segment_seconds=options.max_segment_seconds)
            return SpeechSegmenter(model.stream(), vad_options, sr)
        if options.vad == "fsmn":
            fsmn = self.fsmn_vad()
            if fsmn is None:
                return None
            endpoint = EndpointOptions.from_model_conf(
                fsmn.settings.model_conf, max_single_segment_time=int(round(options.max_segment_seconds * 1000)))
            return FsmnSegmenter(fsmn, endpoint, sr)
        return None

    def speaker_embedder(self) -> SpeakerEmbedder:
        """CAM++ for diarization, opened once; a model folder without campplus.onnx is an error (asked for)."""
        with self._speakers_lock:
            return self._open_speaker_embedder()

    def _open_speaker_embedder(self) -> SpeakerEmbedder:
        if self._speakers is None:
            path = find_speaker_model(self.settings.model_dir)
            if path is None:
                raise OnnxModelError(f"{self.settings.model_dir}/campplus.onnx: not found: diarization needs CAM++ "
                                     "(get it with `funasr-nano export --spk-release-dir DIR`, which downloads "
                                     "iic/speech_campplus_sv_zh-cn_16k-common into DIR)")
            t0 = time.perf_counter()
            self._speakers = SpeakerEmbedder(path, threads=self._threads)
            self.load_times["speakers"] = time.perf_counter() - t0
        return self._speakers

    def fsmn_vad(self) -> FsmnVad | None:
        """FSMN-VAD's session, opened once and shared by every input and live stream (each segmenter keeps
        its own state); None, and one warning, when the model folder lacks it."""
        if self._fsmn is None:
            self._fsmn = self._loaded("fsmn", self._open_fsmn) or False
            if not self._fsmn:
                log.warning("fsmn_vad.onnx not found in the model folder (get it with `funasr-nano export "
                            "--vad-release-dir DIR`, which downloads iic/speech_fsmn_vad_zh-cn-16k-common-pytorch into "
                            "DIR): cutting at quiet points instead (--vad none)")
        return self._fsmn or None

    def _open_fsmn(self) -> FsmnVad | None:
        path = find_fsmn_vad_model(self.settings.model_dir)
        return FsmnVad(path) if path is not None else None

    def silero_vad(self) -> SileroVad | None:
        """Silero VAD's session, opened once and shared by every input and live stream (each takes its own
        `stream()` state); None, and one warning, when neither the model folder nor silero-vad has it."""
        if self._vad is None:
            self._vad = self._loaded("vad", self._open_vad) or False
            if not self._vad:
                log.warning("silero_vad.onnx not found in the model folder (re-run `funasr-nano export` or 01_export_onnx.py with "
                            "silero-vad installed): cutting at quiet points instead (--vad none)")
        return self._vad or None

    def _open_ctc(self) -> CTCModel | None:
        return CTCModel.load(self.settings, threads=self._threads, providers=self._providers)

    def _open_vad(self) -> SileroVad | None:
        path = find_vad_model(self.settings.model_dir)
        return SileroVad(path) if path is not None else None

    def _loaded(self, name: str, opener: Callable[[], T]) -> T:
        """What a background load of `name` gave (waiting for it), or `opener()` now if none was started."""
        future = self._loading.pop(name, None)
        if future is not None:
            return future.result()
        t0 = time.perf_counter()
        value = opener()
        self.load_times[name] = time.perf_counter() - t0
        return value

    def _wait_for_loads(self) -> None:
        """Let background loads finish (their threads hold sessions) before the engine goes away."""
        for future in self._loading.values():
            with contextlib.suppress(Exception):
                future.result()
        self._loading.clear()

    # ------------------------------------------------------------------ internals

    def _decode_pieces(self, pieces: Iterable[tuple[SampleSpan, np.ndarray]], options: TranscribeOptions,
                       clock: dict[str, float], cancel: _Cancellation | None = None) -> Iterator[Segment]:
        """Segments of (span, audio) pairs, in input order, as many decoding at once as the context has sequences.

        The scheduler pulls the jobs lazily, so each piece is encoded only when a sequence is free
        for it: memory holds a few prepared segments plus the finished ones waiting for an earlier,
        longer one to end.
        """
        order: deque[_Piece] = deque()  # input order
        by_job: list[_Piece] = []
        sr = self.frontend.sample_rate

        def jobs() -> Iterator[Job]:
            for span, audio in pieces:
                prepared = None if is_digital_silence(audio) else self.prepare(audio, options.prompt, clock)
                piece = _Piece(span, prepared)
                order.append(piece)
                if prepared is None:
                    piece.segment = Segment(*self._seconds(span), "", [], 0)
                    continue
                by_job.append(piece)
                yield self._job(prepared, options, len(audio) / sr, clock)

        results = self.scheduler.stream(jobs())
        if cancel is not None:
            cancel.attach(results)
        try:
            for index, decoded in results:
                piece = by_job[index]
                assert piece.prepared is not None
                piece.segment = self._segment(piece.span, piece.prepared, decoded, options, clock)
                piece.prepared = None  # the encoder output is no longer needed
                while order and order[0].segment is not None:
                    yield order.popleft().segment
        finally:
            results.close()  # stopped early: the remaining jobs are cancelled
        while order:  # trailing silent pieces
            segment = order.popleft().segment
            assert segment is not None
            yield segment

    def _decode_ahead(self, pieces: Iterable[tuple[SampleSpan, np.ndarray]], options: TranscribeOptions,
                      clock: dict[str, float], cancel: _Cancellation) -> Iterator[Segment]:
        """Segments of (span, audio) pairs in input order, each prepared on this (the caller's) thread
        and submitted to the scheduler, at most `options.prepare_ahead` of them not yet decoded.

        The scheduler's thread then only decodes: what this caller loads, detects and encodes
        overlaps the rounds of everyone else's segments (`TranscribeOptions.prepare_ahead`).
        """
        order: deque[tuple[_Piece, Future | None]] = deque()  # input order, futures of the submitted ones
        sr = self.frontend.sample_rate

        def finished(room: int) -> Iterator[Segment]:
            """The leading segments that are decoded, once fewer than `room` submitted ones are not.

            A piece decoded behind a longer one keeps only its Segment, not its prompt, till its turn.
            """
            while True:
                undone = []
                for piece, future in order:
                    if future is None or piece.segment is not None:
                        continue
                    if not future.done():
                        undone.append(future)
                        continue
                    assert piece.prepared is not None
                    piece.segment = self._segment(piece.span, piece.prepared, future.result(), options, clock)
                    piece.prepared = None
                if len(undone) < room:
                    break
                wait(undone, timeout=1.0, return_when=FIRST_COMPLETED)  # a timeout keeps Ctrl-C responsive
            while order and order[0][0].segment is not None:
                yield order.popleft()[0].segment

        try:
            for span, audio in pieces:
                cancel.check()
                prepared = None if is_digital_silence(audio) else self.prepare(audio, options.prompt, clock)
                piece = _Piece(span, prepared)
                future = None
                if prepared is None:
                    piece.segment = Segment(*self._seconds(span), "", [], 0)
                else:
                    future = self.scheduler.submit(self._job(prepared, options, len(audio) / sr, clock))
                    cancel.attach(future)
                order.append((piece, future))
                yield from finished(options.prepare_ahead)
            yield from finished(1)
        finally:
            for _, future in order:  # stopped early: what is still queued or decoding is cancelled
                if future is not None:
                    future.cancel()

    def _job(self, prepared: PreparedPrompt, options: TranscribeOptions, seconds: float,
             clock: dict[str, float]) -> Job:
        """The decoding job of one prepared segment of `seconds` of audio: the file path's and submit_segment's.

        CapacityError when the prompt and the new tokens asked for cannot fit one sequence's context: such a
        job would reach a decoding round and make llama_decode fail for every job in it, so it is refused
        here, alone, before it is queued.
        """
        rule = self.hooks.rule(options, seconds)
        positions = prepared.length + rule.max_new_tokens - 1  # the last token is never fed back
        capacity = self.decoder.n_ctx
        if positions > capacity:
            raise CapacityError(
                f"a {seconds:.1f} s segment with this prompt needs {positions} positions ({prepared.length} for the "
                f"prompt, up to {rule.max_new_tokens} new tokens) and this engine's context holds {capacity} per "
                "sequence: ask for fewer new tokens or fewer hotwords, or open the engine with larger limits "
                "(Engine.from_preset's max_new_tokens, max_segment_seconds, hotwords)")
        return Job(prepared.prompt, rule, self._draft(prepared, options, clock), clock)

    def _seconds(self, span: SampleSpan) -> tuple[float, float]:
        start, end = span.seconds(self.frontend.sample_rate)
        return round(start, 3), round(end, 3)

    def _segment(self, span: SampleSpan, prepared: PreparedPrompt, decoded: Decoded, options: TranscribeOptions,
                 clock: dict[str, float]) -> Segment:
        """The text (and sentence times) of one decoded piece."""
        start, end = self._seconds(span)
        if decoded.looped:
            log.warning(loop_message(f"segment {start:.2f}-{end:.2f} s", len(decoded.tokens)))
        text = clean_text(self.decoder.detokenize(decoded.tokens))
        segment = Segment(start, end, text, decoded.tokens, int(prepared.audio_rows.shape[0]),
                          draft_proposed=decoded.proposed, draft_accepted=decoded.accepted)
        if options.timestamps:
            self._add_times(segment, prepared, clock)
        return segment

    def _add_times(self, segment: Segment, prepared: PreparedPrompt, clock: dict[str, float]) -> None:
        """Sentence times of one segment: aligned on the CTC posteriors, or shared out over the segment."""
        t0 = time.perf_counter()
        ctc = self.ctc
        times = None
        if ctc is not None and segment.text and prepared.encoder_out is not None:
            times = char_times(segment.text, ctc.log_probs(prepared.encoder_out), ctc.vocab, ctc.frame_shift_ms,
                               segment.start, segment.end)
        segment.char_times = times
        segment.sentences = [Sentence(round(s.start, 3), round(s.end, 3), s.text)
                             for s in sentence_times(segment.text, segment.start, segment.end, times)]
        clock["align"] = clock.get("align", 0.0) + time.perf_counter() - t0

    def _draft(self, prepared: PreparedPrompt, options: TranscribeOptions,
               clock: dict[str, float]) -> list[int] | None:
        """The CTC head's transcript of a segment as Qwen3 tokens; None without speculation or CTC."""
        ctc = self.ctc if options.speculative else None
        if ctc is None or prepared.encoder_out is None:
            return None
        t0 = time.perf_counter()
        text = ctc.text(prepared.encoder_out).strip()
        draft = self.decoder.tokenize(text) if text else []
        clock["draft"] = clock.get("draft", 0.0) + time.perf_counter() - t0
        return draft


class _Cancellation:
    """A SegmentStream's cancel switch, for any thread: cancels what is attached (the scheduler stream,
    or each submitted segment's future) and whatever is attached later (then it never starts)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._targets: list[StreamResults | Future] = []
        self._requested = False

    def attach(self, target: StreamResults | Future) -> None:
        with self._lock:
            if self._requested:
                target.cancel()
                return
            self._targets = [t for t in self._targets if not (isinstance(t, Future) and t.done())]
            self._targets.append(target)

    def check(self) -> None:
        """Raise CancelledError once cancelled (the preparing thread, between two segments)."""
        if self._requested:
            raise CancelledError()

    def __call__(self) -> None:
        with self._lock:
            self._requested = True
            targets, self._targets = self._targets, []
        for target in targets:
            target.cancel()


GPU_LLAMA_HINT = ("for a GPU build of llama.cpp: CMAKE_ARGS=\"-DGGML_CUDA=on\" pip install --force-reinstall "
                  "--no-cache-dir llama-cpp-python==0.3.36 (or -DGGML_VULKAN=on)")
GPU_ONNX_HINT = "for the encoder on an NVIDIA GPU: pip install onnxruntime-gpu"


def gpu_setup() -> tuple[int, list[str] | None]:
    """(n_gpu_layers, ONNX providers): offload everything that has a GPU backend; log what runs on the CPU."""
    import onnxruntime as ort

    from funasr_nano.models.llm import gpu_offload_supported

    llama_gpu = gpu_offload_supported()
    available = ort.get_available_providers()
    gpu_providers = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                                 "CoreMLExecutionProvider") if p in available]
    if not llama_gpu and not gpu_providers:
        log.warning("no GPU found (llama.cpp has no GPU backend, onnxruntime no GPU provider): running on the CPU; "
                    "%s; %s", GPU_LLAMA_HINT, GPU_ONNX_HINT)
    elif not llama_gpu:
        log.warning("this llama.cpp build has no GPU backend: the decoder runs on the CPU; %s", GPU_LLAMA_HINT)
    elif not gpu_providers:
        log.warning("onnxruntime has no GPU execution provider: the encoder runs on the CPU; %s", GPU_ONNX_HINT)
    providers = gpu_providers + ["CPUExecutionProvider"] if gpu_providers else None
    return (-1 if llama_gpu else 0), providers


__all__ = ["BenchmarkHooks", "Engine", "PendingSegment", "PreparedPrompt", "SegmentStream", "TranscribeOptions"]
