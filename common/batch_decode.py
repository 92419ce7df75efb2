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
(`common.speculative.decode_round`): each sequence proposes its own number of draft
tokens in the shared batch; the tokens stay those of plain greedy decoding.

The context needs `n_seq_max` > 1 (`DecoderOptions(n_seq_max=N)`). With more segments
than that, a sequence that ends takes the next segment at once (`decode_stream`), so a
long segment does not leave the others' slots idle while it finishes.

Use llama.cpp's default split KV cache (one stream per sequence, `kv_unified=False`):
each sequence's cache is then laid out exactly as when it is decoded alone, and the tokens
are bit-for-bit those of one-by-one decoding (tested with f32 and f16 GGUFs). A unified cache also works and stores the prefix once, but with
flash attention (llama.cpp's CPU default) the results then depend on where earlier calls
left free cells: two identical calls can differ in the last bits of the logits.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from common.llm import LlamaDecoder
from common.repetition import RepetitionGuard
from common.speculative import SeqState, SpeculativeConfig, begin, decode_round, limits


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


@dataclass
class Job:
    """One segment to decode: its prompt and its draft (None or [] for plain greedy steps)."""

    prompt: Prompt
    draft: list[int] | None = None
    forced: int | None = None  # benchmarks only: exactly this many tokens (random weights never stop)


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
    """Greedy tokens for each prompt, in order (`decode_stream` over a list)."""
    jobs = [Job(p, d) for p, d in zip(prompts, drafts if drafts is not None else [None] * len(prompts))]
    out: list[Decoded | None] = [None] * len(prompts)
    for index, done in decode_stream(decoder, jobs, max_new_tokens, min_new_tokens=min_new_tokens, guard=guard,
                                     timings=timings, prefix_ready=prefix_ready):
        out[index] = done
    assert all(d is not None for d in out)
    return out  # type: ignore[return-value]


def decode_stream(
    decoder: LlamaDecoder,
    jobs: Iterable[Job],
    max_new_tokens: int,
    *,
    min_new_tokens: int = 0,
    guard: RepetitionGuard | None = None,
    timings: dict[str, float] | None = None,
    prefix_ready: bool = False,
    config: SpeculativeConfig | None = None,
    refill: bool = True,
) -> Iterator[tuple[int, Decoded]]:
    """(job index, tokens) for each job as it finishes, up to `decoder.n_seq_max` decoding at once.

    A sequence that ends hands its id to the next job at once (continuous batching): segments
    of very different lengths keep the batch full instead of waiting for the longest of a
    fixed group. Jobs are pulled from `jobs` only when a sequence is free, so a lazy iterable
    (one that runs the encoder) holds at most `n_seq_max` prepared segments.

    All prompts must share `before_ids`. `prefix_ready` says sequence 0 already holds them (a
    transcriber's cached prefix); afterwards sequence 0 still holds them. `timings` gets
    "prefill" and "decode" seconds added. `refill=False` admits jobs only when every sequence
    has ended (fixed groups: the benchmark's comparison).
    """
    config = config or SpeculativeConfig()
    width = max(1, decoder.n_seq_max)
    stop = decoder.stop_ids
    pending = enumerate(jobs)
    lookahead = next(pending, None)
    free = list(range(width))
    live: dict[int, tuple[int, SeqState]] = {}  # sequence id -> (job index, state)
    before: list[int] | None = None
    holders: set[int] = {0} if prefix_ready else set()  # sequences holding the text before the audio
    clock = timings if timings is not None else {}

    def finished(state: SeqState) -> Decoded:
        done = finish(state.tokens, guard, limits(state, max_new_tokens, min_new_tokens)[1])
        done.proposed, done.accepted = state.proposed, state.accepted
        return done

    while True:
        admitting = refill or not live  # fixed groups: a new group only once all have ended
        while admitting and free and lookahead is not None:
            index, job = lookahead
            prompt = job.prompt
            lookahead = next(pending, None)
            if before is None:
                before = list(prompt.before_ids)
            elif list(prompt.before_ids) != before:
                raise ValueError("batched prompts must share the text before the audio")
            seq = free.pop(0)
            t0 = time.perf_counter()
            logits = admit(decoder, prompt, before, seq, holders)
            t1 = time.perf_counter()
            _add(clock, "prefill", t1 - t0)
            state = SeqState(seq=seq, pos=prompt.length, logits=logits, draft=list(job.draft or []),
                             forced=job.forced)
            if not state.draft and not live and (width == 1 or lookahead is None):
                # alone in the context: the lean one-row loop (the common single-segment case)
                most, least = limits(state, max_new_tokens, min_new_tokens)
                tokens = decoder.greedy(logits, prompt.length, most, seq, least, guard)
                _add(clock, "decode", time.perf_counter() - t1)
                free.insert(0, seq)
                yield index, finish(tokens, guard, least)
                continue
            begin(state, stop, max_new_tokens, min_new_tokens, guard)
            if state.done:
                free.insert(0, seq)
                yield index, finished(state)
                continue
            live[seq] = (index, state)
        if not live:
            return
        t0 = time.perf_counter()
        # rows in increasing sequence order: with a split cache llama.cpp puts only consecutive sequence ids
        # in one micro-batch, so any other order (or a gap) costs another pass over the weights
        states = [live[seq][1] for seq in sorted(live)]
        decode_round(decoder, states, max_new_tokens, min_new_tokens, config, guard)
        _add(clock, "decode", time.perf_counter() - t0)
        for seq in [seq for seq, (_, state) in live.items() if state.done]:
            index, state = live.pop(seq)
            free.append(seq)
            yield index, finished(state)
        free.sort()
        if lookahead is None:
            compact(decoder, live, free, holders)


def compact(decoder: LlamaDecoder, live: dict[int, tuple[int, SeqState]], free: list[int], holders: set[int]) -> None:
    """Move the highest live sequences into the lowest free ids until the live ids are 0..n-1.

    llama.cpp batches only consecutive sequence ids of a split cache in one pass, so with no
    segment left to fill a gap, every gap would cost a pass over the weights per round until the
    end. A move copies the whole stream (cells keep their places: the same attention, the same
    tokens) and costs about one decode step; it saves one pass per remaining round.
    """
    while live and free and free[0] < max(live):
        src, dst = max(live), free.pop(0)
        decoder.clear(dst, 0)
        decoder.copy_sequence(src, dst)
        decoder.clear(src, 0)
        holders.discard(src)
        holders.add(dst)
        index, state = live.pop(src)
        state.seq = dst
        live[dst] = (index, state)
        free.append(src)
        free.sort()


def admit(decoder: LlamaDecoder, prompt: Prompt, before: list[int], seq: int, holders: set[int]) -> np.ndarray:
    """Put one prompt into sequence `seq`; returns a copy of the logits after it.

    `holders` are the sequences whose cache starts with the shared text before the audio (updated
    here). A holder only drops what follows that text. Any other sequence gets the text from
    sequence 0 (decoded there first if needed): with a split cache llama.cpp copies a whole
    stream, so whatever sequence 0 holds after the text goes too and is removed again. Either way
    the new rows land in the cells they would take if the segment were decoded alone, and each
    stream is copied at most once, not once per segment.
    """
    n_before = len(before)
    if seq == 0 and 0 not in holders:  # the whole prompt in one pass over the weights
        decoder.clear(0, 0)
        decoder.decode_prompt(before, _rows_after(decoder, prompt), 0)
        holders.add(0)
        return np.array(decoder.logits(-1), copy=True)
    if seq not in holders:
        if 0 not in holders:
            decoder.clear(0, 0)
            decoder.decode_tokens(before, 0, 0)
            holders.add(0)
        if seq != 0:
            decoder.clear(seq, 0)
            if n_before:
                decoder.copy_sequence(0, seq)
            holders.add(seq)
    decoder.clear(seq, n_before)
    decoder.decode_embeddings(_rows_after(decoder, prompt), n_before, seq)
    return np.array(decoder.logits(-1), copy=True)


def _rows_after(decoder: LlamaDecoder, prompt: Prompt) -> np.ndarray:
    """The embedding rows that follow the shared text: the audio, then the text after it."""
    return np.concatenate([prompt.audio_rows, decoder.token_embeddings(prompt.after_ids)], axis=0)


def _add(timings: dict[str, float], key: str, seconds: float) -> None:
    timings[key] = timings.get(key, 0.0) + seconds
