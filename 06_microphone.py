#!/usr/bin/env python3
"""Live transcription from the microphone (or a file played at real-time speed): partial text in place, final lines.

    python 06_microphone.py                          # default input device, models loaded here (cpu-int8)
    python 06_microphone.py --file talk.mp3 --speed 4
    python 06_microphone.py --server ws://localhost:8000 --output-file notes.txt

Partial text (the CTC head's, provisional) is rewritten in place on stderr when it is a terminal;
each segment's final text (the LLM's) goes to stdout as one line. Ctrl-C stops cleanly: the speech
in progress is finished and, with --output-file, the transcript so far is written. The same as
`funasr-nano mic` (same options; the model options are transcribe's). The microphone needs
PortAudio (`pip install -r requirements-mic.txt`, and libportaudio2 / portaudio from the system's
packages). See README.md, "Real-time transcription".
"""

from __future__ import annotations

import sys

from funasr_nano.requirements import guarded

if __name__ == "__main__":
    with guarded("06_microphone.py", "base"):  # a missing package: one error line, exit 2
        from funasr_nano.realtime.client import main

        sys.exit(main(prog="06_microphone.py"))
