"""Typed configuration: what an engine is opened with (`EngineConfig`) and what each call asks (`TranscribeOptions`).

The command lines build these once from their options (`funasr_nano.cli.engine_config`,
`funasr_nano.cli.transcribe_options`); the library, the server, live sessions and corpus workers
only ever see these dataclasses, never a command line's parsed options. Both are frozen and picklable: a
corpus run hands them to its Ray actors as they are.

The split follows what a value fixes. `EngineConfig` sizes memory and threads when the models are
loaded (each sequence's KV cells come from its limits); `TranscribeOptions` may change from call to
call, within those limits: a call whose prompt and new tokens cannot fit is refused alone
(`funasr_nano.engine.CapacityError`) before it reaches a decoding round shared with others.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from funasr_nano.audio.vad import VadOptions
from funasr_nano.decoding.repetition import RepetitionGuard
from funasr_nano.models.prompt import PromptOptions
from funasr_nano.presets import (
    DEFAULT_BATCH_SIZE,
    DEFAULT_MAX_NEW_TOKENS,
    DEFAULT_MAX_SEGMENT_SECONDS,
    PRESETS,
    context_per_sequence,
)
from funasr_nano.speakers.clustering import SpeakerCount

VAD_CHOICES = ("silero", "fsmn", "none")


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
    # Decoding stops with AudioTooLong once more audio than this has been decoded (None: no limit):
    # a server's bound on work, which a container header that lies about its length cannot lift.
    max_audio_seconds: float | None = None
    # who spoke when (funasr_nano/speakers/, docs/diarization.md): CAM++ embeddings of every VAD segment while the
    # input streams, clustered once it is read, so `segments()` yields segments whose `speaker` is set only when
    # the stream is exhausted (the transcript's are). Needs campplus.onnx (`funasr-nano export --spk-release-dir`).
    diarize: bool = False
    speakers: SpeakerCount = SpeakerCount()  # what is known of the number of speakers

    def __post_init__(self) -> None:
        if self.vad not in VAD_CHOICES:
            raise ValueError(f"unknown VAD {self.vad!r}; choose from {', '.join(VAD_CHOICES)}")


@dataclass(frozen=True)
class EngineConfig:
    """How an engine is opened: the models, threads, the batch and each sequence's capacity.

    `max_new_tokens`, `max_segment_seconds` and `max_hotword_chars` size each sequence's KV cache
    (`context_per_sequence`); calls may ask for less, not more. `kv_unified`: one KV cache shared by
    all sequences, so a new segment's prompt joins the next decoding round instead of a pass of its
    own (many concurrent callers: the server); not with `batch_invariant`, which needs each
    sequence's cache laid out as when it is decoded alone. `min_new_tokens` makes every segment
    decode at least that many tokens, stop tokens passed over: speed measurements on random weights,
    which never stop (the hidden `--force-tokens`). `preload`: the sessions those options will need
    (VAD, CTC head) are opened alongside the decoder instead of on first use.
    """

    model_dir: Path = Path("model-gguf")
    preset: str = "cpu-int8"
    encoder_path: Path | None = None  # None: the preset's encoder file in model_dir
    gguf_path: Path | None = None  # None: the preset's GGUF file in model_dir
    threads: int = 2
    batch_size: int = DEFAULT_BATCH_SIZE
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    max_segment_seconds: float = DEFAULT_MAX_SEGMENT_SECONDS
    max_hotword_chars: int = 0  # the longest hotwords text a call will send
    min_new_tokens: int = 0
    kv_unified: bool = False
    batch_invariant: bool = False
    preload: TranscribeOptions | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        if self.preset not in PRESETS:
            raise ValueError(f"unknown preset {self.preset!r}; choose from {', '.join(PRESETS)}")
        if self.kv_unified and self.batch_invariant:
            raise ValueError("batch_invariant needs the split KV cache (kv_unified=False)")
        for name in ("threads", "batch_size", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, not {getattr(self, name)}")
        if not self.max_segment_seconds > 0:
            raise ValueError(f"max_segment_seconds must be above 0, not {self.max_segment_seconds}")
        object.__setattr__(self, "model_dir", Path(self.model_dir))

    @property
    def context_per_sequence(self) -> int:
        """KV cells each sequence gets: the longest prompt and the most new tokens these limits allow."""
        return context_per_sequence(max(self.max_new_tokens, self.min_new_tokens), self.max_segment_seconds,
                                    self.max_hotword_chars)

    @property
    def encoder_file(self) -> Path:
        return self.encoder_path or self.model_dir / PRESETS[self.preset].encoder_file

    @property
    def gguf_file(self) -> Path:
        return self.gguf_path or self.model_dir / PRESETS[self.preset].gguf_file


__all__ = ["EngineConfig", "TranscribeOptions", "VAD_CHOICES"]
