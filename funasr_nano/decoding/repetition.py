"""Loop detection for greedy decoding: stop a segment that keeps repeating itself.

On long or noisy audio the LLM sometimes falls into a loop ("好的好的好的...", one
token over and over) and would burn all `max_new_tokens`. A `RepetitionGuard` looks
at the tokens generated so far and says when the tail is a loop:

- the last `window` tokens hold at most `max_distinct` different ids, or
- the last `window` tokens are one pattern of `max_period` tokens or fewer repeated
  back to back (at least `min_repeats` times).

Both need at least `window` generated tokens (32 by default), so short outputs
(the parity tests decode 16 tokens) are never touched. The same guard serves
every sequence the decoding scheduler runs (`funasr_nano.decoding.sequence.StopRule`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class RepetitionGuard:
    """`window` <= 0 disables the guard."""

    window: int = 32
    max_distinct: int = 4
    max_period: int = 16
    min_repeats: int = 3

    @property
    def enabled(self) -> bool:
        return self.window > 0

    def period(self, tokens: Sequence[int]) -> int | None:
        """The loop's period when the tail of `tokens` is a loop (0: few distinct ids, no strict period), else None."""
        w = self.window
        if w <= 0 or len(tokens) < w:
            return None
        tail = list(tokens[-w:])
        for p in range(1, min(self.max_period, w // max(1, self.min_repeats)) + 1):
            if all(tail[i] == tail[i - p] for i in range(p, w)):
                return p
        if len(set(tail)) <= self.max_distinct:
            return 0
        return None

    def looping(self, tokens: Sequence[int]) -> bool:
        return self.period(tokens) is not None

    def trim(self, tokens: Sequence[int]) -> list[int]:
        """`tokens` with a strictly periodic tail cut down to one copy of its pattern.

        A loop without a strict period (few distinct ids in any order) is kept as is:
        decoding stopped, but there is no clean place to cut.
        """
        out = list(tokens)
        p = self.period(out)
        if not p:
            return out
        start = len(out) - self.window
        while start > 0 and out[start - 1] == out[start - 1 + p]:
            start -= 1
        return out[: start + p]


NO_GUARD = RepetitionGuard(window=0)


def loop_message(where: str, n_tokens: int) -> str:
    """The one line logged (as a warning) when a segment is stopped for looping."""
    return f"{where}: decoding loop detected after {n_tokens} tokens; segment stopped"
