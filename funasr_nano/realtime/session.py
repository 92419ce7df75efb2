"""One live audio stream: PCM16 in, speech events, partial text and final text out.

A `RealtimeSession` turns appended audio into the events of `funasr_nano.realtime.events`:

    audio --resample to 16 kHz--> Silero VAD (incremental) --speech started/stopped-->
      open segment --every 0.5 s of audio: CTC head (funasr_nano.realtime.partials)--> delta events
      closed segment (pause, max length, or commit) --Engine.submit_segment--> the shared Scheduler
      --batched with other streams and file requests--> completed event (the final text)

The final text is the engine's offline text of that same segment (same features, prompt and
decoding path, `Engine.submit_segment`). Work happens on one thread per session, so `append` only
converts and queues (it never waits for a model) and the caller's loop (a WebSocket, a microphone
callback) stays responsive; events are handed to `on_event` on that thread, in order.

Back-pressure: the session measures how far behind real time it is (audio waiting for the VAD,
or the oldest final waiting for the decoder). Audio that would take it past
`RealtimeConfig.max_lag_seconds` is dropped and `append` returns one `falling_behind` error (again
only once the lag has halved), rather than buffering without bound. Partials are skipped while an
interval's worth of audio waits (they would be stale), while the stream's own final is being
decoded, while another stream's partial is being encoded, and they give way to every stream's
finals on the engine (`funasr_nano.realtime.partials`: only first partials of a turn while finals
are outstanding, none while one is late).
With `SessionSettings.diarize`, each closed segment's CAM++ embedding (the mean of its windows) is
given a speaker among those of the stream so far as it closes (`funasr_nano.speakers.online`: an
online assignment, not the offline clustering), and its completed event carries it.
`close()` cancels the session's decoding jobs (their sequences are freed before the scheduler's
next round) and drops its audio.
"""

from __future__ import annotations

import dataclasses
import logging
import queue
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError
from dataclasses import dataclass

import numpy as np

from funasr_nano.audio.fsmn_vad import EndpointOptions, FsmnSegmenter
from funasr_nano.audio.segments import SampleSpan
from funasr_nano.audio.vad import (
    SpeechSegment,
    SpeechSegmenter,
    SpeechStarted,
    VadError,
    find_vad_model,
)
from funasr_nano.realtime.audio_input import ManualTurns, StreamResampler, pcm16_samples
from funasr_nano.realtime.events import (
    Cleared,
    Committed,
    Error,
    ServerEvent,
    SessionUpdated,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
)
from funasr_nano.realtime.events import SpeechStarted as SpeechStartedEvent
from funasr_nano.realtime.events import SpeechStopped as SpeechStoppedEvent
from funasr_nano.realtime.partials import PartialTranscriber
from funasr_nano.realtime.settings import DEFAULT_CONFIG, MODEL_RATE, RealtimeConfig, SessionSettings
from funasr_nano.speakers.online import OnlineSpeakers, segment_embedding

log = logging.getLogger(__name__)

EventSink = Callable[[ServerEvent], None]


@dataclass
class _Final:
    """A closed segment waiting for its final text."""

    item_id: str
    pending: object  # funasr_nano.engine.PendingSegment
    submitted: float  # time.monotonic() when submitted
    speaker: int | None = None  # settings.diarize: the stream's speaker of this segment


@dataclass
class _OpenItem:
    """The segment in progress and what its partial text has sent so far."""

    item_id: str
    start: int  # padded start, samples of the session's stream
    partial_samples: int = 0  # audio covered by the last partial
    partial: str = ""
    sent: str = ""  # the concatenation of its deltas


