"""The repetition guard: a segment caught in a decoding loop is stopped and trimmed."""

from __future__ import annotations

import numpy as np

from funasr_nano.decoding import StopRule
from funasr_nano.decoding.repetition import NO_GUARD, RepetitionGuard

# --------------------------------------------------------------------------- repetition guard


def test_guard_needs_a_full_window_and_finds_loops():
    guard = RepetitionGuard()
    assert not guard.looping([7] * 31)  # the parity tests decode 16 tokens: never touched
    assert guard.looping([7] * 32)
    varied = list(range(100, 160))
    assert not guard.looping(varied)
    looped = varied[:10] + [1, 2, 3, 4, 5, 6, 7] * 6
    assert guard.period(looped) == 7
    assert guard.trim(looped) == varied[:10] + [1, 2, 3, 4, 5, 6, 7]
    few = varied[:5] + [int(x) for x in np.random.default_rng(0).integers(1, 4, 40)]  # 3 ids, no period
    assert guard.period(few) == 0 and guard.trim(few) == few
    assert not NO_GUARD.looping([7] * 100)
    assert StopRule(64, 0, guard).finish([7] * 40) == ([7], True)
    assert StopRule(64, 40, guard).finish([7] * 40)[0] == [7] * 40  # benchmarks force a length
