"""`funasr-nano transcribe` and the three 03_inference_*.py scripts (its `--preset` shorthands), and the
helpers every command line shares: the engine loader, the folder checks, the first-use export, stderr lines.

One name per folder, everywhere: `--release-dir` is the official release (read by the export),
`--model-dir` the exported models (written by the export, read by everything else). Their defaults,
`Fun-ASR-Nano-2512/` and `model-gguf/`, are in the project folder in a checkout and in the user's
data folder when the package is installed (`funasr_nano.paths`), whatever the current directory;
only the defaults are downloaded or exported into when missing, a folder named on the command line
must exist. The option definitions themselves live in `funasr_nano.options`.

Everything a run can check cheaply is checked before a model is loaded or exported: option values,
the language, the output folder (created and test-written), every input file. Errors a user can
cause (a bad file, a missing model) become one line on stderr and an exit code (1: an input
failed, 2: options, folders or models), never a traceback; in a multi-file run the other files are
still transcribed and a summary lists what failed. C libraries that print to the process's stderr
themselves (mpg123's notes on a damaged MP3) are silenced while a file is decoded; set
FUNASR_DEBUG=1 to see them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from funasr_nano.options import (
    DEFAULT_MODEL_DIR,
    DEFAULT_PRESET,
    DEFAULT_RELEASE_DIR,
    EXIT_SETUP,
    OneLineParser,
    add_diarize_options,
    add_format_option,
    add_model_options,
    add_output_dir_option,
    add_preset_option,
    add_quiet_option,
    add_transcription_options,
    examples,
)
from funasr_nano.paths import (
    CHECKOUT_DIR,
    CONSOLE_SCRIPT,
    SCRIPT_EXPORT_GGUF,
    SCRIPT_EXPORT_ONNX,
    from_numbered_script,
)
from funasr_nano.presets import PRESETS, Preset

if TYPE_CHECKING:  # pragma: no cover
    from funasr_nano.config import EngineConfig, TranscribeOptions
    from funasr_nano.engine import Engine
    from funasr_nano.output.results import Transcript

RELEASE_ID = "FunAudioLLM/Fun-ASR-Nano-2512"
EXPORT_TYPES = "f16,q8_0"  # the GGUF types the presets load: f16 (cpu, gpu) and q8_0 (cpu-int8)

EXIT_OK, EXIT_FAILED_INPUTS = 0, 1
SUBTITLE_FORMATS = ("srt", "vtt")
PROG = f"{CONSOLE_SCRIPT} transcribe"


class SetupError(RuntimeError):
    """Something about the models or the options, not about one input file."""


def export_commands(model_dir: Path, release_dir: Path | None = None) -> str:
    """The command(s) that fill `model_dir` (from `release_dir`), for messages: the numbered scripts when this
    process is one of them, else `funasr-nano export`."""
    target = "" if model_dir == DEFAULT_MODEL_DIR else f" --model-dir {model_dir}"
    if release_dir is not None and release_dir != DEFAULT_RELEASE_DIR:
        target = f" --release-dir {release_dir}{target}"
    if from_numbered_script(sys.argv[0]):
        return f"python {SCRIPT_EXPORT_ONNX}{target} && python {SCRIPT_EXPORT_GGUF}{target} --types {EXPORT_TYPES}"
    return f"{CONSOLE_SCRIPT} export{target}"


def export_folders(args: argparse.Namespace) -> tuple[Path, Path]:
    """(release folder, model folder) for the export: the release found or downloaded, the target checked.

    A release folder named on the command line must exist (an existing empty one is downloaded
    into); only the default is downloaded when absent. A --model-dir that holds a release (what
    --model-dir meant in 01 and 02 before) is refused: exporting into it would mix the two.
    Raises ReleaseError with a one-line message.
    """
    from funasr_nano.export.release import ReleaseError, ensure_release

    model_dir = args.model_dir if args.model_dir is not None else DEFAULT_MODEL_DIR
    if (model_dir / "config.yaml").is_file() and (model_dir / "model.pt").is_file():
        raise ReleaseError(f"{model_dir}: this is a release folder (config.yaml, model.pt): pass it as --release-dir; "
                           "--model-dir is where the exported models go")
    if model_dir.exists() and not model_dir.is_dir():
        raise ReleaseError(f"{model_dir}: not a folder (--model-dir)")
    given = args.release_dir
    release = ensure_release(given if given is not None else DEFAULT_RELEASE_DIR,
                             download=given is None or given.exists(), source=args.source)
    return release, model_dir


def build_parser(prog: str = PROG, preset: str = DEFAULT_PRESET) -> argparse.ArgumentParser:
    """transcribe's parser; the 03 scripts pass their own name and preset (their --preset's default)."""
    run = f"python {prog}" if prog.endswith(".py") else prog
    if prog.endswith(".py"):  # a 03 script: its preset's files (the same as `funasr-nano transcribe --preset`)
        description = f"Transcribe audio with Fun-ASR-Nano. {PRESETS[preset].description}."
    else:
        description = "Transcribe audio files with Fun-ASR-Nano: text, JSON or subtitles, on stdout or into --output-dir."
    epilog = examples(
        f"{run} talk.mp3",
        f"{run} a.wav b.flac --format json --output-dir out/",
        f"{run} lecture.mp3 --format txt,srt,vtt --output-dir subs/",
        f'{run} meeting.m4a --language zh --hotwords "通义,魔搭"',
        f"{run} clip.mp3 --preset cpu --model-dir ~/models/model-gguf",
        notes="""\
