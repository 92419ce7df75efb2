#!/usr/bin/env python3
"""Transcribe audio files with Fun-ASR-Nano: every GGUF layer offloaded to the GPU (CUDA/Vulkan build of llama.cpp), GPU ONNX provider when installed; falls back to the CPU and says so.

The same as `funasr-nano transcribe --preset gpu` (same options); run `python 03_inference_gpu.py --help`
for them; see README.md for the set-up.
"""

import sys

from funasr_nano.requirements import guarded

if __name__ == "__main__":
    with guarded("03_inference_gpu.py", "base"):  # a missing package: one error line, exit 2
        from funasr_nano.cli import main

        sys.exit(main(prog="03_inference_gpu.py", preset="gpu"))
