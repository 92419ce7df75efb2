"""Transcript files: txt, json and subtitles (srt, vtt), written atomically.

A file is written to a temporary name in the target folder and renamed over the
final name, so an interrupted run never leaves a half-written transcript and a
re-run can trust that an existing output file is complete.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

from common.output.results import Transcript
from common.output.subtitles import DEFAULT_MAX_CUE_SECONDS, render_srt, render_vtt, transcript_cues

FORMATS = ("txt", "json", "srt", "vtt")


def render_txt(transcript: Transcript) -> str:
    return transcript.text + "\n"


def render_json(transcript: Transcript) -> str:
    return json.dumps(transcript.to_dict(), ensure_ascii=False, indent=2) + "\n"


def render_srt_file(transcript: Transcript, max_cue_seconds: float = DEFAULT_MAX_CUE_SECONDS) -> str:
    return render_srt(transcript_cues(transcript.segments, max_cue_seconds))


def render_vtt_file(transcript: Transcript, max_cue_seconds: float = DEFAULT_MAX_CUE_SECONDS) -> str:
    return render_vtt(transcript_cues(transcript.segments, max_cue_seconds))


RENDERERS: dict[str, Callable[[Transcript], str]] = {"txt": render_txt, "json": render_json,
                                                     "srt": render_srt_file, "vtt": render_vtt_file}
SUBTITLE_FORMATS = ("srt", "vtt")


def output_path(source: Path | str, output_dir: Path, fmt: str) -> Path:
    return output_dir / f"{Path(source).stem}.{fmt}"


def render(transcript: Transcript, fmt: str, *, max_cue_seconds: float = DEFAULT_MAX_CUE_SECONDS) -> str:
    if fmt not in RENDERERS:
        raise ValueError(f"unknown output format {fmt!r}; choose from {', '.join(RENDERERS)}")
    if fmt in SUBTITLE_FORMATS:
        return RENDERERS[fmt](transcript, max_cue_seconds)
    return RENDERERS[fmt](transcript)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
