"""The multipart fields of `POST /v1/audio/transcriptions`, checked and turned into engine options.

OpenAI's fields: `file`, `model` (accepted, echoed in the `openai-model` header), `language`
(ISO 639-1 or the model's own names: `funasr_nano.models.prompt.resolve_language`), `prompt`,
`response_format`, `timestamp_granularities[]`, `temperature` (0 only: decoding is greedy),
`stream`. Fields this model has and OpenAI lacks: `hotwords` (comma-separated) and `itn`
(true/false). Fun-ASR-Nano takes no free-text prompt, only a hotword list in its "context"
preamble, so `prompt` is read as hotwords too (split at commas) and joins `hotwords`.

Speakers (docs/diarization.md): `response_format=diarized_json` (OpenAI's format for its
diarizing model) asks for them; so does `diarize=true`, our field, for the formats that can show
them (verbose_json, srt, vtt). `speakers` (exactly N), `min_speakers`, `max_speakers` are ours
too (OpenAI has no count field): each 1 to MAX_SPEAKERS, and they imply diarization. OpenAI's
`known_speaker_names[]` / `known_speaker_references[]` are refused (400): speakers here are named
in the order they are first heard, never matched against reference clips.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from starlette.datastructures import FormData, UploadFile

from funasr_nano.models.prompt import (
    LANGUAGES,
    NANO,
    LanguageError,
    PromptOptions,
    language_code,
    parse_hotwords,
    resolve_language,
)
from funasr_nano.server.errors import bad_request
from funasr_nano.speakers.clustering import DEFAULT_MAX_SPEAKERS, SpeakerCount

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
# the formats that have a place for a speaker (diarized_json always diarizes)
SPEAKER_FORMATS = ("verbose_json", "srt", "vtt", "diarized_json")
# a client's speaker counts: funasr's own ceiling on the count it finds (its eigengap searches 1-15);
# a larger count would only make k-means split voices that the spectral step could not tell apart
MAX_SPEAKERS = DEFAULT_MAX_SPEAKERS
KNOWN_SPEAKER_FIELDS = ("known_speaker_names[]", "known_speaker_names", "known_speaker_references[]",
                        "known_speaker_references")
MAX_MODEL_CHARS = 128  # the `model` field is echoed in a response header: short printable ASCII only
GRANULARITIES = ("segment", "word")
_TRUE, _FALSE = ("true", "1", "yes", "on"), ("false", "0", "no", "off")


@dataclass(frozen=True)
class TranscriptionRequest:
    """One request's validated choices (the upload itself stays in the form until it is saved)."""

    upload: UploadFile
    model: str
    language: str | None  # the prompt's name (中文), None: the model decides
    language_code: str  # what verbose_json reports: the ISO code asked for, or "auto"
    prompt: PromptOptions
    response_format: str
    words: bool  # timestamp_granularities[] has "word"
    stream: bool
    diarize: bool = False  # label speakers (diarized_json, or diarize=true / a count with a format that shows them)
    speakers: SpeakerCount = field(default_factory=SpeakerCount)

    @property
    def timestamps(self) -> bool:
        """Whether sentence/character times are needed (they cost a CTC head run per segment). Not for
        diarized_json: its segments are the VAD's, whose speakers need no finer times."""
        return self.response_format in ("srt", "vtt", "verbose_json")


def _one(form: FormData, name: str) -> str | None:
    value = form.get(name)
    if value is None:
        return None
    if not isinstance(value, str):
        raise bad_request(f"'{name}' must be a text field, not a file", param=name)
    return value


def _flag(form: FormData, name: str, default: bool) -> bool:
    value = _one(form, name)
    if value is None or value.strip() == "":
        return default
    text = value.strip().lower()
    if text in _TRUE:
        return True
    if text in _FALSE:
        return False
    raise bad_request(f"'{name}' must be true or false, not {value!r}", param=name)


def _count(form: FormData, name: str) -> int | None:
    """One speaker-count field: an integer from 1 to MAX_SPEAKERS, or None when absent or blank."""
    value = _one(form, name)
    if value is None or not value.strip():
        return None
    try:
        number = int(value.strip())
    except ValueError:
        raise bad_request(f"'{name}' must be a whole number, not {value[:40]!r}", param=name) from None
    if not 1 <= number <= MAX_SPEAKERS:
        raise bad_request(f"'{name}' must be between 1 and {MAX_SPEAKERS}, not {number}", param=name)
    return number


