"""Export Fun-ASR-Nano's audio encoder + adaptor (and CTC head) to ONNX for onnxruntime.

    python 01_export_onnx.py [--release-dir DIR] [--model-dir DIR] [--no-int8] [--quiet]

Writes FunASR_Nano_Encoder.onnx and .int8.onnx (plus FunASR_Nano_CTC[.int8].onnx and
ctc_vocab.tiktoken when the release has the CTC head), tokenizer/ and funasr_nano.json.
All logic lives in funasr_nano/export_onnx.py; this file only parses arguments.
"""

from __future__ import annotations

import argparse
import sys

from funasr_nano.cli import OneLineParser, add_folder_options, export_folders
from funasr_nano.export.release import ReleaseError
from funasr_nano.requirements import guarded

EXAMPLES = """\
examples:
  python 01_export_onnx.py                                  # Fun-ASR-Nano-2512/ -> model-gguf/ (downloads if absent)
  python 01_export_onnx.py --release-dir ~/models/Fun-ASR-Nano-2512 --model-dir ~/models/model-gguf
  python 01_export_onnx.py --no-int8 --quiet

Both folders default to the project folder (the one holding this script), whatever the current directory.
"""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = OneLineParser(prog="01_export_onnx.py", description=__doc__.splitlines()[0], epilog=EXAMPLES,
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    add_folder_options(parser, export=True)
    parser.add_argument("--no-int8", action="store_true", help="skip the int8 variants")
    parser.add_argument("--quiet", action="store_true", help="no progress output")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Resolve the release before importing torch/funasr: a missing folder fails in well under a second.
    try:
        release_dir, model_dir = export_folders(args)
    except ReleaseError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    from funasr_nano.export.export_onnx import ExportError, export_onnx, stderr_log

    try:
        paths = export_onnx(release_dir, model_dir, int8=not args.no_int8, log=None if args.quiet else stderr_log)
    except (ReleaseError, ExportError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        for path in paths:
            print(path)
    return 0


if __name__ == "__main__":
    with guarded("01_export_onnx.py", "base", "export"):  # a missing package: one error line, exit 2
        sys.exit(main())
