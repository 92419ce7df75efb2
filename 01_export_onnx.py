#!/usr/bin/env python3
"""Export Fun-ASR-Nano's audio encoder + adaptor (and CTC head) to ONNX for onnxruntime.

    python 01_export_onnx.py [--release-dir DIR] [--model-dir DIR] [--no-int8] [--quiet]

Writes FunASR_Nano_Encoder.onnx and .int8.onnx (plus FunASR_Nano_CTC[.int8].onnx and
ctc_vocab.tiktoken when the release has the CTC head), tokenizer/ and funasr_nano.json.
The ONNX half of `funasr-nano export` (same options); the logic is in funasr_nano/export/.
"""

import sys

from funasr_nano.requirements import guarded

if __name__ == "__main__":
    with guarded("01_export_onnx.py", "base", "export"):  # a missing package: one error line, exit 2
        from funasr_nano.export.cli import main_onnx

        sys.exit(main_onnx())
