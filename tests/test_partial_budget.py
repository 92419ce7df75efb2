"""Partials give way to finals: `funasr_nano.realtime.partials.PartialBudget`, alone and in live sessions.

The rule is checked first on its own with explicit times. Then RealtimeSessions run on a fake engine
whose encoder and decoder have fixed costs and share one simulated core (a lock held for the cost),
as partials and finals share the CPU of a real machine: with four streams speaking at once and
committing a turn every 2 s (each a quarter turn after the one before), the finals' delays stay bounded while partials thin out; once three
streams stop, the remaining stream's partials come back at their usual rate. With the budget off,
the same load shows what it prevents (more partial work, later finals), so the test can fail.
"""

from __future__ import annotations

import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest

from funasr_nano.audio.features import FrontendConfig
from funasr_nano.engine import PendingSegment
from funasr_nano.output.results import Segment
from funasr_nano.realtime import RealtimeConfig, RealtimeSession, SessionSettings
from funasr_nano.realtime.events import Committed, TranscriptionCompleted, TranscriptionDelta
from funasr_nano.realtime.partials import PartialBudget

SR = 16000
CHUNK = SR // 10  # 0.1 s per append, at real-time pace
PARTIAL_COST = 0.15  # a partial's features + encoder + CTC head
FINAL_ENCODE_COST = 0.05  # a final's features + encoder, on its session's thread
FINAL_DECODE_COST = 0.35  # a final's prefill + decode rounds, on the decoder's thread


# ---------------------------------------------------------------------------------------------- the rule alone

def test_the_rule_follows_the_finals_of_every_stream():
    budget = PartialBudget(late_seconds=1.0)
    assert budget.state(now=0.0) == "free"
    assert budget.allows(first_of_turn=False, now=0.0) and budget.allows(first_of_turn=True, now=0.0)
    a, b = object(), object()
    budget.final_started(a, now=10.0)
    assert budget.state(now=10.5) == "busy"
    assert budget.allows(first_of_turn=True, now=10.5)  # a turn's first partial: the speaker is heard
    assert not budget.allows(first_of_turn=False, now=10.5)  # updates wait for the finals
    budget.final_started(b, now=10.8)
    assert budget.state(now=11.2) == "late"  # a's wait passed 1 s: nothing at all
    assert not budget.allows(first_of_turn=True, now=11.2)
    budget.final_done(a)
    assert budget.state(now=11.2) == "busy"  # b is on time
    budget.final_done(b)
    budget.final_done(b)  # twice (a cancelled final's callback after its done): harmless
    assert budget.state(now=20.0) == "free" and budget.allows(first_of_turn=False, now=20.0)
    assert (budget.stats.busy, budget.stats.late) == (1, 1)


# ---------------------------------------------------------------------------------------------- live sessions

