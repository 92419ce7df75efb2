"""Lossless speculative decoding of the Qwen3 decoder, drafted by the CTC head's greedy transcript.

One greedy step reads every weight of the decoder once, for one token. Checking a token the
decoder is likely to produce anyway costs little extra when it rides in the same `llama_decode`:
the weights are read once for all rows. The CTC head gives such a draft for free (its greedy text,
tokenized with the Qwen3 tokenizer), so each round feeds the last accepted token plus the next k
draft tokens, reads the logits of every row, keeps the longest prefix where the decoder's own
choice equals the draft, adds the decoder's choice after it and drops the rest from the KV cache.

The output is exactly what `LlamaDecoder.greedy` gives: every emitted token is the greedy choice
(same argmax, same stop rule, same `min_new_tokens` forcing) from the logits of the row that holds
the tokens before it. What differs is only how many rows share one `llama_decode`; on the CPU
backend the logits of a row do not depend on the other rows of its batch (checked by the tests),
so the tokens are identical.

How many draft tokens to propose is a cost decision, not a guess: on the CPU a 2-row decode costs
1.7 single steps and a 16-row one 5.3, so a proposal pays only when enough of it will be kept.
Each sequence records how often its draft was right (`AcceptanceRecord`), and each round
`choose_k` picks the row count with the most expected output tokens per unit of cost. A good
draft quickly earns 16-row rounds; one right only at every other token gets 2-row rounds; a
useless one costs a single wasted round, then plain greedy steps.

The core, `speculative_decode`, advances several sequences (segments) in one batch, each with its
own draft and its own number of proposed tokens; one sequence is the special case.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

from common.llm import LlamaDecoder
from common.repetition import RepetitionGuard

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


@dataclass
class SeqState:
    """One sequence being decoded.

    `logits` are those after the prompt (a copy, as `prefill` returns a view); `pos` is the position
    the first generated token goes to (the prompt length). `tokens` collects the output;
    `proposed` / `accepted` count draft tokens checked and kept; `rounds` counts llama_decode calls
    this sequence took part in.
    """

    seq: int
    pos: int
    logits: np.ndarray
    draft: list[int] = field(default_factory=list)
    tokens: list[int] = field(default_factory=list)
    proposed: int = 0
    accepted: int = 0
    rounds: int = 0
    done: bool = False
    forced: int | None = None  # benchmarks only: exactly this many tokens, whatever the call's limits
    # internal: where the draft is believed to continue, and how often its tokens were right
    draft_pos: int = 0
    aligned: bool = True
    misses: int = 0  # consecutive rounds whose guessed proposal was rejected outright
    guess: bool = False  # the current alignment is a guess, not a match
    guess_failed: bool = False  # the last round's guessed proposal was rejected at once
    record: AcceptanceRecord = field(default_factory=lambda: AcceptanceRecord())


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


def _pick(logits: np.ndarray, argmax: int, n_out: int, stop: frozenset[int], min_new_tokens: int) -> int | None:
    """LlamaDecoder.greedy's choice from one row: None means stop."""
    if argmax in stop:
        if n_out >= min_new_tokens:
            return None
        masked = np.array(logits, copy=True)
        masked[list(stop)] = -np.inf
        return int(np.argmax(masked))
    return argmax


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


