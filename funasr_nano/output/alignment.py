"""Timestamps from the CTC head: forced alignment of the final transcript onto the CTC posteriors.

The LLM writes the text, but it says nothing about *when* each word was spoken. The CTC head
(present in the release, exported next to the encoder) gives per-frame log-probabilities over
the SenseVoice tiktoken vocabulary, one frame per 60 ms LFR row. Encoding the transcript with
that vocabulary and finding the best CTC path that spells exactly those tokens (Viterbi over
the blank-interleaved lattice) places every token on the frames where the acoustics support
it, even where the CTC head's own greedy text differs from the LLM's (digits written by ITN,
capitals, a word the CTC head got wrong): a forced path has to pass through every token in
order, so a poorly matching token is squeezed between its well matching neighbours.

This is what funasr's FunASRNano does for its "timestamps" (torchaudio's forced_align on
`ctc_tokenizer.encode(text)`); here it is numpy and the standard library only, so that
inference needs neither torch nor tiktoken nor the `regex` module.

Three layers, each usable alone:

- `BPEEncoder`: text -> CTC token ids with tiktoken's algorithm (pre-tokenize with the GPT-2
  pattern SenseVoice uses, then merge byte pairs by rank), with the byte span of every token
  so times can be mapped back to characters;
- `forced_align`: CTC Viterbi of a token sequence on (T, V) log-probs -> each token's frames;
- `char_times` / `sentence_times`: per-character start times of a segment's text (the format
  `funasr_nano/subtitles.py` reads as `char_times`) and per-sentence (start, end, text).

Punctuation and spaces are left out of the targets by default (the CTC head is not expected to
spell them reliably, and a forced punctuation token would have to steal a frame from speech);
they take the time of the next spoken character.
"""

from __future__ import annotations

import sys
import unicodedata
import weakref
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from funasr_nano.output.results import Sentence
from funasr_nano.output.subtitles import split_sentences

# --------------------------------------------------------------------------- pre-tokenization

# SenseVoice's (and Whisper's, GPT-2's) tiktoken pattern, which the CTC targets were encoded with:
#   's|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+
# Python's `re` has no \p{..}; the scanner below implements the same alternation by hand.
GPT2_PATTERN = r"""'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"""
_CONTRACTIONS = ("'s", "'t", "'re", "'ve", "'m", "'ll", "'d")
_LETTER, _NUMBER, _SPACE, _OTHER = "L", "N", "S", "O"
# `regex`'s \s is Unicode White_Space: str.isspace() minus the four ASCII separators U+001C..U+001F.
_NOT_REGEX_SPACE = frozenset("\x1c\x1d\x1e\x1f")


def _char_class(ch: str) -> str:
    """Which class of the pattern a character belongs to: letter, number, whitespace or other."""
    if ch.isspace() and ch not in _NOT_REGEX_SPACE:
        return _SPACE
    major = unicodedata.category(ch)[0]
    if major == "L":
        return _LETTER
    if major == "N":
        return _NUMBER
    return _OTHER


def _run_end(classes: Sequence[str], i: int, cls: str) -> int:
    """End (exclusive) of the run of `cls` characters starting at `i`."""
    n = len(classes)
    while i < n and classes[i] == cls:
        i += 1
    return i


def _match_at(text: str, classes: Sequence[str], i: int) -> int:
    """End of the pattern's match at `i` (leftmost alternative that matches, greedy, with backtracking)."""
    for c in _CONTRACTIONS:
        if text.startswith(c, i):
            return i + len(c)
    cls = classes[i]
    n = len(text)
    if cls != _SPACE:  # ` ?\p{L}+`, ` ?\p{N}+`, ` ?[^\s\p{L}\p{N}]+`: a run of one class
        return _run_end(classes, i, cls)
    if text[i] == " " and i + 1 < n and classes[i + 1] != _SPACE:
        return _run_end(classes, i + 1, classes[i + 1])  # the optional leading space joins the run
    end = _run_end(classes, i, _SPACE)
    if end == n or end - i == 1:  # `\s+(?!\S)` whole, or `\s+` for a single space before a word
        return end
    return end - 1  # `\s+(?!\S)` backtracks one: the last space goes with the next word


