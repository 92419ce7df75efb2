"""One sequence being decoded, and the one rule that picks its next token and says when it ends.

Every token the scheduler emits, in a plain greedy row or in a verified draft row, goes through
`SequenceState.emit`: argmax of the row's logits; a stop token ends the sequence unless the
`StopRule` still forces a length (then the next best token is taken); the sequence also ends at
`max_new_tokens` or when the repetition guard sees a loop. The tokens are therefore those of
plain greedy decoding whatever the batch, the draft or the sequence id.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from funasr_nano.decoding.repetition import NO_GUARD, RepetitionGuard
from funasr_nano.decoding.speculation import Draft


@dataclass(frozen=True)
class StopRule:
    """When a sequence ends: a stop token, `max_new_tokens`, or a loop the guard recognizes.

    `min_new_tokens` forces a length (benchmarks on random weights, which never stop): stop tokens
    are passed over in favour of the next best until that many tokens exist, and a loop is neither
    stopped nor trimmed below it.
    """

    max_new_tokens: int = 512
    min_new_tokens: int = 0
    guard: RepetitionGuard = NO_GUARD

    @classmethod
    def forced(cls, n_tokens: int) -> StopRule:
        """Exactly `n_tokens` tokens (benchmarks)."""
        return cls(max_new_tokens=n_tokens, min_new_tokens=n_tokens)

    def pick(self, logits: np.ndarray, argmax: int, n_out: int, stop_ids: frozenset[int]) -> int | None:
        """Greedy's choice from one row of logits after `n_out` tokens; None: the sequence stops here."""
        if argmax not in stop_ids:
            return argmax
        if n_out >= self.min_new_tokens:
            return None
        masked = np.array(logits, copy=True)
        masked[list(stop_ids)] = -np.inf
        return int(np.argmax(masked))

    def ends_after(self, tokens: list[int]) -> bool:
        """Whether decoding stops right after the last of `tokens` (length cap or loop)."""
        if len(tokens) >= self.max_new_tokens:
            return True
        guard = self.guard
        return guard.enabled and len(tokens) >= self.min_new_tokens and guard.looping(tokens)

    def finish(self, tokens: list[int]) -> tuple[list[int], bool]:
        """(tokens with a looping tail trimmed, whether the guard stopped them); never below min_new_tokens."""
        guard = self.guard
        if not guard.enabled or len(tokens) < self.min_new_tokens or not guard.looping(tokens):
            return list(tokens), False
        trimmed = guard.trim(tokens)
        if len(trimmed) < self.min_new_tokens:
            trimmed = list(tokens)
        return trimmed, True


@dataclass
class Decoded:
    """One job's generated tokens (a loop already trimmed) and whether the guard stopped it."""

    tokens: list[int]
    looped: bool = False
    proposed: int = 0  # draft tokens checked (speculative decoding)
    accepted: int = 0  # of those, tokens the decoder confirmed
    rounds: int = 0  # llama_decode calls this job took part in (its prompt not counted)


@dataclass
class SequenceState:
    """One job in one llama.cpp sequence.

    `logits` are those after the prompt (a copy); `pos` is where the next fed token goes (the
    prompt length at first). `tokens` collects the output; `draft` is None for plain greedy rows.
    `prompt_rows`: the prompt's rows after its cached prefix, when they are to be fed in the next
    round with the other sequences' rows (`pos` is then the first one's position, and `logits`
    arrive with them).
    """

    seq: int
    pos: int
    logits: np.ndarray | None
    rule: StopRule = StopRule()
    draft: Draft | None = None
    tokens: list[int] = field(default_factory=list)
    rounds: int = 0
    done: bool = False
    prompt_rows: np.ndarray | None = None

    def start(self, stop_ids: frozenset[int]) -> None:
        """Take the first token from the prompt's logits (no decode needed)."""
        assert self.logits is not None
        self.tokens = []
        self.done = False
        if self.rule.max_new_tokens <= 0:
            self.done = True
            return
        if self.emit(self.logits, int(np.argmax(self.logits)), stop_ids) and self.draft is not None:
            self.draft.realign(self.tokens)

    def emit(self, logits: np.ndarray, argmax: int, stop_ids: frozenset[int]) -> bool:
        """Append greedy's token from one row of logits; False (and `done`) when decoding ends here."""
        token = self.rule.pick(logits, argmax, len(self.tokens), stop_ids)
        if token is not None:
            self.tokens.append(token)
        if token is None or self.rule.ends_after(self.tokens):
            self.done = True
            return False
        return True

    def result(self) -> Decoded:
        tokens, looped = self.rule.finish(self.tokens)
        draft = self.draft
        return Decoded(tokens, looped, draft.proposed if draft else 0, draft.accepted if draft else 0, self.rounds)
