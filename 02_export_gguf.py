"""Export the Qwen3 decoder of Fun-ASR-Nano to GGUF files for llama.cpp.

    python 02_export_gguf.py [--release-dir DIR] [--model-dir DIR] [--types f16,q8_0] [--quiet]

Writes qwen3-0.6b-asr.gguf (f16) and qwen3-0.6b-asr.<type>.gguf for other types.
All logic lives in funasr_nano/export_gguf.py; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys

from funasr_nano.cli import OneLineParser, add_folder_options, export_folders
from funasr_nano.export.export_gguf import (
    DEFAULT_TYPE,
    SUPPORTED_TYPES,
    ExportError,
    export_gguf,
    parse_types,
)
from funasr_nano.export.release import ReleaseError
from funasr_nano.requirements import guarded

EXAMPLES = """\
examples:
  python 02_export_gguf.py                                  # f16: model-gguf/qwen3-0.6b-asr.gguf
  python 02_export_gguf.py --types f16,q8_0                 # + qwen3-0.6b-asr.q8_0.gguf (03_inference_cpu_int8.py)
  python 02_export_gguf.py --release-dir ~/models/Fun-ASR-Nano-2512 --types q4_k_m --model-dir ~/models/model-gguf

Both folders default to the project folder (the one holding this script), whatever the current directory.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="02_export_gguf.py", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_folder_options(parser, export=True)
    parser.add_argument(
        "--types",
        default=DEFAULT_TYPE,
        help=f"comma-separated output types (default: {DEFAULT_TYPE}); any of {','.join(SUPPORTED_TYPES)}",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    progress = not args.quiet and sys.stderr.isatty()
    try:
        types = parse_types(args.types)
        release_dir, model_dir = export_folders(args)
        paths = export_gguf(release_dir, model_dir, types, progress=progress)
    except (ReleaseError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    with guarded("02_export_gguf.py", "base", "export"):  # a missing package: one error line, exit 2
        sys.exit(main())
