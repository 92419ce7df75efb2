"""`funasr-nano export` and `funasr-nano download`, and the halves of the export the numbered scripts run.

export = 01_export_onnx.py (encoder + adaptor + CTC head -> ONNX, tokenizer, settings) followed by
02_export_gguf.py (the Qwen3 decoder -> GGUF), from `--release-dir` into `--model-dir`, in one
process; each script is the same parser with one half (`PARTS`). download only fetches the
release into `--release-dir` (what the export would do first when the default folder is empty).

The release is resolved before torch or funasr is imported: a missing folder fails in well under
a second, with one `error:` line and exit 2.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys
from pathlib import Path

from funasr_nano.export.release import CHECKPOINT_CHOICES
from funasr_nano.options import (
    DEFAULT_RELEASE_DIR,
    EXIT_SETUP,
    OneLineParser,
    add_folder_options,
    add_quiet_option,
    examples,
)
from funasr_nano.paths import CONSOLE_SCRIPT, SCRIPT_EXPORT_GGUF, SCRIPT_EXPORT_ONNX

PARTS = ("onnx", "gguf")
EXPORT_PROG = f"{CONSOLE_SCRIPT} export"
DOWNLOAD_PROG = f"{CONSOLE_SCRIPT} download"
ALL_TYPES = "f16,q8_0"  # what the presets load: f16 (cpu, gpu) and q8_0 (cpu-int8)
_DESCRIPTIONS = {
    ("onnx",): "Export Fun-ASR-Nano's audio encoder + adaptor (and CTC head) to ONNX for onnxruntime, with the "
               "tokenizer and settings.",
    ("gguf",): "Export the Qwen3 decoder of Fun-ASR-Nano to GGUF files for llama.cpp.",
    PARTS: "Export Fun-ASR-Nano for this runtime: the encoder to ONNX (fp32 + int8) and the decoder to GGUF, "
           "from the official release (downloaded when absent).",
}


def build_parser(prog: str = EXPORT_PROG, parts: tuple[str, ...] = PARTS) -> argparse.ArgumentParser:
    """The export's parser: both halves (`funasr-nano export`), or one (01: onnx, 02: gguf)."""
    from funasr_nano.export.export_gguf import DEFAULT_TYPE, SUPPORTED_TYPES  # constants only: no torch

    run = f"python {prog}" if prog.endswith(".py") else prog
    types_default = ALL_TYPES if "onnx" in parts else DEFAULT_TYPE
    lines = [f"{run}                                  # {DEFAULT_RELEASE_DIR.name}/ -> model-gguf/ "
             "(downloaded if absent)",
             f"{run} --release-dir ~/models/Fun-ASR-Nano-2512 --model-dir ~/models/model-gguf"]
    if "gguf" in parts:
        lines.append(f"{run} --types f16,q8_0,q4_k_m            # + a 4-bit k-quant decoder")
    if "onnx" in parts:
        lines.append(f"{run} --no-int8 --quiet")
    parser = OneLineParser(prog=prog, description=_DESCRIPTIONS[parts],
                           epilog=examples(*lines, notes="Both folders' defaults are in --help above, whatever the "
                                                         "current directory."))
    add_folder_options(parser, export=True)
    if "onnx" in parts:
        parser.add_argument("--no-int8", action="store_true", help="skip the int8 variants of the ONNX models")
        parser.add_argument("--vad-release-dir", type=Path, default=None, metavar="DIR",
                            help="FunASR's FSMN-VAD release (iic/speech_fsmn_vad_zh-cn-16k-common-pytorch) for "
                                 "--vad fsmn, downloaded into DIR when absent (default: "
                                 "speech_fsmn_vad_zh-cn-16k-common-pytorch/ beside the release's default folder, "
                                 "exported only when it is there)")
        parser.add_argument("--spk-release-dir", type=Path, default=None, metavar="DIR",
                            help="CAM++ (iic/speech_campplus_sv_zh-cn_16k-common, funasr's cam++) for --diarize, "
                                 "downloaded into DIR when absent (default: speech_campplus_sv_zh-cn_16k-common/ "
                                 "beside the release's default folder, exported only when it is there)")
        parser.add_argument("--checkpoint", choices=sorted(CHECKPOINT_CHOICES), default=None,
                            help="which checkpoint the release holds: nano (Fun-ASR-Nano-2512: zh, en, ja) or mlt "
                                 "(Fun-ASR-MLT-Nano-2512: 31 languages) (default: from configuration.json or the "
                                 "folder's name, else nano)")
    if "gguf" in parts:
        parser.add_argument("--types", default=types_default, metavar="LIST",
                            help=f"comma-separated GGUF types (default: {types_default}); any of "
                                 f"{','.join(SUPPORTED_TYPES)}")
    add_quiet_option(parser)
    return parser


