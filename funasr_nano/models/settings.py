"""`funasr_nano.json`: the model settings inference needs besides the graphs and the GGUF.

The exporter (funasr_nano/export_onnx.py) reads them from the release's config.yaml once, so that
inference never parses funasr's config or imports funasr/torch. This module is the torch-free
reader; the writer lives beside the exporter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from funasr_nano.models.prompt import NANO, checkpoint_languages

SETTINGS_FILE = "funasr_nano.json"
FORMAT_VERSION = 1

ENCODER_FILE = "FunASR_Nano_Encoder.onnx"
ENCODER_INT8_FILE = "FunASR_Nano_Encoder.int8.onnx"
CTC_FILE = "FunASR_Nano_CTC.onnx"
CTC_INT8_FILE = "FunASR_Nano_CTC.int8.onnx"
CTC_VOCAB_FILE = "ctc_vocab.tiktoken"
TOKENIZER_DIR = "tokenizer"


class SettingsError(RuntimeError):
    """funasr_nano.json is missing, unreadable or of another format version (one line for the user)."""


@dataclass(frozen=True)
class CTCSettings:
    """How to turn CTC ids into text without funasr (the SenseVoice tiktoken layout).

    `special_tokens` are the names of the ids right after the tiktoken ranks, in order, up to
    (not including) the first timestamp token; funasr's decode drops ids >= `timestamp_begin`.
    Special ids decode to their own names (tiktoken does that), hence the names, not just a count.
    """

    vocab_size: int
    blank_id: int
    n_ranks: int
    special_tokens: tuple[str, ...]
    timestamp_begin: int
    frame_shift_ms: int = 60  # one CTC frame = one LFR row (frame_shift * lfr_n)


@dataclass(frozen=True)
class ModelSettings:
    """Everything in funasr_nano.json, typed. `model_dir` is the folder it was read from."""

    model_dir: Path
    format_version: int
    frontend: dict[str, Any]  # funasr frontend_conf keys: fs, n_mels, frame_length, ... (dither 0)
    sys_prompt: bool
    do_think: bool
    use_low_frame_rate: bool
    input_size: int
    encoder_dim: int
    adaptor_dim: int
    llm_hidden: int
    ctc: CTCSettings | None = None
    files: dict[str, str] = field(default_factory=dict)
    checkpoint: str = NANO  # which checkpoint of the family was exported (folders exported before: Nano)

    @property
    def has_ctc(self) -> bool:
        return self.ctc is not None

    @property
    def languages(self) -> dict[str, str]:
        """The languages this checkpoint takes in its prompt, ISO code -> the prompt's name."""
        return checkpoint_languages(self.checkpoint)

    @property
    def capabilities(self) -> dict[str, bool]:
        """What needs the CTC head: times aligned to the audio, live partial text, speculative drafts.

        A checkpoint without CTC weights (the Hugging Face copy of Nano, MLT-Nano) still transcribes;
        its sentence times come from the segments and its streams show finals only.
        """
        return {"aligned_timestamps": self.has_ctc, "live_partials": self.has_ctc, "speculative_decoding": self.has_ctc}

    def describe(self) -> dict[str, object]:
        """The model as the JSON output, /health and the page show it."""
        return {"checkpoint": self.checkpoint, "languages": list(self.languages), "capabilities": self.capabilities}

    def path(self, key: str) -> Path:
        """Absolute path of one of the exported files (`encoder`, `encoder_int8`, `ctc`, ...)."""
        if key not in self.files:
            raise SettingsError(f"{self.model_dir / SETTINGS_FILE}: no file entry {key!r}")
        return self.model_dir / self.files[key]

    @classmethod
    def load(cls, model_dir: Path | str) -> ModelSettings:
        """Read `<model_dir>/funasr_nano.json`, refusing other format versions with one clear line."""
        model_dir = Path(model_dir)
        path = model_dir / SETTINGS_FILE
        try:
            with open(path, encoding="utf-8") as f:
                raw = json.load(f)
        except FileNotFoundError as exc:
            raise SettingsError(f"{path}: not found (export the model first: funasr-nano export, or 01_export_onnx.py)") from exc
        except (OSError, ValueError) as exc:
            raise SettingsError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
        try:
            return cls._from_dict(model_dir, raw)
        except (KeyError, TypeError, ValueError) as exc:
            raise SettingsError(f"{path}: malformed ({type(exc).__name__}: {exc})") from exc

    @classmethod
    def _from_dict(cls, model_dir: Path, raw: dict[str, Any]) -> ModelSettings:
        version = int(raw["format_version"])
        if version != FORMAT_VERSION:
            raise ValueError(f"format_version {version}, this code reads {FORMAT_VERSION}; re-run funasr-nano export (or 01_export_onnx.py)")
        ctc_raw = raw.get("ctc") or {}
        ctc = None
        if ctc_raw.get("present"):
            ctc = CTCSettings(
                vocab_size=int(ctc_raw["vocab_size"]),
                blank_id=int(ctc_raw["blank_id"]),
                n_ranks=int(ctc_raw["n_ranks"]),
                special_tokens=tuple(str(s) for s in ctc_raw["special_tokens"]),
                timestamp_begin=int(ctc_raw["timestamp_begin"]),
                frame_shift_ms=int(ctc_raw.get("frame_shift_ms", 60)),
            )
        prompt = raw["prompt"]
        return cls(
            model_dir=model_dir,
            format_version=version,
            frontend=dict(raw["frontend"]),
            sys_prompt=bool(prompt["sys_prompt"]),
            do_think=bool(prompt["do_think"]),
            use_low_frame_rate=bool(raw["use_low_frame_rate"]),
            input_size=int(raw["encoder"]["input_size"]),
            encoder_dim=int(raw["encoder"]["output_size"]),
            adaptor_dim=int(raw["adaptor"]["output_size"]),
            llm_hidden=int(raw["llm"]["hidden_size"]),
            ctc=ctc,
            files={str(k): str(v) for k, v in (raw.get("files") or {}).items()},
            checkpoint=str(raw.get("checkpoint") or NANO),
        )
