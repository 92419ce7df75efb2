"""`funasr-nano mic` and 06_microphone.py: an audio source, a session (here or on a server), a display.

Sources: the default input device through PortAudio (`sounddevice`, imported only when used, so
that --file and --server work without it), or a file played at real-time speed (`--speed N`: N
times faster). Sessions: a `RealtimeSession` on an engine loaded here (transcribe's model
options), or a server's `/v1/realtime` WebSocket (`--server URL`, the `websockets` client). Either
way the same events reach the display: partials rewritten in place on stderr (a terminal only),
final lines on stdout. Options that would do nothing here are not offered: the session segments
the speech itself (no --vad), writes no subtitles (no --max-cue-seconds) and decodes one stream
(no --batch-size).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import queue
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from funasr_nano.cli import (
    EXIT_FAILED_INPUTS,
    EXIT_OK,
    SetupError,
    check_folders,
    engine_config,
    log_to_stderr,
    open_engine,
    prompt_options,
    transcribe_options,
)
from funasr_nano.options import (
    DEFAULT_PRESET,
    EXIT_SETUP,
    OneLineParser,
    add_deprecated_alias,
    add_model_options,
    add_preset_option,
    add_prompt_options,
    add_quiet_option,
    examples,
    positive,
)
from funasr_nano.paths import CONSOLE_SCRIPT
from funasr_nano.presets import DEFAULT_BATCH_SIZE
from funasr_nano.realtime import protocol
from funasr_nano.realtime.events import (
    Error,
    ServerEvent,
    TranscriptionCompleted,
    TranscriptionDelta,
    TranscriptionFailed,
)
from funasr_nano.realtime.settings import MAX_RATE, MIN_RATE, MODEL_RATE, RealtimeConfig, SessionSettings

CHUNK_SECONDS = 0.1  # audio per append: the microphone's block, the file's step
FINISH_TIMEOUT = 300.0
PROG = f"{CONSOLE_SCRIPT} mic"


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    run = f"python {prog}" if prog.endswith(".py") else prog
    p = OneLineParser(prog=prog, description="Live transcription with Fun-ASR-Nano: partial text "
                      "in place while you speak, one final line per segment.",
                      epilog=examples(
                          f"{run}                                  # the default input device, models loaded here",
                          f"{run} --file talk.mp3 --speed 4",
                          f"{run} --server ws://localhost:8000 --output-file notes.txt",
                          notes="Partial text is rewritten in place on stderr when it is a terminal; each segment's "
                                "final text goes to stdout as one line. Ctrl-C stops cleanly: the speech in "
                                "progress is finished and, with --output-file, the transcript so far is written. "
                                "The microphone needs the mic extra and the system's PortAudio (libportaudio2 on "
                                "Debian/Ubuntu, portaudio with Homebrew)."))
    p.add_argument("--file", type=Path, default=None, metavar="AUDIO",
                   help="play this file through the live path instead of the microphone (default: the microphone)")
    p.add_argument("--speed", type=positive(float), default=1.0, help="--file: N times real-time speed (default: 1)")
    p.add_argument("--server", default=None, metavar="URL",
                   help="transcribe on a running server (ws://host:port[/v1/realtime]) instead of loading the "
                        "models here (default: load them here)")
    output = p.add_argument("--output-file", type=Path, default=None, metavar="FILE",
                            help="write the final lines to this file at the end, also after Ctrl-C (default: "
                                 "stdout only)")
    add_deprecated_alias(p, "--output", output)
    p.add_argument("--device", default=None, help="input device (number or name; default: the system's)")
    add_quiet_option(p, "no partial text, notes or progress on stderr")
    p.add_argument("--api-key", default=None, help="--server: the server's API key (default: $FUNASR_API_KEY)")
    add_preset_option(p, DEFAULT_PRESET)
    p.add_argument("--partial-interval", type=positive(float), default=0.5, metavar="S",
                   help="seconds of new audio between partial texts (default: 0.5)")
    add_model_options(p)
    add_prompt_options(p)
    # the engine's context still holds a few sequences (a final decodes while the next speech starts)
    p.set_defaults(batch_size=DEFAULT_BATCH_SIZE)
    return p


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    """Transcribe live until the input ends or Ctrl-C: 0, 1 (the --file cannot be read), 2 (set-up)."""
    args = build_parser(prog).parse_args(argv)
    log_to_stderr()
    try:
        return _run(args)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_SETUP
    except _InputError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_FAILED_INPUTS


class _InputError(RuntimeError):
    """The --file input cannot be read (exit 1)."""


def _run(args: argparse.Namespace) -> int:
    options = transcribe_options(args, prompt_options(args), timestamps=False)
    if args.server is None:
        check_folders(args)
    source = FileSource(args.file, args.speed) if args.file is not None else MicSource(args.device)
    display = Display(show_partials=not args.quiet and sys.stderr.isatty())
    settings = SessionSettings(sample_rate=source.rate, prompt=options.prompt)
    engine = None
    if args.server is not None:
        api_key = args.api_key or os.environ.get("FUNASR_API_KEY") or None
        sink: LocalSink | ServerSink = ServerSink(args.server, settings, display, api_key)
    else:
        engine = open_engine(engine_config(args.preset, args))
        try:  # the checkpoint loaded decides the languages
            options = dataclasses.replace(options, prompt=prompt_options(args, engine.settings))
        except SetupError:
            engine.close()
            raise
        settings = dataclasses.replace(settings, prompt=options.prompt)
        sink = LocalSink(engine, settings, RealtimeConfig(partial_interval_seconds=args.partial_interval,
                                                          options=options), display)
    try:
        try:
            for chunk in source:
                if source.can_wait:
                    sink.wait_for_room()
                sink.append(chunk)
        except KeyboardInterrupt:
            source.stop()
            display.note("stopped: finishing the speech in progress (Ctrl-C again to quit at once)")
        sink.finish()
    except KeyboardInterrupt:
        pass
    finally:
        sink.close()
        if engine is not None:
            engine.close()
        display.end()
        if args.output_file is not None:
            _write(args.output_file, display.finals)
    return EXIT_OK


def _write(path: Path, lines: list[str]) -> None:
    from funasr_nano.output.writers import WriteError, write_atomic

    try:
        write_atomic(path, "".join(f"{line}\n" for line in lines))
    except WriteError as exc:
        raise SetupError(str(exc)) from exc


# ---------------------------------------------------------------------- sources


class FileSource:
    """A file decoded to 16 kHz and handed out in 0.1 s chunks at `speed` times real time."""

    rate = MODEL_RATE
    can_wait = True  # a file can wait for a session that falls behind; a microphone cannot

    def __init__(self, path: Path, speed: float) -> None:
        from funasr_nano.audio.load import AudioError, check_audio_file, load_audio
        from funasr_nano.cli import native_stderr_silenced

        try:
            check_audio_file(path)
            with native_stderr_silenced():  # mpg123's notes on a damaged MP3, as the 03 scripts do
                self.wave = load_audio(path, MODEL_RATE)
        except AudioError as exc:
            raise _InputError(str(exc)) from exc
        self.speed = speed
        self._stopped = False

    def __iter__(self) -> Iterator[np.ndarray]:
        step = int(CHUNK_SECONDS * self.rate)
        t0 = time.monotonic()
        for start in range(0, len(self.wave), step):
            if self._stopped:
                return
            yield self.wave[start: start + step]
            time.sleep(max(0.0, t0 + (start + step) / self.rate / self.speed - time.monotonic()))

    def stop(self) -> None:
        self._stopped = True


class MicSource:
    """The input device through PortAudio, PCM16 mono at the device's own rate (the session resamples)."""

    can_wait = False

    def __init__(self, device: str | None) -> None:
        sd = _sounddevice()
        device_id: int | str | None = int(device) if device is not None and device.isdigit() else device
        try:
            info = sd.query_devices(device_id, kind="input")
        except (ValueError, sd.PortAudioError) as exc:
            raise SetupError(f"no input device{f' {device!r}' if device else ''}: {exc}") from exc
        rate = int(info["default_samplerate"])
        self.rate = rate if MIN_RATE <= rate <= MAX_RATE else MODEL_RATE
        self._blocks: queue.Queue[np.ndarray] = queue.Queue()
        self._stopped = False
        self._stream = sd.InputStream(samplerate=self.rate, channels=1, dtype="int16", device=device_id,
                                      blocksize=int(self.rate * CHUNK_SECONDS), callback=self._callback)

    def _callback(self, indata, frames, time_info, status) -> None:  # PortAudio's thread: hand over, never wait
        self._blocks.put(indata[:, 0].copy())

    def __iter__(self) -> Iterator[np.ndarray]:
        with self._stream:
            while not self._stopped:
                try:
                    yield self._blocks.get(timeout=0.5)
                except queue.Empty:
                    continue

    def stop(self) -> None:
        self._stopped = True


