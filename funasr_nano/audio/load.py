"""Decode any audio file to mono float32 in [-1, 1] at 16 kHz, without torch, in bounded memory.

We reproduce what funasr itself does for a file path (``load_audio_text_image_video`` with no
torchaudio installed), because the model's features must match the official pipeline's:

1. libsndfile (``soundfile``) reads WAV, FLAC, MP3 (mpg123), OGG Vorbis / Opus, AIFF, ... as
   float32; channels are averaged; a rate other than 16 kHz is resampled with soxr at "HQ"
   quality (what ``librosa.resample`` does by default), and the length is fixed to
   ``ceil(n * 16000 / rate)`` samples (librosa's ``fix=True``: pad with zeros or trim).
2. Anything libsndfile cannot open (M4A/AAC, MP4, WebM, WMA, AMR, ...) goes to FFmpeg: funasr runs
   the ``ffmpeg`` CLI to get 16 kHz mono s16; we get the same from PyAV's bundled FFmpeg
   libraries (libswresample downmix and resampling, then s16), so no ffmpeg binary is needed.
   The FFmpeg versions differ (PyAV's vs the system's), so here parity is within about one
   16-bit step, not exact.
3. ``*.pcm`` files that libsndfile rejects are raw 16-bit little-endian mono at the target rate,
   as funasr assumes.

Why not PyAV for everything: FFmpeg's MP3 decoder and mpg123 differ by ~1e-6 per sample, which
moves log-mel features of quiet high bands by up to 3e-3; FFmpeg's Opus decoder differs from
libopus much more. libsndfile keeps us equal to funasr on the formats people actually use.

Damaged files: mpg123 (inside libsndfile) gives up at the first stretch of garbage in an MP3 and
the read fails; FFmpeg skips the bad packets and goes on, as the ``ffmpeg`` CLI funasr calls would.
So a read that fails mid-file switches to PyAV for the rest (the samples already produced are not
produced twice), and a file that decodes to clearly less than its header announces (damage,
truncation) gets one warning through ``logging``: name, what was skipped, seconds decoded vs
the header's duration. An empty transcript of a cut file then never passes unnoticed; one that
decodes to less than one frame (25 ms) of what its header announces raises ``AudioError`` instead
(at the end of the stream): no audio at all out of a non-empty file is a failed input, not a success.

Everything streams: ``iter_audio_blocks`` decodes, downmixes and resamples chunk by chunk
(soxr's streaming resampler gives the same samples as its one-shot call), so an hours-long file
never needs more than a block of memory. ``load_audio`` is the concatenation of the same chunks.
"""

from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from funasr_nano.native_lines import mpg123_notes_dropped

# Source frames decoded per chunk (about 1.4 s at 44.1 kHz): small enough to bound memory for
# many channels, large enough that Python overhead per chunk is negligible.
_CHUNK_FRAMES = 65536
# A file that decodes to less than its header's duration by more than this (seconds, or fraction of
# the duration, whichever is larger) is reported: MP3 padding and AAC priming stay well below it.
SHORT_DECODE_SECONDS = 0.5
SHORT_DECODE_FRACTION = 0.05
# Less than one 25 ms analysis frame out of a file that announced more is no audio at all: an error.
NO_AUDIO_SECONDS = 0.025
# Below this a file holds no speech band to transcribe, and resampling it to 16 kHz would multiply
# its samples (a 3 KB WAV that says 1 Hz would become half an hour of audio in memory).
MIN_SAMPLE_RATE = 4000
# libsndfile's frame count for a stream of unknown length (a FLAC written without it): SF_COUNT_MAX.
_UNKNOWN_FRAMES = 2**62

logger = logging.getLogger(__name__)


class AudioError(Exception):
    """A file that cannot be read as audio. The message is one line: ``"<path>: <problem>"``."""

    def __init__(self, path: str | Path, problem: str) -> None:
        self.path = str(path)
        self.problem = " ".join(str(problem).split())  # one line, whatever the library said
        super().__init__(f"{self.path}: {self.problem}")


