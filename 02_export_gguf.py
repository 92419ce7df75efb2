#!/usr/bin/env python3
"""Export the Qwen3 decoder of Fun-ASR-Nano to GGUF files for llama.cpp.

    python 02_export_gguf.py [--release-dir DIR] [--model-dir DIR] [--types f16,q8_0] [--quiet]

Writes qwen3-0.6b-asr.gguf (f16) and qwen3-0.6b-asr.<type>.gguf for other types.
The GGUF half of `funasr-nano export` (same options); the logic is in funasr_nano/export/.
"""

import sys

from funasr_nano.requirements import guarded

if __name__ == "__main__":
    with guarded("02_export_gguf.py", "base", "export"):  # a missing package: one error line, exit 2
        from funasr_nano.export.cli import main_gguf

        sys.exit(main_gguf())
