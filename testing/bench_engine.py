"""Engines for speed measurements on random weights, through the engine's extension points.

Random weights never stop, so a benchmark fixes how many tokens each segment decodes; and the
comparison for continuous batching is fixed groups. Neither belongs in the production API: they
subclass `Engine` (`stop_rule`, `make_planner`) here.
"""

from __future__ import annotations

from funasr_nano.config import TranscribeOptions
from funasr_nano.decoding import RoundPlanner, StopRule
from funasr_nano.engine import Engine


class FixedGroupsPlanner(RoundPlanner):
    """Admits only when every sequence has ended: a freed sequence waits for its whole group."""

    def can_admit(self) -> bool:
        return not self.live


class BenchmarkEngine(Engine):
    """`tokens_per_second`: every segment decodes exactly this many tokens per second of its audio, as
    real speech would give (0: off, `min_new_tokens` applies); `refill=False`: fixed groups."""

    def __init__(self, *args: object, tokens_per_second: float = 0.0, refill: bool = True, **kwargs: object) -> None:
        self.tokens_per_second = tokens_per_second
        self.refill = refill
        super().__init__(*args, **kwargs)

    def make_planner(self, decoder) -> RoundPlanner:  # noqa: ANN001 - a LlamaDecoder
        planner = RoundPlanner if self.refill else FixedGroupsPlanner
        return planner(decoder.n_seq_max, decoder.n_ctx)

    def stop_rule(self, options: TranscribeOptions, seconds: float) -> StopRule:
        if self.tokens_per_second > 0:
            return StopRule.forced(max(1, round(self.tokens_per_second * seconds)))
        return super().stop_rule(options, seconds)
