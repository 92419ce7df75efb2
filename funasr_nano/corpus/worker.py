"""The transcription stage: a Ray Data actor that holds one Engine and turns files into rows.

Ray Data makes a pool of these (`map_batches(Transcriber, concurrency=(min, max), num_cpus=...)`);
each loads the models once, in its constructor, and then transcribes one file per call: decoding
the audio, Silero VAD, encoder and the batched llama.cpp decoding of the file's segments, exactly
as the 03 scripts do (`funasr_nano.cli.load_engine` and `transcribe_options` with the same options),
so a row's text is the text `03_inference_*.py FILE --format json` prints.

Why the actor decodes its own audio rather than a CPU-task stage before it: on this machine
(AMD EPYC, one core) decoding the shared MP3 runs at 283x real time and Silero VAD at 161x, so
both cost 0.0097 core-seconds per second of audio, against 0.61 core-seconds for the transcription
itself (cpu-int8, RTF 0.304 on 2 threads, benchmarks/RESULTS.md): 1.6 % of an actor's work. A
separate stage could save at most that, and would ship the 16 kHz float32 waveform through
Ray's object store instead of a path: 64 KB per second of audio, 230 MB per hour, one object per
file (a 3-hour lecture: 690 MB held until an actor takes it). Inside the actor the engine streams
the file in 60 s blocks, so memory stays bounded by the file's segments, not its length, and the
object store carries only paths and finished rows. On a cluster whose actors sit on GPUs the
balance changes (the transcription gets ~20x faster, decode + VAD become ~25 % of the time on
the actor's CPU); that is the case for a decode stage of CPU tasks, left for when it is measured.

Nothing is lost: any error on a file (unreadable audio, an unknown language in the manifest)
becomes that file's row with `error` set; only the death of the process (a crash in a native
library, the node lost) escapes, and then Ray restarts the actor and retries the call
(`max_restarts`, `max_task_retries` set by the pipeline).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa

from funasr_nano.corpus.store import ROW_SCHEMA

# The worker's rows: the stored columns plus the per-file outputs (--formats) rendered here, where the
# transcript still has its character times, and written by the driver (the output folder is only
# needed on the driver's machine).
WORKER_SCHEMA = ROW_SCHEMA.append(pa.field("outputs", pa.string()))


@dataclass(frozen=True)
class WorkerSettings:
    """What every actor needs, pickled once to each: the preset and the 03 options, the outputs to render."""

    preset: str
    args: argparse.Namespace  # the options of funasr_nano.options.add_model_options / add_transcription_options, folders absolute
    model: str  # the model folder, for the rows
    formats: tuple[str, ...] = ()
    context_hotwords: str = ""  # the longest hotwords of any input: sizes the KV cache
    # Test hook, not for users: the process exits (as if it crashed) after transcribing this many files,
    # once per output folder (the marker file says it happened), so a test can see Ray replace it.
    crash_after: int = 0
    crash_marker: str = ""


class Transcriber:
    """One Engine per actor; `__call__` takes a batch of file records and returns their rows."""

    def __init__(self, settings: WorkerSettings) -> None:
        from funasr_nano.cli import load_engine, log_to_stderr
        from funasr_nano.presets import PRESETS

        log_to_stderr()
        self.settings = settings
        self.engine = load_engine(PRESETS[settings.preset], settings.args, export=False,
                                  hotwords=settings.context_hotwords)
        self.files_done = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.transcribe(record) for record in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=WORKER_SCHEMA)

    def transcribe(self, record: dict) -> dict:
        """The row of one file: its transcript, or its error; never raises for a bad file."""
        from funasr_nano.audio.load import check_audio_file
        from funasr_nano.cli import current_input, transcribe_options
        from funasr_nano.models.prompt import PromptOptions, parse_hotwords, resolve_language
        from funasr_nano.output.writers import render

        args = self.settings.args
        path = record["path"]
        language = record.get("language") or args.language
        hotwords = record.get("hotwords") or args.hotwords
        row = dict.fromkeys(WORKER_SCHEMA.names)
        row.update(path=path, size=record["size"], mtime_ns=record["mtime_ns"], language=language,
                   hotwords=hotwords, model=self.settings.model, preset=self.settings.preset)
        t0 = time.perf_counter()
        try:
            check_audio_file(path)
            settings = self.engine.settings
            prompt = PromptOptions(language=resolve_language(language, settings.languages, settings.checkpoint),
                                   itn=not args.no_itn,
                                   hotwords=parse_hotwords(hotwords))
            with current_input(path):  # its warnings (a decoding loop, damaged audio) name the file
                transcript = self.engine.transcribe(path, transcribe_options(args, prompt, timestamps=True))
            if transcript.duration == 0:  # as the 03 scripts: nothing at all is an error, not an empty text
                raise ValueError(f"{path}: no audio samples (the file holds no audio data)")
            as_json = transcript.to_dict()
            row.update(duration=as_json["duration"], text=transcript.text,
                       segments=json.dumps(as_json["segments"], ensure_ascii=False),
                       n_segments=len(transcript.segments), n_tokens=transcript.n_tokens,
                       timings=json.dumps(as_json["timings"]), speakers=transcript.speakers,
                       outputs=json.dumps({fmt: render(transcript, fmt, max_cue_seconds=args.max_cue_seconds)
                                           for fmt in self.settings.formats}, ensure_ascii=False))
        except Exception as exc:  # one bad file must not stop the actor, let alone the job
            message = " ".join(str(exc).split()) or type(exc).__name__
            row["error"] = message if message.startswith(path) else f"{path}: {message}"
        row["seconds"] = round(time.perf_counter() - t0, 4)
        self.files_done += 1
        self._crash_hook()
        return row

    def _crash_hook(self) -> None:
        settings = self.settings
        if settings.crash_after and self.files_done > settings.crash_after:
            marker = Path(settings.crash_marker)
            if not marker.exists():
                marker.write_text(f"pid {os.getpid()} exited after {self.files_done - 1} files\n")
                os._exit(1)
