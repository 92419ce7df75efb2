#!/usr/bin/env python3
"""Transcribe audio files with Fun-ASR-Nano: fp32 ONNX encoder + f16 GGUF decoder, on the CPU.

The same as `funasr-nano transcribe --preset cpu` (same options); run `python 03_inference_cpu.py --help`
for them; see README.md for the set-up.
"""

import sys

from funasr_nano.requirements import guarded

if __name__ == "__main__":
    with guarded("03_inference_cpu.py", "base"):  # a missing package: one error line, exit 2
        from funasr_nano.cli import main

        sys.exit(main(prog="03_inference_cpu.py", preset="cpu"))
