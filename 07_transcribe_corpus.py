#!/usr/bin/env python3
"""Transcribe a corpus (folders, globs, manifests) with Fun-ASR-Nano on Ray Data, locally or on a cluster.

The same as `funasr-nano corpus` (same options); run `python 07_transcribe_corpus.py --help` for them; README.md ("Corpus scale") for a cluster.
Needs `pip install -r requirements-corpus.txt`.
"""

import sys

from funasr_nano.requirements import guarded

if __name__ == "__main__":
    with guarded("07_transcribe_corpus.py", "base", "corpus"):  # a missing package: one error line, exit 2
        from funasr_nano.corpus.cli import main

        sys.exit(main(prog="07_transcribe_corpus.py"))
