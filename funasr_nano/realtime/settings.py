"""The settings of a real-time session: what a client chooses (`SessionSettings`) and what the server does (`RealtimeConfig`)."""

from __future__ import annotations

from dataclasses import dataclass, field

from funasr_nano.audio.vad import VadOptions
from funasr_nano.config import TranscribeOptions
from funasr_nano.models.prompt import PromptOptions
from funasr_nano.speakers.online import DEFAULT_MAX_ONLINE_SPEAKERS, DEFAULT_THRESHOLD

MODEL_RATE = 16000
# Input rates taken as PCM16: 16 kHz is used as sent (bit-exact with offline transcription of the same
# samples); any other whole rate in this range goes through soxr's streaming resampler (high quality).
MIN_RATE, MAX_RATE = 8000, 48000


@dataclass(frozen=True)
class SessionSettings:
    """A client's choices (OpenAI's transcription session settings, `funasr_nano.realtime.protocol` parses them).

    `vad`: server VAD options (segments end at pauses), or None for manual turns: a segment is
    everything between two client commits (OpenAI's `turn_detection: null`).
    """

    sample_rate: int = MODEL_RATE
    prompt: PromptOptions = PromptOptions()
    vad: VadOptions | None = field(default_factory=VadOptions)
    model: str = "fun-asr-nano"
    # a speaker on each final (`funasr_nano.speakers.online`: assigned as each segment ends, not the offline
    # clustering); needs campplus.onnx in the model folder
    diarize: bool = False

    def __post_init__(self) -> None:
        if not (MIN_RATE <= int(self.sample_rate) <= MAX_RATE):
            raise ValueError(f"sample rate {self.sample_rate} Hz is not accepted: PCM16 mono at {MIN_RATE}-{MAX_RATE} Hz "
                             f"({MODEL_RATE} Hz is used as sent, other rates are resampled)")


@dataclass(frozen=True)
class RealtimeConfig:
    """The server's side of every session.

    Partials: every `partial_interval_seconds` of new audio in an open segment (only while the session
    keeps up: a partial is skipped while audio waits to be processed), the CTC head's greedy text of the
    segment, encoded in windows of at most `partial_window_seconds` (see `funasr_nano.realtime.partials`).
    `max_lag_seconds`: how far behind real time a session may fall (audio waiting for the VAD, or a
    final waiting for the decoder) before new audio is refused with a `falling_behind` error.
    `options`: what each final is decoded with (the offline defaults, so finals equal offline
    transcription), the session's prompt in place of theirs; their `max_segment_seconds` also
    bounds a turn, and their `vad` chooses the VAD of server turn detection: FunASR's FSMN-VAD for
    "fsmn" (the server's --vad fsmn), else Silero.
    """

    partial_interval_seconds: float = 0.5
    partial_window_seconds: float = 4.0
    partials: bool = True
    # partials give way to the finals of every stream on the engine (funasr_nano.realtime.partials.PartialBudget);
    # False: they run whenever their own stream has no final outstanding
    partial_budget: bool = True
    max_lag_seconds: float = 5.0
    options: TranscribeOptions = TranscribeOptions()
    # longest hotword prompt a client may set (None: any): the server's KV cache is sized for it
    max_prompt_chars: int | None = None
    # sessions with `diarize`: the cosine to a speaker's running mean at which a final is that speaker's, and the
    # most speakers one stream gets (funasr_nano.speakers.online says why these defaults)
    speaker_threshold: float = DEFAULT_THRESHOLD
    max_speakers: int = DEFAULT_MAX_ONLINE_SPEAKERS


DEFAULT_CONFIG = RealtimeConfig()