def realign(state: SeqState) -> None:
    """Decide where the draft continues after the tokens produced so far.

    The expected place is `draft_pos`; when the last token is the draft token there, the draft
    simply goes on. Otherwise (the decoder added punctuation, wrote a number as digits...) the
    last 3, 2, then 1 output tokens are looked up in the draft, nearest the expected place first;
    With no match the token is taken for a substitution (CTC heard another character) and the
    draft goes on after it, as long as such guesses have not failed `MAX_GUESS_MISSES` rounds in a
    row; otherwise nothing is proposed until a later token matches again (plain greedy rows).
    """
    draft, out = state.draft, state.tokens
    state.guess = False
    if not draft or not out:
        state.aligned = bool(draft) and not out
        return
    expected = state.draft_pos
    if expected < len(draft) and draft[expected] == out[-1]:
        state.draft_pos = expected + 1
        state.aligned = True
        return
    for n in range(min(NGRAM_MAX, len(out)), 1, -1):
        # longer n-grams are trustworthy anywhere; search forward from just before the expected place
        suffix = out[-n:]
        i = _find(draft, suffix, expected - NEAR_BEFORE, len(draft))
        if i is None:
            i = _find(draft, suffix, 0, expected - NEAR_BEFORE + n)
        if i is not None:
            state.draft_pos, state.aligned = i + n, True
            return
    if state.guess_failed and expected >= 1 and draft[expected - 1] == out[-1]:
        # the decoder inserted a token (punctuation) that was taken for a substitution: undo the skip
        state.draft_pos, state.aligned = expected, True
        return
    if state.misses < MAX_GUESS_MISSES and expected < len(draft):  # substitution: go on after it
        state.draft_pos, state.aligned, state.guess = expected + 1, True, True
        return
    i = _find(draft, out[-1:], expected - NEAR_BEFORE, expected + NEAR_AFTER)
    if i is not None:
        state.draft_pos, state.aligned = i + 1, True
        return
    state.aligned = False


def _proposal(state: SeqState, max_new_tokens: int, n_ctx: int, config: SpeculativeConfig) -> list[int]:
    if not state.aligned:
        return []
    room = min(max_new_tokens - len(state.tokens) - 1, n_ctx - state.pos - 1, len(state.draft) - state.draft_pos)
    if room <= 0:
        return []
    limit = min(room, config.k_max)
    k = choose_k(state.record.rates(state.guess, limit, config), limit, config)
    return state.draft[state.draft_pos:state.draft_pos + k]


def _ends_after(state: SeqState, max_new_tokens: int, min_new_tokens: int, guard: RepetitionGuard | None) -> bool:
    """Whether greedy stops right after appending the last token (length cap or loop guard)."""
    out = state.tokens
    if len(out) >= max_new_tokens:
        return True
    return guard is not None and guard.enabled and len(out) >= min_new_tokens and guard.looping(out)


def _emit(state: SeqState, logits: np.ndarray, argmax: int, stop: frozenset[int], max_new_tokens: int,
          min_new_tokens: int, guard: RepetitionGuard | None) -> bool:
    """Append greedy's token from one row of logits; False (and `done`) when decoding ends here."""
    token = _pick(logits, argmax, len(state.tokens), stop, min_new_tokens)
    if token is not None:
        state.tokens.append(token)
    if token is None or _ends_after(state, max_new_tokens, min_new_tokens, guard):
        state.done = True
        return False
    return True


def _start(state: SeqState, stop: frozenset[int], max_new_tokens: int, min_new_tokens: int,
           guard: RepetitionGuard | None) -> None:
    """First token from the prompt's logits (no decode needed)."""
    state.tokens = []
    if max_new_tokens <= 0:
        state.done = True
        return
    if _emit(state, state.logits, int(np.argmax(state.logits)), stop, max_new_tokens, min_new_tokens, guard):
        realign(state)


def limits(state: SeqState, max_new_tokens: int, min_new_tokens: int) -> tuple[int, int]:
    """(max, min) new tokens of this state: the call's, or its own forced count."""
    return (state.forced, state.forced) if state.forced is not None else (max_new_tokens, min_new_tokens)


def begin(state: SeqState, stop: frozenset[int], max_new_tokens: int, min_new_tokens: int = 0,
          guard: RepetitionGuard | None = None) -> None:
    """Reset the counters and take the first token from the prompt's logits (no decode needed)."""
    max_new_tokens, min_new_tokens = limits(state, max_new_tokens, min_new_tokens)
    state.record = AcceptanceRecord()
    state.draft_pos = state.misses = 0
    state.proposed = state.accepted = state.rounds = 0
    state.done = False
    _start(state, stop, max_new_tokens, min_new_tokens, guard)