def _install(extra: str) -> str:
    """The command that installs `extra` (`funasr_nano.requirements`: its requirements file in a checkout)."""
    from funasr_nano.requirements import EXTRAS, install_command

    return install_command(EXTRAS[extra])


def _sounddevice():
    """sounddevice, or a SetupError saying what to install."""
    try:
        import sounddevice
    except ImportError as exc:
        raise SetupError(f"the microphone needs sounddevice: {_install('mic')} (or use --file AUDIO)") from exc
    except OSError as exc:  # sounddevice is there, the PortAudio library is not
        raise SetupError(f"the microphone needs the PortAudio library ({exc}): install libportaudio2 (Debian/Ubuntu) "
                         "or portaudio (Homebrew), or use --file AUDIO") from exc
    return sounddevice


# ---------------------------------------------------------------------- sessions


class LocalSink:
    """A RealtimeSession on an engine loaded in this process."""

    def __init__(self, engine, settings: SessionSettings, config: RealtimeConfig, display: Display) -> None:
        from funasr_nano.realtime.session import RealtimeSession

        self.config = config
        self.display = display
        self.session = RealtimeSession(engine, settings, config, display)

    def wait_for_room(self) -> None:
        while self.session.lag_seconds() > self.config.max_lag_seconds / 2:
            time.sleep(0.01)

    def append(self, chunk: np.ndarray) -> None:
        for event in self.session.append(chunk):
            self.display(event)

    def finish(self) -> None:
        self.session.finish(FINISH_TIMEOUT)

    def close(self) -> None:
        self.session.close()