def check_some_audio(duration: float, path: str | Path) -> None:
    """AudioError when a transcript covers no audio at all: a file that holds no samples. Shorter than
    one frame is fine (an empty text); nothing at all is not."""
    if duration == 0:
        raise AudioError(path, "no audio samples (the file holds no audio data)")


class AudioTooLong(AudioError):
    """More decoded audio than the caller's limit (`max_seconds`): decoding stopped there, whatever
    the container's header claimed."""

    def __init__(self, path: str | Path, limit_seconds: float) -> None:
        self.limit_seconds = limit_seconds
        super().__init__(path, f"more than {limit_seconds:g} s of audio (decoding stopped there)")


def _check_rate(path: str | Path, rate: int) -> None:
    if rate < MIN_SAMPLE_RATE:
        raise AudioError(path, f"sample rate {rate} Hz is below {MIN_SAMPLE_RATE} Hz: not speech audio")


def _sf_frames(sf_file) -> int | None:  # noqa: ANN001 - soundfile.SoundFile
    """The frame count libsndfile read from the header, or None where it does not know it."""
    frames = sf_file.frames
    return frames if 0 < frames < _UNKNOWN_FRAMES else None


def check_audio_file(path: str | Path) -> Path:
    """Reject what no decoder can read (missing, a folder, empty), with a message a user understands.

    Cheap (no decoding): the command line runs it on every input before it loads or exports a model.
    """
    p = Path(path)
    if not p.exists():
        raise AudioError(path, "no such file")
    if p.is_dir():
        raise AudioError(path, "is a directory, not an audio file")
    if not p.is_file():
        raise AudioError(path, "not a regular file")
    try:
        size = p.stat().st_size
    except OSError as e:
        raise AudioError(path, f"cannot read ({e.strerror or e})") from e
    if size == 0:
        raise AudioError(path, "empty file (0 bytes)")
    return p


# libsndfile's generic answers for formats it does not know; not worth showing to a user.
_SF_GENERIC = ("format not recognised", "file does not exist", "system error", "unspecified internal error")


def _open_soundfile(p: Path):  # -> tuple[soundfile.SoundFile | None, str]
    """Open with libsndfile; on failure (None, its reason), and FFmpeg is tried next."""
    try:
        import soundfile
    except ImportError:  # optional: without it every format goes through PyAV
        return None, ""
    try:
        with mpg123_notes_dropped():  # an MP3's header scan already reports damaged frames
            return soundfile.SoundFile(str(p)), ""
    except (RuntimeError, TypeError, ValueError, OSError) as e:  # LibsndfileError is a RuntimeError
        reason = str(e).split("': ", 1)[-1].strip()  # drop "Error opening '<path>': "
        return None, "" if reason.lower().startswith(_SF_GENERIC) else reason


class _Resampler:
    """Streaming soxr resampler to ``out_rate`` that ends with librosa's length fix.

    soxr's stream output is identical to its one-shot ``soxr.resample`` (checked in the tests);
    librosa then pads or trims the result to ``ceil(n_in * out / in)`` samples.
    """

    def __init__(self, path: str | Path, in_rate: int, out_rate: int) -> None:
        self.in_rate, self.out_rate = in_rate, out_rate
        self.n_in = 0
        self.n_out = 0
        self.stream = None
        if in_rate != out_rate:
            try:
                import soxr
            except ImportError as e:
                raise AudioError(path, f"resampling {in_rate} Hz needs soxr: pip install soxr") from e
            self.stream = soxr.ResampleStream(in_rate, out_rate, 1, dtype="float32", quality="HQ")

    def process(self, x: np.ndarray, last: bool = False) -> np.ndarray:
        """Resample one chunk; with ``last``, flush and apply the final length."""
        self.n_in += len(x)
        y = x if self.stream is None else self.stream.resample_chunk(x, last=last)
        if last and self.stream is not None:
            target = int(math.ceil(self.n_in * (float(self.out_rate) / self.in_rate)))
            have = self.n_out + len(y)
            if have < target:
                y = np.concatenate([y, np.zeros(target - have, np.float32)])
            elif have > target:
                y = y[: max(0, len(y) - (have - target))]
        self.n_out += len(y)
        return np.asarray(y, dtype=np.float32)


