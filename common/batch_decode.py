"""Greedy decoding of several segments at once in one llama.cpp context.

Each segment gets its own sequence id. The text before the audio is the same for
every segment: it is decoded once into sequence 0 and copied to the others
(`llama_memory_seq_cp`). Each sequence's audio rows and the text after them go in
with one `llama_decode` per sequence (prompt rows are a batch already), exactly as
a lone segment's would. Then every generation step is ONE `llama_decode` with one
token per live sequence, so the weights are read once per step for all segments
instead of once per segment: the gain of batching on memory-bound hardware.

The tokens are those of decoding each segment alone (`LlamaDecoder.greedy`): same
stop rule, same `min_new_tokens` rule, same repetition guard.

With drafts (the CTC head's transcripts), the steps verify draft tokens instead
(`common.speculative.speculative_decode`): each sequence proposes its own number of draft
tokens in the shared batch; the tokens stay those of plain greedy decoding.

The context needs `n_seq_max` > 1 (`DecoderOptions(n_seq_max=N)`); more prompts than that
are decoded in groups of `n_seq_max`. Use llama.cpp's default split KV cache (one stream
per sequence, `kv_unified=False`): each sequence's cache is then laid out exactly as when
it is decoded alone, and the tokens are bit-for-bit those of one-by-one decoding (tested
with f32 and f16 GGUFs). A unified cache also works and stores the prefix once, but with
flash attention (llama.cpp's CPU default) the results then depend on where earlier calls
left free cells: two identical calls can differ in the last bits of the logits.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from common.llm import LlamaDecoder
from common.repetition import RepetitionGuard
from common.speculative import SeqState, speculative_decode


class Prompt(Protocol):
    """What `Transcriber.prepare` returns (`PreparedPrompt`)."""

    before_ids: list[int]
    audio_rows: np.ndarray
    after_ids: list[int]

    @property
    def length(self) -> int: ...


@dataclass
class Decoded:
    """One segment's generated tokens (a loop already trimmed) and whether the guard stopped it."""

    tokens: list[int]
    looped: bool = False
    proposed: int = 0  # draft tokens checked (speculative decoding)
    accepted: int = 0  # of those, tokens the decoder confirmed


def finish(tokens: list[int], guard: RepetitionGuard | None, min_new_tokens: int = 0) -> Decoded:
    """Trim a looping tail the guard recognizes (never below `min_new_tokens`, the benchmark case)."""
    if guard is None or not guard.enabled or len(tokens) < min_new_tokens or not guard.looping(tokens):
        return Decoded(list(tokens))
    trimmed = guard.trim(tokens)
    if len(trimmed) < min_new_tokens:
        trimmed = list(tokens)
    return Decoded(trimmed, looped=True)


def decode_batch(
    decoder: LlamaDecoder,
    prompts: Sequence[Prompt],
    max_new_tokens: int,
    *,
    min_new_tokens: int = 0,
    guard: RepetitionGuard | None = None,
    timings: dict[str, float] | None = None,
    prefix_ready: bool = False,
    drafts: Sequence[list[int] | None] | None = None,
) -> list[Decoded]:
    """Greedy tokens for each prompt, decoded `decoder.n_seq_max` at a time.

    All prompts must share `before_ids`. `prefix_ready` says sequence 0 already holds
    them (a transcriber's cached prefix); afterwards sequence 0 still holds them.
    `drafts` (one per prompt, None for none) switch to speculative decoding.
    `timings` gets "prefill" and "decode" seconds added.
    """
    if not prompts:
        return []
    before = list(prompts[0].before_ids)
    if any(list(p.before_ids) != before for p in prompts):
        raise ValueError("batched prompts must share the text before the audio")
    width = max(1, decoder.n_seq_max)
    out: list[Decoded] = []
    for lo in range(0, len(prompts), width):
        group = prompts[lo : lo + width]
        t0 = time.perf_counter()
        first = prefill_group(decoder, group, before, prefix_ready or lo > 0)
        t1 = time.perf_counter()
        group_drafts = None if drafts is None else list(drafts[lo : lo + width])
        if group_drafts is not None and any(group_drafts):
            states = [SeqState(seq=seq, pos=p.length, logits=logits, draft=list(draft or []))
                      for seq, (p, logits, draft) in enumerate(zip(group, first, group_drafts))]
            speculative_decode(decoder, states, max_new_tokens, min_new_tokens, guard=guard)
            for state in states:
                done = finish(state.tokens, guard, min_new_tokens)
                done.proposed, done.accepted = state.proposed, state.accepted
                out.append(done)
        elif len(group) == 1:
            tokens = decoder.greedy(first[0], group[0].length, max_new_tokens, 0, min_new_tokens, guard)
            out.append(finish(tokens, guard, min_new_tokens))
        else:
            out.extend(_greedy_group(decoder, group, first, max_new_tokens, min_new_tokens, guard))
        if timings is not None:
            timings["prefill"] = timings.get("prefill", 0.0) + (t1 - t0)
            timings["decode"] = timings.get("decode", 0.0) + (time.perf_counter() - t1)
    return out


def prefill_group(decoder: LlamaDecoder, prompts: Sequence[Prompt], before: list[int], prefix_ready: bool
                  ) -> list[np.ndarray]:
    """Each prompt into its own sequence (0, 1, ...); returns copies of the logits after each prompt.

    The shared text before the audio is decoded once into sequence 0 (or kept when
    `prefix_ready`) and copied to the other sequences.
    """
    n_before = len(before)
    if prefix_ready:
        decoder.clear(0, n_before)
    else:
        decoder.clear(0, 0)
        decoder.decode_tokens(before, 0, 0)
    for seq in range(1, len(prompts)):
        decoder.clear(seq, 0)
        if n_before:
            decoder.copy_sequence(0, seq)
    first: list[np.ndarray] = []
    for seq, prompt in enumerate(prompts):
        rows = np.concatenate([prompt.audio_rows, decoder.token_embeddings(prompt.after_ids)], axis=0)
        decoder.decode_embeddings(rows, n_before, seq)
        first.append(np.array(decoder.logits(-1), copy=True))
    return first


def _greedy_group(decoder: LlamaDecoder, prompts: Sequence[Prompt], first: list[np.ndarray], max_new_tokens: int,
                  min_new_tokens: int, guard: RepetitionGuard | None) -> list[Decoded]:
    """Plain greedy steps for every sequence at once: one llama_decode per step, one row per live sequence."""
    n = len(prompts)
    stop = decoder.stop_ids
    stop_list = list(stop)
    check_loops = guard is not None and guard.enabled
    tokens: list[list[int]] = [[] for _ in range(n)]
    pos = [p.length for p in prompts]
    live = list(range(n))
    current: Sequence[np.ndarray] = first
    while live:
        feed: list[int] = []
        still: list[int] = []
        for k, seq in enumerate(live):
            logits = current[k]
            out = tokens[seq]
            token = int(np.argmax(logits))
            if token in stop:
                if len(out) >= min_new_tokens:
                    continue
                masked = np.array(logits, copy=True)
                masked[stop_list] = -np.inf
                token = int(np.argmax(masked))
            out.append(token)
            if len(out) == max_new_tokens:
                continue
            if check_loops and len(out) >= min_new_tokens and guard.looping(out):
                continue
            feed.append(token)
            still.append(seq)
        if not still:
            break
        decoder.decode_many(feed, [pos[s] for s in still], still, [True] * len(still))
        for s in still:
            pos[s] += 1
        current = decoder.logits_rows(len(still))
        live = still
    return [finish(t, guard, min_new_tokens) for t in tokens]