def split_pieces(text: str) -> list[str]:
    """`regex.findall(GPT2_PATTERN, text)` without the `regex` module: tiktoken's pre-tokenization."""
    classes = [_char_class(ch) for ch in text]
    pieces: list[str] = []
    i = 0
    while i < len(text):
        end = _match_at(text, classes, i)
        pieces.append(text[i:end])
        i = end
    return pieces


# --------------------------------------------------------------------------- byte-level BPE

_NO_RANK = sys.maxsize


class BPEEncoder:
    """tiktoken's encoder for one rank table (rank -> bytes), in pure Python.

    Why not tiktoken itself: inference must not depend on it (nor on `regex`). The algorithm is
    tiktoken's `encode_ordinary`: a piece found whole in the table is one token; otherwise its
    bytes are merged pairwise, always the adjacent pair of lowest rank (leftmost on ties), until
    no adjacent pair is in the table.
    """

    def __init__(self, pieces: Sequence[bytes]) -> None:
        self.pieces = list(pieces)
        self.ranks: dict[bytes, int] = {}
        for rank, piece in enumerate(self.pieces):
            self.ranks.setdefault(piece, rank)  # a duplicate keeps its lowest id, like the first occurrence
        missing = [b for b in range(256) if bytes([b]) not in self.ranks]
        if missing:
            raise ValueError(f"rank table lacks {len(missing)} single bytes (e.g. {missing[0]}): cannot encode all text")

    @classmethod
    def for_vocabulary(cls, vocab) -> BPEEncoder:
        """The encoder of a `funasr_nano.models.ctc.CTCVocabulary`, built once per vocabulary object.

        The vocabulary's pieces are the tiktoken ranks followed by the special tokens' names; the
        names can never be produced from ordinary text (the pattern splits `<|`, letters and `|>`).
        """
        encoder = _ENCODERS.get(vocab)
        if encoder is None:
            encoder = cls(vocab.pieces)
            _ENCODERS[vocab] = encoder
        return encoder

    def _merge(self, piece: bytes) -> list[int]:
        """Byte offsets of the token boundaries of one piece (0, ..., len(piece))."""
        ranks = self.ranks
        bounds = list(range(len(piece) + 1))
        pair_ranks = [ranks.get(piece[i : i + 2], _NO_RANK) for i in range(len(piece) - 1)]
        while pair_ranks:
            best = min(pair_ranks)
            if best == _NO_RANK:
                break
            i = pair_ranks.index(best)
            del bounds[i + 1]
            del pair_ranks[i]
            if i < len(pair_ranks):
                pair_ranks[i] = ranks.get(piece[bounds[i] : bounds[i + 2]], _NO_RANK)
            if i > 0:
                pair_ranks[i - 1] = ranks.get(piece[bounds[i - 1] : bounds[i + 1]], _NO_RANK)
        return bounds

    def encode_spans(self, text: str) -> list[tuple[int, int, int]]:
        """(token id, first byte, end byte) of each token, byte offsets into `text.encode()`."""
        out: list[tuple[int, int, int]] = []
        offset = 0
        for piece in split_pieces(text):
            data = piece.encode("utf-8")
            whole = self.ranks.get(data)
            if whole is not None:
                out.append((whole, offset, offset + len(data)))
            else:
                bounds = self._merge(data)
                out.extend((self.ranks[data[a:b]], offset + a, offset + b) for a, b in zip(bounds, bounds[1:]))
            offset += len(data)
        return out

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, as tiktoken's `encode_ordinary` gives them."""
        return [t for t, _, _ in self.encode_spans(text)]

    def decode(self, ids: Sequence[int]) -> str:
        """The text of some ids (bytes joined, invalid UTF-8 replaced), for checks and debugging."""
        return b"".join(self.pieces[i] for i in ids).decode("utf-8", errors="replace")


_ENCODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


# --------------------------------------------------------------------------- CTC forced alignment


@dataclass(frozen=True)
class TokenSpan:
    """One target token and the frames (inclusive) the best forced path spends on it."""

    token_id: int
    first_frame: int
    last_frame: int


@dataclass(frozen=True)
class Alignment:
    """The best CTC path spelling the targets: each target's frames, and the path's total log-prob."""

    spans: list[TokenSpan]
    score: float