Several inputs on stdout: txt gives a "==> file <==" line before each transcript, json one
JSON object per line (JSON Lines); srt and vtt, and several formats, need --output-dir. With
--output-dir, inputs from several folders keep their sub-folders and same-named inputs keep their
extension (a.mp3.txt, a.wav.txt). Two runs on one --output-dir do not coordinate: both transcribe
everything and the last one to finish a file wins (each file is written whole).""")
    p = OneLineParser(prog=prog, description=description, epilog=epilog)
    p.add_argument("audio", nargs="+",
                   help="audio files (mp3, wav, flac, ogg, m4a, ...; any rate and channels); - reads one from stdin")
    add_preset_option(p, preset)
    add_format_option(p, "txt", "output format, or a comma-separated list with --output-dir: txt, json (with "
                                "segments), srt or vtt subtitles (default: txt)")
    add_output_dir_option(p, "write one file per input (and format) here instead of stdout, created if needed "
                             "(default: stdout)")
    p.add_argument("--overwrite", action="store_true", help="re-transcribe inputs whose output file exists")
    p.add_argument("--stream", action="store_true",
                   help='with --format json on stdout: JSON Lines, one {"type": "segment", ...} object per segment '
                        'as it is decoded, then one {"type": "transcript", ...} per input (txt always prints '
                        "each segment's text as it is decoded)")
    add_quiet_option(p)
    add_model_options(p)
    add_transcription_options(p)
    add_diarize_options(p)
    return p


def main(argv: list[str] | None = None, *, prog: str = PROG, preset: str = DEFAULT_PRESET) -> int:
    """Transcribe the files `argv` names; the exit code (0 all transcribed, 1 an input failed, 2 set-up)."""
    args = build_parser(prog, preset).parse_args(argv)
    log_to_stderr()
    try:
        return _run(args)
    except SetupError as exc:
        _error(str(exc))
        return EXIT_SETUP
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


@dataclass
class _Job:
    """One input of a run and where its transcript goes: one file per format (None: stdout)."""

    source: str  # as given (`-`: stdin)
    targets: tuple[Path, ...] | None
    path: str = ""  # the file decoded (stdin's copy for `-`); the source itself when empty

    def __post_init__(self) -> None:
        self.path = self.path or self.source


def _run(args: argparse.Namespace) -> int:
    from funasr_nano.audio.load import AudioError, check_audio_file
    from funasr_nano.output.writers import WriteError, check_writable

    prompt = prompt_options(args)
    sources = _distinct(args.audio)
    if not args.format:
        raise SetupError("--format: no format given")
    if args.output_dir is None and len(args.format) > 1:
        raise SetupError(f"--format {','.join(args.format)}: several formats need --output-dir (one file per input "
                         "and format)")
    fmt = args.format[0]
    if args.output_dir is None and len(sources) > 1 and fmt in SUBTITLE_FORMATS:
        raise SetupError(f"--format {fmt} with {len(sources)} inputs needs --output-dir "
                         "(one subtitle file per input)")
    if args.stream and (args.format != ("json",) or args.output_dir is not None):
        raise SetupError("--stream is for --format json on stdout (txt on stdout always shows each segment as it "
                         "is decoded; --output-dir files are written whole)")
    check_folders(args)
    if args.output_dir is not None:
        try:
            check_writable(args.output_dir)
        except WriteError as exc:
            raise SetupError(str(exc)) from exc
    targets = _targets(sources, args)
    with contextlib.ExitStack() as cleanup:
        # `-`: the audio comes on stdin, kept in a temporary file (the decoders seek; a pipe cannot)
        stdin_file = cleanup.enter_context(_stdin_audio()) if STDIN in sources else None
        failures: list[str] = []
        jobs: list[_Job] = []
        for source, target in zip(sources, targets):
            path = stdin_file if source == STDIN else source
            try:
                if path is None:
                    raise AudioError(STDIN, "no audio on stdin (0 bytes)")
                check_audio_file(path)
            except AudioError as exc:
                _error(str(exc).replace(str(path), source, 1))
                failures.append(source)
                continue
            if target is not None and all(t.exists() for t in target) and not args.overwrite:
                exist = f"{target[0]} exists" if len(target) == 1 else f"{', '.join(map(str, target))} exist"
                _note(f"{source}: skipped, {exist} (use --overwrite)", args.quiet)
                continue
            jobs.append(_Job(source, target, str(path)))
        if not jobs:  # nothing to transcribe: no model is loaded, let alone exported
            return _summary(failures, len(sources), write_failed=False)

        options = transcribe_options(args, prompt, timestamps=_timestamps(args))
        # the VAD and CTC sessions these options need load alongside the encoder and llama.cpp
        engine = open_engine(engine_config(args.preset, args, preload=options))
        write_failed = False
        try:
            if _diarize(args):
                _open_speaker_model(engine)
            # the checkpoint loaded decides the languages
            options = dataclasses.replace(options, prompt=prompt_options(args, engine.settings))
            write_failed = _transcribe_all(engine, jobs, options, args, failures, several=len(sources) > 1)
        finally:
            engine.close()
        return _summary(failures, len(sources), write_failed)


def _open_speaker_model(engine) -> None:
    """--diarize without campplus.onnx is a set-up error, said once before any input."""
    from funasr_nano.models.encoder import OnnxModelError

    try:
        engine.speaker_embedder()
    except OnnxModelError as exc:
        raise SetupError(str(exc)) from exc


STDIN = "-"


@contextlib.contextmanager
def _stdin_audio():
    """stdin's bytes in a temporary file (removed afterwards); None when stdin is empty or a terminal."""
    import shutil
    import tempfile

    if sys.stdin is None or sys.stdin.isatty():
        yield None
        return
    with tempfile.NamedTemporaryFile(prefix="funasr-stdin-", suffix=".audio") as tmp:
        shutil.copyfileobj(sys.stdin.buffer, tmp)
        tmp.flush()
        yield Path(tmp.name) if tmp.tell() else None


