"""Partial text of the open segment from the CTC head: cheap, provisional, replaced by the final text.

Why windows and not the whole open segment: the encoder is not streaming (full attention over its
input), so a partial re-encodes what it covers. Measured on this 2-core machine at the real model's
shapes (int8 encoder + int8 CTC head, `benchmarks/realtime.py --encoder-cost`): about 70 ms + 25 ms
per second of audio for features + encoder + CTC head (0.5 s: 77 ms, 4 s: 220 ms, 10 s: 300 ms,
30 s: 1.2 s). Re-encoding the whole segment every 0.5 s would cost more than real time past ~8 s of
speech, for one stream. So the segment is covered by windows of at most `window_seconds` (4 s by
default): once the current window is full, its first part up to the quietest moment of its last
second is encoded once more, its text frozen, and the window starts there. A partial then costs at
most one window's encoding (about 0.2 s), whatever the segment's length; the words at a window's
edge may come out slightly differently from the whole-segment text, which the final replaces.

Several streams on one engine take turns: one partial is encoded at a time (`try_update` returns
None while another stream's is being encoded; the caller tries again with its next audio), so the
partials of N streams cost at most one encoder's worth of the cores.

And partials give way to finals (`PartialBudget`, one per engine: `Engine.partial_budget`). A partial's encoder run takes the
cores the decoder needs: on a CPU where one stream's final costs most of its real time, partials
running beside other streams' finals make those finals late, then every stream falls behind. The
rule, over every stream of the engine:

- no final outstanding (from the segment's close to its text): partials as configured;
- finals outstanding, none waiting longer than `late_seconds`: only the first partial of a new turn
  (the one that tells a speaker they are heard), no updates of partials already shown;
- a final waiting longer than `late_seconds`: no partials at all, until the finals catch up.

Partials come back as soon as the finals are done: a stream loses updates while others' finals
decode, never its finals.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass

import numpy as np

from funasr_nano.audio.features import compute_features
from funasr_nano.audio.segments import split_at_quiet_points
from funasr_nano.realtime.settings import MODEL_RATE

FREEZE_SEARCH_SECONDS = 1.0  # the window's cut is the quietest moment of its last second
LATE_SECONDS = 1.0  # a final waiting longer than this (from its segment's close) stops every partial


@dataclass
class BudgetStats:
    """What the partials of one engine did: runs, their encoder seconds, and why others did not run."""

    runs: int = 0
    seconds: float = 0.0  # features + encoder + CTC head, summed over the runs
    busy: int = 0  # updates held back while finals were outstanding (first partials of a turn still ran)
    late: int = 0  # partials held back while a final was late


class PartialBudget:
    """When the partials of one engine's streams may run, following its finals (the rule above).

    Thread-safe: sessions report their finals (`final_started` before the segment's encoder runs,
    `final_done` from the decoder's callback) and ask `allows` on their own threads. `turn` is the
    lock one partial holds while it is encoded.
    """

    def __init__(self, late_seconds: float = LATE_SECONDS) -> None:
        self.late_seconds = late_seconds
        self.turn = threading.Lock()
        self.stats = BudgetStats()
        self._lock = threading.Lock()
        self._finals: dict[object, float] = {}  # a final's key -> when it started (time.monotonic())

    def final_started(self, key: object, now: float | None = None) -> None:
        with self._lock:
            self._finals[key] = time.monotonic() if now is None else now

    def final_done(self, key: object) -> None:
        with self._lock:
            self._finals.pop(key, None)

    def state(self, now: float | None = None) -> str:
        """"free" (no final outstanding), "busy" (finals outstanding, on time) or "late"."""
        with self._lock:
            oldest = min(self._finals.values(), default=None)
        if oldest is None:
            return "free"
        now = time.monotonic() if now is None else now
        return "late" if now - oldest > self.late_seconds else "busy"

    def allows(self, first_of_turn: bool, now: float | None = None) -> bool:
        """Whether a partial may run now; `first_of_turn`: the turn has shown no partial yet."""
        state = self.state(now)
        if state == "free" or (state == "busy" and first_of_turn):
            return True
        with self._lock:
            if state == "late":
                self.stats.late += 1
            else:
                self.stats.busy += 1
        return False

    def ran(self, seconds: float) -> None:
        with self._lock:
            self.stats.runs += 1
            self.stats.seconds += seconds


class PartialTranscriber:
    """Greedy CTC text of one open segment, updated as its audio grows (`update`), reset per segment."""

    def __init__(self, engine, window_seconds: float = 4.0) -> None:
        self.engine = engine
        self.window = max(int(window_seconds * MODEL_RATE), int(2 * FREEZE_SEARCH_SECONDS * MODEL_RATE))
        self.reset()

    @property
    def available(self) -> bool:
        """Whether the model folder has the CTC head (without it there is no partial text)."""
        return self.engine.ctc is not None

    def reset(self) -> None:
        self.frozen = ""  # text of the windows already closed
        self.window_start = 0  # where the current window starts in the segment's audio

    def try_update(self, audio: np.ndarray) -> str | None:
        """`update`, or None at once when another stream's partial is being encoded on this engine."""
        budget = self.engine.partial_budget
        if not budget.turn.acquire(blocking=False):
            return None
        t0 = time.perf_counter()
        try:
            return self.update(audio)
        finally:
            budget.ran(time.perf_counter() - t0)
            budget.turn.release()

    def update(self, audio: np.ndarray) -> str:
        """The partial text of a segment whose audio so far (from its start) is `audio`."""
        while len(audio) - self.window_start > self.window:
            piece = audio[self.window_start: self.window_start + self.window]
            cut = split_at_quiet_points(piece, MODEL_RATE, (self.window - 1) / MODEL_RATE,
                                        search_seconds=FREEZE_SEARCH_SECONDS)[0].end
            self.frozen += self._ctc_text(piece[:cut])
            self.window_start += cut
        return (self.frozen + self._ctc_text(audio[self.window_start:])).strip()

    def _ctc_text(self, wave: np.ndarray) -> str:
        ctc = self.engine.ctc
        feats = compute_features(wave, self.engine.frontend)
        if ctc is None or feats.shape[0] == 0:
            return ""
        encoder_out, _ = self.engine.encoder.run(feats)
        return ctc.text(encoder_out)