def decode_round(
    decoder: LlamaDecoder,
    live: Sequence[SeqState],
    max_new_tokens: int,
    min_new_tokens: int = 0,
    config: SpeculativeConfig = SpeculativeConfig(),
    guard: RepetitionGuard | None = None,
) -> None:
    """One llama_decode for the states that are not done: each feeds its last token plus its proposal.

    A state without a draft (or out of alignment) feeds one row: a plain greedy step. States that do
    not fit in `n_batch` rows wait for the next round.
    """
    stop = decoder.stop_ids
    n_batch = decoder.n_batch
    tokens: list[int] = []
    positions: list[int] = []
    seqs: list[int] = []
    plan: list[tuple[SeqState, list[int]]] = []
    for state in live:
        if state.done:
            continue
        proposal = _proposal(state, limits(state, max_new_tokens, min_new_tokens)[0], decoder.n_ctx, config)
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
    decoder.decode_many(tokens, positions, seqs, [True] * len(tokens))
    all_logits = decoder.logits_rows(len(tokens))
    argmaxes = all_logits.argmax(axis=1)
    row = 0
    for state, proposal in plan:
        _advance(decoder, state, proposal, all_logits, argmaxes, row, stop,
                 *limits(state, max_new_tokens, min_new_tokens), config, guard)
        row += 1 + len(proposal)


def speculative_decode(
    decoder: LlamaDecoder,
    states: list[SeqState],
    max_new_tokens: int,
    min_new_tokens: int = 0,
    config: SpeculativeConfig = SpeculativeConfig(),
    guard: RepetitionGuard | None = None,
) -> None:
    """Greedy decoding of every state at once, verifying drafts; fills `tokens` and the counters.

    Each state's KV cache must hold its prompt at positions [0, pos) of sequence `seq`. Afterwards
    it holds the prompt and the fed output tokens only (rejected draft rows are removed).
    Tokens equal `decoder.greedy(state.logits, state.pos, max_new_tokens, state.seq, min_new_tokens, guard)`.
    """
    for state in states:
        begin(state, decoder.stop_ids, max_new_tokens, min_new_tokens, guard)
    while any(not s.done for s in states):
        decode_round(decoder, states, max_new_tokens, min_new_tokens, config, guard)


def _advance(decoder: LlamaDecoder, state: SeqState, proposal: list[int], all_logits: np.ndarray,
             argmaxes: np.ndarray, row: int, stop: frozenset[int], max_new_tokens: int, min_new_tokens: int,
             config: SpeculativeConfig, guard: RepetitionGuard | None) -> None:
    """Consume this state's rows of one batch: accept the matching draft prefix plus one token."""
    k = len(proposal)
    state.rounds += 1
    state.proposed += k
    fed = state.pos  # rows hold positions pos .. pos + k; position pos + j is valid once accepted
    accepted = 0
    for j in range(k + 1):
        if not _emit(state, all_logits[row + j], int(argmaxes[row + j]), stop, max_new_tokens, min_new_tokens,
                     guard):
            break
        if j < k and state.tokens[-1] == proposal[j]:
            accepted += 1
            continue
        break
    state.accepted += accepted
    valid_end = fed + 1 + accepted  # first position whose KV entry is not part of the output
    if valid_end < fed + 1 + k:
        decoder.clear(state.seq, valid_end)
    state.pos = valid_end
    if state.done:
        return
    if k:
        if accepted:
            state.misses = 0
        elif state.guess:
            state.misses += 1
        state.record.update(state.guess, k, accepted, config.decay)
    state.draft_pos += accepted
    state.guess_failed = bool(k) and state.guess and not accepted
    realign(state)


# ---------------------------------------------------------------------------- drafts


