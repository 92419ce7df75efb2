"""One decoding round: a single `llama_decode` that advances every live sequence.

Each sequence feeds its last token, plus the draft tokens it proposes (none for plain greedy
rows), at its own positions; the logits of every row are read, each sequence keeps the longest
prefix of its proposal that equals greedy's own choice plus the token after it, and the rejected
rows are removed from its KV cache. Plain greedy decoding is the case with no proposals.

Rows go in increasing sequence order: llama.cpp's split KV cache puts only consecutive sequence
ids into one micro-batch, so any other order (or a gap) costs another pass over the weights.

On the CPU backend the logits of a row do not depend on which other rows share its batch, as
long as there is at least one: llama.cpp multiplies a lone row by the weights with another
kernel (a vector dot product per output) than several rows (tiled), and the two sum in another
order. With f32, f16 and bf16 weights the lone row's logits differ in the last bits (relative
1e-6 for f32, 5e-4 for f16, measured), enough to flip a near-tie; with q8_0 they are the same.
`pad_single_row` gives a lone row a second row (its own token again, one position on, logits
read and thrown away, KV entry removed), so a sequence's logits never depend on the load: that
costs a 2-row decode (1.33 single steps for f16 on 2 cores) whenever one sequence is live.

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

from common.decoding.sequence import SequenceState
from common.decoding.speculation import DEFAULT_CONFIG, SpeculativeConfig


class RoundDecoder(Protocol):
    """What a round needs from the llama.cpp binding (`LlamaDecoder`; tests use a fake)."""

    n_batch: int
    n_ctx: int
    stop_ids: frozenset[int]

    def decode_many(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
                    outputs: Sequence[bool]) -> None: ...

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


def decode_round(decoder: RoundDecoder, states: Sequence[SequenceState],
                 config: SpeculativeConfig = DEFAULT_CONFIG, pad_single_row: bool = False,
                 costs: RoundCosts | None = None) -> None:
    """One llama_decode for the states that are not done (given in increasing sequence order).

    States that do not fit in `n_batch` rows wait for the next round. A round of one plain row
    takes `decoder.step`, the leanest call (the single-segment case), unless `pad_single_row`
    asks for a second, discarded row (see the module docstring).
    """
    n_batch = decoder.n_batch
    tokens: list[int] = []
    positions: list[int] = []
    seqs: list[int] = []
    plan: list[tuple[SequenceState, list[int]]] = []
    for state in states:
        if state.done:
            continue
        proposal: list[int] = []
        if state.draft is not None:
            room = min(state.rule.max_new_tokens - len(state.tokens) - 1, decoder.n_ctx - state.pos - 1)
            proposal = state.draft.propose(room, config)
        rows = 1 + len(proposal)
        if len(tokens) + rows > n_batch:
            proposal = proposal[:max(0, n_batch - len(tokens) - 1)]
            rows = 1 + len(proposal)
            if len(tokens) + rows > n_batch:
                break  # this sequence waits for the next round
        tokens.append(state.tokens[-1])
        tokens.extend(proposal)
        positions.extend(range(state.pos, state.pos + rows))
        seqs.extend([state.seq] * rows)
        plan.append((state, proposal))
    if not plan:
        return
    padded = pad_single_row and len(tokens) == 1 and positions[0] + 1 < decoder.n_ctx and n_batch > 1
    timed = costs is not None and not padded and len(tokens) == len(plan)  # plain rows: one per sequence
    split = timed and costs.split(len(tokens))
    t0 = time.perf_counter()
    if padded:
        decoder.decode_many(tokens * 2, [positions[0], positions[0] + 1], seqs * 2, [True, True])
        all_logits = decoder.logits_rows(1)
        decoder.clear(seqs[0], positions[0] + 1)
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


def decode_to_end(decoder: RoundDecoder, states: Sequence[SequenceState],
                  config: SpeculativeConfig = DEFAULT_CONFIG, pad_single_row: bool = False) -> None:
    """Rounds until every state is done; each state's prompt must already be in its sequence.

    Afterwards each sequence's cache holds its prompt and the fed output tokens only (rejected
    draft rows removed).
    """
    for state in states:
        state.start(decoder.stop_ids)
    ordered = sorted(states, key=lambda s: s.seq)
    while any(not s.done for s in ordered):
        decode_round(decoder, ordered, config, pad_single_row)


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