def min_frames(targets: Sequence[int]) -> int:
    """Shortest input a CTC path can spell `targets` in: one frame each, plus a blank between repeats."""
    t = list(targets)
    return len(t) + sum(1 for a, b in zip(t, t[1:]) if a == b)


def _viterbi(emit: np.ndarray, skip: np.ndarray) -> tuple[np.ndarray, float]:
    """Best state path through the CTC lattice, given per-frame state scores (T, S) and skip penalties (S,).

    State s at frame t comes from s (stay), s - 1 (next state) or s - 2 (skip a blank, where
    `skip[s]` is 0; -inf where the skip is not allowed). One vectorized step per frame; back
    pointers kept as int8 offsets. Returns (path of states (T,), score); score is -inf if none.
    """
    n_frames, n_states = emit.shape
    delta = np.full(n_states, -np.inf)
    delta[:2] = emit[0, :2]
    back = np.zeros((n_frames, n_states), dtype=np.int8)
    cand = np.full((3, n_states), -np.inf)
    cols = np.arange(n_states)
    for t in range(1, n_frames):
        cand[0] = delta
        cand[1, 1:] = delta[:-1]
        np.add(delta[:-2], skip[2:], out=cand[2, 2:])
        b = cand.argmax(axis=0)
        back[t] = b
        delta = cand[b, cols] + emit[t]
    last = n_states - 1 if n_states == 1 or delta[-1] >= delta[-2] else n_states - 2
    score = float(delta[last])
    path = np.empty(n_frames, dtype=np.int64)
    s = last
    for t in range(n_frames - 1, -1, -1):
        path[t] = s
        s -= int(back[t, s])
    return path, score


def forced_align(log_probs: np.ndarray, targets: Sequence[int], blank: int) -> Alignment | None:
    """Viterbi CTC forced alignment of `targets` onto `log_probs` (T, V).

    Returns the frames of each target token on the most probable path that collapses to exactly
    `targets` (blanks allowed anywhere, a blank required between two equal consecutive tokens),
    or None when no such path exists: fewer frames than `min_frames(targets)`, or every path has
    probability zero. Empty targets give an all-blank path (no spans).
    """
    lp = np.asarray(log_probs)
    if lp.ndim != 2:
        raise ValueError(f"log_probs must be (T, V), got shape {lp.shape}")
    n_frames, vocab_size = lp.shape
    tg = np.asarray(list(targets), dtype=np.int64)
    if tg.size and (tg.min() < 0 or tg.max() >= vocab_size or bool((tg == blank).any())):
        raise ValueError("targets must be ids in [0, V) other than the blank")
    if not 0 <= blank < vocab_size:
        raise ValueError(f"blank id {blank} is outside the vocabulary (V={vocab_size})")
    if n_frames == 0:
        return None if tg.size else Alignment([], 0.0)
    if n_frames < min_frames(tg.tolist()):
        return None
    labels = np.full(2 * tg.size + 1, blank, dtype=np.int64)
    labels[1::2] = tg
    emit = lp[:, labels].astype(np.float64)  # only the columns the lattice visits
    skip = np.full(labels.size, -np.inf)
    skip[3::2] = np.where(tg[1:] != tg[:-1], 0.0, -np.inf)
    path, score = _viterbi(emit, skip)
    if not np.isfinite(score):
        return None
    token_states = np.arange(1, labels.size, 2)
    first = np.searchsorted(path, token_states, side="left")  # the path never goes back
    last = np.searchsorted(path, token_states, side="right") - 1
    spans = [TokenSpan(int(tok), int(a), int(b)) for tok, a, b in zip(tg, first, last)]
    return Alignment(spans, score)


# --------------------------------------------------------------------------- text -> targets

_APOSTROPHES = frozenset("'\u2019")


def _is_content(ch: str) -> bool:
    """Whether a character is spoken (letters, digits, combining marks): only these become targets."""
    return unicodedata.category(ch)[0] in "LNM"


def _is_wide(ch: str) -> bool:
    """CJK ideographs, kana, hangul, full-width forms: scripts written without spaces between words."""
    return unicodedata.east_asian_width(ch) in ("W", "F")