class ServerSink:
    """The server's realtime WebSocket: session.update, base64 PCM16 appends, events back on a reader thread."""

    def __init__(self, url: str, settings: SessionSettings, display: Display, api_key: str | None = None) -> None:
        try:
            from websockets.sync.client import connect
        except ImportError as exc:
            raise SetupError(f"--server needs the websockets package: {_install('mic')}") from exc
        self.url = realtime_url(url)
        self.display = display
        try:
            headers = {"Authorization": f"Bearer {api_key}"} if api_key else None
            self.ws = connect(self.url, open_timeout=30, max_size=None, additional_headers=headers)
            first = json.loads(self.ws.recv(timeout=30))
        except Exception as exc:  # noqa: BLE001 - refused, unresolvable, not a WebSocket, a bad handshake...
            raise SetupError(f"{self.url}: cannot open the realtime session ({exc})") from exc
        if first.get("type") != "session.created":
            raise SetupError(f"{self.url}: {first.get('error', {}).get('message') or 'no session.created'}")
        self.ws.send(json.dumps(protocol.session_update(settings)))
        self._drained = threading.Event()
        self._reader = threading.Thread(target=self._read, name="realtime-reader", daemon=True)
        self._reader.start()

    def wait_for_room(self) -> None:  # the server says when it falls behind (an error event)
        return

    def append(self, chunk: np.ndarray) -> None:
        if chunk.dtype != np.int16:
            chunk = np.clip(np.round(chunk * 32768), -32768, 32767).astype(np.int16)
        self.ws.send(json.dumps({"type": "input_audio_buffer.append", "audio": protocol.encode_audio(chunk.tobytes())}))

    def finish(self) -> None:
        """Commit the speech in progress; a second commit's (empty) answer says the server has seen everything."""
        self.ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "end-of-input"}))
        self.ws.send(json.dumps({"type": "input_audio_buffer.commit", "event_id": "end-of-input-check"}))
        if not self._drained.wait(FINISH_TIMEOUT):
            self.display.note(f"{self.url}: no final text within {FINISH_TIMEOUT:g} s")

    def close(self) -> None:
        self.ws.close()
        self._reader.join(timeout=5)

    def _read(self) -> None:
        """Events to the display; `_drained` once the end-of-input check is answered and every commit has its final."""
        committed = completed = 0
        end_seen = False
        try:
            for message in self.ws:
                data = json.loads(message)
                kind = data.get("type")
                answers = (data.get("error") or {}).get("event_id") or "" if kind == "error" else ""
                if answers.startswith("end-of-input"):  # the answers to finish()'s commits are not news
                    end_seen |= answers == "end-of-input-check"
                else:
                    committed += kind == "input_audio_buffer.committed"
                    completed += kind in (TranscriptionCompleted.type, TranscriptionFailed.type)
                    event = protocol.parse_server_event(data)
                    if event is not None:
                        self.display(event)
                if end_seen and completed >= committed:
                    self._drained.set()
        except Exception:  # noqa: BLE001 - the connection closed: nothing more will come
            pass
        self._drained.set()