def _distinct(audio: list[str]) -> list[str]:
    """The inputs with repeats of one file (however spelled) dropped, and a warning for each."""
    seen: dict[str, str] = {}
    out = []
    for source in audio:
        key = source if source == STDIN else os.path.realpath(source)
        if key in seen:
            _error(f"warning: {source}: given twice (as {seen[key]}), transcribed once")
            continue
        seen[key] = source
        out.append(source)
    return out


def _timestamps(args: argparse.Namespace) -> bool:
    """Whether a format of the run shows times (everything but txt), or speakers per sentence (--diarize)."""
    return any(fmt != "txt" for fmt in args.format) or _diarize(args)


def _targets(sources: list[str], args: argparse.Namespace) -> list[tuple[Path, ...] | None]:
    """Each input's output files, one per format (None: stdout), with a warning where names had to be told
    apart (the same inputs are renamed the same way in every format: only the first is named)."""
    from funasr_nano.output.writers import output_path, output_paths

    if args.output_dir is None:
        return [None] * len(sources)
    named = ["stdin" if s == STDIN else s for s in sources]  # `-` -> stdin.txt
    per_format = [output_paths(named, args.output_dir, fmt) for fmt in args.format]
    first = args.format[0]
    plain = [output_path(s, args.output_dir, first) for s in named]
    if len(sources) > 1 and per_format[0] != plain:
        renamed = [f"{s} -> {t}" for s, t, p in zip(sources, per_format[0], plain) if t != p]
        _error(f"warning: inputs share a name; so that none overwrites another: {'; '.join(renamed)}")
    return [tuple(paths) for paths in zip(*per_format)]


