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
partials of N streams cost at most one encoder's worth of the cores, and the finals, which are
what a transcript is made of, keep the rest. Each stream's partials then come less often as
streams are added, instead of every stream falling behind.
"""

from __future__ import annotations

import threading
import weakref

import numpy as np

from funasr_nano.audio.features import compute_features
from funasr_nano.audio.segments import split_at_quiet_points
from funasr_nano.realtime.settings import MODEL_RATE

FREEZE_SEARCH_SECONDS = 1.0  # the window's cut is the quietest moment of its last second
_TURNS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # engine -> the lock its partials share
_TURNS_LOCK = threading.Lock()


def _turn(engine) -> threading.Lock:  # noqa: ANN001 - an Engine
    with _TURNS_LOCK:
        return _TURNS.setdefault(engine, threading.Lock())


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
        turn = _turn(self.engine)
        if not turn.acquire(blocking=False):
            return None
        try:
            return self.update(audio)
        finally:
            turn.release()

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