class RealtimeSession:
    """See the module docstring. `settings=None`: defaults, and `configured` stays False until `configure`."""

    def __init__(self, engine, settings: SessionSettings | None = None, config: RealtimeConfig = DEFAULT_CONFIG,
                 on_event: EventSink | None = None) -> None:
        self.engine = engine
        self.config = config
        self.id = f"sess_{uuid.uuid4().hex[:16]}"
        self.configured = settings is not None
        self.settings = settings or SessionSettings()
        self._on_event = on_event
        self._queue: queue.SimpleQueue[tuple] = queue.SimpleQueue()
        self._lock = threading.Lock()  # _backlog and _finals, read by append() on the caller's thread
        self._backlog = 0.0  # seconds of audio appended, not yet through the VAD
        self._finals: deque[_Final] = deque()
        self._behind = False
        self._closed = False
        self.dropped_seconds = 0.0
        self._items = 0
        self._last_item: str | None = None
        self._open: _OpenItem | None = None
        self._offset = 0  # stream samples before the current segmenter (settings changes start a new one)
        self._finishing: threading.Event | None = None
        self._partials = PartialTranscriber(engine, config.partial_window_seconds)
        self._budget = engine.partial_budget  # every stream's finals on this engine, which partials give way to
        self._partials_on = config.partials and self._partials.available  # loads the CTC head now
        self._vad_path = find_vad_model(engine.settings.model_dir)
        self._speakers: OnlineSpeakers | None = None  # the stream's speakers, once a segment is diarized
        self._apply(self.settings)
        self._thread = threading.Thread(target=self._run, name=f"realtime-{self.id}", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ caller's side (any one thread)

    def configure(self, settings: SessionSettings) -> list[ServerEvent]:
        """New settings; audio appended from now on follows them (an open segment is closed first if the
        rate or the turn detection changes)."""
        self._check_open()
        self.settings = settings
        self.configured = True
        self._queue.put(("update", settings))
        return [SessionUpdated(self.id, settings)]

    def append(self, audio: bytes | np.ndarray) -> list[ServerEvent]:
        """Queue audio at `settings.sample_rate`: PCM16 bytes, int16 samples or float samples in [-1, 1].

        Returns at once: [] normally, or a `falling_behind` error when the audio was dropped.
        """
        self._check_open()
        if isinstance(audio, (bytes, bytearray, memoryview)):
            samples = pcm16_samples(bytes(audio))
        else:
            samples = np.asarray(audio).reshape(-1)
            samples = samples.astype(np.float32) / 32768.0 if samples.dtype == np.int16 else samples.astype(np.float32)
        if samples.size == 0:
            return []
        seconds = samples.size / self.settings.sample_rate
        lag = self.lag_seconds()
        limit = self.config.max_lag_seconds
        if lag + seconds > limit:  # taking it would put the session beyond the limit
            self.dropped_seconds += seconds
            if self._behind:
                return []
            self._behind = True
            return [Error("falling_behind", f"transcription is {lag:.1f} s behind real time (limit {limit:g} s): "
                          "audio is dropped until it catches up; send less audio or fewer streams",
                          kind="server_error")]
        if self._behind and lag < limit / 2:
            self._behind = False
        with self._lock:
            self._backlog += seconds
        self._queue.put(("audio", samples, seconds))
        return []

    def clear(self) -> list[ServerEvent]:
        """Drop the audio appended and not yet committed (the speech in progress gets no final);
        `input_audio_buffer.cleared` follows once the audio queued before it is through."""
        self._check_open()
        self._queue.put(("clear",))
        return []

    def commit(self, event_id: str | None = None) -> list[ServerEvent]:
        """Close the segment in progress now (its final follows); an error event later if there is none
        (answering `event_id`, the client's commit event)."""
        self._check_open()
        self._queue.put(("commit", event_id))
        return []

    def lag_seconds(self) -> float:
        """How far behind real time the session is: audio waiting for the VAD, or the oldest final's wait."""
        with self._lock:
            oldest = self._finals[0].submitted if self._finals else None
            backlog = self._backlog
        return max(backlog, 0.0 if oldest is None else time.monotonic() - oldest)

    def finish(self, timeout: float | None = None) -> bool:
        """End of input: the speech in progress becomes the last segment; wait until every final is out.

        False if `timeout` ran out first. The session stays usable (a new stream position follows on).
        """
        self._check_open()
        done = threading.Event()
        self._queue.put(("finish", done))
        return done.wait(timeout)

    def close(self) -> None:
        """Stop: queued audio is dropped, the decoding of unfinished finals is cancelled. Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._queue.put(("close",))
        if threading.current_thread() is not self._thread:
            self._thread.join()

    def __enter__(self) -> RealtimeSession:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"{self.id} is closed")

    # ------------------------------------------------------------------ the session's thread

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if self._closed:
                break
            kind = item[0]
            try:
                if kind == "audio":
                    self._on_audio(item[1], item[2])
                elif kind == "commit":
                    self._on_commit(item[1])
                elif kind == "update":
                    self._on_update(item[1])
                elif kind == "finish":
                    self._on_finish(item[1])
                elif kind == "clear":
                    self._on_clear()
                self._deliver_finals()
            except Exception:  # noqa: BLE001 - one failing step must not end the stream
                log.exception("%s: %s failed", self.id, kind)  # the detail (paths included) stays in the log
                self._emit(Error("server_error", f"processing {kind} failed (see the server's log)",
                                 kind="server_error"))
        with self._lock:
            finals, self._finals = list(self._finals), deque()
        for final in finals:
            final.pending.cancel()
        self._segmenter = None
        self._open = None

    def _apply(self, settings: SessionSettings) -> None:
        """Resampler, segmenter and decoding options for these settings."""
        self._resample = StreamResampler(settings.sample_rate)
        if settings.vad is None:
            self._segmenter: SpeechSegmenter | FsmnSegmenter | ManualTurns | None = ManualTurns(
                self.config.options.max_segment_seconds)
        elif self.config.options.vad == "fsmn":  # the engine's one FSMN-VAD session; its turns end as funasr's segments
            fsmn = self.engine.fsmn_vad()
            if fsmn is None:
                raise VadError(f"{self.engine.settings.model_dir}: fsmn_vad.onnx not found (export it with `funasr-nano "
                               "export --vad-release-dir DIR`), so turns need commits: turn_detection null")
            endpoint = EndpointOptions.from_model_conf(
                fsmn.settings.model_conf,
                max_single_segment_time=int(round(self.config.options.max_segment_seconds * 1000)))
            self._segmenter = FsmnSegmenter(fsmn, endpoint, MODEL_RATE)
        else:
            if self._vad_path is None:
                raise VadError(f"{self.engine.settings.model_dir}: silero_vad.onnx not found (re-run `funasr-nano export` or 01_export_onnx.py "
                               "with silero-vad installed), so turns need commits: turn_detection null")
            options = dataclasses.replace(settings.vad, max_segment_seconds=self.config.options.max_segment_seconds)
            # the engine's one Silero session, this stream's own state (a restart takes a fresh one)
            self._segmenter = SpeechSegmenter(self.engine.silero_vad().stream(), options, MODEL_RATE)
        self._options = dataclasses.replace(self.config.options, prompt=settings.prompt)
        self._vad_mode = settings.vad is not None
        self._applied = settings
        if settings.diarize:
            self.engine.speaker_embedder()  # CAM++ now: a model folder without it fails here, not at the first final

    def _on_audio(self, samples: np.ndarray, seconds: float) -> None:
        try:
            self._handle(self._segmenter.push(self._resample(samples)))
        finally:
            with self._lock:
                self._backlog -= seconds
        self._partial()

    def _on_commit(self, event_id: str | None) -> None:
        segment = self._segmenter.commit()
        if segment is None:
            self._emit(Error("input_audio_buffer_commit_empty", "nothing to commit: no speech in the buffer",
                             event_id=event_id))
        else:
            self._close_segment(segment)

    def _on_update(self, settings: SessionSettings) -> None:
        if settings.sample_rate != self._applied.sample_rate or settings.vad != self._applied.vad:
            self._restart(settings)
        else:
            self._options = dataclasses.replace(self._options, prompt=settings.prompt)
            self._applied = settings

    def _on_clear(self) -> None:
        """A fresh resampler and segmenter: what the old ones held (open speech, lookahead) is dropped."""
        self._offset += self._segmenter.total
        self._open = None
        self._apply(self._applied)
        self._emit(Cleared())

    def _on_finish(self, done: threading.Event) -> None:
        self._restart(self._applied)
        self._finishing = done

    def _restart(self, settings: SessionSettings) -> None:
        """End the stream so far (its open speech becomes a segment), go on with a fresh one at these settings."""
        self._end_stream()
        self._offset += self._segmenter.total
        self._apply(settings)

    def _end_stream(self) -> None:
        """The input so far is complete: its tail through the resampler and the VAD, the open speech closed."""
        tail = self._resample(np.zeros(0, np.float32), last=True)
        events = self._segmenter.push(tail, last=True) if isinstance(self._segmenter, SpeechSegmenter) \
            else self._segmenter.push(tail)
        self._handle(events + self._segmenter.finish())

    def _handle(self, events: list) -> None:
        for event in events:
            if isinstance(event, SpeechStarted):
                self._open = _OpenItem(self._new_item_id(), self._offset + event.sample)
                self._emit(SpeechStartedEvent(self._open.item_id, _ms(self._open.start)))
            elif isinstance(event, SpeechSegment):
                self._close_segment(event)

    def _close_segment(self, segment: SpeechSegment) -> None:
        span = SampleSpan(self._offset + segment.span.start, self._offset + segment.span.end)
        item_id = self._open.item_id if self._open is not None else self._new_item_id()
        self._open = None
        if self._vad_mode:
            self._emit(SpeechStoppedEvent(item_id, _ms(span.end)))
        self._emit(Committed(item_id, self._last_item))
        self._last_item = item_id
        key = object()  # this final in the engine's PartialBudget, from before its encoder runs
        self._budget.final_started(key)
        try:
            pending = self.engine.submit_segment(segment.audio, self._options, offset=span.start)
        except BaseException:
            self._budget.final_done(key)
            raise
        submitted = time.monotonic()
        speaker = self._speaker_of(segment.audio)  # after the submit: the segment decodes meanwhile
        with self._lock:
            self._finals.append(_Final(item_id, pending, submitted, speaker))

        def decoded(_: object) -> None:
            self._budget.final_done(key)
            self._queue.put(("final",))

        pending.add_done_callback(decoded)

    def _speaker_of(self, audio: np.ndarray) -> int | None:
        """With settings.diarize, the segment's speaker among the stream's so far (funasr_nano.speakers.online)."""
        if not self._applied.diarize:
            return None
        try:
            if self._speakers is None:
                self._speakers = OnlineSpeakers(self.config.speaker_threshold, self.config.max_speakers)
            return self._speakers.assign(segment_embedding(self.engine.speaker_embedder(), audio, MODEL_RATE))
        except Exception:  # noqa: BLE001 - the final still comes, without a speaker
            log.exception("%s: the speaker of a segment failed", self.id)
            return None

    def _partial(self) -> None:
        """A delta for the open segment once `partial_interval_seconds` of new audio is in, if keeping up."""
        if not self._partials_on:
            return
        opened = self._segmenter.open_segment()
        if opened is None:
            return
        start, audio = opened
        start += self._offset
        if self._open is None or self._open.start != start:  # manual turns open items silently
            self._open = _OpenItem(self._new_item_id(), start)
        item = self._open
        interval = self.config.partial_interval_seconds
        if len(audio) - item.partial_samples < interval * MODEL_RATE:
            return
        with self._lock:
            if self._backlog >= interval:  # behind: catch up first, a partial would be stale
                return
            if self._finals:  # this stream's final text first: a partial now would compete with it
                return
        if self.config.partial_budget and not self._budget.allows(first_of_turn=item.partial_samples == 0):
            return  # other streams' finals first (funasr_nano.realtime.partials.PartialBudget)
        if item.partial_samples == 0:
            self._partials.reset()
        text = self._partials.try_update(audio)
        if text is None:  # another stream's partial is being encoded: try with the next audio
            return
        item.partial_samples = len(audio)
        if text == item.partial:
            return
        item.partial = text
        delta = ""
        if text.startswith(item.sent):
            delta, item.sent = text[len(item.sent):], text
        self._emit(TranscriptionDelta(item.item_id, delta, text))

    def _deliver_finals(self) -> None:
        """Completed events for the finished finals at the head of the line (items complete in order)."""
        while True:
            with self._lock:
                if not self._finals or not self._finals[0].pending.done():
                    break
                final = self._finals.popleft()
            try:
                segment = final.pending.result()
            except CancelledError:
                continue
            except Exception:  # noqa: BLE001 - the decoder failed this segment: say so, go on
                log.exception("%s: %s failed", self.id, final.item_id)  # the detail stays in the server's log
                self._emit(TranscriptionFailed(final.item_id, "transcription_failed",
                                               "decoding this segment failed (see the server's log)"))
                continue
            self._emit(TranscriptionCompleted(final.item_id, segment.text, round(segment.start * 1000),
                                              round(segment.end * 1000), final.speaker))
        if self._finishing is not None and not self._finals:
            self._finishing.set()
            self._finishing = None

    def _new_item_id(self) -> str:
        self._items += 1
        return f"item_{self.id[5:13]}_{self._items:04d}"

    def _emit(self, event: ServerEvent) -> None:
        if self._on_event is None:
            return
        try:
            self._on_event(event)
        except Exception:  # noqa: BLE001 - a listener's failure must not stop the stream
            log.exception("%s: event listener failed on %s", self.id, event.type)


def _ms(samples: int) -> int:
    return round(samples * 1000 / MODEL_RATE)