def realtime_url(url: str) -> str:
    """ws://host:port -> ws://host:port/v1/realtime?intent=transcription (http(s) becomes ws(s))."""
    from urllib.parse import urlsplit, urlunsplit

    parts = urlsplit(url if "://" in url else f"ws://{url}")
    scheme = {"http": "ws", "https": "wss"}.get(parts.scheme, parts.scheme)
    path = parts.path if parts.path not in ("", "/") else "/v1/realtime"
    query = parts.query or "intent=transcription"
    return urlunsplit((scheme, parts.netloc, path, query, ""))


# ---------------------------------------------------------------------- display


class Display:
    """Partial text rewritten in place on stderr (a terminal only), final lines on stdout; keeps the finals."""

    def __init__(self, show_partials: bool) -> None:
        self.show_partials = show_partials
        self.finals: list[str] = []
        self._partial_shown = False
        self._lock = threading.Lock()

    def __call__(self, event: ServerEvent) -> None:
        with self._lock:
            if isinstance(event, TranscriptionDelta):
                if self.show_partials:
                    width = 200
                    try:
                        import shutil

                        width = shutil.get_terminal_size().columns - 1
                    except (OSError, ValueError):
                        pass
                    text = event.partial if len(event.partial) <= width else "…" + event.partial[-(width - 1):]
                    sys.stderr.write(f"\r\033[K{text}")
                    sys.stderr.flush()
                    self._partial_shown = True
            elif isinstance(event, TranscriptionCompleted):
                self._clear()
                self.finals.append(event.transcript)
                print(event.transcript, flush=True)
            elif isinstance(event, TranscriptionFailed):
                self._clear()
                print(f"error: segment {event.item_id}: {event.message}", file=sys.stderr, flush=True)
            elif isinstance(event, Error):
                self._clear()
                print(f"warning: {event.message}", file=sys.stderr, flush=True)

    def note(self, message: str) -> None:
        with self._lock:
            self._clear()
            print(message, file=sys.stderr, flush=True)

    def end(self) -> None:
        with self._lock:
            self._clear()

    def _clear(self) -> None:
        if self._partial_shown:
            sys.stderr.write("\r\033[K")
            sys.stderr.flush()
            self._partial_shown = False
