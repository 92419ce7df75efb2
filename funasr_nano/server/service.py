"""One request's transcription on a worker thread, feeding the shared Engine's scheduler.

Decoding the upload, the VAD and the encoder run on the request's worker thread (or, for the
segments the scheduler pulls, on the scheduler's thread), never on the event loop; the segments
join the one `Scheduler`, whose rounds mix the segments of every request in flight (each with its
own language, hotwords and ITN). Segments come back in input order; the event loop gets them
through an asyncio queue (for streaming) and the transcript at the end.

A request that is cancelled (client gone, timeout, shutdown) calls `SegmentStream.cancel()`:
its sequences are freed before the next round and the others go on unchanged.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path

from funasr_nano import requirements
from funasr_nano.audio.load import AudioError, AudioTooLong, audio_duration, check_some_audio
from funasr_nano.config import TranscribeOptions
from funasr_nano.engine import Engine, SegmentStream
from funasr_nano.output.results import Segment, Transcript
from funasr_nano.server.errors import ApiError, bad_request
from funasr_nano.speakers.embeddings import SPK_MODEL_FILE, find_speaker_model

AUDIO_SLACK_SECONDS = 1.0  # decoded audio may run this much past the header's duration before it counts


def audio_too_long(seconds: float | None, limit: float) -> ApiError:
    """413; `seconds` None when decoding stopped at the limit (the length beyond it is not known)."""
    length = f"is {seconds:.1f} s long" if seconds is not None else "goes on past the limit"
    return ApiError(413, f"audio {length}; this server takes at most {limit:g} s (--max-audio-seconds)",
                    code="audio_too_long", param="file")


def _retrieve(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


@dataclass(frozen=True)
class Limits:
    max_audio_seconds: float
    timeout: float  # seconds per request, upload excluded


class Running:
    """A transcription in progress: segments arrive on `segments` (None at the end), `cancel()` from the loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.segments: asyncio.Queue[Segment | None] = asyncio.Queue()
        self._lock = threading.Lock()
        self._stream: SegmentStream | None = None
        self._cancelled = False
        self.future: asyncio.Future[Transcript] | None = None

    def cancel(self) -> None:
        with self._lock:
            self._cancelled = True
            if self._stream is not None:
                self._stream.cancel()

    def _attach(self, stream: SegmentStream) -> None:
        with self._lock:
            self._stream = stream
            if self._cancelled:
                stream.cancel()

    def _post(self, item: Segment | None) -> None:
        self.loop.call_soon_threadsafe(self.segments.put_nowait, item)


class TranscriptionService:
    """The shared Engine and the worker threads that feed it (one per request in flight)."""

    def __init__(self, engine: Engine, defaults: TranscribeOptions, limits: Limits, workers: int) -> None:
        self.engine = engine
        self.defaults = defaults
        self.limits = limits
        self.executor = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="request")

    def close(self) -> None:
        self.executor.shutdown(wait=True, cancel_futures=True)

    def speakers_available(self) -> bool:
        """Whether requests may ask for speakers: campplus.onnx is in the model folder (/health says so, and
        the page shows its speakers box only then)."""
        return find_speaker_model(self.engine.settings.model_dir) is not None

    def open_speakers(self) -> None:
        """CAM++ opened (once: the engine's); ApiError 400 when this server cannot diarize, so that the client
        learns it before its upload is decoded rather than as a 500 from the worker thread."""
        if not self.speakers_available():
            raise bad_request(f"speakers need CAM++ ({SPK_MODEL_FILE}), which this server's model folder lacks: "
                              "export it with funasr-nano export --spk-release-dir", param="response_format",
                              code="diarization_unavailable")
        try:
            requirements.check("the server's diarization", "diarize")
        except requirements.MissingRequirement as exc:
            raise bad_request(str(exc), param="response_format", code="diarization_unavailable") from None
        self.engine.speaker_embedder()

    def start(self, path: Path, name: str, options: TranscribeOptions) -> Running:
        """Start transcribing `path` (the upload, called `name` in messages); await `running.future`."""
        loop = asyncio.get_running_loop()
        running = Running(loop)
        running.future = asyncio.wrap_future(self.executor.submit(self._run, running, path, name, options))
        # a request whose client left (or timed out) never awaits its outcome: retrieve it here so
        # that asyncio does not log "Future exception was never retrieved" for each one
        running.future.add_done_callback(_retrieve)
        return running

    def options(self, **choices: object) -> TranscribeOptions:
        """The defaults with `choices`, decoding stopped past the audio limit whatever the header says."""
        return replace(self.defaults, max_audio_seconds=self.limits.max_audio_seconds + AUDIO_SLACK_SECONDS,
                       **choices)

    def _run(self, running: Running, path: Path, name: str, options: TranscribeOptions) -> Transcript:
        """On a worker thread: check the audio, decode it segment by segment, post each segment."""
        limit = self.limits.max_audio_seconds
        try:
            try:
                seconds = audio_duration(path)
                if seconds is not None and seconds > limit + AUDIO_SLACK_SECONDS:
                    raise audio_too_long(seconds, limit)
                stream = self.engine.segments(path, options)
            except AudioTooLong:
                raise audio_too_long(None, limit) from None
            except AudioError as exc:
                raise bad_request(f"{name}: {exc.problem}", param="file", code="invalid_audio") from None
            running._attach(stream)
            try:
                for segment in stream:
                    if segment.end > limit + AUDIO_SLACK_SECONDS:
                        raise audio_too_long(segment.end, limit)
                    running._post(segment)
            except AudioTooLong:
                raise audio_too_long(None, limit) from None
            except AudioError as exc:  # damaged further in
                raise bad_request(f"{name}: {exc.problem}", param="file", code="invalid_audio") from None
            finally:
                stream.close()
            transcript = stream.transcript
            if transcript is None:
                raise CancelledError()
            try:
                check_some_audio(transcript.duration, name)
            except AudioError as exc:
                raise bad_request(str(exc), param="file", code="invalid_audio") from None
            if transcript.duration > limit + AUDIO_SLACK_SECONDS:
                raise audio_too_long(transcript.duration, limit)
            return transcript
        finally:
            running._post(None)  # the end, whatever happened (the error is the future's)
