"""What a transcription returns: typed results (segments, sentences, timings, the transcript).

`Transcript.to_dict()` is the JSON the 03 scripts write; its fields and their order are part of
the output format.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field, fields

from funasr_nano.models.prompt import NANO, checkpoint_languages, language_code
from funasr_nano.output.language import text_language

STAGES = ("load_audio", "vad", "features", "encoder", "prefill", "decode")


class StageClock:
    """Seconds per stage of one input, added from several threads at once: the prepare stage (reading,
    VAD, features, encoder), the decoding owner (prefill, rounds) and the thread that reads the results."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._seconds = dict.fromkeys(STAGES, 0.0)

    def add(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] = self._seconds.get(stage, 0.0) + seconds

    def set(self, stage: str, seconds: float) -> None:
        with self._lock:
            self._seconds[stage] = seconds

    def __getitem__(self, stage: str) -> float:
        with self._lock:
            return self._seconds.get(stage, 0.0)

    def snapshot(self) -> dict[str, float]:
        with self._lock:
            return dict(self._seconds)


@dataclass(frozen=True)
class Sentence:
    """One sentence of a segment and its time span (seconds)."""

    start: float
    end: float
    text: str
    speaker: int | None = None  # with diarization: 0 for the first voice heard, 1 for the next, ...

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {"start": self.start, "end": self.end, "text": self.text}
        if self.speaker is not None:
            out["speaker"] = self.speaker
        return out


@dataclass
class Segment:
    """One decoded piece of the input (a VAD segment, or a cut at a quiet point)."""

    start: float
    end: float
    text: str
    token_ids: list[int]
    audio_rows: int
    draft_proposed: int = 0  # CTC draft tokens checked by the decoder (speculative decoding)
    draft_accepted: int = 0  # of those, tokens the decoder confirmed
    sentences: list[Sentence] = field(default_factory=list)  # with times (timestamps on)
    char_times: list[float] | None = None  # start time of each character of `text` (CTC alignment; not in JSON)
    speaker: int | None = None  # with diarization (set once the whole input is read): funasr's `spk`

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "start": self.start, "end": self.end, "text": self.text, "token_ids": list(self.token_ids),
            "audio_rows": self.audio_rows, "draft_proposed": self.draft_proposed,
            "draft_accepted": self.draft_accepted, "sentences": [s.to_dict() for s in self.sentences]}
        if self.speaker is not None:
            out["speaker"] = self.speaker
        return out


@dataclass
class Timings:
    """Seconds per stage, summed over segments. `draft` and `align` exist only when those stages ran."""

    load_audio: float = 0.0
    vad: float = 0.0
    features: float = 0.0
    encoder: float = 0.0
    prefill: float = 0.0
    decode: float = 0.0
    draft: float | None = None  # CTC drafts (speculative decoding)
    align: float | None = None  # CTC forced alignment (timestamps)
    diarize: float | None = None  # speaker embeddings and clustering (diarization)
    total: float = 0.0

    @classmethod
    def from_clock(cls, clock: dict[str, float] | StageClock) -> Timings:
        if isinstance(clock, StageClock):
            clock = clock.snapshot()
        return cls(**{f.name: clock[f.name] for f in fields(cls) if f.name in clock})

    def __getitem__(self, stage: str) -> float:
        value = getattr(self, stage, None) if stage in _TIMING_NAMES else None
        if value is None:
            raise KeyError(stage)
        return value

    def get(self, stage: str, default: float = 0.0) -> float:
        try:
            return self[stage]
        except KeyError:
            return default

    def to_dict(self) -> dict[str, float]:
        return {f.name: round(getattr(self, f.name), 4) for f in fields(self) if getattr(self, f.name) is not None}

    def __iter__(self):
        return iter(self.to_dict())


_TIMING_NAMES = frozenset(f.name for f in fields(Timings))


@dataclass
class Transcript:
    """The result for one input.

    `vad` is "silero" when the Silero VAD chose the segments (None: cut at quiet points);
    `timestamps` says where sentence times came from, "ctc" or "segments" (None: not asked for).
    `language` is given as the prompt names it (英文) or its code; it becomes the ISO code (`en`), and
    when the model chose (None) the language of the text it wrote (`funasr_nano.output.language`; None for
    a text without letters). `language_from` says which: "request" or "text". `checkpoint` names the model
    that wrote it (its languages decide the text's); `model` is what the JSON says of that model (checkpoint,
    languages, capabilities: `ModelSettings.describe`).
    """

    source: str
    text: str
    duration: float
    segments: list[Segment]
    timings: Timings
    n_tokens: int
    language: str | None = None
    vad: str | None = None
    timestamps: str | None = None
    model: dict[str, object] | None = None
    speakers: int | None = None  # with diarization: how many speakers were found
    language_from: str = field(init=False, default="request")

    def __post_init__(self) -> None:
        languages = checkpoint_languages(self.checkpoint)
        if self.language is None:
            self.language, self.language_from = text_language(self.text, languages), "text"
        else:
            self.language = language_code(self.language, languages)

    @property
    def checkpoint(self) -> str:
        """The checkpoint that wrote the text, from `model`; Fun-ASR-Nano-2512 when none is given."""
        return str(self.model["checkpoint"]) if self.model else NANO

    @property
    def tokens_per_second(self) -> float:
        return self.n_tokens / self.timings.decode if self.timings.decode > 0 else 0.0

    @property
    def real_time_factor(self) -> float:
        return self.timings.total / self.duration if self.duration > 0 else 0.0

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "source": self.source,
            "text": self.text,
            "language": self.language,
            "language_from": self.language_from,
            "duration": round(self.duration, 3),
            "segments": [s.to_dict() for s in self.segments],
            "timings": self.timings.to_dict(),
            "n_tokens": self.n_tokens,
            "tokens_per_second": round(self.tokens_per_second, 2),
            "real_time_factor": round(self.real_time_factor, 4),
        }
        if self.vad is not None:
            out["vad"] = self.vad
        if self.timestamps is not None:
            out["timestamps"] = self.timestamps
        if self.model is not None:
            out["model"] = self.model
        if self.speakers is not None:
            out["speakers"] = self.speakers
        return out
