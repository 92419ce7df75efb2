"""`funasr-nano`, the console script (and `python -m funasr_nano`): one command line, six subcommands.

    funasr-nano transcribe talk.mp3                 # the 03 scripts (--preset cpu|cpu-int8|gpu)
    funasr-nano serve --port 8000                   # 05_server.py
    funasr-nano mic                                 # 06_microphone.py
    funasr-nano corpus recordings/ --output-dir out/  # 07_transcribe_corpus.py
    funasr-nano export                              # 01_export_onnx.py + 02_export_gguf.py
    funasr-nano download                            # fetch the official release

Each subcommand is the parser and `main` its numbered script uses, so the option names and their
meanings are the same both ways (`funasr_nano.options`). Before a subcommand runs, the packages of
its extra are looked up: one missing is one `error:` line naming the install command
(`funasr_nano.requirements`), exit 2. The dispatch is by hand rather than argparse sub-parsers so
that each subcommand's `--help` is exactly its script's, with its own `examples:`.
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass

from funasr_nano import __version__
from funasr_nano.paths import CONSOLE_SCRIPT

EXIT_SETUP = 2


@dataclass(frozen=True)
class Command:
    """One subcommand: where its `main(argv, prog=...)` lives, what it needs installed, a line for --help."""

    module: str
    function: str
    extras: tuple[str, ...]
    summary: str


COMMANDS: dict[str, Command] = {
    "transcribe": Command("funasr_nano.cli", "main", ("base",),
                          "transcribe audio files to txt, json, srt or vtt (the 03 scripts)"),
    "serve": Command("funasr_nano.server.cli", "main", ("base", "server"),
                     "OpenAI-compatible HTTP server with a page and a realtime WebSocket (05_server.py)"),
    "mic": Command("funasr_nano.realtime.client", "main", ("base",),
                   "live transcription of the microphone or a file, here or on a server (06_microphone.py)"),
    "corpus": Command("funasr_nano.corpus.cli", "main", ("base", "corpus"),
                      "transcribe a corpus on Ray Data into Parquet, resumable (07_transcribe_corpus.py)"),
    "export": Command("funasr_nano.export.cli", "main", ("base", "export"),
                      "export the release to ONNX + GGUF (01_export_onnx.py + 02_export_gguf.py)"),
    "download": Command("funasr_nano.export.cli", "download_main", (),
                        "download the official release (ModelScope or Hugging Face)"),
}


def usage() -> str:
    lines = [f"usage: {CONSOLE_SCRIPT} [--version] COMMAND [options]", "",
             "Fun-ASR-Nano speech recognition: ONNX Runtime encoder + llama.cpp decoder, no PyTorch at run time.",
             "", "commands:"]
    lines += [f"  {name:<11} {command.summary}" for name, command in COMMANDS.items()]
    lines += ["", f"`{CONSOLE_SCRIPT} COMMAND --help` shows a command's options, their defaults and examples.", "",
              "examples:",
              f"  {CONSOLE_SCRIPT} transcribe talk.mp3 --model-dir ~/models/model-gguf",
              f"  {CONSOLE_SCRIPT} transcribe a.wav b.flac --preset cpu --format json,srt --output-dir out/",
              f"  {CONSOLE_SCRIPT} serve --preset gpu --host 0.0.0.0 --port 9000",
              f"  {CONSOLE_SCRIPT} download && {CONSOLE_SCRIPT} export    # needs the export extra"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand with the rest of the arguments; its exit code."""
    args = sys.argv[1:] if argv is None else list(argv)
    if not args:
        sys.stderr.write(usage())
        return EXIT_SETUP
    name, rest = args[0], args[1:]
    if name in ("-h", "--help", "help"):
        sys.stdout.write(usage())
        return 0
    if name == "--version":
        print(f"{CONSOLE_SCRIPT} {__version__}")
        return 0
    command = COMMANDS.get(name)
    if command is None:
        print(f"error: unknown command {name!r}; choose from {', '.join(COMMANDS)} (see {CONSOLE_SCRIPT} --help)",
              file=sys.stderr)
        return EXIT_SETUP
    from funasr_nano.requirements import guarded

    prog = f"{CONSOLE_SCRIPT} {name}"
    with guarded(prog, *command.extras, argv=rest):  # a missing package: one error line, exit 2
        function = getattr(importlib.import_module(command.module), command.function)
        return function(rest, prog=prog)


if __name__ == "__main__":
    sys.exit(main())
