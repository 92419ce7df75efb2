"""Greedy CTC decoding of the Fun-ASR-Nano CTC head, without torch, funasr or tiktoken.

Reproduces FunASRNano.inference_llm's `ctc_text`: argmax per frame, collapse repeats, drop the
blank, decode with the SenseVoice tiktoken tokenizer (ids >= timestamp_begin dropped, special ids
decode to their names, bytes joined then UTF-8 with errors="replace"), strip "<|nospeech|>".
The id layout (ranks, then specials) comes from funasr_nano.json, written at export time.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from funasr_nano.models.settings import CTCSettings, ModelSettings

NOSPEECH = "<|nospeech|>"


@dataclass(frozen=True)
class CTCToken:
    """One emitted token and the LFR frames (inclusive) its run of argmax frames covered."""

    token_id: int
    first_frame: int
    last_frame: int


def greedy_ctc(ids_or_logprobs: np.ndarray, blank: int) -> list[CTCToken]:
    """Collapse consecutive equal argmax ids and drop the blank, keeping each run's frame span."""
    arr = np.asarray(ids_or_logprobs)
    ids = arr.argmax(axis=-1) if arr.ndim == 2 else arr.reshape(-1)
    if ids.size == 0:
        return []
    starts = np.flatnonzero(np.r_[True, ids[1:] != ids[:-1]])
    ends = np.r_[starts[1:], ids.size] - 1
    return [CTCToken(int(ids[s]), int(s), int(e)) for s, e in zip(starts, ends) if ids[s] != blank]


class CTCVocabulary:
    """The SenseVoice tokenizer's id -> bytes table: tiktoken ranks, then special tokens, then timestamps."""

    def __init__(self, vocab_path: Path | str, settings: CTCSettings) -> None:
        self.path = Path(vocab_path)
        self.pieces: list[bytes] = read_tiktoken(self.path)
        if len(self.pieces) != settings.n_ranks:
            raise ValueError(f"{self.path}: {len(self.pieces)} tokens, funasr_nano.json says {settings.n_ranks}")
        self.pieces.extend(tok.encode("utf-8") for tok in settings.special_tokens)
        self.timestamp_begin = settings.timestamp_begin
        self.blank_id = settings.blank_id

    def decode(self, token_ids: list[int]) -> str:
        """funasr's Tokenizer.decode: drop timestamp ids, join the bytes, decode UTF-8 leniently."""
        data = b"".join(self.pieces[t] for t in token_ids if t < self.timestamp_begin)
        return data.decode("utf-8", errors="replace")

    def ctc_text(self, ids_or_logprobs: np.ndarray) -> str:
        """Greedy CTC text exactly as funasr's `ctc_text` (with <|nospeech|> removed)."""
        tokens = greedy_ctc(ids_or_logprobs, self.blank_id)
        return self.decode([t.token_id for t in tokens]).replace(NOSPEECH, "")


def read_tiktoken(path: Path | str) -> list[bytes]:
    """A tiktoken rank file (`base64-token rank` per line) as a rank-indexed list of byte strings."""
    path = Path(path)
    ranks: dict[int, bytes] = {}
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise ValueError(f"{path}:{lineno}: expected `token rank`")
            ranks[int(parts[1])] = base64.b64decode(parts[0])
    if sorted(ranks) != list(range(len(ranks))):
        raise ValueError(f"{path}: ranks are not 0..{len(ranks) - 1}")
    return [ranks[i] for i in range(len(ranks))]


class CTCModel:
    """The CTC head and its vocabulary: greedy drafts for speculative decoding, posteriors for alignment."""

    def __init__(self, settings: ModelSettings, *, threads: int = 2, providers: list[str] | None = None) -> None:
        from funasr_nano.models.encoder import CTCHead

        if settings.ctc is None:
            raise ValueError(f"{settings.model_dir}: the model has no CTC head")
        self.head = CTCHead(settings.path("ctc"), threads=threads, providers=providers)
        self.vocab = CTCVocabulary(settings.path("ctc_vocab"), settings.ctc)
        self.frame_shift_ms = settings.ctc.frame_shift_ms

    @classmethod
    def load(cls, settings: ModelSettings, *, threads: int = 2,
             providers: list[str] | None = None) -> CTCModel | None:
        """The model folder's CTC head, or None when it was exported without one."""
        if settings.has_ctc and "ctc" in settings.files and settings.path("ctc").is_file():
            return cls(settings, threads=threads, providers=providers)
        return None

    def text(self, encoder_out: np.ndarray) -> str:
        """Greedy CTC transcript of one segment's encoder output (funasr's `ctc_text`)."""
        return self.vocab.ctc_text(self.head.run(encoder_out))

    def log_probs(self, encoder_out: np.ndarray) -> np.ndarray:
        """Per-frame log-probabilities (T, V), for forced alignment."""
        return self.head.run(encoder_out, log_probs=True)
