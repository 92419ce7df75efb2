"""The engine: audio -> features -> ONNX encoder -> prompt with audio rows -> llama.cpp -> text.

One `Transcriber` holds the loaded models; `transcribe()` runs one input and
returns plain dataclasses with the text, the segments and the time spent in
each stage. The constant part of the prompt (system turn and task prompt) is
decoded once and its KV cache reused by every following segment with the same
options.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from common.audio import load_audio
from common.encoder import AudioEncoder
from common.features import FrontendConfig, audio_token_count, compute_features
from common.llm import DecoderOptions, LlamaDecoder
from common.prompt import PromptOptions, build_prompt
from common.segments import Span, split_at_quiet_points
from common.settings import ModelSettings

STAGES = ("load_audio", "features", "encoder", "prefill", "decode")


@dataclass(frozen=True)
class TranscribeOptions:
    """Per-call choices. `min_new_tokens` exists for benchmarks on random weights only."""

    prompt: PromptOptions = PromptOptions()
    max_new_tokens: int = 512
    max_segment_seconds: float = 30.0
    min_new_tokens: int = 0


@dataclass
class Segment:
    start: float
    end: float
    text: str
    token_ids: list[int]
    audio_rows: int


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
            "segments": [asdict(s) for s in self.segments],
            "timings": {k: round(v, 4) for k, v in self.timings.items()},
            "n_tokens": self.n_tokens,
            "tokens_per_second": round(self.tokens_per_second, 2),
            "real_time_factor": round(self.real_time_factor, 4),
            **self.extra,
        }


@dataclass
class PreparedPrompt:
    """One segment's prompt: the shared text before the audio, then the rows decoded per segment."""

    before_ids: list[int]
    audio_rows: np.ndarray  # (n, hidden): adaptor output cut to the official count
    after_ids: list[int]

    @property
    def length(self) -> int:
        return len(self.before_ids) + self.audio_rows.shape[0] + len(self.after_ids)


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
    ) -> None:
        self.settings = ModelSettings.load(model_dir)
        self.frontend = FrontendConfig.from_dict(self.settings.frontend)
        t0 = time.perf_counter()
        self.encoder = AudioEncoder(Path(encoder_path or self.settings.path("encoder")), threads=threads,
                                    providers=providers)
        options = decoder_options or DecoderOptions(threads=threads)
        self.decoder = LlamaDecoder(Path(gguf_path) if gguf_path else Path(model_dir) / "qwen3-0.6b-asr.gguf", options)
        if self.decoder.n_embd != self.settings.adaptor_dim:
            raise ValueError(
                f"{self.decoder.path}: LLM width {self.decoder.n_embd} does not match the encoder's "
                f"adaptor output {self.settings.adaptor_dim}; export both from the same release"
            )
        self.load_seconds = time.perf_counter() - t0
        self._cached_before: list[int] | None = None  # prefix whose KV cache sits in sequence 0

    # ------------------------------------------------------------------ public API

    def transcribe(
        self,
        audio: str | Path | np.ndarray,
        options: TranscribeOptions = TranscribeOptions(),
        progress: Callable[[int, int], None] | None = None,
    ) -> Transcript:
        """Transcribe a file path or a 16 kHz mono float32 waveform."""
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
        for i, span in enumerate(spans):
            segments.append(self._transcribe_span(wave, span, options, timings))
            if progress is not None:
                progress(i + 1, len(spans))
        timings["total"] = time.perf_counter() - t_start
        return Transcript(
            source=source,
            text=join_texts([s.text for s in segments]),
            duration=wave.shape[0] / sr,
            segments=segments,
            timings=timings,
            n_tokens=sum(len(s.token_ids) for s in segments),
            language=options.prompt.language,
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
        _, adaptor_out = self.encoder.run(feats)
        timings["encoder"] += time.perf_counter() - t1
        n_rows = audio_token_count(feats.shape[0]) if self.settings.use_low_frame_rate else feats.shape[0]
        parts = build_prompt(prompt, sys_prompt=self.settings.sys_prompt, do_think=self.settings.do_think)
        return PreparedPrompt(
            before_ids=self.decoder.tokenize(parts.before),
            audio_rows=adaptor_out[:n_rows],
            after_ids=self.decoder.tokenize(parts.after),
        )

    def prefill(self, prepared: PreparedPrompt, seq: int = 0) -> np.ndarray:
        """Decode the prompt into `seq` and return the logits after its last position.

        The text before the audio is decoded only when it differs from what the
        KV cache already holds; audio rows and the text after them go in as one
        batch of embeddings.
        """
        n_before = len(prepared.before_ids)
        if self._cached_before != prepared.before_ids:
            self.decoder.clear(seq, 0)
            self._cached_before = None
            self.decoder.decode_tokens(prepared.before_ids, 0, seq)
            self._cached_before = list(prepared.before_ids)
        else:
            self.decoder.clear(seq, n_before)
        rows = np.concatenate([prepared.audio_rows, self.decoder.token_embeddings(prepared.after_ids)], axis=0)
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
        self.decoder.close()

    # ------------------------------------------------------------------ internals

    def _transcribe_span(self, wave: np.ndarray, span: Span, options: TranscribeOptions,
                         timings: dict[str, float]) -> Segment:
        start, end = span.seconds(self.frontend.sample_rate)
        prepared = self.prepare(wave[span.start:span.end], options.prompt, timings)
        if prepared is None:
            return Segment(start, end, "", [], 0)
        t0 = time.perf_counter()
        logits = self.prefill(prepared)
        t1 = time.perf_counter()
        tokens = self.decoder.greedy(logits, prepared.length, options.max_new_tokens,
                                     min_new_tokens=options.min_new_tokens)
        t2 = time.perf_counter()
        timings["prefill"] += t1 - t0
        timings["decode"] += t2 - t1
        text = clean_text(self.decoder.detokenize(tokens))
        return Segment(round(start, 3), round(end, 3), text, tokens, int(prepared.audio_rows.shape[0]))
