"""Decode speed of plain greedy vs speculative decoding with synthetic drafts (benchmark only).

Random weights make the CTC draft meaningless, so the drafts are made from the decoder's own
greedy output (`testing.drafts`): all right (the upper bound), every second token wrong, random.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import numpy as np

from funasr_nano.decoding import StopRule
from funasr_nano.decoding.rounds import decode_to_end
from funasr_nano.decoding.sequence import SequenceState
from funasr_nano.decoding.speculation import DEFAULT_CONFIG, Draft, SpeculativeConfig
from funasr_nano.models.prompt import PromptOptions
from testing.drafts import make_draft


def bench_speculative(engine, wave: np.ndarray, n_tokens: int = 45, draft_kinds: Sequence[str] = (
        "own", "half", "random"), repeats: int = 3, config: SpeculativeConfig = DEFAULT_CONFIG,
        seed: int = 0) -> dict[str, object]:
    """Decode tokens/s after the segment's prompt: plain greedy vs speculative with synthetic drafts.

    `n_tokens` are forced, so random weights work too. Each kind is run `repeats` times, alternating
    with greedy, and the median is reported; `identical` says whether every speculative run produced
    greedy's tokens. Runs on the engine's scheduler thread (`Scheduler.call`), sequence 0.
    """
    prepared = engine.prepare(wave, PromptOptions())
    if prepared is None:
        raise ValueError("audio shorter than one frame")
    rng = np.random.default_rng(seed)
    rule = StopRule.forced(n_tokens)

    def run(decoder, prefixes, draft: list[int] | None) -> tuple[SequenceState, float]:
        logits = prefixes.admit(prepared.prompt, 0)
        state = SequenceState(seq=0, pos=prepared.length, logits=logits, rule=rule,
                              draft=Draft(list(draft)) if draft else None)
        t0 = time.perf_counter()
        decode_to_end(decoder, [state], config)
        return state, time.perf_counter() - t0

    def measure(decoder, prefixes) -> dict[str, object]:
        own = run(decoder, prefixes, None)[0].tokens
        result: dict[str, object] = {"n_tokens": n_tokens, "prompt_length": prepared.length, "k_max": config.k_max}
        greedy_times: list[float] = []
        kinds: dict[str, dict[str, object]] = {}
        identical = True
        for kind in draft_kinds:
            draft = make_draft(own, kind, rng, decoder.n_vocab)
            times = []
            state = None
            for _ in range(repeats):
                plain, tg = run(decoder, prefixes, None)
                identical &= plain.tokens == own
                greedy_times.append(tg)
                state, ts = run(decoder, prefixes, draft)
                identical &= state.tokens == own
                times.append(ts)
            assert state is not None
            med = float(np.median(times))
            proposed, accepted = (state.draft.proposed, state.draft.accepted) if state.draft else (0, 0)
            kinds[kind] = {"tokens_per_second": round(n_tokens / med, 2), "seconds": round(med, 4),
                           "proposed": proposed, "accepted": accepted, "rounds": state.rounds}
        g = float(np.median(greedy_times))
        result["greedy_tokens_per_second"] = round(n_tokens / g, 2)
        for row in kinds.values():
            row["speedup"] = round(g / float(row["seconds"]), 3)
        result["speculative"] = kinds
        result["identical"] = identical
        return result

    return engine.scheduler.call(measure)