class CTCDrafter:
    """Greedy CTC text of a segment's encoder output, as Qwen3 token ids: the draft."""

    def __init__(self, settings, *, threads: int = 2, providers: list[str] | None = None) -> None:
        from common.ctc import CTCVocabulary
        from common.encoder import CTCHead

        if not settings.has_ctc:
            raise ValueError(f"{settings.model_dir}: the model has no CTC head")
        self.head = CTCHead(settings.path("ctc"), threads=threads, providers=providers)
        self.vocab = CTCVocabulary(settings.path("ctc_vocab"), settings.ctc)

    def text(self, encoder_out: np.ndarray) -> str:
        return self.vocab.ctc_text(self.head.run(encoder_out))

    def draft(self, decoder: LlamaDecoder, encoder_out: np.ndarray) -> list[int]:
        text = self.text(encoder_out).strip()
        return decoder.tokenize(text) if text else []


def make_draft(own: list[int], kind: str, rng: np.random.Generator, n_vocab: int) -> list[int]:
    """Benchmark/test drafts made from the decoder's own greedy output."""
    if kind == "own":
        return list(own)
    if kind == "half":  # every second token wrong
        return [t if i % 2 == 0 else (t + 1) % n_vocab for i, t in enumerate(own)]
    if kind == "third":  # every third token wrong
        return [t if i % 3 != 2 else (t + 1) % n_vocab for i, t in enumerate(own)]
    if kind == "random":
        return [int(x) for x in rng.integers(0, n_vocab, size=len(own))]
    if kind == "empty":
        return []
    raise ValueError(f"unknown draft kind {kind!r}")


def bench_speculative(transcriber, wave: np.ndarray, n_tokens: int = 45, draft_kinds: Sequence[str] = (
        "own", "half", "random"), repeats: int = 3, config: SpeculativeConfig = SpeculativeConfig(),
        seed: int = 0) -> dict[str, object]:
    """Decode tokens/s after the segment's prompt: plain greedy vs speculative with synthetic drafts.

    `n_tokens` are forced (min_new_tokens), so random weights work too. Each kind is run `repeats`
    times, alternating with greedy, and the median is reported; `identical` says whether every
    speculative run produced greedy's tokens.
    """
    from common.prompt import PromptOptions

    decoder = transcriber.decoder
    prepared = transcriber.prepare(wave, PromptOptions())
    if prepared is None:
        raise ValueError("audio shorter than one frame")
    rng = np.random.default_rng(seed)

    def run_greedy() -> tuple[list[int], float]:
        logits = np.array(transcriber.prefill(prepared), copy=True)
        t0 = time.perf_counter()
        out = decoder.greedy(logits, prepared.length, n_tokens, min_new_tokens=n_tokens)
        return out, time.perf_counter() - t0

    def run_spec(draft: list[int]) -> tuple[SeqState, float]:
        logits = np.array(transcriber.prefill(prepared), copy=True)
        state = SeqState(seq=0, pos=prepared.length, logits=logits, draft=draft)
        t0 = time.perf_counter()
        speculative_decode(decoder, [state], n_tokens, n_tokens, config)
        return state, time.perf_counter() - t0

    own, _ = run_greedy()
    result: dict[str, object] = {"n_tokens": n_tokens, "prompt_length": prepared.length,
                                 "k_max": config.k_max}
    greedy_times: list[float] = []
    kinds: dict[str, dict[str, object]] = {}
    identical = True
    for kind in draft_kinds:
        draft = make_draft(own, kind, rng, decoder.n_vocab)
        times = []
        state = None
        for _ in range(repeats):
            out, tg = run_greedy()
            identical &= out == own
            greedy_times.append(tg)
            state, ts = run_spec(draft)
            identical &= state.tokens == own
            times.append(ts)
        assert state is not None
        med = float(np.median(times))
        kinds[kind] = {"tokens_per_second": round(n_tokens / med, 2), "seconds": round(med, 4),
                       "proposed": state.proposed, "accepted": state.accepted, "rounds": state.rounds}
    g = float(np.median(greedy_times))
    result["greedy_tokens_per_second"] = round(n_tokens / g, 2)
    for row in kinds.values():
        row["speedup"] = round(g / float(row["seconds"]), 3)
    result["speculative"] = kinds
    result["identical"] = identical
    return result