def check_folders(args: argparse.Namespace) -> None:
    """Folders named on the command line must exist: a typo is an error, not a download or an export."""
    from funasr_nano.export.release import not_a_release

    for option, path in (("--model-dir", args.model_dir), ("--release-dir", args.release_dir)):
        if path is not None and not path.exists():
            raise SetupError(f"{path}: no such folder ({option})")
        if path is not None and not path.is_dir():
            raise SetupError(f"{path}: not a folder ({option})")
    if args.release_dir is not None and (problem := not_a_release(args.release_dir)) is not None:
        raise SetupError(problem)  # whether or not the model folder needs an export: never silently ignored
    for option, path in (("--encoder", args.encoder), ("--gguf", args.gguf)):
        if path is not None and not path.is_file():
            raise SetupError(f"{path}: {'not a file' if path.exists() else 'no such file'} ({option})")


def engine_config(preset: str, args: argparse.Namespace, *, export: bool = True,
                  max_hotword_chars: int | None = None, kv_unified: bool = False, preload=None) -> EngineConfig:
    """The EngineConfig of preset `preset` (its name) and these command-line options; SetupError (one line).

    The model files are resolved here (`model_files`): `export`, an empty (or stale) model folder is
    exported first (the 03 scripts' first use); without it, that is an error giving the export
    commands. A missing file is an error naming it. `max_hotword_chars`: the longest
    hotwords text a call will send, which sizes the KV cache (default: --hotwords, where the command
    has it). `preload` (TranscribeOptions): the sessions those options need are opened alongside the
    rest. `kv_unified`: one KV cache for all sequences (the server's default). --force-tokens (hidden,
    for benchmarks on random weights) becomes `min_new_tokens`.
    """
    from funasr_nano.config import EngineConfig

    model_dir = args.model_dir if args.model_dir is not None else DEFAULT_MODEL_DIR
    encoder_path, gguf_path = model_files(PRESETS[preset], args, model_dir, export=export)
    if max_hotword_chars is None:
        max_hotword_chars = hotword_chars(getattr(args, "hotwords", None))
    try:
        return EngineConfig(model_dir=model_dir, preset=preset, encoder_path=encoder_path, gguf_path=gguf_path,
                            threads=args.threads, batch_size=args.batch_size, max_new_tokens=args.max_new_tokens,
                            max_segment_seconds=args.max_segment, max_hotword_chars=max_hotword_chars,
                            min_new_tokens=args.force_tokens, kv_unified=kv_unified,
                            batch_invariant=args.batch_invariant, preload=preload)
    except ValueError as exc:
        raise SetupError(one_line(exc)) from exc


def open_engine(config: EngineConfig) -> Engine:
    """`Engine.from_config(config)`; SetupError (one line) when the models cannot load."""
    from funasr_nano.engine import Engine
    from funasr_nano.models.llm import DecoderError

    try:
        return Engine.from_config(config)
    except (DecoderError, ValueError, RuntimeError, OSError) as exc:
        raise SetupError(one_line(exc)) from exc


def hotword_chars(hotwords: str | None) -> int:
    """How many characters `--hotwords TEXT` takes in the prompt (the words as the prompt lists them), for
    `EngineConfig.max_hotword_chars`."""
    from funasr_nano.models.prompt import parse_hotwords

    return len(", ".join(parse_hotwords(hotwords)))


