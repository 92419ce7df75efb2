"""The engine: audio -> features -> ONNX encoder -> prompt with audio rows -> llama.cpp -> text.

One `Transcriber` holds the loaded models; `transcribe()` runs one input and
returns plain dataclasses with the text, the segments and the time spent in
each stage. The constant part of the prompt (system turn and task prompt) is
decoded once and its KV cache reused by every following segment with the same
options.
"""

from __future__ import annotations

import contextlib
import re
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np

from common.alignment import char_times, sentence_times
from common.audio import iter_audio_blocks, load_audio
from common.batch_decode import Decoded, Job, decode_stream
from common.encoder import AudioEncoder
from common.features import FrontendConfig, audio_token_count, compute_features
from common.llm import DecoderOptions, LlamaDecoder, warn
from common.loading import in_background
from common.prompt import PromptOptions, build_prompt
from common.repetition import RepetitionGuard, loop_message
from common.segments import Span, split_at_quiet_points
from common.settings import ModelSettings
from common.speculative import CTCDrafter
from common.vad import SileroVad, SpeechSegmenter, VadOptions, find_vad_model

STAGES = ("load_audio", "vad", "features", "encoder", "prefill", "decode")
VAD_CHOICES = ("silero", "none")
VAD_BLOCK_SECONDS = 60.0  # audio decoded at a time on the VAD path; the segmenter holds about three blocks
# Segments quieter than this RMS (about -80 dBFS: digital silence, at most 16-bit dither) are not
# decoded: given nothing to hear, the real model hallucinates text or loops until max_new_tokens.
SILENCE_RMS = 1e-4
T = TypeVar("T")


@dataclass(frozen=True)
class TranscribeOptions:
    """Per-call choices. `min_new_tokens` exists for benchmarks on random weights only."""

    prompt: PromptOptions = PromptOptions()
    max_new_tokens: int = 512
    max_segment_seconds: float = 30.0
    min_new_tokens: int = 0
    # "silero": decode only the speech Silero VAD finds (no speech: empty transcript), streaming the
    # file in blocks; "none": the whole input, cut at quiet points into max_segment_seconds pieces.
    vad: str = "none"
    vad_options: VadOptions | None = None  # None: VadOptions(max_segment_seconds=max_segment_seconds)
    guard: RepetitionGuard = RepetitionGuard()  # stops a segment caught in a decoding loop
    # verify the CTC head's greedy transcript as a draft (common/speculative.py): same tokens, fewer
    # decoder passes; ignored (plain greedy) when the model folder has no CTC graph
    speculative: bool = True
    # per-sentence times: CTC forced alignment of each segment's text (common/alignment.py) when the model
    # folder has the CTC graph, else the VAD segment's span shared out by characters. Costs one more CTC
    # head run per segment, so only outputs that show times (json, srt, vtt) ask for it.
    timestamps: bool = False
    # benchmarks only (random weights never stop): each segment decodes exactly this many tokens per
    # second of its audio, as real speech would give; 0: off
    forced_tokens_per_second: float = 0.0
    # a sequence that ends takes the next segment at once; False: fixed groups (the benchmark's comparison)
    refill: bool = True


@dataclass
class Segment:
    start: float
    end: float
    text: str
    token_ids: list[int]
    audio_rows: int
    draft_proposed: int = 0  # CTC draft tokens checked by the decoder (speculative decoding)
    draft_accepted: int = 0  # of those, tokens the decoder confirmed
    sentences: list[dict[str, object]] = field(default_factory=list)  # {start, end, text} (timestamps on)
    char_times: list[float] | None = None  # start time of each character of `text` (CTC alignment; not in JSON)


@dataclass
class Transcript:
    """The result for one input; `timings` are seconds per stage, summed over segments."""

    source: str
    text: str
    duration: float
    segments: list[Segment]
    timings: dict[str, float]
    n_tokens: int
    language: str | None = None
    extra: dict[str, object] = field(default_factory=dict)

    @property
    def tokens_per_second(self) -> float:
        decode = self.timings.get("decode", 0.0)
        return self.n_tokens / decode if decode > 0 else 0.0

    @property
    def real_time_factor(self) -> float:
        return self.timings.get("total", 0.0) / self.duration if self.duration > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        return {
            "source": self.source,
            "text": self.text,
            "language": self.language,
            "duration": round(self.duration, 3),
            "segments": [{k: v for k, v in asdict(s).items() if k != "char_times"} for s in self.segments],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "n_tokens": self.n_tokens,
            "tokens_per_second": round(self.tokens_per_second, 2),
            "real_time_factor": round(self.real_time_factor, 4),
            **self.extra,
        }


