#!/usr/bin/env python3
"""OpenAI-compatible transcription server: concurrent requests share one batched Fun-ASR-Nano decoder.

The same as `funasr-nano serve` (same options); run `python 05_server.py --help` for them; README.md ("The server") shows curl and
openai-client examples.
"""

import sys

from funasr_nano.requirements import guarded

if __name__ == "__main__":
    with guarded("05_server.py", "base", "server"):  # a missing package: one error line, exit 2
        from funasr_nano.server.cli import main

        sys.exit(main(prog="05_server.py"))