def prompt_options(args: argparse.Namespace, settings=None):
    """The PromptOptions of --language, --no-itn and --hotwords; SetupError for a language the model does not take.

    `settings`: the loaded model's (`ModelSettings`), whose checkpoint decides the languages. Before a model is
    loaded, the model folder's settings when it holds an export, else every language of the family (the check
    is made again once the model is known).
    """
    from funasr_nano.models.prompt import (
        MLT,
        MLT_LANGUAGES,
        LanguageError,
        PromptOptions,
        parse_hotwords,
        resolve_language,
    )
    from funasr_nano.models.settings import ModelSettings, SettingsError

    if settings is None:
        try:
            settings = ModelSettings.load(args.model_dir if args.model_dir is not None else DEFAULT_MODEL_DIR)
        except SettingsError:
            settings = None
    languages, checkpoint = (settings.languages, settings.checkpoint) if settings is not None else (MLT_LANGUAGES, MLT)
    try:
        language = resolve_language(args.language, languages, checkpoint)
    except LanguageError as exc:
        raise SetupError(f"--language: {exc}") from exc
    return PromptOptions(language=language, itn=not args.no_itn, hotwords=parse_hotwords(args.hotwords))


def transcribe_options(args: argparse.Namespace, prompt, *, timestamps: bool) -> TranscribeOptions:
    """The per-call TranscribeOptions of these command-line options and this prompt (language, hotwords).

    Built once per run; what changes per input or request is a `dataclasses.replace` of it. Options a command
    does not offer (mic: --vad; serve, mic: --diarize) keep their defaults.
    """
    from funasr_nano.config import TranscribeOptions

    return TranscribeOptions(prompt=prompt, max_new_tokens=args.max_new_tokens, max_segment_seconds=args.max_segment,
                             speculative=not args.no_speculative, vad=getattr(args, "vad", TranscribeOptions.vad),
                             timestamps=timestamps, **_diarize_options(args))


def _diarize_options(args: argparse.Namespace) -> dict[str, object]:
    """--diarize and the speaker counts (which imply it); nothing for command lines without them."""
    from funasr_nano.speakers.clustering import DEFAULT_MAX_SPEAKERS, SpeakerCount

    if not _diarize(args):
        return {}
    try:
        count = SpeakerCount(args.speakers, args.min_speakers, args.max_speakers)
    except ValueError as exc:
        raise SetupError(f"--min-speakers {args.min_speakers} --max-speakers {args.max_speakers}: {exc}") from exc
    if args.speakers is not None and (args.min_speakers != 1 or args.max_speakers != DEFAULT_MAX_SPEAKERS):
        raise SetupError("--speakers gives the count: leave out --min-speakers and --max-speakers")
    return {"diarize": True, "speakers": count}


def _diarize(args: argparse.Namespace) -> bool:
    from funasr_nano.speakers.clustering import DEFAULT_MAX_SPEAKERS

    return bool(getattr(args, "diarize", False) or getattr(args, "speakers", None) is not None
                or getattr(args, "min_speakers", 1) != 1
                or getattr(args, "max_speakers", DEFAULT_MAX_SPEAKERS) != DEFAULT_MAX_SPEAKERS)


def _transcribe_all(engine, jobs: list[_Job], options: TranscribeOptions, args: argparse.Namespace,
                    failures: list[str], *, several: bool) -> bool:
    """Transcribe and write every job; a failing input is listed in `failures`. True if a write failed.

    Stdout gets each segment as it is decoded (txt: its text; json with --stream: a JSON Lines record),
    so a long file shows progress and Ctrl-C keeps what was printed. Files under --output-dir are
    written whole at the end of their input, never partly (`write_atomic`).
    """
    from funasr_nano.output.writers import WriteError, render, render_json, write_atomic

    fmt = args.format[0]  # on stdout there is one
    show_progress = not args.quiet and sys.stderr.isatty()
    write_failed = False
    out = _Stdout(several)
    bar = _progress_bar(len(jobs), show_progress)
    try:
        for job in jobs:
            try:
                with native_stderr_silenced(), current_input(job.source, job.path):
                    # one long input: a segment counter, shown only once decoding takes a while
                    segment_bar = _SegmentBar() if show_progress and len(jobs) == 1 else None
                    try:
                        transcript = _transcribe_one(engine, job, options, args, out, segment_bar)
                    finally:
                        if segment_bar is not None:
                            segment_bar.close()
                if job.targets is not None:
                    for target_format, target in zip(args.format, job.targets):
                        write_atomic(target, render(transcript, target_format, max_cue_seconds=args.max_cue_seconds))
                elif fmt == "txt":
                    out.end_text(job.source)
                elif fmt == "json" and args.stream:
                    out.line(json.dumps({"type": "transcript", **transcript.to_dict()}, ensure_ascii=False))
                elif fmt == "json":  # several inputs: JSON Lines, one object per line
                    out.write(render_json(transcript, compact=several))
                else:
                    out.write(render(transcript, fmt, max_cue_seconds=args.max_cue_seconds))
            except KeyboardInterrupt:
                raise
            except WriteError as exc:  # the output folder, not the input: exit 2, but the other inputs go on
                _error(str(exc))
                failures.append(job.source)
                write_failed = True
            except Exception as exc:  # one bad input must not stop the batch
                out.abandon()
                message = one_line(exc).replace(job.path, job.source)
                if not message.startswith(str(job.source)):
                    message = f"{job.source}: {message}"
                _error(message)
                failures.append(job.source)
            finally:
                if bar is not None:
                    bar.update(1)
    except KeyboardInterrupt:
        out.abandon()  # end the partly printed line: what was decoded stays on stdout
        raise
    finally:
        if bar is not None:
            bar.close()
    return write_failed


