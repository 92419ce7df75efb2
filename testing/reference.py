"""Plain greedy decoding of one prompt, one token per `llama_decode`: what "decoding a job alone" means.

Written without `funasr_nano.decoding`, so that the scheduler's tokens (batched, speculative, refilled,
compacted, with cached prefixes) are held against an independent implementation: the whole prompt
goes into the given sequence from scratch, then argmax steps with the stop rule spelled out here.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def prompt_logits(decoder, prefix_ids: Sequence[int], audio_rows: np.ndarray, suffix_ids: Sequence[int],
                  seq: int = 0) -> np.ndarray:
    """Decode a whole prompt into an emptied sequence; a copy of the logits after it."""
    decoder.clear(seq, 0)
    decoder.decode_tokens(list(prefix_ids), 0, seq)
    rows = np.concatenate([audio_rows, decoder.token_embeddings(list(suffix_ids))], axis=0)
    decoder.decode_embeddings(rows, len(prefix_ids), seq)
    return np.array(decoder.logits(-1), copy=True)


def greedy(decoder, logits: np.ndarray, pos: int, max_new_tokens: int, seq: int = 0, min_new_tokens: int = 0,
           guard=None) -> list[int]:
    """Greedy tokens from the prompt's logits: stop tokens end it (unless `min_new_tokens` forces more:
    then the best other token), `max_new_tokens` caps it, a loop the guard sees stops it (untrimmed)."""
    out: list[int] = []
    stop_ids = decoder.stop_ids
    while len(out) < max_new_tokens:
        token = int(np.argmax(logits))
        if token in stop_ids:
            if len(out) >= min_new_tokens:
                break
            masked = np.array(logits, copy=True)
            masked[sorted(stop_ids)] = -np.inf
            token = int(np.argmax(masked))
        out.append(token)
        if len(out) == max_new_tokens:
            break
        if guard is not None and guard.enabled and len(out) >= min_new_tokens and guard.looping(out):
            break
        logits = decoder.step(token, pos, seq)
        pos += 1
    return out


def decode_alone(decoder, prepared, max_new_tokens: int, min_new_tokens: int = 0, guard=None,
                 seq: int = 0) -> list[int]:
    """Greedy tokens of one prepared prompt (`Engine.prepare`), decoded alone in sequence `seq`."""
    logits = prompt_logits(decoder, prepared.prefix_ids, prepared.audio_rows, prepared.suffix_ids, seq)
    return greedy(decoder, logits, prepared.length, max_new_tokens, seq, min_new_tokens, guard)