@dataclass
class _Piece:
    """One (span, audio) piece on its way through `_transcribe_pieces`: prompt until decoded, then its segment."""

    span: Span
    prepared: PreparedPrompt | None
    segment: Segment | None = None


@dataclass
class PreparedPrompt:
    """One segment's prompt: the shared text before the audio, then the rows decoded per segment."""

    before_ids: list[int]
    audio_rows: np.ndarray  # (n, hidden): adaptor output cut to the official count
    after_ids: list[int]
    encoder_out: np.ndarray | None = None  # (T, enc_dim): full encoder output, the CTC head's input

    @property
    def length(self) -> int:
        return len(self.before_ids) + self.audio_rows.shape[0] + len(self.after_ids)


def _timed(items: Iterator[T], timings: dict[str, float], stage: str) -> Iterator[T]:
    """`items`, adding the time spent producing each one to `timings[stage]` (lazy pipelines)."""
    while True:
        t0 = time.perf_counter()
        item = next(items, None)
        timings[stage] += time.perf_counter() - t0
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


def _load_decoder(gguf: Path, options: DecoderOptions) -> LlamaDecoder:
    """llama.cpp's model and context, with the embedding table located (the prompt's text rows need it)."""
    decoder = LlamaDecoder(gguf, options)
    decoder.load_embedding_table()
    return decoder