def _keeps_apostrophe(text: str, i: int) -> bool:
    """An apostrophe inside a word (don't, it's) is spelled by the CTC vocabulary ('t, 's): keep it."""
    return text[i] in _APOSTROPHES and 0 < i < len(text) - 1 and text[i - 1].isalpha() and text[i + 1].isalpha()


def target_text(text: str, keep_punctuation: bool = False) -> tuple[str, list[int]]:
    """The text to align and, for each of its characters, the index it came from in `text` (-1: added space).

    Without punctuation: spoken characters only; a run of other characters between two words
    becomes one space when it held whitespace or sits between two characters of space-separated
    scripts ("hello, world" -> "hello world", "你好，世界" -> "你好世界", "3.5" -> "3 5").
    With punctuation (what funasr aligns): the text with its whitespace runs collapsed.
    """
    chars: list[str] = []
    source: list[int] = []
    gap = ""  # characters skipped since the last kept one
    for i, ch in enumerate(text):
        keep = not ch.isspace() if keep_punctuation else (_is_content(ch) or _keeps_apostrophe(text, i))
        if not keep:
            gap += ch
            continue
        if chars and gap:
            spaced = any(c.isspace() for c in gap)
            if spaced or (not keep_punctuation and not _is_wide(chars[-1]) and not _is_wide(ch)):
                chars.append(" ")
                source.append(-1)
        gap = ""
        chars.append(ch)
        source.append(i)
    return "".join(chars), source


@dataclass(frozen=True)
class Targets:
    """CTC targets of a text: token ids, and per character of the aligned text its token and rank in it.

    `char_token[k]` is the token holding the first byte of aligned character k; `char_rank[k]`
    counts the timed (non-space) characters before k that start in the same token, `token_chars[j]`
    how many timed characters start in token j: a token spelling several characters shares its
    frames among them.
    """

    text: str
    source: list[int]
    ids: list[int]
    char_token: list[int]
    char_rank: list[int]
    token_chars: list[int]


def make_targets(text: str, encoder: BPEEncoder, keep_punctuation: bool = False) -> Targets:
    """Encode the spoken part of `text` and map each of its characters to the token that spells it."""
    aligned, source = target_text(text, keep_punctuation)
    spans = encoder.encode_spans(aligned)
    char_token: list[int] = []
    char_rank: list[int] = []
    token_chars = [0] * len(spans)
    j, byte = 0, 0
    for ch in aligned:
        while j + 1 < len(spans) and spans[j + 1][1] <= byte:  # the token holding this character's first byte
            j += 1
        char_token.append(j)
        char_rank.append(token_chars[j])
        if not ch.isspace():
            token_chars[j] += 1
        byte += len(ch.encode("utf-8"))
    return Targets(aligned, source, [t for t, _, _ in spans], char_token, char_rank, token_chars)


# --------------------------------------------------------------------------- character and sentence times


def _fill_gaps(times: list[float | None]) -> list[float] | None:
    """Untimed characters (punctuation, spaces) take the next timed character's time, or the previous one's."""
    known = [t for t in times if t is not None]
    if not known:
        return None
    out: list[float] = []
    nxt = known[-1]  # trailing untimed characters keep the last time
    for t in reversed(times):
        nxt = t if t is not None else nxt
        out.append(nxt)
    return out[::-1]


def _bounded(times: Sequence[float], start: float, end: float) -> list[float]:
    """Rounded to milliseconds, clipped to [start, end], never decreasing."""
    arr = np.clip(np.round(np.asarray(times, dtype=np.float64), 3), start, end)
    return [float(x) for x in np.maximum.accumulate(arr)]


