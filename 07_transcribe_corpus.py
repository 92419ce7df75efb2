#!/usr/bin/env python3
"""Transcribe a corpus (folders, globs, manifests) with Fun-ASR-Nano on Ray Data, locally or on a cluster.

Run `python 07_transcribe_corpus.py --help` for the options; README.md ("Corpus scale") for a cluster.
Needs `pip install -r requirements-corpus.txt` on top of requirements.txt.
"""

import sys

from funasr_nano.requirements import guarded

if __name__ == "__main__":
    with guarded("07_transcribe_corpus.py", "base", "corpus"):  # a missing package: one error line, exit 2
        from funasr_nano.corpus.cli import main

        sys.exit(main())
