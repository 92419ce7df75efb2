"""One decoding round: a single `llama_decode` that advances every live sequence.

Each sequence feeds its last token, plus the draft tokens it proposes (none for plain greedy
rows), at its own positions; the logits of every row are read, each sequence keeps the longest
prefix of its proposal that equals greedy's own choice plus the token after it, and the rejected
rows are removed from its KV cache. Plain greedy decoding is the case with no proposals.

Rows go in increasing sequence order: llama.cpp's split KV cache puts only consecutive sequence
ids into one micro-batch, so any other order (or a gap) costs another pass over the weights.

A row's logits depend on how llama.cpp groups the rows it is given, in two ways, both measured
on the CPU backend. llama.cpp splits a round into micro-batches of consecutive sequence ids, each
sequence giving them the same number of rows (`micro_batches`), so a sequence with more rows than
its neighbours finishes in micro-batches of its own. (1) A micro-batch of one row is multiplied by
the weights with another kernel (a vector dot product per output) than several rows (tiled), and
the two sum in another order: with f32, f16 and bf16 weights the logits differ in the last bits
(relative 1e-6 for f32, 5e-4 for f16), enough to flip a near-tie; with q8_0 they are the same.
(2) With flash attention, one query row of one sequence against 512 or more cache cells has its
cache split among the threads and the parts summed, which no batch of two rows does: this holds
for every weight type once a sequence passes 256 cells. Two or more rows are computed alike
whatever their company (2 to 200 rows measured bit-identical).

`pad_lone_rows` therefore gives every sequence that would be alone with one row in a micro-batch
a second row (its last token again, one position on, logits read and thrown away, KV entry
removed): a sequence's logits then never depend on the load (the scheduler's `batch_invariant`).
That costs a 2-row decode whenever one sequence is live (1.33 single steps for f16 on 2 cores,
2.8 for q8_0 on an AVX-512 EPYC).

The other way round, `RoundCosts` may send a small round of plain rows as separate one-row steps:
on some CPUs llama.cpp's multi-row kernels cost more for 2 or 3 rows than that many single steps
(q8_0 on an AVX-512 EPYC: 56 ms for 2 rows, 72 ms for 3, 20 ms for one; an AVX2 box measured 1.74
steps for 2). Which is the case is learned from the rounds themselves, never assumed.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from funasr_nano.decoding.sequence import SequenceState
from funasr_nano.decoding.speculation import DEFAULT_CONFIG, SpeculativeConfig


class RoundDecoder(Protocol):
    """What a round needs from the llama.cpp binding (`LlamaDecoder`; tests use a fake)."""

    n_batch: int
    n_ctx: int
    stop_ids: frozenset[int]

    def decode_many(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
                    outputs: Sequence[bool]) -> None: ...

    def decode_rows(self, rows: np.ndarray, positions: Sequence[int], seqs: Sequence[int],
                    outputs: Sequence[bool]) -> None: ...

    def token_embeddings(self, tokens: Sequence[int]) -> np.ndarray: ...

    def logits_rows(self, count: int) -> np.ndarray: ...

    def step(self, token: int, pos: int, seq: int = 0) -> np.ndarray: ...

    def clear(self, seq: int = -1, start: int = 0) -> None: ...


MAX_SPLIT_ROWS = 3  # rounds of up to this many plain rows may go as one-row steps
SPLIT_MARGIN = 1.1  # ... when batched they measured this much slower than the steps would be
COST_MEMORY = 0.8  # weight of the previous estimate in each new measurement (a moving average)


@dataclass
class RoundCosts:
    """Seconds one plain round of n rows takes here (moving averages), and whether to split one.

    A size is decoded batched until it has been timed; it is split into one-row steps only if it
    then measured more than SPLIT_MARGIN times that many one-row steps (timed by splitting one
    round, if no lone round has timed them yet). Split rounds are timed as
    one-row steps, so the estimate of a split size is not revisited: the kernels do not change.
    Splitting is for weights whose lone rows compute what batched rows do (q8_0, measured); the
    scheduler does not split when it pads lone rows (`batch_invariant` with f16 or f32 weights).
    """

    seconds: dict[int, float] = field(default_factory=dict)
    split_rounds: int = 0

    def record(self, rows: int, seconds: float) -> None:
        old = self.seconds.get(rows)
        self.seconds[rows] = seconds if old is None else COST_MEMORY * old + (1 - COST_MEMORY) * seconds

    def split(self, rows: int) -> bool:
        """Whether a plain round of `rows` rows should go as one-row steps; once a size has been
        timed batched, one round of it is split if one-row steps were never timed (to time them)."""
        one, batched = self.seconds.get(1), self.seconds.get(rows)
        if not 2 <= rows <= MAX_SPLIT_ROWS or batched is None:
            return False
        return one is None or batched > SPLIT_MARGIN * rows * one


def micro_batches(rows: Sequence[tuple[int, int]], n_ubatch: int) -> list[list[tuple[int, int]]]:
    """How llama.cpp's split KV cache divides a round: `rows` is (sequence id, row count) in
    increasing id order; each micro-batch is (sequence id, rows taken) for its sequences.

    Mirrors `llama_batch_allocr::split_equal(n_ubatch, sequential=true)`: a micro-batch starts at
    the lowest sequence with rows left, takes the run of consecutive ids after it that still have
    rows, and as many rows from each as the one with fewest has (at most n_ubatch in all).
    """
    left = dict(rows)
    out: list[list[tuple[int, int]]] = []
    while True:
        live = [seq for seq, n in left.items() if n > 0]
        if not live:
            return out
        run = [live[0]]
        for seq in live[1:]:
            if seq != run[-1] + 1:
                break
            run.append(seq)
        take = min(min(left[seq] for seq in run), max(1, n_ubatch // len(run)))
        for seq in run:
            left[seq] -= take
        out.append([(seq, take) for seq in run])


def lone_row_sequences(rows: Sequence[tuple[int, int]], n_ubatch: int) -> list[int]:
    """The sequences that would be decoded as a micro-batch of one row (see `micro_batches`)."""
    return [batch[0][0] for batch in micro_batches(rows, n_ubatch) if len(batch) == 1 and batch[0][1] == 1]


def decode_round(decoder: RoundDecoder, states: Sequence[SequenceState],
                 config: SpeculativeConfig = DEFAULT_CONFIG, pad_lone_rows: bool = False,
                 costs: RoundCosts | None = None) -> None:
    """One llama_decode for the states that are not done (given in increasing sequence order).

    States that do not fit in `n_batch` rows wait for the next round. A round of one plain row
    takes `decoder.step`, the leanest call (the single-segment case), unless `pad_lone_rows`
    asks for padding rows (see the module docstring).
    """
    n_batch = decoder.n_batch
    plan: list[tuple[SequenceState, list[int]]] = []
    used = 0
    for state in states:
        if state.done:
            continue
        if state.prompt_rows is not None:  # a prompt folded into this round (unified cache only)
            if used + len(state.prompt_rows) > n_batch:
                break
            plan.append((state, []))
            used += len(state.prompt_rows)
            continue
        proposal: list[int] = []
        if state.draft is not None:
            room = min(state.rule.max_new_tokens - len(state.tokens) - 1, decoder.n_ctx - state.pos - 1)
            proposal = state.draft.propose(room, config)
        room = n_batch - used - 1
        if room < 0:
            break  # this sequence and those after it wait for the next round
        proposal = proposal[:room]
        plan.append((state, proposal))
        used += 1 + len(proposal)
    pads = _padded_sequences(plan, decoder) if pad_lone_rows and n_batch > 1 else set()
    while pads and used + len(pads) > n_batch and len(plan) > 1:  # the last sequence waits instead
        state, proposal = plan.pop()
        used -= 1 + len(proposal)
        pads = _padded_sequences(plan, decoder)
    if not plan:
        return
    if any(state.prompt_rows is not None for state, _ in plan):
        _decode_with_prompts(decoder, plan, config)
        return
    tokens: list[int] = []
    positions: list[int] = []
    seqs: list[int] = []
    real: list[int] = []  # the indices of rows that are not padding
    for state, proposal in plan:
        fed = [state.tokens[-1], *proposal]
        real.extend(range(len(tokens), len(tokens) + len(fed)))
        if state.seq in pads:
            fed.append(fed[-1])
        tokens.extend(fed)
        positions.extend(range(state.pos, state.pos + len(fed)))
        seqs.extend([state.seq] * len(fed))
    timed = costs is not None and not pads and len(tokens) == len(plan)  # plain rows: one per sequence
    split = timed and costs.split(len(tokens))
    t0 = time.perf_counter()
    if pads:
        decoder.decode_many(tokens, positions, seqs, [True] * len(tokens))
        all_logits = decoder.logits_rows(len(tokens))[real]
        for state, proposal in plan:
            if state.seq in pads:
                decoder.clear(state.seq, state.pos + len(proposal) + 1)
    elif len(tokens) == 1:
        all_logits = decoder.step(tokens[0], positions[0], seqs[0])[None, :]
    elif split:
        all_logits = np.stack([decoder.step(t, p, s).copy() for t, p, s in zip(tokens, positions, seqs)])
    else:
        decoder.decode_many(tokens, positions, seqs, [True] * len(tokens))
        all_logits = decoder.logits_rows(len(tokens))
    if timed:
        seconds = time.perf_counter() - t0
        if split:
            costs.split_rounds += 1
            costs.record(1, seconds / len(tokens))
        else:
            costs.record(len(tokens), seconds)
    argmaxes = all_logits.argmax(axis=1)
    row = 0
    for state, proposal in plan:
        _advance(decoder, state, proposal, all_logits, argmaxes, row, config)
        row += 1 + len(proposal)


def _decode_with_prompts(decoder: RoundDecoder, plan: Sequence[tuple[SequenceState, list[int]]],
                         config: SpeculativeConfig) -> None:
    """One llama_decode of embedding rows: the new sequences' prompt rows (only the last one's logits
    read) beside the other sequences' token rows, looked up in the embedding table as llama.cpp
    would. For the unified cache, where llama.cpp puts them all in one pass over the weights; a
    prompt costs a few rows' share of a round instead of a pass of its own."""
    rows: list[np.ndarray] = []
    positions: list[int] = []
    seqs: list[int] = []
    outputs: list[bool] = []
    for state, proposal in plan:
        if state.prompt_rows is not None:
            fed_rows, output = state.prompt_rows, [False] * (len(state.prompt_rows) - 1) + [True]
        else:
            fed = [state.tokens[-1], *proposal]
            fed_rows, output = decoder.token_embeddings(fed), [True] * len(fed)
        rows.append(fed_rows)
        positions.extend(range(state.pos, state.pos + len(fed_rows)))
        seqs.extend([state.seq] * len(fed_rows))
        outputs.extend(output)
    decoder.decode_rows(np.concatenate(rows, axis=0), positions, seqs, outputs)
    all_logits = decoder.logits_rows(sum(outputs))
    argmaxes = all_logits.argmax(axis=1)
    row = 0
    for state, proposal in plan:
        if state.prompt_rows is None:
            _advance(decoder, state, proposal, all_logits, argmaxes, row, config)
            row += 1 + len(proposal)
            continue
        state.pos += len(state.prompt_rows)
        state.prompt_rows = None
        state.logits = np.array(all_logits[row], copy=True)
        state.start(decoder.stop_ids)
        row += 1