def char_times(text: str, log_probs: np.ndarray, vocab, frame_shift_ms: float, start: float, end: float,
               *, keep_punctuation: bool = False, encoder: BPEEncoder | None = None) -> list[float] | None:
    """Start time (seconds) of every character of `text`, from CTC forced alignment; None if it cannot align.

    `log_probs` (T, V) are the CTC head's outputs for the segment's audio, which starts at `start`
    seconds (frame f starts at start + f * frame_shift_ms / 1000). `vocab` is the
    `funasr_nano.models.ctc.CTCVocabulary` (its pieces and blank id). A token's characters share its frames
    evenly; characters that are not aligned take the next aligned one's time. None when the text
    has nothing to align, or more tokens than the audio has frames: callers keep proportional times.
    """
    if not text:
        return []
    encoder = encoder or BPEEncoder.for_vocabulary(vocab)
    targets = make_targets(text, encoder, keep_punctuation)
    if not targets.ids:
        return None
    alignment = forced_align(log_probs, targets.ids, vocab.blank_id)
    if alignment is None:
        return None
    shift = frame_shift_ms / 1000.0
    times: list[float | None] = [None] * len(text)
    for k, ch in enumerate(targets.text):
        src = targets.source[k]
        if src < 0 or ch.isspace():
            continue
        span = alignment.spans[targets.char_token[k]]
        n = max(1, targets.token_chars[targets.char_token[k]])
        frames = span.first_frame + (span.last_frame + 1 - span.first_frame) * targets.char_rank[k] / n
        times[src] = start + frames * shift
    filled = _fill_gaps(times)
    return None if filled is None else _bounded(filled, start, end)


def proportional_char_times(text: str, start: float, end: float) -> list[float]:
    """Character start times without alignment: the segment shared out by non-space characters.

    The same rule `funasr_nano/subtitles.py` uses without `char_times` (the VAD-segment fallback).
    """
    total = max(1, sum(1 for ch in text if not ch.isspace()))
    times: list[float] = []
    seen = 0
    for ch in text:
        times.append(start + (end - start) * seen / total)
        if not ch.isspace():
            seen += 1
    return _bounded(times, start, max(start, end))


def sentence_times(text: str, start: float, end: float, times: Sequence[float] | None = None) -> list[Sentence]:
    """The segment's sentences (split as subtitles are) with their start and end times.

    `times` are per-character start times of `text` (`char_times`); None falls back to the
    proportional ones. A sentence starts at its first character's time and ends where the next
    one starts; the last ends at the segment's `end`.
    """
    if times is None or len(times) != len(text):
        times = proportional_char_times(text, start, end)
    positions = [i for i, ch in enumerate(text) if not ch.isspace()]  # non-space ordinal -> index in text
    sentences = split_sentences(" ".join(text.split()))
    firsts: list[int] = []
    seen = 0
    for sentence in sentences:
        firsts.append(positions[seen])
        seen += sum(1 for ch in sentence if not ch.isspace())
    starts = [min(end, max(start, float(times[i]))) for i in firsts]
    ends = starts[1:] + [max(end, starts[-1])] if starts else []
    return [Sentence(a, max(a, b), s) for a, b, s in zip(starts, ends, sentences)]


@dataclass(frozen=True)
class Word:
    """One word of a segment and its span (seconds): a whole word where words are spaced, a character where not."""

    word: str
    start: float
    end: float


def word_times(text: str, start: float, end: float, times: Sequence[float] | None = None) -> list[Word]:
    """The segment's words with their times: what verbose_json's `words[]` lists.

    Words of space-separated scripts (English) are whole words, with the punctuation written against them
    ("Hello," "world."); in scripts written without spaces (Chinese, Japanese) each character is one (with
    the punctuation after it: "好，"), as there is no word boundary in the text to go by. A word starts at its first character's time (`times`,
    per character of `text` as `char_times` gives them; None: shared out) and ends where the next one
    starts, the last at the segment's `end`.
    """
    if times is None or len(times) != len(text):
        times = proportional_char_times(text, start, end)
    spans: list[tuple[int, int]] = []  # [first, last + 1) in text
    i = 0
    while i < len(text):
        if text[i].isspace():
            i += 1
            continue
        j = i + 1
        if not _is_wide(text[i]):
            while j < len(text) and not text[j].isspace() and not _is_wide(text[j]):
                j += 1
        while j < len(text) and unicodedata.category(text[j]).startswith("P"):  # 好， / world。: with their word
            j += 1
        spans.append((i, j))
        i = j
    words: list[Word] = []
    for k, (a, b) in enumerate(spans):
        begin = float(min(end, max(start, times[a])))
        finish = float(times[spans[k + 1][0]]) if k + 1 < len(spans) else float(end)
        words.append(Word(text[a:b], begin, min(max(float(end), begin), max(begin, finish))))
    return words