def _speakers(form: FormData, response_format: str) -> tuple[bool, SpeakerCount]:
    """Whether to diarize, and what is known of the count; 400 for fields this server cannot honour."""
    for name in KNOWN_SPEAKER_FIELDS:
        if form.getlist(name):
            raise bad_request(f"'{name}' is not supported: speakers are named in the order they are first heard "
                              "(diarized_json: A, B, ...), not matched against reference clips", param=name,
                              code="unsupported_value")
    count, low, high = (_count(form, name) for name in ("speakers", "min_speakers", "max_speakers"))
    diarize = (_flag(form, "diarize", False) or response_format == "diarized_json"
               or any(n is not None for n in (count, low, high)))
    if not diarize:
        return False, SpeakerCount()
    if response_format not in SPEAKER_FORMATS:
        raise bad_request(f"speakers need a response_format that shows them ({', '.join(SPEAKER_FORMATS)}), "
                          f"not {response_format}", param="response_format")
    if count is not None and (low is not None or high is not None):
        raise bad_request("'speakers' gives the count: leave out 'min_speakers' and 'max_speakers'", param="speakers")
    low, high = low or 1, high or MAX_SPEAKERS
    if low > high:
        raise bad_request(f"min_speakers {low} is more than max_speakers {high}", param="min_speakers")
    return True, SpeakerCount(count, low, high)


def _model_name(value: str | None, default: str) -> str:
    """The `model` field, safe to echo in the `openai-model` header: printable ASCII, at most
    MAX_MODEL_CHARS. A newline there would make the HTTP layer refuse the response's headers."""
    name = (value or "").strip() or default
    if len(name) > MAX_MODEL_CHARS or not name.isascii() or not name.isprintable():
        raise bad_request(f"'model' must be printable ASCII of at most {MAX_MODEL_CHARS} characters", param="model")
    return name


def parse_request(form: FormData, *, default_model: str, max_prompt_chars: int,
                  languages: dict[str, str] = LANGUAGES, checkpoint: str = NANO) -> TranscriptionRequest:
    """The request's fields checked; raises ApiError 400 naming the field and the problem. `languages`: those
    the loaded model's `checkpoint` takes."""
    upload = form.get("file")
    if upload is None:
        raise bad_request("no 'file' field: send the audio as multipart/form-data field 'file'", param="file",
                          code="missing_file")
    if isinstance(upload, str):
        raise bad_request("'file' must be an uploaded file, not a text field", param="file", code="missing_file")

    response_format = (_one(form, "response_format") or "json").strip()
    if response_format not in RESPONSE_FORMATS:
        raise bad_request(f"unknown response_format {response_format!r}; choose from {', '.join(RESPONSE_FORMATS)}",
                          param="response_format")

    temperature = _one(form, "temperature")
    if temperature is not None and temperature.strip():
        try:
            value = float(temperature)
        except ValueError:
            raise bad_request(f"temperature must be a number, not {temperature!r}", param="temperature") from None
        if value != 0:
            raise bad_request(f"temperature {temperature} is not supported: this server decodes greedily "
                              "(temperature 0 only)", param="temperature", code="unsupported_value")

    language_field = _one(form, "language")
    try:
        language = resolve_language(language_field, languages, checkpoint)
    except LanguageError as exc:
        raise bad_request(str(exc), param="language", code="unsupported_language") from None
    code = "auto" if language is None else language_code(language, languages)  # 中文, zh-CN, zh: zh

    granularities = [g.strip() for key in ("timestamp_granularities[]", "timestamp_granularities")
                     for g in form.getlist(key) if isinstance(g, str) and g.strip()]
    unknown = [g for g in granularities if g not in GRANULARITIES]
    if unknown:
        raise bad_request(f"unknown timestamp_granularities {unknown[0]!r}; choose from {', '.join(GRANULARITIES)}",
                          param="timestamp_granularities[]")
    if granularities and response_format != "verbose_json":
        raise bad_request("timestamp_granularities needs response_format verbose_json",
                          param="timestamp_granularities[]")

    words_text = ", ".join(t for t in (_one(form, "hotwords"), _one(form, "prompt")) if t and t.strip())
    if len(words_text) > max_prompt_chars:
        raise bad_request(f"prompt and hotwords hold {len(words_text)} characters; this server takes at most "
                          f"{max_prompt_chars} (--max-prompt-chars)", param="prompt", code="prompt_too_long")
    prompt = PromptOptions(language=language, itn=_flag(form, "itn", True), hotwords=parse_hotwords(words_text))

    stream = _flag(form, "stream", False)
    diarize, speakers = _speakers(form, response_format)
    return TranscriptionRequest(upload=upload, model=_model_name(_one(form, "model"), default_model),
                                language=language, language_code=code, prompt=prompt,
                                response_format=response_format, words="word" in granularities, stream=stream,
                                diarize=diarize, speakers=speakers)