def _padded_sequences(plan: Sequence[tuple[SequenceState, list[int]]], decoder: RoundDecoder) -> set[int]:
    """The sequences of a round that get a padding row: alone with one row in a micro-batch, and
    with a position left for it."""
    lone = set(lone_row_sequences([(state.seq, 1 + len(proposal)) for state, proposal in plan], decoder.n_batch))
    return {state.seq for state, proposal in plan
            if state.seq in lone and state.pos + len(proposal) + 1 < decoder.n_ctx}


def decode_to_end(decoder: RoundDecoder, states: Sequence[SequenceState],
                  config: SpeculativeConfig = DEFAULT_CONFIG, pad_lone_rows: bool = False) -> None:
    """Rounds until every state is done; each state's prompt must already be in its sequence.

    Afterwards each sequence's cache holds its prompt and the fed output tokens only (rejected
    draft rows removed).
    """
    for state in states:
        state.start(decoder.stop_ids)
    ordered = sorted(states, key=lambda s: s.seq)
    while any(not s.done for s in ordered):
        decode_round(decoder, ordered, config, pad_lone_rows)


def _advance(decoder: RoundDecoder, state: SequenceState, proposal: list[int], all_logits: np.ndarray,
             argmaxes: np.ndarray, row: int, config: SpeculativeConfig) -> None:
    """Consume this state's rows of one batch: accept the matching draft prefix plus one token."""
    k = len(proposal)
    state.rounds += 1
    fed = state.pos  # rows hold positions pos .. pos + k; position pos + j is valid once accepted
    accepted = 0
    stop_ids = decoder.stop_ids
    for j in range(k + 1):
        if not state.emit(all_logits[row + j], int(argmaxes[row + j]), stop_ids):
            break
        if j < k and state.tokens[-1] == proposal[j]:
            accepted += 1
            continue
        break
    valid_end = fed + 1 + accepted  # first position whose KV entry is not part of the output
    if valid_end < fed + 1 + k:
        decoder.clear(state.seq, valid_end)
    state.pos = valid_end
    draft = state.draft
    if draft is None:
        return
    draft.proposed += k
    draft.accepted += accepted
    if state.done:
        return
    draft.checked(k, accepted, config)
    draft.realign(state.tokens)