def _transcribe_one(engine, job: _Job, options, args: argparse.Namespace, out: _Stdout, progress) -> Transcript:
    """One input's transcript, its segments shown on stdout as they are decoded (when stdout is its output)."""
    from funasr_nano.audio.load import check_some_audio

    stream = engine.segments(job.path, options)
    to_stdout = job.targets is None
    txt = args.format[0] == "txt"
    turns = txt and options.diarize  # speakers are known once the whole input is read: printed at its end
    if to_stdout and txt:
        out.start_text(job.source)
    try:
        for index, segment in enumerate(stream):
            if progress is not None:
                progress(len(stream.done), stream.total)
            if to_stdout and txt and not turns:
                out.text(segment.text)
            elif to_stdout and args.stream:
                out.line(json.dumps({"type": "segment", "source": job.source, "index": index, **segment.to_dict()},
                                    ensure_ascii=False))
    finally:
        stream.close()  # stopped early (an error, Ctrl-C): the segments still in the scheduler are cancelled
    transcript = stream.transcript
    assert transcript is not None
    transcript.source = job.source  # `-`, not the temporary file stdin was copied to
    if to_stdout and turns:
        from funasr_nano.output.writers import render_txt

        out.text(render_txt(transcript).rstrip("\n"))
    check_some_audio(transcript.duration, job.source)
    return transcript


class _Stdout:
    """What goes to stdout, flushed as it comes: text deltas, `==> file <==` headers, JSON Lines.

    A txt transcript is printed segment by segment; the deltas concatenate to exactly the transcript's
    text (`funasr_nano.engine.join_texts` decides the spaces between segments, so a first segment with blanks
    around it waits for the second). A header is printed with an input's first text, or at its end (an
    empty transcript keeps its header; an input that fails before any text has none).
    """

    def __init__(self, several: bool) -> None:
        self.several = several
        self.printed = 0  # inputs whose output is complete
        self.source: str | None = None  # the input whose text is being printed
        self.parts: list[str] = []
        self.sent = ""
        self.open = False  # a header or some text printed, the line not ended

    def write(self, text: str) -> None:
        sys.stdout.write(text)
        sys.stdout.flush()
        self.printed += 1

    def line(self, text: str) -> None:
        sys.stdout.write(text + "\n")
        sys.stdout.flush()

    def start_text(self, source: str) -> None:
        self.source, self.parts, self.sent = source, [], ""

    def text(self, segment_text: str) -> None:
        from funasr_nano.engine import join_texts

        self.parts.append(segment_text)
        if len(self.parts) == 1 and segment_text != segment_text.strip():
            return  # join_texts keeps a lone segment as it is but strips it beside others: wait for the next
        self._emit(join_texts(self.parts))

    def end_text(self, source: str) -> None:
        from funasr_nano.engine import join_texts

        self._emit(join_texts(self.parts) if self.parts else "", force_header=True)
        sys.stdout.write("\n")
        sys.stdout.flush()
        self.open, self.source = False, None
        self.printed += 1

    def abandon(self) -> None:
        """An input failed or the run was interrupted: end its partly printed line, keep what it shows."""
        if self.open:
            sys.stdout.write("\n")
            sys.stdout.flush()
            self.printed += 1
        self.open, self.source = False, None

    def _emit(self, full: str, force_header: bool = False) -> None:
        if not full.startswith(self.sent):  # cannot happen with join_texts' rule; never print a wrong text
            logging.getLogger(__name__).error("streamed text is not a prefix of the joined text")
            return
        delta, self.sent = full[len(self.sent):], full
        if self.several and not self.open and (delta or force_header):
            sys.stdout.write(f"{chr(10) if self.printed else ''}==> {self.source} <==\n")
        if delta or force_header:
            self.open = True
        sys.stdout.write(delta)
        sys.stdout.flush()