@dataclass
class _DecodeLog:
    """What happened while decoding one file; any shortfall becomes one warning at its end."""

    header_seconds: float | None = None  # the duration the container claims, where it says
    samples: int = 0  # samples produced, at the output rate
    fallback: str = ""  # libsndfile's error when it gave up mid-file and FFmpeg took over
    fallback_at: float = 0.0  # seconds produced by libsndfile before that
    skipped_packets: int = 0  # packets FFmpeg could not decode and skipped
    stopped: str = ""  # the FFmpeg error that ended the stream before its end


def _soundfile_chunks(sf_file, path: str | Path, sample_rate: int, log: _DecodeLog) -> Iterator[np.ndarray]:
    """Chunks from libsndfile: float32 read, channel mean, soxr HQ resampling (funasr's path).

    A read that fails mid-file (mpg123 gives up on a damaged stretch) hands over to FFmpeg.
    """
    resampler = _Resampler(path, int(sf_file.samplerate), sample_rate)
    # soundfile.read() stops at the frame count in the header even if more data follows; do the
    # same so the sample count matches funasr's.
    remaining = _sf_frames(sf_file)
    failure: Exception | None = None
    notes_filtered = mpg123_notes_dropped if sf_file.format == "MP3" else contextlib.nullcontext
    with sf_file:
        while remaining is None or remaining > 0:
            n = _CHUNK_FRAMES if remaining is None else min(_CHUNK_FRAMES, remaining)
            try:
                with notes_filtered():
                    block = sf_file.read(n, dtype="float32", always_2d=True)
            except (RuntimeError, ValueError, OSError) as e:  # LibsndfileError is a RuntimeError
                failure = e
                break
            if len(block) == 0:
                break
            if remaining is not None:
                remaining -= len(block)
            mono = block[:, 0] if block.shape[1] == 1 else block.mean(axis=1, dtype=np.float32)
            y = resampler.process(np.ascontiguousarray(mono))
            if len(y):
                yield y
    if failure is not None:
        yield from _resume_with_ffmpeg(path, sample_rate, resampler.n_out, failure, log)
        return
    y = resampler.process(np.zeros(0, np.float32), last=True)
    if len(y):
        yield y


def _resume_with_ffmpeg(path: str | Path, sample_rate: int, produced: int, failure: Exception,
                        log: _DecodeLog) -> Iterator[np.ndarray]:
    """The rest of a file libsndfile failed on, from FFmpeg, which skips damaged packets.

    FFmpeg decodes from the start and its first `produced` samples (what libsndfile already gave)
    are dropped, so the two decoders meet where libsndfile stopped.
    """
    reason = " ".join(str(failure).split()) or type(failure).__name__
    log.fallback, log.fallback_at = reason, produced / sample_rate
    try:
        chunks = _av_chunks(path, sample_rate, log)
    except AudioError as e:
        raise AudioError(path, f"decoding failed at {log.fallback_at:.2f} s ({reason}); FFmpeg: {e.problem}") from e
    skip = produced
    for y in chunks:
        if skip >= len(y):
            skip -= len(y)
            continue
        yield y[skip:]
        skip = 0


def _report_shortfall(path: str | Path, log: _DecodeLog, sample_rate: int) -> None:
    """One warning when the file was damaged or decoded to clearly less than its header says."""
    decoded = log.samples / sample_rate
    header = log.header_seconds
    short = header is not None and header - decoded > max(SHORT_DECODE_SECONDS, SHORT_DECODE_FRACTION * header)
    problems = []
    if log.fallback:
        problems.append(f"libsndfile stopped at {log.fallback_at:.2f} s ({log.fallback}), FFmpeg decoded the rest")
    if log.skipped_packets:
        problems.append(f"{log.skipped_packets} damaged packet{'s' if log.skipped_packets > 1 else ''} skipped")
    if log.stopped:
        problems.append(f"decoding ended early ({log.stopped})")
    if not problems and not short:
        return
    amount = f"{decoded:.2f} s decoded" + (f" of the {header:.2f} s its header gives" if header is not None else "")
    kind = "damaged audio" if problems else "truncated or damaged audio"
    if log.samples < NO_AUDIO_SECONDS * sample_rate:
        # Nothing usable came out of a file that promised audio: an empty transcript with exit 0 would read
        # as success in a batch script, so this is an error, not a warning.
        raise AudioError(path, f"no audio decoded ({kind}): {'; '.join([*problems, amount])}")
    logger.warning("%s: %s: %s", path, kind, "; ".join([*problems, amount]))


