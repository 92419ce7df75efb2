"""The options every command line shares: one name, one meaning, one type, wherever an option applies.

`funasr-nano transcribe|serve|mic|corpus|export|download` and the numbered scripts build their
parsers from these helpers, so `--model-dir`, `--preset`, `--output-dir`, `--format`, `--batch-size`,
`--language`, `--hotwords`, `--threads` and `--release-dir` cannot drift apart between them
(tests/test_cli_options.py walks every parser and compares). Old spellings stay for one release as
hidden aliases (`add_deprecated_alias`): they still work, and say once on stderr which name to use.

Defaults of the folder options: `funasr_nano.paths` (the project folder in a checkout, the user's
data folder when installed). Every visible option's help names its default, and every parser's
epilog starts with `examples:`. Nothing heavy is imported here: `--help` must work without the
runtime's packages.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

from funasr_nano.paths import MODEL_DIR_NAME, RELEASE_DIR_NAME, data_dir, data_dir_note
from funasr_nano.presets import DEFAULT_BATCH_SIZE, PRESETS

EXIT_SETUP = 2
DEFAULT_PRESET = "cpu-int8"  # the fastest on a CPU; `transcribe`, `serve`, `mic` and `corpus` start from it
FORMATS = ("txt", "json", "srt", "vtt")  # funasr_nano.output.writers.FORMATS, without importing it
DEFAULT_THREADS = max(1, min(os.cpu_count() or 2, 8))
SOURCES = ("modelscope", "huggingface")
DEFAULT_MODEL_DIR = data_dir() / MODEL_DIR_NAME
DEFAULT_RELEASE_DIR = data_dir() / RELEASE_DIR_NAME


class HelpFormatter(argparse.HelpFormatter):
    """Wraps a one-line description as argparse does, keeps a text of several lines (the epilog's examples,
    one command a line) as it is written."""

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        if "\n" in text.strip():
            return "".join(indent + line for line in text.splitlines(keepends=True))
        return super()._fill_text(text, width, indent)


class OneLineParser(argparse.ArgumentParser):
    """argparse with its errors on one `error:` line (exit 2), like every other error of the command lines."""

    def __init__(self, *args, **kwargs) -> None:
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(EXIT_SETUP, f"error: {message} (see {self.prog} --help)\n")


def positive(kind: type[int] | type[float]) -> Callable[[str], int | float]:
    """An argparse type: a whole number >= 1 (`int`) or a finite number > 0 (`float`); errors say the value.

    The function is named `positive_int` / `positive_float`, so that parsers can be compared by type.
    """

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{'a whole' if kind is int else 'a'} number is needed, not {text!r}") from None
        if kind is int and value < 1:
            raise argparse.ArgumentTypeError(f"must be at least 1, not {text}")
        if not (value > 0 and math.isfinite(value)):
            raise argparse.ArgumentTypeError(f"must be a number above 0, not {text}")
        return value

    parse.__name__ = parse.__qualname__ = f"positive_{kind.__name__}"
    return parse


def formats(text: str) -> tuple[str, ...]:
    """--format: one output format or a comma-separated list (txt, json, srt, vtt), repeats dropped."""
    chosen: list[str] = []
    for item in text.split(","):
        name = item.strip().lower()
        if not name:
            continue
        if name not in FORMATS:
            raise argparse.ArgumentTypeError(f"unknown format {item.strip()!r}; choose from {', '.join(FORMATS)}")
        if name not in chosen:
            chosen.append(name)
    return tuple(chosen)


class DeprecatedAlias(argparse.Action):
    """An old option name kept for one release: it does what the new one does, after one warning line."""

    def __init__(self, option_strings: list[str], dest: str, replacement: str = "", **kwargs) -> None:
        self.replacement = replacement
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:  # noqa: ANN001 - argparse's API
        print(f"warning: {option_string} is deprecated; use {self.replacement}", file=sys.stderr, flush=True)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old: str, new: argparse.Action) -> argparse.Action:
    """`old` as a hidden spelling of the option `new` (same dest and type; no default of its own)."""
    return parser.add_argument(old, dest=new.dest, type=new.type, metavar=new.metavar, action=DeprecatedAlias,
                               replacement=new.option_strings[0], default=argparse.SUPPRESS, help=argparse.SUPPRESS)


def examples(*lines: str, notes: str = "") -> str:
    """An epilog: `examples:` and one command a line (each --help has one), then free notes (a note given as
    one line is wrapped here: the epilog is printed as written, so that each command keeps its own line)."""
    text = "examples:\n" + "".join(f"  {line}\n" for line in lines)
    notes = notes.strip()
    if notes and "\n" not in notes:
        notes = textwrap.fill(notes, 100, break_on_hyphens=False, break_long_words=False)
    return text + (f"\n{notes}\n" if notes else "")


# --------------------------------------------------------------------------- the shared options


def _default_text(path: Path) -> str:
    return f"{path}, in {data_dir_note()}"


def add_folder_options(parser: argparse.ArgumentParser, *, export: bool, model: bool = True) -> None:
    """`--release-dir`, `--model-dir` (unless not `model`) and `--source`: the same in every command; None when
    not given (the defaults are applied where they are used, so that a named folder can be told apart)."""
    if export:
        release_help = ("official Fun-ASR-Nano release folder to export (default: "
                        f"{_default_text(DEFAULT_RELEASE_DIR)}; downloaded when absent)")
        model_help = f"where the exported models go (default: {_default_text(DEFAULT_MODEL_DIR)})"
    else:
        release_help = ("official release folder, exported from when the model folder is empty (default: "
                        f"{_default_text(DEFAULT_RELEASE_DIR)}; downloaded when absent)")
        model_help = f"exported models (default: {_default_text(DEFAULT_MODEL_DIR)}; exported there on first use)"
    parser.add_argument("--release-dir", type=Path, default=None, metavar="DIR", help=release_help)
    if model:
        parser.add_argument("--model-dir", type=Path, default=None, metavar="DIR", help=model_help)
    parser.add_argument("--source", choices=SOURCES, default="modelscope",
                        help="where a missing release is downloaded from (default: modelscope; the huggingface copy "
                             "lacks the CTC head: no timestamps aligned to the audio, no live partials, no "
                             "speculative decoding). HTTPS_PROXY / NO_PROXY are honoured")


def add_preset_option(parser: argparse.ArgumentParser, default: str = DEFAULT_PRESET) -> None:
    """`--preset cpu|cpu-int8|gpu`: which exported files to load and where (the 03 scripts are its shorthands)."""
    parser.add_argument("--preset", choices=tuple(PRESETS), default=default,
                        help="which exported files to load and where: cpu (fp32 encoder + f16 GGUF), cpu-int8 "
                             "(int8 encoder + q8_0 GGUF, the fastest on a CPU), gpu (every layer on the GPU) "
                             f"(default: {default})")


def add_output_dir_option(parser: argparse.ArgumentParser, help_text: str) -> argparse.Action:
    return parser.add_argument("--output-dir", type=Path, default=None, metavar="DIR", help=help_text)


def add_format_option(parser: argparse.ArgumentParser, default: str | None, help_text: str) -> argparse.Action:
    return parser.add_argument("--format", type=formats, default=default, metavar="LIST", help=help_text)


def add_batch_size_option(parser: argparse.ArgumentParser, default: int | None, help_text: str) -> argparse.Action:
    return parser.add_argument("--batch-size", type=positive(int), default=default, metavar="N", help=help_text)


def add_prompt_options(p: argparse.ArgumentParser) -> None:
    """What the model is asked for: language, ITN, hotwords (transcribe, mic, corpus; a server takes them
    per request)."""
    from funasr_nano.models.prompt import MLT, MLT_LANGUAGES, NANO, language_choices

    p.add_argument("--language", default=None,
                   help=f"the language to write, by ISO code or the model's name for it; {NANO}: "
                        f"{language_choices()}; {MLT}: {', '.join(MLT_LANGUAGES)} (default: the model decides)")
    p.add_argument("--no-itn", action="store_true", help="no inverse text normalization (numbers stay spelled out)")
    p.add_argument("--hotwords", default=None, metavar="WORDS",
                   help='comma-separated words to favour, e.g. "通义,魔搭" (default: none)')


def add_transcription_options(p: argparse.ArgumentParser) -> None:
    """How the inputs of one run are transcribed: the prompt options, VAD, batching, subtitle cues.

    transcribe (the 03 scripts) and corpus take them; mic takes only the prompt options (it has its own
    segmentation and one stream), a server takes them per request (`prompt_options`, `transcribe_options`
    read them).
    """
    add_prompt_options(p)
    p.add_argument("--max-cue-seconds", type=positive(float), default=6.0, metavar="S",
                   help="longest subtitle cue in seconds, srt/vtt (default: 6)")
    add_vad_option(p)
    add_batch_size_option(p, DEFAULT_BATCH_SIZE,
                          f"segments decoded together in one llama.cpp context (default: {DEFAULT_BATCH_SIZE}; "
                          "1: one at a time)")


def add_diarize_options(p: argparse.ArgumentParser) -> None:
    """Who spoke when (transcribe): CAM++ embeddings and funasr's clustering (docs/diarization.md)."""
    p.add_argument("--diarize", action="store_true",
                   help="label speakers: JSON \"speaker\" per segment and sentence, SRT/VTT cues with the speaker, "
                        "txt a paragraph per turn (needs campplus.onnx: export it with --spk-release-dir)")
    p.add_argument("--speakers", type=positive(int), default=None, metavar="N",
                   help="exactly N speakers (implies --diarize; default: found from the audio)")
    p.add_argument("--min-speakers", type=positive(int), default=1, metavar="N",
                   help="at least N speakers when the count is found (implies --diarize; default: 1)")
    p.add_argument("--max-speakers", type=positive(int), default=15, metavar="N",
                   help="at most N speakers when the count is found (implies --diarize; default: 15)")