class Transcriber:
    """Loaded models for one model folder (model-gguf/)."""

    def __init__(
        self,
        model_dir: Path | str,
        *,
        encoder_path: Path | str | None = None,
        gguf_path: Path | str | None = None,
        threads: int = 2,
        providers: list[str] | None = None,
        decoder_options: DecoderOptions | None = None,
        preload: TranscribeOptions | None = None,
    ) -> None:
        """Load the encoder and llama.cpp side by side (common/loading.py); with `preload`, also the
        sessions those options will need (the VAD, the CTC head), which are otherwise opened on first use."""
        self.settings = ModelSettings.load(model_dir)
        self.frontend = FrontendConfig.from_dict(self.settings.frontend)
        t0 = time.perf_counter()
        self.load_times: dict[str, float] = {}  # seconds per model loaded (encoder, llama.cpp, ctc, vad)
        self._cached_before: list[int] | None = None  # prefix whose KV cache sits in sequence 0
        self._vad: SileroVad | None = None
        self._vad_missing_warned = False
        self._no_ctc_warned = False
        self._threads, self._providers = threads, providers
        self._drafter: CTCDrafter | None | bool = None  # False: no CTC head in the model folder
        self._loading: dict[str, Future] = {}  # sessions being opened in the background, by name
        if preload is not None:
            self.preload(preload)
        options = decoder_options or DecoderOptions(threads=threads)
        gguf = Path(gguf_path) if gguf_path else Path(model_dir) / "qwen3-0.6b-asr.gguf"
        decoder = in_background(lambda: _load_decoder(gguf, options), "llama.cpp", self.load_times)
        try:
            t1 = time.perf_counter()
            self.encoder = AudioEncoder(Path(encoder_path or self.settings.path("encoder")), threads=threads,
                                        providers=providers)
            self.load_times["encoder"] = time.perf_counter() - t1
        except BaseException:
            with contextlib.suppress(Exception):
                decoder.result().close()
            raise
        self.decoder = decoder.result()
        if self.decoder.n_embd != self.settings.adaptor_dim:
            raise ValueError(
                f"{self.decoder.path}: LLM width {self.decoder.n_embd} does not match the encoder's "
                f"adaptor output {self.settings.adaptor_dim}; export both from the same release"
            )
        self.load_seconds = time.perf_counter() - t0

    # ------------------------------------------------------------------ public API

    def transcribe(
        self,
        audio: str | Path | np.ndarray,
        options: TranscribeOptions = TranscribeOptions(),
        progress: Callable[[int, int], None] | None = None,
    ) -> Transcript:
        """Transcribe a file path or a 16 kHz mono float32 waveform."""
        if options.vad not in VAD_CHOICES:
            raise ValueError(f"unknown VAD {options.vad!r}; choose from {', '.join(VAD_CHOICES)}")
        if options.vad == "silero":
            vad = self._silero()
            if vad is not None:
                return self._transcribe_vad(audio, options, vad, progress)
        timings = dict.fromkeys(STAGES, 0.0)
        t_start = time.perf_counter()
        if isinstance(audio, (str, Path)):
            wave = load_audio(audio, self.frontend.sample_rate)
            source = str(audio)
        else:
            wave = np.asarray(audio, dtype=np.float32)
            source = "<waveform>"
        timings["load_audio"] = time.perf_counter() - t_start

        sr = self.frontend.sample_rate
        spans = split_at_quiet_points(wave, sr, options.max_segment_seconds)
        segments: list[Segment] = []
        pieces = ((span, wave[span.start:span.end]) for span in spans)
        for segment in self._transcribe_pieces(pieces, options, timings):
            segments.append(segment)
            if progress is not None:
                progress(len(segments), len(spans))
        timings["total"] = time.perf_counter() - t_start
        return Transcript(
            source=source,
            text=join_texts([s.text for s in segments]),
            duration=wave.shape[0] / sr,
            segments=segments,
            timings=timings,
            n_tokens=sum(len(s.token_ids) for s in segments),
            language=options.prompt.language,
            extra=self._extra(options),
        )

    def prepare(self, wave: np.ndarray, prompt: PromptOptions, timings: dict[str, float] | None = None
                ) -> PreparedPrompt | None:
        """Features, encoder and prompt for one segment; None when it is shorter than one frame."""
        timings = timings if timings is not None else dict.fromkeys(STAGES, 0.0)
        t0 = time.perf_counter()
        feats = compute_features(wave, self.frontend)
        t1 = time.perf_counter()
        timings["features"] += t1 - t0
        if feats.shape[0] == 0:
            return None
        encoder_out, adaptor_out = self.encoder.run(feats)
        timings["encoder"] += time.perf_counter() - t1
        n_rows = audio_token_count(feats.shape[0]) if self.settings.use_low_frame_rate else feats.shape[0]
        parts = build_prompt(prompt, sys_prompt=self.settings.sys_prompt, do_think=self.settings.do_think)
        return PreparedPrompt(
            before_ids=self.decoder.tokenize(parts.before),
            audio_rows=adaptor_out[:n_rows],
            after_ids=self.decoder.tokenize(parts.after),
            encoder_out=encoder_out,
        )

    def prefill(self, prepared: PreparedPrompt, seq: int = 0) -> np.ndarray:
        """Decode the prompt into `seq` and return the logits after its last position.

        The text before the audio is decoded only when it differs from what the
        KV cache already holds (then with the rest, in one llama_decode); audio rows
        and the text after them go in as one batch of embeddings.
        """
        n_before = len(prepared.before_ids)
        rows = np.concatenate([prepared.audio_rows, self.decoder.token_embeddings(prepared.after_ids)], axis=0)
        if self._cached_before != prepared.before_ids:
            self.decoder.clear(seq, 0)
            self._cached_before = None
            self.decoder.decode_prompt(prepared.before_ids, rows, seq)
            self._cached_before = list(prepared.before_ids)
        else:
            self.decoder.clear(seq, n_before)
            self.decoder.decode_embeddings(rows, n_before, seq)
        return self.decoder.logits(-1)

    def teacher_forced_logits(self, wave: np.ndarray, prompt: PromptOptions, tokens: list[int]) -> np.ndarray:
        """Logits after the prompt and after each of `tokens` fed in turn (parity tests)."""
        prepared = self.prepare(wave, prompt)
        if prepared is None:
            raise ValueError("audio shorter than one frame has no prompt")
        rows = [np.array(self.prefill(prepared), copy=True)]
        pos = prepared.length
        for token in tokens:
            rows.append(np.array(self.decoder.step(token, pos), copy=True))
            pos += 1
        return np.stack(rows)

    def close(self) -> None:
        for future in self._loading.values():  # let background loads finish before the process moves on
            with contextlib.suppress(Exception):
                future.result()
        self._loading.clear()
        self.decoder.close()

    # ------------------------------------------------------------------ internals

    def preload(self, options: TranscribeOptions) -> None:
        """Start opening, in background threads, the sessions `options` will need (the VAD, the CTC head)."""
        wanted = {"vad": options.vad == "silero", "ctc": options.speculative or options.timestamps}
        openers = {"vad": self._open_vad, "ctc": self._open_drafter}
        for name, opener in openers.items():
            if wanted[name] and name not in self._loading:
                self._loading[name] = in_background(opener, name, self.load_times)

    def _loaded(self, name: str, opener: Callable[[], T]) -> T:
        """What a background load of `name` gave (waiting for it), or `opener()` now if none was started."""
        future = self._loading.pop(name, None)
        if future is not None:
            return future.result()
        t0 = time.perf_counter()
        value = opener()
        self.load_times[name] = time.perf_counter() - t0
        return value

    def _open_drafter(self) -> CTCDrafter | None:
        if self.settings.has_ctc and "ctc" in self.settings.files and self.settings.path("ctc").is_file():
            return CTCDrafter(self.settings, threads=self._threads, providers=self._providers)
        return None

    def _open_vad(self) -> SileroVad | None:
        path = find_vad_model(self.settings.model_dir)
        return SileroVad(path) if path is not None else None

    def drafter(self) -> CTCDrafter | None:
        """The CTC head that drafts for speculative decoding, loaded on first use; None without CTC weights."""
        if self._drafter is None:
            self._drafter = False
            self._drafter = self._loaded("ctc", self._open_drafter) or False
        return self._drafter or None

    def _extra(self, options: TranscribeOptions) -> dict[str, object]:
        if not options.timestamps:
            return {}
        source = self.timestamp_source()
        if source == "segments" and not self._no_ctc_warned:
            warn(f"note: {self.settings.model_dir} has no CTC head: sentence times are shared out over the "
                 "VAD segments, not aligned to the audio")
            self._no_ctc_warned = True
        return {"timestamps": source}

    def _silero(self) -> SileroVad | None:
        """The VAD model, loaded once; None (and one warning) when neither the model folder nor silero-vad has it."""
        if self._vad is None:
            self._vad = self._loaded("vad", self._open_vad)
            if self._vad is None:
                if not self._vad_missing_warned:
                    warn("warning: silero_vad.onnx not found in the model folder (re-run 01_export_onnx.py with "
                         "silero-vad installed): cutting at quiet points instead (--vad none)")
                    self._vad_missing_warned = True
                return None
        return self._vad

    def _transcribe_vad(self, audio: str | Path | np.ndarray, options: TranscribeOptions, vad: SileroVad,
                        progress: Callable[[int, int], None] | None) -> Transcript:
        """Stream the input through the VAD; decode its speech segments (batched when the context allows)."""
        timings = dict.fromkeys(STAGES, 0.0)
        t_start = time.perf_counter()
        sr = self.frontend.sample_rate
        if isinstance(audio, (str, Path)):
            source = str(audio)
            blocks = iter_audio_blocks(audio, VAD_BLOCK_SECONDS, sr)  # opening errors surface here
        else:
            source = "<waveform>"
            blocks = iter([np.asarray(audio, dtype=np.float32).reshape(-1)])
        n_samples = 0

        def counted(items: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
            nonlocal n_samples
            for block in items:
                n_samples += len(block)
                yield block

        vad_options = options.vad_options or VadOptions(max_segment_seconds=options.max_segment_seconds)
        segmenter = SpeechSegmenter(vad, vad_options, sr)
        stream = segmenter.segments(counted(_timed(blocks, timings, "load_audio")))

        segments: list[Segment] = []
        for segment in self._transcribe_pieces(_timed(stream, timings, "vad"), options, timings):
            segments.append(segment)
            if progress is not None:
                progress(len(segments), 0)  # total unknown while streaming
        timings["vad"] = max(0.0, timings["vad"] - timings["load_audio"])  # the VAD pulls the audio
        timings["total"] = time.perf_counter() - t_start
        return Transcript(
            source=source,
            text=join_texts([s.text for s in segments]) if segments else "",
            duration=n_samples / sr,
            segments=segments,
            timings=timings,
            n_tokens=sum(len(s.token_ids) for s in segments),
            language=options.prompt.language,
            extra={"vad": "silero", **self._extra(options)},
        )

    def _transcribe_pieces(self, pieces: Iterable[tuple[Span, np.ndarray]], options: TranscribeOptions,
                           timings: dict[str, float]) -> Iterator[Segment]:
        """Segments of (span, audio) pairs, in input order, up to `decoder.n_seq_max` decoding at once.

        Each piece is encoded only when a sequence is free for it (`decode_stream` pulls them), so
        memory holds at most n_seq_max prepared segments plus the finished ones waiting for an
        earlier, longer one to end.
        """
        order: deque[_Piece] = deque()  # input order
        by_job: list[_Piece] = []

        def jobs() -> Iterator[Job]:
            for span, audio in pieces:
                prepared = None if is_digital_silence(audio) else self.prepare(audio, options.prompt, timings)
                piece = _Piece(span, prepared)
                order.append(piece)
                if prepared is None:
                    piece.segment = Segment(*self._seconds(span), "", [], 0)
                    continue
                by_job.append(piece)
                self._cached_before = None  # sequence 0 changes from here until a result is out
                rate = options.forced_tokens_per_second
                forced = max(1, round(rate * len(audio) / self.frontend.sample_rate)) if rate > 0 else None
                yield Job(prepared, self._draft(prepared, options, timings), forced)

        before = self.decoder.tokenize(build_prompt(options.prompt, sys_prompt=self.settings.sys_prompt,
                                                    do_think=self.settings.do_think).before)
        ready = self._cached_before == before
        stream = decode_stream(self.decoder, jobs(), options.max_new_tokens, min_new_tokens=options.min_new_tokens,
                               guard=options.guard, timings=timings, prefix_ready=ready, refill=options.refill)
        for index, decoded in stream:
            piece = by_job[index]
            assert piece.prepared is not None
            piece.segment = self._segment(piece.span, piece.prepared, decoded, options, timings)
            piece.prepared = None  # the encoder output is no longer needed
            self._cached_before = before
            while order and order[0].segment is not None:
                yield order.popleft().segment
        while order:  # trailing silent pieces
            segment = order.popleft().segment
            assert segment is not None
            yield segment

    def _seconds(self, span: Span) -> tuple[float, float]:
        start, end = span.seconds(self.frontend.sample_rate)
        return round(start, 3), round(end, 3)

    def _segment(self, span: Span, prepared: PreparedPrompt, decoded: Decoded, options: TranscribeOptions,
                 timings: dict[str, float]) -> Segment:
        """The text (and sentence times) of one decoded piece."""
        start, end = self._seconds(span)
        if decoded.looped:
            warn(loop_message(f"segment {start:.2f}-{end:.2f} s", len(decoded.tokens)))
        text = clean_text(self.decoder.detokenize(decoded.tokens))
        segment = Segment(start, end, text, decoded.tokens, int(prepared.audio_rows.shape[0]),
                          draft_proposed=decoded.proposed, draft_accepted=decoded.accepted)
        if options.timestamps:
            self._add_times(segment, prepared, timings)
        return segment

    def _add_times(self, segment: Segment, prepared: PreparedPrompt, timings: dict[str, float]) -> None:
        """Sentence times of one segment: aligned on the CTC posteriors, or shared out over the segment."""
        t0 = time.perf_counter()
        ctc = self.drafter()
        times = None
        if ctc is not None and segment.text and prepared.encoder_out is not None:
            log_probs = ctc.head.run(prepared.encoder_out, log_probs=True)
            times = char_times(segment.text, log_probs, ctc.vocab, self.settings.ctc.frame_shift_ms,
                               segment.start, segment.end)
        segment.char_times = times
        segment.sentences = [{"start": round(s.start, 3), "end": round(s.end, 3), "text": s.text}
                             for s in sentence_times(segment.text, segment.start, segment.end, times)]
        timings["align"] = timings.get("align", 0.0) + time.perf_counter() - t0

    def timestamp_source(self) -> str:
        """Where sentence times come from: "ctc" (forced alignment) or "segments" (VAD/segment spans)."""
        return "ctc" if self.drafter() is not None else "segments"

    def _draft(self, prepared: PreparedPrompt, options: TranscribeOptions,
               timings: dict[str, float]) -> list[int] | None:
        """The CTC head's transcript of a segment as Qwen3 tokens; None without speculation or CTC."""
        drafter = self.drafter() if options.speculative else None
        if drafter is None or prepared.encoder_out is None:
            return None
        t0 = time.perf_counter()
        draft = drafter.draft(self.decoder, prepared.encoder_out)
        timings["draft"] = timings.get("draft", 0.0) + time.perf_counter() - t0
        return draft
