"""Every option name means the same in every subcommand and numbered script (issue 25, item 4).

The test builds every parser: the six `funasr-nano` subcommands and the nine numbered scripts
(whose `--help` is compared with the parser's own, so a script cannot quietly build another one),
collects each option string with its dest, type, choices and action, and checks:

- one option string has one meaning everywhere: the same dest, type, choices and kind of action;
- the shared names the issue lists are present wherever they apply, under exactly those names;
- an old spelling is a hidden alias of its new name (same dest and type, no help line), gives the
  same value, and prints one `warning: --X is deprecated; use --Y` line;
- every visible option that takes a value names its default in its help, and every --help ends
  with an `examples:` block of commands of that very program;
- 06 / `mic` offers no option that does nothing there; the 03 scripts are `transcribe --preset X`.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from funasr_nano.options import DEFAULT_THREADS, DeprecatedAlias

ROOT = Path(__file__).resolve().parent.parent


def _transcribe(prog: str = "funasr-nano transcribe", preset: str = "cpu-int8") -> argparse.ArgumentParser:
    from funasr_nano.cli import build_parser

    return build_parser(prog, preset)


def _serve(prog: str = "funasr-nano serve") -> argparse.ArgumentParser:
    from funasr_nano.server.cli import build_parser

    return build_parser(prog)


def _mic(prog: str = "funasr-nano mic") -> argparse.ArgumentParser:
    from funasr_nano.realtime.client import build_parser

    return build_parser(prog)


def _corpus(prog: str = "funasr-nano corpus") -> argparse.ArgumentParser:
    from funasr_nano.corpus.cli import build_parser

    return build_parser(prog)


def _export(prog: str = "funasr-nano export", parts: tuple[str, ...] = ("onnx", "gguf")) -> argparse.ArgumentParser:
    from funasr_nano.export.cli import build_parser

    return build_parser(prog, parts)


def _download(prog: str = "funasr-nano download") -> argparse.ArgumentParser:
    from funasr_nano.export.cli import build_download_parser

    return build_download_parser(prog)


# program -> the parser it uses; the numbered scripts are checked below to really print that parser's help
PARSERS: dict[str, Callable[[], argparse.ArgumentParser]] = {
    "funasr-nano transcribe": _transcribe,
    "funasr-nano serve": _serve,
    "funasr-nano mic": _mic,
    "funasr-nano corpus": _corpus,
    "funasr-nano export": _export,
    "funasr-nano download": _download,
    "01_export_onnx.py": lambda: _export("01_export_onnx.py", ("onnx",)),
    "02_export_gguf.py": lambda: _export("02_export_gguf.py", ("gguf",)),
    "03_inference_cpu.py": lambda: _transcribe("03_inference_cpu.py", "cpu"),
    "03_inference_cpu_int8.py": lambda: _transcribe("03_inference_cpu_int8.py", "cpu-int8"),
    "03_inference_gpu.py": lambda: _transcribe("03_inference_gpu.py", "gpu"),
    "05_server.py": lambda: _serve("05_server.py"),
    "06_microphone.py": lambda: _mic("06_microphone.py"),
    "07_transcribe_corpus.py": lambda: _corpus("07_transcribe_corpus.py"),
}
SCRIPTS = [name for name in PARSERS if name.endswith(".py")]
SUBCOMMANDS = [name.split()[1] for name in PARSERS if not name.endswith(".py")]

# The shared names (issue 25) and the programs each one applies to: present there, under this name.
TRANSCRIBING = {"funasr-nano transcribe", "funasr-nano corpus", "03_inference_cpu.py", "03_inference_cpu_int8.py",
                "03_inference_gpu.py", "07_transcribe_corpus.py"}
LOADING = TRANSCRIBING | {"funasr-nano serve", "funasr-nano mic", "05_server.py", "06_microphone.py"}
EXPORTING = {"funasr-nano export", "01_export_onnx.py", "02_export_gguf.py"}
SHARED: dict[str, set[str]] = {
    "--model-dir": LOADING | EXPORTING,
    "--release-dir": LOADING | EXPORTING | {"funasr-nano download"},
    "--source": LOADING | EXPORTING | {"funasr-nano download"},
    "--preset": LOADING,
    "--output-dir": TRANSCRIBING,
    "--format": TRANSCRIBING,
    "--batch-size": TRANSCRIBING | {"funasr-nano serve", "05_server.py"},
    "--language": TRANSCRIBING | {"funasr-nano mic", "06_microphone.py"},
    "--hotwords": TRANSCRIBING | {"funasr-nano mic", "06_microphone.py"},
    "--threads": LOADING,
}
# Old spellings (hidden, one release): program group -> old -> new
ALIASES: dict[str, dict[str, str]] = {
    "corpus": {"--output": "--output-dir", "--formats": "--format"},
    "serve": {"--max-batch": "--batch-size"},
    "mic": {"--output": "--output-file"},
}
# `--output` was a folder in 07 and a file in 06 before the rename; each old meaning lives on as an alias there
ALIASES_WITH_TWO_OLD_MEANINGS = {"--output"}


@dataclass(frozen=True)
class Meaning:
    """What an option string does in one parser."""

    dest: str
    type: str
    choices: tuple | None
    action: str
    hidden: bool

    @classmethod
    def of(cls, action: argparse.Action) -> Meaning:
        kind = type(action).__name__
        if isinstance(action, DeprecatedAlias):
            kind = "_StoreAction"  # an alias stores like the option it spells
        type_name = getattr(action.type, "__name__", repr(action.type)) if action.type is not None else "str"
        if action.nargs == 0:
            type_name = "flag"
        return cls(action.dest, type_name, tuple(action.choices) if action.choices else None, kind,
                   action.help == argparse.SUPPRESS)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    return {s: a for a in parser._actions for s in a.option_strings if s not in ("-h", "--help")}


@pytest.fixture(scope="module")
def parsers() -> dict[str, argparse.ArgumentParser]:
    return {name: build() for name, build in PARSERS.items()}


def _group(program: str) -> str:
    """The subcommand a program is (or is a shorthand of)."""
    if not program.endswith(".py"):
        return program.split()[1]
    return {"01": "export", "02": "export", "03": "transcribe", "05": "serve", "06": "mic", "07": "corpus"}[program[:2]]


def test_one_option_name_has_one_meaning_everywhere(parsers):
    seen: dict[str, dict[Meaning, list[str]]] = {}
    for program, parser in parsers.items():
        for option, action in _options(parser).items():
            meaning = Meaning.of(action)
            if option in ALIASES_WITH_TWO_OLD_MEANINGS and meaning.hidden:
                continue  # checked against its own new name in test_old_spellings_...
            seen.setdefault(option, {}).setdefault(meaning, []).append(program)
    conflicts = {option: {str(m): programs for m, programs in meanings.items()}
                 for option, meanings in seen.items() if len(meanings) > 1}
    assert not conflicts, conflicts


def test_one_meaning_has_one_visible_name_everywhere(parsers):
    """No dest is spelled one way here and another way there (the old --output vs --output-dir)."""
    names: dict[str, set[str]] = {}
    for parser in parsers.values():
        for option, action in _options(parser).items():
            if action.help != argparse.SUPPRESS:
                names.setdefault(action.dest, set()).add(option)
    assert {dest: spellings for dest, spellings in names.items() if len(spellings) > 1} == {}


@pytest.mark.parametrize("option", sorted(SHARED))
def test_the_shared_names_are_wherever_they_apply(option, parsers):
    have = {program for program, parser in parsers.items()
            if option in _options(parser) and _options(parser)[option].help != argparse.SUPPRESS}
    assert have == SHARED[option]


@pytest.mark.parametrize("program", list(PARSERS))
def test_old_spellings_are_hidden_aliases_that_warn_once(program, parsers, capsys):
    parser = parsers[program]
    options = _options(parser)
    aliases = {o: a for o, a in options.items() if isinstance(a, DeprecatedAlias)}
    assert {o: a.replacement for o, a in aliases.items()} == ALIASES.get(_group(program), {})
    positional = {"transcribe": ["a.wav"], "corpus": ["in/"]}.get(_group(program), [])
    for old, alias in aliases.items():
        new = options[alias.replacement]
        assert alias.help == argparse.SUPPRESS and not re.search(rf"{re.escape(old)}(?![\w-])", parser.format_help())
        assert (alias.dest, alias.type) == (new.dest, new.type)
        value = "txt,srt" if new.option_strings[0] == "--format" else "7" if new.dest == "batch_size" else "x/y"
        by_new = parser.parse_args([*positional, new.option_strings[0], value])
        capsys.readouterr()
        by_old = parser.parse_args([*positional, old, value])
        assert by_old == by_new
        assert capsys.readouterr().err == f"warning: {old} is deprecated; use {alias.replacement}\n"
        # neither given: the new option's default, untouched by the alias
        assert getattr(parser.parse_args(positional), new.dest) == new.default


@pytest.mark.parametrize("program", list(PARSERS))
def test_help_shows_every_default_and_examples(program, parsers):
    parser = parsers[program]
    missing = []
    for action in parser._actions:
        if not action.option_strings or action.help == argparse.SUPPRESS or action.nargs == 0:
            continue  # positionals, hidden options and flags (a flag's default is "off")
        if "default" not in action.help:
            missing.append(action.option_strings[0])
    assert not missing, f"{program}: no default in the help of {missing}"
    epilog = parser.epilog or ""
    assert epilog.startswith("examples:\n"), program
    run = f"python {program}" if program.endswith(".py") else program
    commands = [line.strip() for line in epilog.split("\n\n")[0].splitlines()[1:]]
    assert commands and any(c.startswith(run) or run in c for c in commands), (program, commands)
    assert all(run in c or c.startswith("curl ") for c in commands), (program, commands)
    threads = _options(parser).get("--threads")
    if threads is not None:
        assert threads.default == DEFAULT_THREADS and f"default: {DEFAULT_THREADS}" in threads.help


def test_mic_offers_no_option_that_does_nothing_there(parsers):
    for program in ("funasr-nano mic", "06_microphone.py"):
        options = _options(parsers[program])
        assert not {"--max-cue-seconds", "--batch-size", "--vad", "--format", "--output-dir"} & set(options)


def test_log_level_has_help(parsers):
    assert "default: info" in _options(parsers["funasr-nano serve"])["--log-level"].help


@pytest.mark.parametrize("script,preset", [("03_inference_cpu.py", "cpu"), ("03_inference_cpu_int8.py", "cpu-int8"),
                                           ("03_inference_gpu.py", "gpu")])
def test_the_03_scripts_are_transcribe_with_a_preset(script, preset, parsers):
    argv = ["a.wav", "--format", "json,srt", "--output-dir", "out", "--batch-size", "2", "--language", "en"]
    assert parsers[script].parse_args(argv) == parsers["funasr-nano transcribe"].parse_args([*argv, "--preset", preset])


@pytest.mark.parametrize("program", SCRIPTS)
def test_each_numbered_script_prints_its_parsers_help(program, monkeypatch):
    """The scripts are thin wrappers: their --help is the parser's, byte for byte (at one terminal width)."""
    monkeypatch.setenv("COLUMNS", "100")  # argparse's width, here and in the child
    proc = subprocess.run([sys.executable, str(ROOT / program), "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PARSERS[program]().format_help()


@pytest.mark.parametrize("command", SUBCOMMANDS)
def test_each_subcommand_prints_its_parsers_help(command, monkeypatch):
    """`python -m funasr_nano COMMAND --help` (the console script's code) from another folder: the parser's help."""
    monkeypatch.setenv("COLUMNS", "100")
    proc = subprocess.run([sys.executable, "-m", "funasr_nano", command, "--help"], cwd="/", capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == PARSERS[f"funasr-nano {command}"]().format_help()


def test_the_console_script_lists_the_subcommands():
    proc = subprocess.run([sys.executable, "-m", "funasr_nano", "--help"], cwd="/", capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0
    listed = [line.split()[0] for line in proc.stdout.split("commands:\n", 1)[1].split("\n\n")[0].splitlines()]
    assert listed == ["transcribe", "serve", "mic", "corpus", "export", "download"]
    assert "examples:\n" in proc.stdout
    unknown = subprocess.run([sys.executable, "-m", "funasr_nano", "transcrbe"], cwd="/", capture_output=True,
                             text=True, timeout=60)
    assert unknown.returncode == 2 and unknown.stderr.startswith("error: unknown command 'transcrbe'")


def test_download_finds_a_release_and_refuses_what_cannot_be_one(tiny_ckpt, tmp_path):
    def download(*args: object) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "funasr_nano", "download", *map(str, args)], cwd=tmp_path,
                              capture_output=True, text=True, timeout=120)

    there = download("--release-dir", tiny_ckpt)
    assert there.returncode == 0 and there.stdout.strip() == str(tiny_ckpt), there.stderr
    assert there.stderr.strip() == f"note: {tiny_ckpt} already holds the release"
    nowhere = download("--release-dir", tmp_path / "no" / "such" / "release")
    assert nowhere.returncode == 2 and nowhere.stderr.strip() == (
        f"error: {tmp_path / 'no' / 'such'}: no such folder (--release-dir)")
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("x")
    other = download("--release-dir", notes)
    assert other.returncode == 2 and "not a Fun-ASR-Nano release folder" in other.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]