class FakeEngine:
    """What a RealtimeSession uses of an Engine, with fixed costs on one simulated core."""

    def __init__(self, model_dir: Path) -> None:
        self.settings = SimpleNamespace(model_dir=model_dir)
        self.frontend = FrontendConfig()
        self.core = threading.Lock()  # the CPU partials and finals share
        self.decoder = ThreadPoolExecutor(1, thread_name_prefix="fake-decoder")  # the one decoding thread
        self.encoder = SimpleNamespace(run=self._encode)
        self.ctc = SimpleNamespace(text=lambda encoder_out: "w" * max(1, encoder_out.shape[0] // 10))
        self.partial_work = 0.0
        self.partial_budget = PartialBudget()  # the engine's one budget, which every session on it shares

    def _busy(self, seconds: float) -> None:
        with self.core:
            time.sleep(seconds)

    def _encode(self, feats: np.ndarray):
        self._busy(PARTIAL_COST)
        self.partial_work += PARTIAL_COST
        rows = np.zeros((len(feats), 4), np.float32)
        return rows, rows

    def submit_segment(self, wave: np.ndarray, options, *, offset: int = 0) -> PendingSegment:
        self._busy(FINAL_ENCODE_COST)
        start, end = offset / SR, (offset + len(wave)) / SR

        def decode() -> None:
            self._busy(FINAL_DECODE_COST)

        future: Future = self.decoder.submit(decode)
        return PendingSegment(future, lambda _: Segment(start, end, "final", [], 0), future.cancel)

    def close(self) -> None:
        self.decoder.shutdown(wait=True)


class Stream:
    """One session's events with their arrival times, and when each of its turns was committed."""

    def __init__(self, engine: FakeEngine, config: RealtimeConfig) -> None:
        self.events: list[tuple[float, object]] = []
        self.session = RealtimeSession(engine, SessionSettings(vad=None), config, self._on_event)
        self.committed_at: list[float] = []

    def _on_event(self, event: object) -> None:
        self.events.append((time.monotonic(), event))

    def final_delays(self) -> list[float]:
        done = [t for t, e in self.events if isinstance(e, TranscriptionCompleted)]
        return [d - c for c, d in zip(self.committed_at, done)]

    def partials_between(self, t0: float, t1: float) -> int:
        return sum(1 for t, e in self.events if isinstance(e, TranscriptionDelta) and t0 <= t < t1)


def _speak(streams: list[Stream], turns: int, turn_seconds: float, rng: np.random.Generator) -> None:
    """Every stream appends noise at real-time pace and commits a turn every `turn_seconds`, stream i a
    quarter turn after stream i - 1 (so that some streams speak while others' finals decode)."""
    per_turn = int(turn_seconds * SR / CHUNK)
    stagger = per_turn // 4
    ticks = turns * per_turn + stagger * (len(streams) - 1)
    t0 = time.monotonic()
    for tick in range(ticks):
        for i, stream in enumerate(streams):
            own = tick - i * stagger  # this stream's ticks so far
            if own < 0 or own >= turns * per_turn:
                continue
            stream.session.append((0.1 * rng.standard_normal(CHUNK)).astype(np.float32))
            if own % per_turn == per_turn - 1:
                stream.committed_at.append(time.monotonic())
                stream.session.commit()
        time.sleep(max(0.0, t0 + (tick + 1) * CHUNK / SR - time.monotonic()))


def _run(tmp_path: Path, budget: bool) -> dict[str, object]:
    engine = FakeEngine(tmp_path)
    config = RealtimeConfig(partial_budget=budget, max_lag_seconds=60.0)
    streams = [Stream(engine, config) for _ in range(4)]
    rng = np.random.default_rng(0)
    try:
        _speak(streams, turns=3, turn_seconds=2.0, rng=rng)  # four speak at once
        for stream in streams[1:]:
            assert stream.session.finish(timeout=60)
        loaded_work = engine.partial_work
        quiet_from = time.monotonic()
        alone = streams[0]
        _speak([alone], turns=1, turn_seconds=3.0, rng=rng)  # the load drops: one stream goes on
        assert alone.session.finish(timeout=60)
        return {"delays": [d for s in streams[1:] for d in s.final_delays()], "loaded_work": loaded_work,
                "alone_partials": alone.partials_between(quiet_from + 0.5, time.monotonic()),
                "held": engine.partial_budget.stats.busy + engine.partial_budget.stats.late,
                "committed": sum(isinstance(e, Committed) for s in streams for _, e in s.events)}
    finally:
        for stream in streams:
            stream.session.close()
        engine.close()


@pytest.mark.parametrize("budget", [True, False])
def test_finals_stay_bounded_while_partials_thin_out_and_return(tmp_path, budget):
    result = _run(tmp_path, budget)
    assert result["committed"] == 3 * 4 + 1
    delays = result["delays"]
    assert len(delays) == 9
    # Four finals of one round cost 4 x (0.05 + 0.3) s of the one core: bounded means the last of them
    # is out within that and a partial in flight, with margin, not after the partials of four streams.
    worst = 4 * (FINAL_ENCODE_COST + FINAL_DECODE_COST) + PARTIAL_COST
    if budget:
        assert max(delays) < worst + 1.0, delays
        assert result["held"] > 0  # partials were held back while finals were outstanding
    else:
        assert result["held"] == 0
    # once alone, a stream gets partials again at their usual rate (one per 0.5 s of audio, one core free)
    assert result["alone_partials"] >= 3, result


def test_the_budget_spends_less_of_the_core_on_partials_and_finals_come_sooner(tmp_path):
    on, off = _run(tmp_path, True), _run(tmp_path, False)
    assert on["loaded_work"] < off["loaded_work"], (on["loaded_work"], off["loaded_work"])
    assert np.median(on["delays"]) < np.median(off["delays"]), (on["delays"], off["delays"])