def add_vad_option(p: argparse.ArgumentParser) -> None:
    p.add_argument("--vad", choices=("silero", "fsmn", "none"), default="silero",
                   help="silero: transcribe only the speech Silero VAD finds; fsmn: FunASR's FSMN-VAD, the "
                        "official pipeline's segments (export it with --vad-release-dir); none: the whole "
                        "input, cut at quiet points (default: silero)")


def add_model_options(p: argparse.ArgumentParser) -> None:
    """The model folders and files, threads and decoding limits: what `funasr_nano.cli.engine_config` reads
    (transcribe, serve, mic, corpus)."""
    add_folder_options(p, export=False)
    p.add_argument("--threads", type=positive(int), default=DEFAULT_THREADS, metavar="N",
                   help=f"CPU threads (default: {DEFAULT_THREADS}: this machine's cores, at most 8)")
    p.add_argument("--max-new-tokens", type=positive(int), default=512, metavar="N",
                   help="cap on generated tokens per segment (default: 512)")
    p.add_argument("--max-segment", type=positive(float), default=30.0, metavar="S",
                   help="longest segment in seconds (default: 30)")
    p.add_argument("--encoder", type=Path, default=None, metavar="FILE",
                   help="ONNX encoder to use instead of the preset's (default: the preset's, in --model-dir)")
    p.add_argument("--gguf", type=Path, default=None, metavar="FILE",
                   help="GGUF decoder to use instead of the preset's (default: the preset's, in --model-dir)")
    p.add_argument("--no-speculative", action="store_true",
                   help="plain greedy decoding: do not verify the CTC head's draft (same text, slower)")
    p.add_argument("--batch-invariant", action="store_true",
                   help="a segment's text never depends on what is decoded alongside it (a step with one "
                        "segment live decodes a second, discarded row: about 1.3x its time with f16 weights, "
                        "up to 2.8x with q8_0; the server also keeps one KV stream per sequence instead of "
                        "its shared cache)")
    # Benchmarks on random weights force a length; not for users.
    p.add_argument("--force-tokens", type=int, default=0, help=argparse.SUPPRESS)


def add_quiet_option(p: argparse.ArgumentParser, what: str = "no progress output") -> None:
    p.add_argument("--quiet", action="store_true", help=what)
