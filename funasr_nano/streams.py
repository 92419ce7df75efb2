"""What a caller holds while its audio is decoded: the segments of one input, or one pending segment.

Both read results the engine's prepare stage (`funasr_nano.prepare.Feed`) and decoding owner
(`funasr_nano.decoding.scheduler`) produce on their threads; both can be cancelled from any
thread, which stops the preparing and frees the sequences before the next decoding round.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent.futures import Future

from funasr_nano.decoding import Decoded
from funasr_nano.output.results import Segment, Transcript


class SegmentStream:
    """The segments of one input as they are decoded, in input order; `transcript` once exhausted."""

    def __init__(self, segments: Iterator[Segment], finish: Callable[[list[Segment]], Transcript],
                 total: int = 0, cancel: Callable[[], None] | None = None) -> None:
        self._segments = segments
        self._cancel = cancel
        self.total = total  # segments expected (0: unknown while the VAD reads the input)
        self._finish = finish
        self.done: list[Segment] = []
        self.transcript: Transcript | None = None

    def __iter__(self) -> Iterator[Segment]:
        for segment in self._segments:
            self.done.append(segment)
            yield segment
        self.transcript = self._finish(self.done)

    def close(self) -> None:
        """Stop early: the segments not yet decoded are cancelled (from the iterating thread)."""
        close = getattr(self._segments, "close", None)
        if close is not None:
            close()

    def cancel(self) -> None:
        """From any thread, while another iterates: its segments' sequences are freed before the next
        round, and the iterating thread gets `concurrent.futures.CancelledError`."""
        if self._cancel is not None:
            self._cancel()


class PendingSegment:
    """One segment handed to `Engine.submit_segment`: prepared on the engine's pool, then decoded.

    `cancel()` stops it wherever it is (its sequence is freed before the scheduler's next round).
    """

    def __init__(self, decoded: Future, finish: Callable[[Decoded | None], Segment],
                 cancel: Callable[[], None]) -> None:
        self._decoded = decoded  # its Decoded; None: nothing to decode (silence, shorter than one frame)
        self._finish = finish
        self._cancel = cancel
        self._segment: Segment | None = None

    def done(self) -> bool:
        return self._decoded.done()

    def cancel(self) -> bool:
        if self._decoded.done():
            return False
        self._cancel()
        return True

    def add_done_callback(self, fn: Callable[[PendingSegment], None]) -> None:
        """Call `fn(self)` once decoded, failed or cancelled (at once if already so, else on the thread that ends it)."""
        self._decoded.add_done_callback(lambda _: fn(self))

    def result(self, timeout: float | None = None) -> Segment:
        """The Segment (raises what preparing or decoding raised, CancelledError once cancelled, TimeoutError)."""
        if self._segment is None:
            self._segment = self._finish(self._decoded.result(timeout))
        return self._segment


__all__ = ["PendingSegment", "SegmentStream"]
