"""The engine: audio -> features -> ONNX encoder -> prompt with audio rows -> llama.cpp -> text.

One `Engine` holds the loaded models, the prepare stage that turns audio into decoding jobs
(`funasr_nano.prepare`: a bounded pool of threads with an encoder budget) and the decoding
scheduler whose one thread owns the llama.cpp context (`funasr_nano.decoding`). It lives as long
as the models and may be shared by several threads. Build it from a configuration or a preset:

    engine = Engine.from_preset("cpu-int8", model_dir="model-gguf")
    transcript = engine.transcribe("talk.mp3")                  # a typed Transcript
    for segment in engine.segments("long.mp3"):                 # or segment by segment, lazily
        print(segment.start, segment.text)

Every front end takes the same path: the 03 scripts and corpus workers (`transcribe`, `segments`),
server requests (`segments`), live streams (`submit_segment`, one segment at a time). Each input's
pieces are prepared on the pool and submitted to the scheduler as they are ready; the caller reads
them back in input order.

The defaults are the 03 scripts': Silero VAD, 4 segments decoded together, speculative decoding
when the model folder has the CTC head, a KV cache sized by `funasr_nano.presets.context_per_sequence`.
Messages (fallbacks, loops) go to the `funasr_nano` loggers; the CLI prints them as one line each.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from funasr_nano.audio.features import FrontendConfig, audio_token_count, lfr_frame_count
from funasr_nano.audio.fsmn_vad import EndpointOptions, FsmnSegmenter, FsmnVad
from funasr_nano.audio.load import AudioTooLong, iter_audio_blocks, load_audio
from funasr_nano.audio.segments import SampleSpan, split_at_quiet_points
from funasr_nano.audio.vad import SileroVad, SpeechSegmenter, VadOptions
from funasr_nano.config import VAD_CHOICES, EngineConfig, TranscribeOptions
from funasr_nano.decoding import CapacityError, Decoded, Job, RoundPlanner, Scheduler, StopRule
from funasr_nano.decoding.prefix_store import PrefixStore
from funasr_nano.decoding.prefixes import PrefixCache
from funasr_nano.decoding.repetition import loop_message
from funasr_nano.decoding.scheduler import Observer
from funasr_nano.models.ctc import CTCModel
from funasr_nano.models.devices import gpu_setup
from funasr_nano.models.encoder import AudioEncoder
from funasr_nano.models.llm import DecoderOptions, LlamaDecoder
from funasr_nano.models.loading import in_background
from funasr_nano.models.prompt import PromptOptions, build_prompt
from funasr_nano.models.sessions import OnDemandSessions
from funasr_nano.models.settings import ModelSettings
from funasr_nano.output.alignment import char_times, sentence_times
from funasr_nano.output.results import Segment, Sentence, StageClock, Timings, Transcript
from funasr_nano.output.text import clean_text, join_texts
from funasr_nano.prepare import CpuTurns, PreparedPrompt, Preparer, encoder_runs_for, is_digital_silence
from funasr_nano.presets import PRESETS
from funasr_nano.realtime.partials import PartialBudget
from funasr_nano.speakers.diarize import Diarization, Diarizer
from funasr_nano.speakers.embeddings import SpeakerEmbedder
from funasr_nano.streams import PendingSegment, SegmentStream

log = logging.getLogger(__name__)

VAD_BLOCK_SECONDS = 60.0  # audio decoded at a time on the VAD path; the segmenter holds about three blocks


@dataclass
class _Piece:
    """One (span, audio) piece on its way: prepared on the pool, `decoded` once the scheduler is done
    (None inside: nothing to decode)."""

    span: SampleSpan
    prepared: PreparedPrompt | None
    decoded: Future
    scheduled: Future | None = None  # the scheduler's future, while it decodes

    def cancel(self) -> None:
        if self.scheduled is not None:
            self.scheduled.cancel()  # a message to the owner: the sequence is freed before its next round
        self.decoded.cancel()


def _load_decoder(gguf: Path, options: DecoderOptions) -> LlamaDecoder:
    """llama.cpp's model and context, with the embedding table located (the prompt's text rows need it)."""
    decoder = LlamaDecoder(gguf, options)
    decoder.load_embedding_table()
    return decoder


class Engine:
    """Loaded models for one model folder (model-gguf/), their prepare stage and the decoding scheduler.

    Extension points for benchmarks and tests (`testing.bench_engine`): `stop_rule` (when a segment's
    decoding ends) and `make_planner` (how sequences are handed out), both overridable by a subclass.
    """

    def __init__(
        self,
        model_dir: Path | str,
        *,
        encoder_path: Path | str | None = None,
        gguf_path: Path | str | None = None,
        threads: int = 2,
        providers: list[str] | None = None,
        decoder_options: DecoderOptions | None = None,
        observer: Observer | None = None,
        preload: TranscribeOptions | None = None,
        batch_invariant: bool = False,
        min_new_tokens: int = 0,
    ) -> None:
        """Load the encoder and llama.cpp side by side (both release the GIL while loading); with
        `preload`, also the sessions those options will need (the VAD, the CTC head), which are
        otherwise opened on first use. `batch_invariant`: a segment's tokens never depend on the
        other segments, files or requests decoded with it (`funasr_nano.decoding.scheduler`).
        `min_new_tokens`: every segment decodes at least that many tokens (`EngineConfig`)."""
        from funasr_nano.presets import GGUF_F16

        self.settings = ModelSettings.load(model_dir)
        self.frontend = FrontendConfig.from_dict(self.settings.frontend)
        self.min_new_tokens = min_new_tokens
        self.load_times: dict[str, float] = {}  # seconds per model loaded (encoder, llama.cpp, ctc, vad)
        self.sessions = OnDemandSessions(self.settings, threads, providers, self.load_times)
        self.partial_budget = PartialBudget()  # live streams' CTC partials on this engine (funasr_nano.realtime.partials)
        self._no_ctc_said = False
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
            self.sessions.close()
            raise
        try:
            self.decoder = decoder.result()
        except BaseException:
            self.sessions.close()  # the VAD / CTC sessions loading beside it must not die with the process
            raise
        if self.decoder.n_embd != self.settings.adaptor_dim:
            self.decoder.close()
            self.sessions.close()
            raise ValueError(
                f"{self.decoder.path}: LLM width {self.decoder.n_embd} does not match the encoder's "
                f"adaptor output {self.settings.adaptor_dim}; export both from the same release"
            )
        self.tokenizer = self.decoder.tokenizer  # thread-safe: callers' threads tokenize and detokenize
        prefixes = PrefixCache(self.decoder, store=PrefixStore.for_decoder(self.decoder))
        # where llama.cpp's threads take every core, encoder runs and decoding rounds take turns
        turns = CpuTurns(shared=(os.cpu_count() or 1) <= threads and not options.n_gpu_layers)
        self.scheduler = Scheduler(self.decoder, prefixes, planner=self.make_planner(self.decoder), observer=observer,
                                   batch_invariant=batch_invariant, turns=turns)
        runs = encoder_runs_for(self.scheduler.width, threads)
        self.preparer = Preparer(self.settings, self.frontend, self.encoder, self.tokenizer, self.sessions.ctc,
                                 workers=runs + 2, encoder_runs=runs, turns=turns)
        self.load_seconds = time.perf_counter() - t0

    @classmethod
    def from_config(cls, config: EngineConfig, **kwargs: object) -> Engine:
        """The models of `config` (its preset's files unless it names others), each sequence's KV cache
        sized for its limits. A GPU preset offloads what this machine can and logs what it cannot.
        `kwargs` go to the constructor (`observer`; a subclass's own)."""
        preset = PRESETS[config.preset]
        n_gpu_layers, providers = gpu_setup() if preset.gpu else (0, None)
        options = DecoderOptions(threads=config.threads, n_gpu_layers=n_gpu_layers, n_seq_max=config.batch_size,
                                 n_ctx=config.context_per_sequence, kv_unified=config.kv_unified)
        return cls(config.model_dir, encoder_path=config.encoder_file, gguf_path=config.gguf_file,
                   threads=config.threads, providers=providers, decoder_options=options, preload=config.preload,
                   batch_invariant=config.batch_invariant, min_new_tokens=config.min_new_tokens, **kwargs)

    @classmethod
    def from_preset(cls, name: str = "cpu-int8", model_dir: Path | str = "model-gguf", **settings: object) -> Engine:
        """`from_config(EngineConfig(preset=name, model_dir=model_dir, **settings))`: the fields of
        `funasr_nano.config.EngineConfig` (threads, batch_size, max_new_tokens, max_segment_seconds,
        max_hotword_chars, kv_unified, batch_invariant...); other keywords go to the constructor (`observer`)."""
        names = {f.name for f in dataclasses.fields(EngineConfig)}
        kwargs = {k: settings.pop(k) for k in list(settings) if k not in names}
        return cls.from_config(EngineConfig(preset=name, model_dir=Path(model_dir), **settings), **kwargs)

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self.sessions.close()
        self.preparer.close()
        self.scheduler.close()
        self.decoder.close()

    def preload(self, options: TranscribeOptions) -> None:
        """Start opening, in background threads, the sessions `options` will need (the VAD, the CTC head)."""
        wanted = {"vad": options.vad == "silero", "fsmn": options.vad == "fsmn",
                  "ctc": options.speculative or options.timestamps}
        self.sessions.preload(name for name, wanted in wanted.items() if wanted)

    # ------------------------------------------------------------------ extension points

    def make_planner(self, decoder: LlamaDecoder) -> RoundPlanner:
        """How the decoder's sequences are handed out (continuous batching); benchmarks override it."""
        return RoundPlanner(decoder.n_seq_max, decoder.n_ctx)

    def stop_rule(self, options: TranscribeOptions, seconds: float) -> StopRule:
        """When the decoding of one segment of `seconds` of audio ends; benchmarks override it."""
        return StopRule(max(options.max_new_tokens, self.min_new_tokens), self.min_new_tokens, options.guard)

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
        clock = StageClock()
        t_start = time.perf_counter()
        sr = self.frontend.sample_rate
        source = str(audio) if isinstance(audio, (str, Path)) else "<waveform>"
        vad = self._segmenter(options, sr)  # this input's own VAD state; None: no VAD
        n_samples = 0
        limit = options.max_audio_seconds
        if not isinstance(audio, (str, Path)) and limit is not None and np.size(audio) > limit * sr:
            raise AudioTooLong(source, limit)
        if vad is not None:
            if isinstance(audio, (str, Path)):
                # opening errors surface here
                blocks = iter_audio_blocks(audio, VAD_BLOCK_SECONDS, sr, max_seconds=limit)
            else:
                blocks = iter([np.asarray(audio, dtype=np.float32).reshape(-1)])

            def counted(items: Iterator[np.ndarray]) -> Iterator[np.ndarray]:
                nonlocal n_samples
                for block in items:
                    if feed.cancelled:  # silence or noise yields no segment: a step may read many blocks
                        raise CancelledError()
                    n_samples += len(block)
                    yield block

            spans = vad.segments(counted(_timed(blocks, clock, "load_audio")))
            pieces: Iterator[tuple[SampleSpan, np.ndarray]] = _timed(spans, clock, "vad")
        else:
            wave = (load_audio(audio, sr, max_seconds=limit) if isinstance(audio, (str, Path))
                    else np.asarray(audio, dtype=np.float32))
            clock.set("load_audio", time.perf_counter() - t_start)
            n_samples = wave.shape[0]
            cuts = split_at_quiet_points(wave, sr, options.max_segment_seconds)
            pieces = ((span, wave[span.start:span.end]) for span in cuts)
        diarizer = Diarizer(self.speaker_embedder(), options.speakers, sr) if options.diarize else None
        if diarizer is not None:
            pieces = diarizer.tap(pieces)

        def finish(segments: list[Segment]) -> Transcript:
            found: Diarization | None = diarizer.label(segments) if diarizer is not None else None
            if found is not None:
                clock.set("diarize", found.embed_seconds + found.cluster_seconds)
            if vad is not None:
                clock.set("vad", max(0.0, clock["vad"] - clock["load_audio"]))  # the VAD pulls the audio
            clock.set("total", time.perf_counter() - t_start)
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

        owner = object()  # this input: its segments are admitted in order, in turn with other callers'
        # enough prepared segments to fill every sequence and one more, so a freed sequence never waits
        feed = self.preparer.feed(pieces, lambda piece: self._prepare_piece(piece, options, clock, owner),
                                  ahead=self.scheduler.width + 1)

        def decoded() -> Iterator[Segment]:
            try:
                for piece in feed:
                    yield self._finish_piece(piece, piece.decoded.result(), options, clock)
            finally:
                feed.cancel()  # stopped early or failed: the rest is not prepared, what was is cancelled

        total = 0 if vad is not None else len(cuts)
        return SegmentStream(decoded(), finish, total, feed.cancel)

    def submit_segment(self, wave: np.ndarray, options: TranscribeOptions = TranscribeOptions(), *,
                       offset: int = 0) -> PendingSegment:
        """Decode one segment (16 kHz mono float32) on its own, alongside every other caller's work.

        For live audio, whose segments arrive one at a time: the segment is prepared on the engine's
        pool, then its job joins the scheduler's batch with the other streams and files. The text is
        that of `transcribe(wave, TranscribeOptions(vad="none"))` for a segment within
        `max_segment_seconds`: the same features, prompt, job and text path. `offset`: where the
        segment starts in its stream (samples), for the Segment's times. CapacityError at once when
        its prompt and new tokens cannot fit one sequence.
        """
        clock = StageClock()
        wave = np.asarray(wave, dtype=np.float32).reshape(-1)
        span = SampleSpan(offset, offset + len(wave))
        seconds = len(wave) / self.frontend.sample_rate
        self.scheduler.planner.check_fits(self._prompt_length(options.prompt, len(wave)),
                                          self.stop_rule(options, seconds).max_new_tokens, _segment_name(seconds))
        decoded: Future = Future()  # the piece's outcome, whichever thread ends it
        held: list[_Piece] = []

        def step() -> None:  # on the prepare pool, as a file's pieces are
            if decoded.cancelled():
                return
            try:
                piece = self._prepare_piece((span, wave), options, clock, None, decoded)
            except BaseException as exc:  # noqa: BLE001 - handed to the caller
                _settle(decoded, exception=exc)
                return
            held.append(piece)
            if decoded.cancelled():  # cancelled while it was prepared
                piece.cancel()

        def cancel() -> None:
            decoded.cancel()
            for piece in held:
                piece.cancel()

        self.preparer.pool.submit(step)
        return PendingSegment(decoded, lambda result: self._finish_piece(held[0], result, options, clock), cancel)

    def prepare(self, wave: np.ndarray, prompt: PromptOptions, clock: StageClock | None = None) -> PreparedPrompt | None:
        """Features, encoder and prompt for one segment; None when it is shorter than one frame."""
        return self.preparer.prepare(wave, prompt, clock)

    def teacher_forced_logits(self, wave: np.ndarray, prompt: PromptOptions, tokens: list[int]) -> np.ndarray:
        """Logits after the prompt and after each of `tokens` fed in turn (parity tests)."""
        prepared = self.prepare(wave, prompt)
        if prepared is None:
            raise ValueError("audio shorter than one frame has no prompt")

        def forced(decoder: LlamaDecoder, prefixes: PrefixCache) -> np.ndarray:
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
        return self.sessions.ctc()

    def silero_vad(self) -> SileroVad | None:
        """Silero VAD's session, opened once and shared by every input and live stream (each takes its own
        `stream()` state); None, and one warning, when neither the model folder nor silero-vad has it."""
        return self.sessions.silero_vad()

    def fsmn_vad(self) -> FsmnVad | None:
        """FSMN-VAD's session, shared likewise (each segmenter keeps its own state); None, and one warning,
        when the model folder lacks it."""
        return self.sessions.fsmn_vad()

    def speaker_embedder(self) -> SpeakerEmbedder:
        """CAM++ for diarization, opened once; a model folder without campplus.onnx is an error (asked for)."""
        return self.sessions.speaker_embedder()

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

    # ------------------------------------------------------------------ one piece: prepare, job, text

    def _prepare_piece(self, item: tuple[SampleSpan, np.ndarray], options: TranscribeOptions, clock: StageClock,
                       owner: Hashable | None, decoded: Future | None = None) -> _Piece:
        """On the prepare pool: one piece's prompt, its job submitted to the scheduler (silence: no job);
        its outcome goes to `decoded` (a new future unless the caller holds one already)."""
        span, audio = item
        decoded = decoded if decoded is not None else Future()
        prepared = None if is_digital_silence(audio) else self.prepare(audio, options.prompt, clock)
        piece = _Piece(span, prepared, decoded)
        if prepared is None:
            _settle(decoded, result=None)
            return piece
        job = self._job(prepared, options, len(audio) / self.frontend.sample_rate, clock)
        piece.scheduled = self.scheduler.submit(job, owner)
        piece.scheduled.add_done_callback(lambda f: _copy_outcome(f, decoded))
        return piece

    def _job(self, prepared: PreparedPrompt, options: TranscribeOptions, seconds: float, clock: StageClock) -> Job:
        """The decoding job of one prepared segment of `seconds` of audio.

        CapacityError when the prompt and the new tokens asked for cannot fit one sequence's context: such a
        job would reach a decoding round and make llama_decode fail for every job in it, so it is refused
        here, alone, before it is queued.
        """
        rule = self.stop_rule(options, seconds)
        job = Job(prepared.prompt, rule, None, clock, prepared.length)
        self.scheduler.planner.check(job, _segment_name(seconds))
        job.draft = self.preparer.draft(prepared, options.speculative, clock)
        return job

    def _prompt_length(self, prompt: PromptOptions, samples: int) -> int:
        """The prompt positions of a segment of `samples` samples, before its features exist."""
        parts = build_prompt(prompt, sys_prompt=self.settings.sys_prompt, do_think=self.settings.do_think)
        frames = lfr_frame_count(samples, self.frontend)
        rows = audio_token_count(frames) if self.settings.use_low_frame_rate else frames
        return len(self.tokenizer.tokenize(parts.before)) + rows + len(self.tokenizer.tokenize(parts.after))

    def _seconds(self, span: SampleSpan) -> tuple[float, float]:
        start, end = span.seconds(self.frontend.sample_rate)
        return round(start, 3), round(end, 3)

    def _finish_piece(self, piece: _Piece, decoded: Decoded | None, options: TranscribeOptions,
                      clock: StageClock) -> Segment:
        """The Segment of one piece: its text (and sentence times), on the reading thread."""
        start, end = self._seconds(piece.span)
        prepared = piece.prepared
        if decoded is None or prepared is None:
            return Segment(start, end, "", [], 0)
        if decoded.looped:
            log.warning(loop_message(f"segment {start:.2f}-{end:.2f} s", len(decoded.tokens)))
        text = clean_text(self.tokenizer.detokenize(decoded.tokens))
        segment = Segment(start, end, text, decoded.tokens, int(prepared.audio_rows.shape[0]),
                          draft_proposed=decoded.proposed, draft_accepted=decoded.accepted)
        if options.timestamps:
            self._add_times(segment, prepared, clock)
        piece.prepared = None  # the encoder output is no longer needed
        return segment

    def _add_times(self, segment: Segment, prepared: PreparedPrompt, clock: StageClock) -> None:
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
        clock.add("align", time.perf_counter() - t0)


def _timed(items: Iterator, clock: StageClock, stage: str) -> Iterator:
    """`items`, adding the time spent producing each one to `clock[stage]` (lazy pipelines)."""
    while True:
        t0 = time.perf_counter()
        item = next(items, None)
        clock.add(stage, time.perf_counter() - t0)
        if item is None:
            return
        yield item


def _segment_name(seconds: float) -> str:
    """How a capacity refusal names the segment."""
    return f"a {seconds:.1f} s segment with this prompt"


def _copy_outcome(source: Future, target: Future) -> None:
    """`target` gets what `source` got: its result, its exception, or cancelled."""
    if source.cancelled():
        target.cancel()
    elif source.exception() is not None:
        _settle(target, exception=source.exception())
    else:
        _settle(target, result=source.result())


def _settle(future: Future, *, result: object = None, exception: BaseException | None = None) -> None:
    with contextlib.suppress(Exception):  # cancelled meanwhile
        if exception is not None:
            future.set_exception(exception)
        else:
            future.set_result(result)


__all__ = ["CapacityError", "Engine", "EngineConfig", "PendingSegment", "PreparedPrompt", "SegmentStream",
           "TranscribeOptions", "clean_text", "join_texts"]
