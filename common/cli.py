"""The command line shared by the three 03_inference_*.py scripts; they differ only in their preset.

Errors a user can cause (a bad file, a missing model) become one line on stderr
and an exit code, never a traceback; in a multi-file run the other files are
still transcribed and a summary lists what failed. C libraries that print to the
process's stderr themselves (mpg123's notes on a damaged MP3) are silenced while a
file is decoded; set FUNASR_DEBUG=1 to see them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

from common.presets import PRESETS, Preset

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MODEL_DIR = Path("model-gguf")
DEFAULT_RELEASE_DIR = Path("Fun-ASR-Nano-2512")

EXIT_OK, EXIT_FAILED_INPUTS, EXIT_SETUP = 0, 1, 2


class SetupError(RuntimeError):
    """Something about the models or the options, not about one input file."""


def build_parser(preset: Preset) -> argparse.ArgumentParser:
    examples = textwrap.dedent(f"""\
        examples:
          python {preset.script} talk.mp3
          python {preset.script} a.wav b.flac --format json --output-dir out/
          python {preset.script} meeting.m4a --language 中文 --hotwords "通义,魔搭"
          python {preset.script} clip.mp3 --gguf model-gguf/qwen3-0.6b-asr.f32.gguf
        """)
    p = argparse.ArgumentParser(
        prog=preset.script, description=f"Transcribe audio with Fun-ASR-Nano. {preset.description}.",
        epilog=examples, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("audio", nargs="+", help="audio files (mp3, wav, flac, ogg, m4a, ...; any rate and channels)")
    p.add_argument("--model-dir", type=Path, default=DEFAULT_MODEL_DIR, help="exported models (default: model-gguf)")
    p.add_argument("--release-dir", type=Path, default=DEFAULT_RELEASE_DIR,
                   help="official release folder, used to export when --model-dir is empty (default: Fun-ASR-Nano-2512)")
    p.add_argument("--language", default=None, help="ask for this output language, e.g. 中文, 英文, 日文")
    p.add_argument("--no-itn", action="store_true", help="no inverse text normalization (numbers stay spelled out)")
    p.add_argument("--hotwords", default=None, help='comma-separated words to favour, e.g. "通义,魔搭"')
    p.add_argument("--format", choices=("txt", "json", "srt", "vtt"), default="txt",
                   help="output format: text, json with segments, or srt/vtt subtitles (default: txt)")
    p.add_argument("--max-cue-seconds", type=float, default=6.0,
                   help="longest subtitle cue in seconds, srt/vtt (default: 6)")
    p.add_argument("--vad", choices=("silero", "none"), default="silero",
                   help="silero: transcribe only the speech Silero VAD finds; none: the whole input, cut "
                        "at quiet points (default: silero)")
    p.add_argument("--batch-size", type=int, default=4,
                   help="segments decoded together in one llama.cpp context (default: 4; 1: one at a time)")
    p.add_argument("--output-dir", type=Path, default=None, help="write one file per input here instead of stdout")
    p.add_argument("--overwrite", action="store_true", help="re-transcribe inputs whose output file exists")
    p.add_argument("--threads", type=int, default=max(1, min(os.cpu_count() or 2, 8)), help="CPU threads")
    p.add_argument("--max-new-tokens", type=int, default=512, help="cap on generated tokens per segment (default: 512)")
    p.add_argument("--max-segment", type=float, default=30.0, help="longest segment in seconds (default: 30)")
    p.add_argument("--encoder", type=Path, default=None, help="ONNX encoder to use instead of the preset's")
    p.add_argument("--gguf", type=Path, default=None, help="GGUF decoder to use instead of the preset's")
    p.add_argument("--quiet", action="store_true", help="no progress output")
    p.add_argument("--no-speculative", action="store_true",
                   help="plain greedy decoding: do not verify the CTC head's draft (same text, slower)")
    # Benchmarks on random weights force a length; not for users.
    p.add_argument("--force-tokens", type=int, default=0, help=argparse.SUPPRESS)
    return p


def main(preset_name: str, argv: list[str] | None = None) -> int:
    preset = PRESETS[preset_name]
    args = build_parser(preset).parse_args(argv)
    try:
        return _run(preset, args)
    except SetupError as exc:
        _error(str(exc))
        return EXIT_SETUP
    except KeyboardInterrupt:
        _error("interrupted")
        return 130


def _run(preset: Preset, args: argparse.Namespace) -> int:
    from common.engine import BenchmarkHooks, Engine, TranscribeOptions
    from common.models.llm import DecoderError
    from common.models.prompt import PromptOptions, parse_hotwords
    from common.output.writers import output_path, render, write_atomic

    _show_engine_messages()

    if args.max_new_tokens < 1 or args.threads < 1 or args.max_segment <= 0:
        raise SetupError("--max-new-tokens, --threads and --max-segment must be positive")
    if args.batch_size < 1 or args.max_cue_seconds <= 0:
        raise SetupError("--batch-size and --max-cue-seconds must be positive")
    encoder_path, gguf_path = _model_files(preset, args)

    try:
        engine = Engine.from_preset(
            preset_name_of(preset), args.model_dir, threads=args.threads, batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens, max_segment_seconds=args.max_segment, hotwords=args.hotwords or "",
            encoder_path=encoder_path, gguf_path=gguf_path, hooks=BenchmarkHooks(min_new_tokens=args.force_tokens))
    except (DecoderError, ValueError, RuntimeError, OSError) as exc:
        raise SetupError(_one_line(exc)) from exc

    options = TranscribeOptions(
        prompt=PromptOptions(language=args.language, itn=not args.no_itn, hotwords=parse_hotwords(args.hotwords)),
        max_new_tokens=args.max_new_tokens,
        max_segment_seconds=args.max_segment,
        speculative=not args.no_speculative,
        vad=args.vad,
        timestamps=args.format != "txt",
    )
    show_progress = not args.quiet and sys.stderr.isatty()
    failures: list[str] = []
    bar = _progress_bar(len(args.audio), show_progress)
    for source in args.audio:
        try:
            if args.output_dir is not None:
                target = output_path(source, args.output_dir, args.format)
                if target.exists() and not args.overwrite:
                    _note(f"{source}: skipped, {target} exists (use --overwrite)", args.quiet)
                    continue
            with _native_stderr_silenced():
                # one long input: a segment counter, shown only once decoding takes a while
                segment_bar = _SegmentBar() if show_progress and len(args.audio) == 1 else None
                try:
                    transcript = engine.transcribe(source, options, progress=segment_bar)
                finally:
                    if segment_bar is not None:
                        segment_bar.close()
            if transcript.duration == 0:  # shorter than one frame is fine (empty text), nothing at all is not
                raise ValueError(f"{source}: no audio samples (the file holds no audio data)")
            if args.output_dir is not None:
                write_atomic(target, render(transcript, args.format, max_cue_seconds=args.max_cue_seconds))
            elif args.format != "txt":
                print(render(transcript, args.format, max_cue_seconds=args.max_cue_seconds), end="", flush=True)
            else:
                print(transcript.text, flush=True)
        except KeyboardInterrupt:
            raise
        except Exception as exc:  # one bad input must not stop the batch
            message = _one_line(exc)
            if not message.startswith(str(source)):
                message = f"{source}: {message}"
            _error(message)
            failures.append(str(source))
        finally:
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()
    engine.close()
    if failures:
        if len(args.audio) > 1:  # a single input's own error line says it all
            _error(f"{len(failures)} of {len(args.audio)} inputs failed: {', '.join(failures)}")
        return EXIT_FAILED_INPUTS
    return EXIT_OK


def _model_files(preset: Preset, args: argparse.Namespace) -> tuple[Path, Path]:
    """The encoder and GGUF to load; exports them first when the model folder is empty."""
    from common.models.settings import SETTINGS_FILE

    model_dir: Path = args.model_dir
    encoder = args.encoder or model_dir / preset.encoder_file
    gguf = args.gguf or model_dir / preset.gguf_file
    empty = not model_dir.exists() or not any(p for p in model_dir.iterdir() if p.name != "README.md")
    if empty:
        _export(model_dir, args.release_dir, args.quiet)
    missing = [p for p in (model_dir / SETTINGS_FILE, encoder, gguf) if not p.is_file()]
    if missing:
        names = ", ".join(str(p) for p in missing)
        raise SetupError(
            f"missing {names}; export with: python 01_export_onnx.py --out-dir {model_dir} && "
            f"python 02_export_gguf.py --out-dir {model_dir} --types f16,q8_0"
        )
    return encoder, gguf


def _export(model_dir: Path, release_dir: Path, quiet: bool) -> None:
    """First use: fetch the release if needed and run 01 and 02, in child processes (torch stays out of here)."""
    _note(f"{model_dir} is empty: exporting the model from {release_dir} (first use only)", quiet)
    steps = [
        [sys.executable, str(ROOT / "01_export_onnx.py"), "--model-dir", str(release_dir), "--out-dir", str(model_dir)],
        [sys.executable, str(ROOT / "02_export_gguf.py"), "--model-dir", str(release_dir), "--out-dir", str(model_dir),
         "--types", "f16,q8_0"],
    ]
    for cmd in steps:
        if quiet:
            cmd.append("--quiet")
        if subprocess.run(cmd).returncode != 0:
            raise SetupError(
                f"{model_dir}: export failed; get the release with `modelscope download --model "
                f"FunAudioLLM/Fun-ASR-Nano-2512 --local_dir {release_dir}`, then run 01_export_onnx.py "
                f"and 02_export_gguf.py"
            )


def preset_name_of(preset: Preset) -> str:
    return next(name for name, p in PRESETS.items() if p == preset)


class _StderrHandler(logging.Handler):
    """The engine's log records as today's one-line messages, on whatever sys.stderr is at the time."""

    PREFIXES = {logging.WARNING: "warning: ", logging.INFO: "note: ", logging.ERROR: "error: "}

    def emit(self, record: logging.LogRecord) -> None:
        print(self.PREFIXES.get(record.levelno, "") + record.getMessage(), file=sys.stderr, flush=True)


def _show_engine_messages() -> None:
    """Route the `common` loggers' notes and warnings to stderr, one line each (once per process)."""
    logger = logging.getLogger("common")
    if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
        logger.addHandler(_StderrHandler())
        logger.setLevel(logging.INFO)
        logger.propagate = False


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
def _native_stderr_silenced():
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


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _error(message: str) -> None:
    print(message if message.startswith(("warning:", "error:")) else f"error: {message}", file=sys.stderr, flush=True)


def _note(message: str, quiet: bool) -> None:
    if not quiet:
        print(message, file=sys.stderr, flush=True)
