#!/usr/bin/env python3
"""OpenAI-compatible transcription server: concurrent requests share one batched Fun-ASR-Nano decoder.

Run `python 05_server.py --help` for the options; README.md ("The server") shows curl and
openai-client examples.
"""

import sys

from common.server.cli import main

if __name__ == "__main__":
    sys.exit(main())