def _summary(failures: list[str], n_inputs: int, write_failed: bool) -> int:
    if not failures:
        return EXIT_OK
    if n_inputs > 1:  # a single input's own error line says it all
        _error(f"{len(failures)} of {n_inputs} inputs failed: {', '.join(failures)}")
    return EXIT_SETUP if write_failed else EXIT_FAILED_INPUTS


def model_files(preset: Preset, args: argparse.Namespace, model_dir: Path, *, export: bool = True
                ) -> tuple[Path, Path]:
    """The encoder and GGUF to load; exports them first when the model folder is empty (and `export`).

    A model folder exported from another release than --release-dir (or from a release that changed
    since: `funasr_nano.export.release.export_mismatch`) is exported again from it; without `export` that is
    an error giving the commands.
    """
    from funasr_nano.export.release import export_mismatch
    from funasr_nano.models.settings import SETTINGS_FILE

    encoder = args.encoder or model_dir / preset.encoder_file
    gguf = args.gguf or model_dir / preset.gguf_file
    empty = not model_dir.exists() or not any(p for p in model_dir.iterdir() if p.name != "README.md")
    release = args.release_dir
    stale = None if empty else export_mismatch(model_dir, release)
    if stale is not None and release is None:  # the recorded release changed: export from it again
        from funasr_nano.export.release import read_export_record

        release = Path(next(iter(read_export_record(model_dir).values()))["release"])
    if (empty or stale) and not export:
        raise SetupError(f"{stale or f'{model_dir} is empty'}; export with: "
                         f"{export_commands(model_dir, release)}")
    if (empty or stale) and export:
        _export(model_dir, release, getattr(args, "quiet", False), stale or f"{model_dir} is empty",
                getattr(args, "source", "modelscope"))
    missing = [p for p in (model_dir / SETTINGS_FILE, encoder, gguf) if not p.is_file()]
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise SetupError(f"missing {names}; export with: {export_commands(model_dir)}")
    return encoder, gguf


def _export(model_dir: Path, release_dir: Path | None, quiet: bool, reason: str, source: str = "modelscope"
            ) -> None:
    """Run `funasr-nano export` in a child process (torch stays out of here), fetching the release first if needed.

    Its output (the paths it wrote, download progress) goes to stderr: stdout carries only the
    transcripts, so `> transcript.txt` and `--format json | python -m json.tool` work on a first run too.
    The child is `python -m funasr_nano` of this Python; run from a checkout that is not installed,
    the checkout is put on its PYTHONPATH (`-m` looks in the current folder, not beside the scripts).
    """
    from funasr_nano.requirements import MissingRequirement, check

    try:  # torch and funasr: not needed to transcribe, only to export
        check(os.path.basename(sys.argv[0]) or "the export", "export")
    except MissingRequirement as exc:
        raise SetupError(f"{reason}, and the export cannot run: {exc}") from exc
    release = release_dir if release_dir is not None else DEFAULT_RELEASE_DIR
    _note(f"{reason}: exporting the model from {release} (once)", quiet)
    cmd = [sys.executable, "-m", "funasr_nano", "export", "--model-dir", str(model_dir), "--source", source,
           "--types", EXPORT_TYPES]
    cmd += ["--release-dir", str(release_dir)] if release_dir else []
    cmd += ["--quiet"] if quiet else []
    env = dict(os.environ)
    if CHECKOUT_DIR is not None:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (str(CHECKOUT_DIR), env.get("PYTHONPATH", "")) if p)
    sys.stdout.flush()
    if subprocess.run(cmd, stdout=sys.stderr.fileno(), env=env).returncode != 0:
        raise SetupError(f"{model_dir}: export failed; {_release_hint(release, source)}")