def _counted(chunks: Iterator[np.ndarray], path: str | Path, sample_rate: int, log: _DecodeLog,
             max_seconds: float | None = None) -> Iterator[np.ndarray]:
    """`chunks`, counting samples; at the end, the warning if the file fell short.

    With `max_seconds`, AudioTooLong as soon as more than that has been decoded: a header can lie
    about the length, and silence or noise never yields a segment whose end could be checked.
    """
    limit = None if max_seconds is None else int(max_seconds * sample_rate)
    try:
        for y in chunks:
            log.samples += len(y)
            if limit is not None and log.samples > limit:
                raise AudioTooLong(path, max_seconds)
            yield y
    finally:
        close = getattr(chunks, "close", None)
        if close is not None:
            close()  # the decoder's file and buffers go now, not at garbage collection
    _report_shortfall(path, log, sample_rate)


def _pcm_chunks(p: Path) -> Iterator[np.ndarray]:
    """Raw 16-bit little-endian mono, taken to be at the target rate (funasr's ffmpeg call)."""
    data = np.memmap(p, dtype="<i2", mode="r", shape=(p.stat().st_size // 2,))
    for start in range(0, len(data), _CHUNK_FRAMES):
        yield data[start : start + _CHUNK_FRAMES].astype(np.float32) / np.float32(32768.0)


def _import_av(path: str | Path):
    try:
        import av
    except ImportError as e:
        raise AudioError(
            path, "libsndfile cannot read this format and PyAV is missing: pip install av"
        ) from e
    return av


def _av_chunks(path: str | Path, sample_rate: int, log: _DecodeLog, sf_reason: str = "") -> Iterator[np.ndarray]:
    """Chunks from FFmpeg via PyAV, as funasr's ``ffmpeg -ac 1 -ar 16000 -f s16le`` produces them.

    Opens eagerly (this function is not a generator) so that unreadable files fail at the call.
    """
    av = _import_av(path)
    try:
        container = av.open(str(path))
    except (av.error.FFmpegError, OSError, ValueError) as e:
        detail = getattr(e, "strerror", None) or e.__class__.__name__
        if sf_reason:
            detail = f"libsndfile: {sf_reason}; FFmpeg: {detail}"
        raise AudioError(path, f"not a readable audio file ({detail})") from e
    if not container.streams.audio:
        container.close()
        raise AudioError(path, "contains no audio stream")
    rate = container.streams.audio[0].codec_context.sample_rate
    if rate:
        try:
            _check_rate(path, rate)
        except AudioError:
            container.close()
            raise
    if log.header_seconds is None:
        log.header_seconds = _av_duration(av, container)
    return _av_decode(av, container, path, sample_rate, log)


def _av_duration(av, container) -> float | None:
    """The container's duration in seconds (its header, or FFmpeg's estimate from the bit rate), or None."""
    if container.duration is not None:
        return container.duration / av.time_base
    stream = container.streams.audio[0] if container.streams.audio else None
    if stream is not None and stream.duration is not None and stream.time_base is not None:
        return float(stream.duration * stream.time_base)
    return None


def _av_decode(av, container, path: str | Path, sample_rate: int, log: _DecodeLog) -> Iterator[np.ndarray]:
    stream = container.streams.audio[0]
    resampler = av.AudioResampler(format="s16", layout="mono", rate=sample_rate)
    decoded = 0
    errors = 0

    def convert(frames) -> np.ndarray:
        parts = [f.to_ndarray().reshape(-1) for f in frames]
        if not parts:
            return np.zeros(0, np.float32)
        return np.concatenate(parts).astype(np.float32) / np.float32(32768.0)

    with container:
        try:
            for packet in container.demux(stream):
                try:
                    frames = packet.decode()
                except av.error.FFmpegError:
                    errors += 1  # like the ffmpeg CLI: skip a damaged packet, keep going
                    continue
                for frame in frames:
                    y = convert(resampler.resample(frame))
                    decoded += len(y)
                    if len(y):
                        yield y
        except av.error.FFmpegError as e:
            if decoded == 0:
                raise AudioError(path, f"no decodable audio ({e.__class__.__name__})") from e
            log.stopped = getattr(e, "strerror", None) or e.__class__.__name__
        y = convert(resampler.resample(None))
        decoded += len(y)
        if len(y):
            yield y
    log.skipped_packets += errors
    if decoded == 0 and errors:
        raise AudioError(path, "no decodable audio (every packet failed to decode)")


def _chunks(path: str | Path, sample_rate: int, max_seconds: float | None = None) -> Iterator[np.ndarray]:
    """Open eagerly (errors surface at the call), then stream mono chunks at ``sample_rate``."""
    p = check_audio_file(path)
    log = _DecodeLog()
    sf_file, sf_reason = _open_soundfile(p)
    if sf_file is not None:
        try:
            _check_rate(path, int(sf_file.samplerate))
        except AudioError:
            sf_file.close()
            raise
        frames = _sf_frames(sf_file)
        if frames is not None:
            log.header_seconds = frames / sf_file.samplerate
        chunks = _soundfile_chunks(sf_file, path, sample_rate, log)
    elif p.suffix.lower() == ".pcm":
        chunks = _pcm_chunks(p)
    else:
        chunks = _av_chunks(path, sample_rate, log, sf_reason)
    return _counted(chunks, path, sample_rate, log, max_seconds)


def load_audio(path: str | Path, sample_rate: int = 16000, max_seconds: float | None = None) -> np.ndarray:
    """The whole file as mono float32 in [-1, 1] at ``sample_rate``, as funasr would load it.

    Raises ``AudioError`` when the file is missing, empty, not audio or undecodable. A valid file
    that holds no samples gives an empty array: the caller decides what that means.
    """
    parts = list(_chunks(path, sample_rate, max_seconds))
    if not parts:
        return np.zeros(0, np.float32)
    return np.concatenate(parts)


def iter_audio_blocks(
    path: str | Path, block_seconds: float = 60.0, sample_rate: int = 16000, max_seconds: float | None = None
) -> Iterator[np.ndarray]:
    """Stream the file as consecutive mono float32 blocks of ``block_seconds`` (the last shorter).

    The concatenation equals ``load_audio(path, sample_rate)`` exactly, and memory stays bounded
    by one block plus one decoder chunk, so hours-long files are fine. Errors opening the file are
    raised here, at the call, not at the first ``next()``. ``max_seconds``: AudioTooLong once more
    than that is decoded (the blocks before it are yielded).
    """
    block = max(1, int(round(block_seconds * sample_rate)))
    chunks = _chunks(path, sample_rate, max_seconds)

    def blocks() -> Iterator[np.ndarray]:
        pending: list[np.ndarray] = []
        size = 0
        for chunk in chunks:
            pending.append(chunk)
            size += len(chunk)
            if size < block:
                continue
            buf = np.concatenate(pending)
            start = 0
            while len(buf) - start >= block:
                yield buf[start : start + block].copy()
                start += block
            pending = [buf[start:]] if start < len(buf) else []
            size = len(buf) - start
        if size:
            yield np.concatenate(pending)

    return blocks()


def audio_duration(path: str | Path) -> float | None:
    """Duration in seconds from the container's metadata (no decoding), or None when unknown.

    An estimate: MP3 headers can be off, and the decoded length is what counts.
    """
    p = check_audio_file(path)
    sf_file, _ = _open_soundfile(p)
    if sf_file is not None:
        with sf_file:
            frames = _sf_frames(sf_file)
            if frames is not None and sf_file.samplerate > 0:
                return frames / sf_file.samplerate
    try:
        import av
    except ImportError:
        return None
    try:
        with av.open(str(p)) as container:
            return _av_duration(av, container)
    except (av.error.FFmpegError, OSError, ValueError):
        return None
