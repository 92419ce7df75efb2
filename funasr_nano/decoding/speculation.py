"""Lossless speculative decoding of the Qwen3 decoder, drafted by the CTC head's greedy transcript.

One greedy step reads every weight of the decoder once, for one token. Checking a token the
decoder is likely to produce anyway costs little extra when it rides in the same `llama_decode`:
the weights are read once for all rows. The CTC head gives such a draft for free (its greedy text,
tokenized with the Qwen3 tokenizer), so each round feeds the last accepted token plus the next k
draft tokens, reads the logits of every row, keeps the longest prefix where the decoder's own
choice equals the draft, adds the decoder's choice after it and drops the rest from the KV cache.

The output is exactly plain greedy decoding's: every emitted token is the greedy choice (the one
stop rule of `funasr_nano.decoding.sequence`) from the logits of the row that holds the tokens before
it. What differs is only how many rows share one `llama_decode`; on the CPU
backend the logits of a row do not depend on the other rows of its batch, so the tokens are
identical, except that a micro-batch of one row is computed apart (`funasr_nano.decoding.rounds`):
with f16 weights, plain 1-row steps may then meet a near-tie differently, unless such rows are
padded (`batch_invariant`).

How many draft tokens to propose is a cost decision, not a guess: on the CPU a 2-row decode costs
1.7 single steps and a 16-row one 5.3, so a proposal pays only when enough of it will be kept.
Each sequence records how often its draft was right (`AcceptanceRecord`), and each round
`choose_k` picks the row count with the most expected output tokens per unit of cost. A good
draft quickly earns 16-row rounds; one right only at every other token gets 2-row rounds; a
useless one costs a single wasted round, then plain greedy steps.

This module holds what belongs to the draft alone: where it is believed to continue (`Draft`),
how often it was right (`AcceptanceRecord`) and how many tokens to propose (`choose_k`). The
rounds that feed proposals to llama.cpp, one batch for all sequences, are in
`funasr_nano.decoding.rounds`; every sequence has its own draft and its own proposal length there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# Cost of one llama_decode of n rows, in single-row steps, on the CPU backend (the q8_0 decoder, 2 threads,
# AVX2; measured with interleaved runs). llama.cpp's CPU matmuls work in tiles of 4 rows, so 2 or 3 rows
# cost nearly as much as 2 or 3 separate steps while 4, 8, 12 and 16 rows are cheap per row: only these
# sizes are worth proposing. The cost grows linearly beyond, so long proposals only pay off for drafts
# that are almost always right.
CPU_ROW_COSTS: tuple[tuple[int, float], ...] = ((1, 1.0), (2, 1.74), (4, 2.17), (8, 3.14), (12, 4.2), (16, 5.31))
K_MAX = 15  # most draft tokens proposed in one round (rows per sequence = k + 1)
PRIOR_ACCEPT = 0.8  # belief that a draft token is right before any has been checked
PRIOR_WEIGHT = 1.0  # ... worth this many observations
DECAY = 0.95  # weight of older rounds' observations: the draft's quality changes along a segment
NGRAM_MAX = 3  # longest suffix of the output looked up in the draft to re-align it
NEAR_BEFORE, NEAR_AFTER = 4, 24  # window around the expected draft position for 1-token matches
MAX_GUESS_MISSES = 2  # after this many fruitless rounds, propose only where the draft provably matches


@dataclass(frozen=True)
class SpeculativeConfig:
    """How many draft tokens to propose: the expected output per unit of decode cost decides.

    `row_costs` lists the batch sizes (rows per sequence) worth using and what each costs in
    single-row steps; the defaults are measured on the CPU (see CPU_ROW_COSTS). A GPU, where a few
    more rows cost almost nothing, would list flatter costs.
    """

    k_max: int = K_MAX
    row_costs: tuple[tuple[int, float], ...] = CPU_ROW_COSTS
    prior_accept: float = PRIOR_ACCEPT
    prior_weight: float = PRIOR_WEIGHT
    decay: float = DECAY


DEFAULT_CONFIG = SpeculativeConfig()


@dataclass
class AcceptanceRecord:
    """How often proposed draft tokens were right: the first of a proposal, and the ones after it.

    The first token after a guessed alignment (a substitution taken on trust) and after a matched one
    are counted apart, and apart from the later tokens: a draft that is right only every other token
    is always right at the first offset after a guess, which one pooled rate would hide. The later
    offsets share one rate, so a draft that was right 4 times in a row is trusted for 8 and then 16.
    Older rounds weigh less (`decay`): the draft's quality changes along a segment.
    """

    hits: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])  # first|matched, first|guess, later
    trials: list[float] = field(default_factory=lambda: [0.0, 0.0, 0.0])

    def _rate(self, i: int, config: SpeculativeConfig) -> float:
        w = config.prior_weight
        return (self.hits[i] + config.prior_accept * w) / (self.trials[i] + w)

    def rates(self, guess: bool, n: int, config: SpeculativeConfig) -> list[float]:
        """Acceptance rates of the n offsets of the next proposal."""
        return [self._rate(1 if guess else 0, config)] + [self._rate(2, config)] * max(0, n - 1)

    def update(self, guess: bool, proposed: int, accepted: int, decay: float) -> None:
        """Count one round: offsets 0 .. accepted were checked, all but the last one (if any) right."""
        for i in range(3):
            self.hits[i] *= decay
            self.trials[i] *= decay
        first = 1 if guess else 0
        self.trials[first] += 1.0
        self.hits[first] += 1.0 if accepted else 0.0
        later_checked = min(accepted + 1, proposed) - 1
        if later_checked > 0:
            self.trials[2] += later_checked
            self.hits[2] += max(0, accepted - 1)


def choose_k(rates: Sequence[float], limit: int, config: SpeculativeConfig) -> int:
    """Draft tokens to propose: the row count with the most expected output tokens per unit of cost.

    With acceptance rates q_j, proposing k tokens yields 1 + q_1 + q_1 q_2 + ... + q_1...q_k tokens
    (the decoder's own token always comes) for the cost of k + 1 rows. Ties go to fewer rows.
    """
    best_k, best_value = 0, 1.0 / config.row_costs[0][1]
    expected, survive, j = 1.0, 1.0, 0
    for rows, cost in config.row_costs:
        k = rows - 1
        if k > min(limit, config.k_max):
            break
        while j < k:
            survive *= rates[j]
            expected += survive
            j += 1
        value = expected / cost
        if value > best_value * 1.000001:
            best_k, best_value = k, value
    return best_k




def _find(draft: Sequence[int], pattern: Sequence[int], lo: int, hi: int) -> int | None:
    """Start index of the first occurrence of `pattern` starting in draft[lo:hi]."""
    n = len(pattern)
    lo = max(0, lo)
    hi = min(len(draft) - n + 1, hi)
    first = pattern[0]
    for i in range(lo, hi):
        if draft[i] == first and list(draft[i:i + n]) == list(pattern):
            return i
    return None


@dataclass
class Draft:
    """One sequence's draft (Qwen3 token ids of the CTC transcript) and what is known about it.

    `pos` is where the draft is believed to continue after the output so far; `proposed` /
    `accepted` count draft tokens checked by the decoder and kept.
    """

    tokens: list[int]
    pos: int = 0
    aligned: bool = True
    misses: int = 0  # consecutive rounds whose guessed proposal was rejected outright
    guess: bool = False  # the current alignment is a guess, not a match
    guess_failed: bool = False  # the last round's guessed proposal was rejected at once
    proposed: int = 0
    accepted: int = 0
    record: AcceptanceRecord = field(default_factory=AcceptanceRecord)

    def realign(self, out: Sequence[int]) -> None:
        """Decide where the draft continues after the tokens produced so far (`out`).

        The expected place is `pos`; when the last token is the draft token there, the draft
        simply goes on. Otherwise (the decoder added punctuation, wrote a number as digits...) the
        last 3, 2, then 1 output tokens are looked up in the draft, nearest the expected place
        first. With no match the token is taken for a substitution (CTC heard another character)
        and the draft goes on after it, as long as such guesses have not failed `MAX_GUESS_MISSES`
        rounds in a row; otherwise nothing is proposed until a later token matches again (plain
        greedy rows).
        """
        draft = self.tokens
        self.guess = False
        if not draft or not out:
            self.aligned = bool(draft) and not out
            return
        expected = self.pos
        if expected < len(draft) and draft[expected] == out[-1]:
            self.pos = expected + 1
            self.aligned = True
            return
        for n in range(min(NGRAM_MAX, len(out)), 1, -1):
            # longer n-grams are trustworthy anywhere; search forward from just before the expected place
            suffix = out[-n:]
            i = _find(draft, suffix, expected - NEAR_BEFORE, len(draft))
            if i is None:
                i = _find(draft, suffix, 0, expected - NEAR_BEFORE + n)
            if i is not None:
                self.pos, self.aligned = i + n, True
                return
        if self.guess_failed and expected >= 1 and draft[expected - 1] == out[-1]:
            # the decoder inserted a token (punctuation) that was taken for a substitution: undo the skip
            self.pos, self.aligned = expected, True
            return
        if self.misses < MAX_GUESS_MISSES and expected < len(draft):  # substitution: go on after it
            self.pos, self.aligned, self.guess = expected + 1, True, True
            return
        i = _find(draft, out[-1:], expected - NEAR_BEFORE, expected + NEAR_AFTER)
        if i is not None:
            self.pos, self.aligned = i + 1, True
            return
        self.aligned = False

    def propose(self, room: int, config: SpeculativeConfig) -> list[int]:
        """The draft tokens to verify next: at most `room` (what the sequence may still emit after one token)."""
        if not self.aligned:
            return []
        room = min(room, len(self.tokens) - self.pos)
        if room <= 0:
            return []
        limit = min(room, config.k_max)
        k = choose_k(self.record.rates(self.guess, limit, config), limit, config)
        return self.tokens[self.pos:self.pos + k]

    def checked(self, proposed: int, accepted: int, config: SpeculativeConfig) -> None:
        """Count one round in which `accepted` of `proposed` tokens were kept (the sequence goes on)."""
        if proposed:
            if accepted:
                self.misses = 0
            elif self.guess:
                self.misses += 1
            self.record.update(self.guess, proposed, accepted, config.decay)
        self.pos += accepted
        self.guess_failed = bool(proposed) and self.guess and not accepted