def _release_hint(release: Path, source: str) -> str:
    """What to do when an export failed: get the release (into `release` only when it can be one)."""
    from funasr_nano.export.release import download_hint, not_a_release

    if not_a_release(release) is not None:
        return f"pass the folder of the {RELEASE_ID} release as --release-dir"
    return download_hint(release, source)


class _SegmentBar:
    """tqdm counter of decoded segments for a single input; it appears after 2 s and is cleared at the end."""

    def __init__(self) -> None:
        self.bar = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:
            from tqdm import tqdm

            # created here, so it writes to the terminal even while fd 2 is silenced (sys.stderr is a copy)
            self.bar = tqdm(total=total or None, unit="segment", file=sys.stderr, delay=2.0, leave=False)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def _progress_bar(total: int, enabled: bool):
    if not enabled or total < 2:
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="file", file=sys.stderr)


@contextlib.contextmanager
def native_stderr_silenced():
    """Point file descriptor 2 at /dev/null while Python's sys.stderr keeps the terminal.

    Decoders inside libsndfile/FFmpeg write to fd 2 directly ("Note: Illegal Audio-MPEG-Header",
    "Warning: Xing stream size off"), which would break the one-line-per-error promise; our own
    warnings, progress bars and error lines go through sys.stderr and still show.
    """
    if os.environ.get("FUNASR_DEBUG"):
        yield
        return
    try:
        sys.stderr.flush()
        saved = os.dup(2)
    except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters)
        yield
        return
    old_stderr = sys.stderr
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        sys.stderr = open(os.dup(saved), "w", encoding=getattr(old_stderr, "encoding", None) or "utf-8",
                          errors="backslashreplace", buffering=1)
        yield
    finally:
        if sys.stderr is not old_stderr:
            sys.stderr.close()
            sys.stderr = old_stderr
        os.dup2(saved, 2)
        os.close(saved)
        os.close(devnull)


class _StderrLines(logging.Handler):
    """Notes and warnings of our modules as `note: ...` / `warning: ...` lines on whatever sys.stderr is.

    A StreamHandler would keep the stderr of its creation, which `native_stderr_silenced` mutes.
    While an input is transcribed (`current_input`), a warning that does not name it (a segment's
    decoding loop, logged by the scheduler's thread) gets its name in front: with several inputs a
    `segment 1.44-4.00 s` alone would not say which file.
    """

    source: str | None = None  # the input being transcribed, as the user gave it
    path: str | None = None  # the file decoded for it (stdin's temporary copy for `-`)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            prefix = "note" if record.levelno == logging.INFO else record.levelname.lower()
            message = record.getMessage()
            source, path = _StderrLines.source, _StderrLines.path
            if source is not None and record.levelno >= logging.WARNING:
                if path and path != source and message.startswith(path):
                    message = source + message[len(path):]
                elif not message.startswith(source):
                    message = f"{source}: {message}"
            print(f"{prefix}: {message}", file=sys.stderr, flush=True)
        except Exception:  # logging must never break a run
            self.handleError(record)


@contextlib.contextmanager
def current_input(source: str, path: str | None = None):
    """Name `source` in the warnings logged while it is transcribed (see `_StderrLines`)."""
    _StderrLines.source, _StderrLines.path = source, path or source
    try:
        yield
    finally:
        _StderrLines.source = _StderrLines.path = None


def log_to_stderr() -> None:
    """Route the `funasr_nano.*` loggers (engine notes, damaged-audio warnings, ...) to stderr lines, once per process."""
    logger = logging.getLogger("funasr_nano")
    if not any(isinstance(h, _StderrLines) for h in logger.handlers):
        logger.addHandler(_StderrLines(logging.INFO))
        logger.setLevel(logging.INFO)
        logger.propagate = False


def one_line(exc: BaseException) -> str:
    """An error's message as one line (stderr, a corpus row, /health): its first line, else its type's name."""
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _error(message: str) -> None:
    print(message if message.startswith(("warning:", "error:")) else f"error: {message}", file=sys.stderr, flush=True)


def _note(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
