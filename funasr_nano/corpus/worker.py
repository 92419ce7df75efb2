"""The transcription stage: a Ray Data actor that holds one Engine and turns files into rows.

Ray Data makes a pool of these (`map_batches(Transcriber, concurrency=(min, max), num_cpus=...)`);
each loads the models once, in its constructor, and then transcribes one file per call: decoding
the audio, Silero VAD, encoder and the batched llama.cpp decoding of the file's segments, exactly
as the 03 scripts do (the `EngineConfig` and `TranscribeOptions` the corpus command builds from the same
options, `funasr_nano.cli.engine_config` and `transcribe_options`), so a row's text is the text
`03_inference_*.py FILE --format json` prints.

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
(`max_restarts`, `max_task_retries` set by the pipeline; testing/corpus_faults.py's actor exits
mid-run to show it).
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass

import pyarrow as pa

from funasr_nano.config import EngineConfig, TranscribeOptions
from funasr_nano.corpus.store import ROW_SCHEMA

# The worker's rows: the stored columns plus the per-file outputs (--formats) rendered here, where the
# transcript still has its character times, and written by the driver (the output folder is only
# needed on the driver's machine).
WORKER_SCHEMA = ROW_SCHEMA.append(pa.field("outputs", pa.string()))


@dataclass(frozen=True)
class WorkerSettings:
    """What every actor needs, pickled once to each: its engine, what to ask of it, the outputs to render.

    `engine`: the model files absolute and checked (exported on first use) on the driver; its
    `max_hotword_chars` covers the longest hotwords of any input. `options`: the run's (timestamps on:
    the rows have segment times); a manifest's language and hotwords replace its prompt's for their
    file. `language` and `hotwords`: the run's --language and --hotwords as given, for the rows.
    """

    engine: EngineConfig
    options: TranscribeOptions
    language: str | None = None
    hotwords: str | None = None
    formats: tuple[str, ...] = ()
    max_cue_seconds: float | None = None  # the subtitle formats' cue limit (--max-cue-seconds)


class Transcriber:
    """One Engine per actor; `__call__` takes a batch of file records and returns their rows."""

    def __init__(self, settings: WorkerSettings) -> None:
        from funasr_nano.cli import log_to_stderr, open_engine

        log_to_stderr()
        self.settings = settings
        self.engine = open_engine(settings.engine)
        self.files_done = 0

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = [self.transcribe(record) for record in batch.to_pylist()]
        return pa.Table.from_pylist(rows, schema=WORKER_SCHEMA)

    def transcribe(self, record: dict) -> dict:
        """The row of one file: its transcript, or its error; never raises for a bad file."""
        from funasr_nano.audio.load import check_audio_file, check_some_audio
        from funasr_nano.cli import current_input, one_line
        from funasr_nano.output.writers import render

        settings = self.settings
        path = record["path"]
        row = dict.fromkeys(WORKER_SCHEMA.names)
        row.update(path=path, size=record["size"], mtime_ns=record["mtime_ns"],
                   language=record.get("language") or settings.language,
                   hotwords=record.get("hotwords") or settings.hotwords, model=str(settings.engine.model_dir),
                   preset=settings.engine.preset)
        t0 = time.perf_counter()
        try:
            check_audio_file(path)
            options = self.options(record)
            with current_input(path):  # its warnings (a decoding loop, damaged audio) name the file
                transcript = self.engine.transcribe(path, options)
            check_some_audio(transcript.duration, path)  # as the 03 scripts: nothing at all is an error
            as_json = transcript.to_dict()
            row.update(duration=as_json["duration"], text=transcript.text,
                       segments=json.dumps(as_json["segments"], ensure_ascii=False),
                       n_segments=len(transcript.segments), n_tokens=transcript.n_tokens,
                       timings=json.dumps(as_json["timings"]), speakers=transcript.speakers,
                       outputs=json.dumps({fmt: render(transcript, fmt, max_cue_seconds=settings.max_cue_seconds)
                                           for fmt in settings.formats}, ensure_ascii=False))
        except Exception as exc:  # one bad file must not stop the actor, let alone the job
            message = one_line(exc)
            row["error"] = message if message.startswith(path) else f"{path}: {message}"
        row["seconds"] = round(time.perf_counter() - t0, 4)
        self.files_done += 1
        return row

    def options(self, record: dict) -> TranscribeOptions:
        """The run's options with the file's own language and hotwords (a manifest's columns), if it has them;
        its language is checked against the checkpoint loaded (ValueError: that file's error)."""
        from funasr_nano.models.prompt import parse_hotwords, resolve_language

        options = self.settings.options
        prompt = options.prompt
        if record.get("language"):
            model = self.engine.settings
            prompt = dataclasses.replace(prompt, language=resolve_language(record["language"], model.languages,
                                                                           model.checkpoint))
        if record.get("hotwords"):
            prompt = dataclasses.replace(prompt, hotwords=parse_hotwords(record["hotwords"]))
        return options if prompt is options.prompt else dataclasses.replace(options, prompt=prompt)
