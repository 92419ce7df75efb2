"""Prompts into llama.cpp sequences, reusing the KV cache of the text before the audio.

A prompt is three parts: the text before the audio (system turn and task prompt: language, ITN,
hotwords), the audio rows, and the text after them. The first part is the same for every segment
asked with the same options, so each sequence keeps it in its cache and a job that follows with
the same text decodes only its audio and the text after it. The cache is keyed by that text: the
sequences of one context may hold different prefixes, so segments with different languages or
hotwords share one batch.

With llama.cpp's split KV cache (one stream per sequence, the default) a sequence that lacks the
prefix copies it from a sequence that holds it: the copy takes the whole stream, so whatever
follows the prefix there is removed again; either way the new rows land in the cells they would
take if the segment were decoded alone, and the tokens are those of one-by-one decoding.

A prefix no sequence holds yet is decoded in a pass of its own, never in one pass with the rows
after it: llama.cpp's CPU flash attention takes another kernel for 64 or more query rows (tiled)
than for fewer, and the two differ in the last bits (logits by up to 5e-2 on a tiny f16 model,
measured). Were the prefix folded into the pass, 50 audio rows after a 20-token prefix would get
the tiled kernel when the prefix is new and the other one when it is cached, so a segment's
tokens would depend on what earlier jobs left in the cache. The extra pass costs one small
prefill per prefix text a context meets, and none in a fresh process that finds the prefix's
cells saved on disk (`funasr_nano.decoding.prefix_store`).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from funasr_nano.decoding.prefix_store import PrefixStore


@dataclass(frozen=True)
class Prompt:
    """What one job feeds the decoder: prefix text, audio rows (n, n_embd), token ids after them."""

    prefix: str
    audio_rows: np.ndarray
    suffix_ids: Sequence[int]


class PrefixDecoder(Protocol):
    """What the prefix cache needs from the llama.cpp binding (`LlamaDecoder`)."""

    def tokenize(self, text: str) -> list[int]: ...

    def clear(self, seq: int = -1, start: int = 0) -> None: ...

    def copy_sequence(self, src: int, dst: int) -> None: ...

    def sequence_state(self, seq: int) -> bytes: ...

    def restore_sequence_state(self, seq: int, data: bytes, n_positions: int) -> bool: ...

    def copy_pending(self, seq: int) -> bool: ...

    def decode_tokens(self, tokens: Sequence[int], start: int, seq: int = 0) -> None: ...

    def decode_embeddings(self, rows: np.ndarray, start: int, seq: int = 0) -> None: ...

    def token_embeddings(self, tokens: Sequence[int]) -> np.ndarray: ...

    def logits(self, index: int = -1) -> np.ndarray: ...


class PrefixCache:
    """Which prefix each sequence's cache starts with, and the token ids of recent prefix texts.

    Owned by the scheduler's thread: not thread-safe.
    """

    def __init__(self, decoder: PrefixDecoder, max_texts: int = 16, store: PrefixStore | None = None) -> None:
        self.decoder = decoder
        self.store = store  # saved prefix cells on disk (`funasr_nano.decoding.prefix_store`), for new prefixes
        self.max_texts = max_texts
        self._ids: OrderedDict[str, list[int]] = OrderedDict()
        self.held: dict[int, str] = {}  # sequence id -> prefix text its cache starts with

    def ids(self, text: str) -> list[int]:
        """Token ids of a prefix text (tokenized once while it stays among the recent ones)."""
        ids = self._ids.get(text)
        if ids is None:
            ids = self.decoder.tokenize(text)
            self._ids[text] = ids
            while len(self._ids) > self.max_texts:
                self._ids.popitem(last=False)
        else:
            self._ids.move_to_end(text)
        return ids

    def prompt_length(self, prompt: Prompt) -> int:
        return len(self.ids(prompt.prefix)) + int(prompt.audio_rows.shape[0]) + len(prompt.suffix_ids)

    def admit(self, prompt: Prompt, seq: int) -> np.ndarray:
        """Put `prompt` into sequence `seq`; returns a copy of the logits after its last position."""
        rows, start = self.place_prefix(prompt, seq)
        return self.feed(rows, start, seq)

    def feed(self, rows: np.ndarray, start: int, seq: int) -> np.ndarray:
        """Decode the rows `place_prefix` left to feed, in a pass of their own; a copy of the last one's logits."""
        self.decoder.decode_embeddings(rows, start, seq)
        return np.array(self.decoder.logits(-1), copy=True)

    def place_prefix(self, prompt: Prompt, seq: int) -> tuple[np.ndarray, int]:
        """Put `prompt`'s prefix into sequence `seq` (kept, copied, loaded or decoded) and cut what
        follows it; returns the rows still to feed (the audio rows, then the text after them) and
        the position of the first."""
        d = self.decoder
        ids = self.ids(prompt.prefix)
        n = len(ids)
        rows = np.concatenate([prompt.audio_rows, d.token_embeddings(list(prompt.suffix_ids))], axis=0)
        if self.held.get(seq) != prompt.prefix:
            donor = next((s for s, text in self.held.items() if text == prompt.prefix and s != seq), None)
            self.held.pop(seq, None)
            d.clear(seq, 0)
            if n and donor is None:
                self._fill(ids, seq)
            elif n:
                d.copy_sequence(donor, seq)
            self.held[seq] = prompt.prefix
        d.clear(seq, n)
        return rows, n

    def _fill(self, ids: list[int], seq: int) -> None:
        """A prefix no sequence holds: its saved cells, or a pass of its own (module docstring)."""
        d = self.decoder
        # a sequence just moved out of `seq` is copied at the next decode: restoring now would overwrite it
        data = self.store.load(ids) if self.store is not None and not d.copy_pending(seq) else None
        if data is not None:
            if d.restore_sequence_state(seq, data, len(ids)):
                return
            self.store.discard(ids)
        d.decode_tokens(ids, 0, seq)
        if self.store is not None:
            self.store.save(ids, d.sequence_state(seq))

    def release(self, seq: int) -> None:
        """Drop what follows the prefix in `seq` (a finished or cancelled job); the prefix stays for reuse."""
        text = self.held.get(seq)
        self.decoder.clear(seq, len(self._ids[text]) if text in self._ids else 0)
        if text not in self._ids:
            self.held.pop(seq, None)

    def moved(self, src: int, dst: int) -> None:
        """`src`'s whole stream was copied into `dst` and `src` emptied."""
        text = self.held.pop(src, None)
        if text is None:
            self.held.pop(dst, None)
        else:
            self.held[dst] = text

    def forget(self) -> None:
        """Nothing is known to be in any sequence (someone else used the decoder)."""
        self.held.clear()