def main(argv: list[str] | None = None, *, prog: str = EXPORT_PROG, parts: tuple[str, ...] = PARTS) -> int:
    """Export the parts; print the files written (stdout), exit 0, or one `error:` line and exit 2."""
    from funasr_nano.cli import export_folders
    from funasr_nano.export.release import ReleaseError

    args = build_parser(prog, parts).parse_args(argv)
    written: list[Path] = []
    try:
        types = _types(args) if "gguf" in parts else ()
        release_dir, model_dir = export_folders(args)
        # the GGUF half first: the ONNX half imports funasr, which configures the root logger (the gguf
        # writer's INFO lines would then show) and keeps the model it built for the rest of the process
        if "gguf" in parts:
            from funasr_nano.export.export_gguf import ExportError, export_gguf

            try:
                written += export_gguf(release_dir, model_dir, types, progress=not args.quiet and sys.stderr.isatty())
            except ExportError as exc:
                raise ReleaseError(str(exc)) from exc
        if "onnx" in parts:
            from funasr_nano.export.export_onnx import ExportError as OnnxExportError
            from funasr_nano.export.export_onnx import export_onnx, stderr_log

            try:
                written += export_onnx(release_dir, model_dir, int8=not args.no_int8,
                                       log=None if args.quiet else stderr_log, checkpoint=args.checkpoint)
            except OnnxExportError as exc:
                raise ReleaseError(str(exc)) from exc
            from funasr_nano.export.export_fsmn_vad import VadReleaseError, export_vad_step

            try:
                written += export_vad_step(args.vad_release_dir, model_dir)
            except VadReleaseError as exc:
                raise ReleaseError(str(exc)) from exc
            from funasr_nano.export.export_campplus import SpkReleaseError, export_spk_step

            try:
                written += export_spk_step(args.spk_release_dir, model_dir)
            except SpkReleaseError as exc:
                raise ReleaseError(str(exc)) from exc
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_SETUP
    if not args.quiet:
        for path in written:
            print(path, flush=True)
    return 0


def _types(args: argparse.Namespace) -> tuple[str, ...]:
    from funasr_nano.export.export_gguf import ExportError, parse_types
    from funasr_nano.export.release import ReleaseError

    try:
        return parse_types(args.types)
    except ExportError as exc:
        raise ReleaseError(str(exc)) from exc


def main_onnx(argv: list[str] | None = None) -> int:
    """01_export_onnx.py."""
    return main(argv, prog=SCRIPT_EXPORT_ONNX, parts=("onnx",))


def main_gguf(argv: list[str] | None = None) -> int:
    """02_export_gguf.py."""
    return main(argv, prog=SCRIPT_EXPORT_GGUF, parts=("gguf",))


# --------------------------------------------------------------------------- download


def build_download_parser(prog: str = DOWNLOAD_PROG) -> argparse.ArgumentParser:
    parser = OneLineParser(
        prog=prog, description="Download the official Fun-ASR-Nano release (FunAudioLLM/Fun-ASR-Nano-2512) into "
                               "--release-dir, for `export` (it downloads it too when the default folder is empty).",
        epilog=examples(f"{prog}", f"{prog} --release-dir ~/models/Fun-ASR-Nano-2512",
                        f"{prog} --source huggingface               # the copy without the CTC head",
                        notes="The ModelScope client (modelscope) or the Hugging Face one (huggingface_hub) must be "
                              "installed: both come with the export extra."))
    add_folder_options(parser, export=True, model=False)
    return parser


def download_main(argv: list[str] | None = None, *, prog: str = DOWNLOAD_PROG) -> int:
    """Fetch the release (nothing to do when it is there); print its folder, or one `error:` line and exit 2."""
    from funasr_nano.export.release import ReleaseError, ensure_release, is_release, not_a_release

    args = build_download_parser(prog).parse_args(argv)
    release = args.release_dir if args.release_dir is not None else DEFAULT_RELEASE_DIR
    if args.release_dir is not None and not release.exists():
        if not release.parent.is_dir():  # the release folder itself is created, not the folders above it
            print(f"error: {release.parent}: no such folder (--release-dir)", file=sys.stderr, flush=True)
            return EXIT_SETUP
    problem = not_a_release(release)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr, flush=True)
        return EXIT_SETUP
    client = {"modelscope": "modelscope", "huggingface": "huggingface_hub"}[args.source]
    if not is_release(release) and importlib.util.find_spec(client) is None:
        print(f"error: {prog} --source {args.source} needs the Python module {client!r}, which is not installed in "
              f"{sys.executable}: install it with: pip install {client.replace('_', '-')} (the export extra has it)",
              file=sys.stderr, flush=True)
        return EXIT_SETUP
    if is_release(release):
        print(f"note: {release} already holds the release", file=sys.stderr, flush=True)
    else:
        if args.release_dir is None:  # the default's data folder (~/.cache/funasr-nano when installed) may be new
            release.parent.mkdir(parents=True, exist_ok=True)
        try:
            ensure_release(release, download=True, source=args.source)
        except ReleaseError as exc:
            print(f"error: {exc}", file=sys.stderr, flush=True)
            return EXIT_SETUP
    print(release, flush=True)
    return 0
