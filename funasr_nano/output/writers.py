"""Transcript files: txt, json and subtitles (srt, vtt), written atomically.

A file is written to a temporary name in the target folder and renamed over the
final name, so an interrupted run never leaves a half-written transcript and a
re-run can trust that an existing output file is complete. It gets the mode any
new file gets under the process's umask (0644 usually), not mkstemp's private 0600.

Two runs writing the same folder do not coordinate: both transcribe every input and
the last rename wins, each file complete either way.
"""

from __future__ import annotations

import errno
import json
import os
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path

from funasr_nano.output.results import Transcript
from funasr_nano.output.subtitles import (
    DEFAULT_MAX_CUE_SECONDS,
    render_srt,
    render_vtt,
    speaker_name,
    transcript_cues,
)

FORMATS = ("txt", "json", "srt", "vtt")


def render_txt(transcript: Transcript) -> str:
    """The text; with diarization, one paragraph per speaker turn, each starting `Speaker N: `."""
    if transcript.speakers is None:
        return transcript.text + "\n"
    return "\n\n".join(f"{speaker_name(speaker)}: {text}" for speaker, text in speaker_turn_texts(transcript)) + "\n"


def speaker_turn_texts(transcript: Transcript) -> list[tuple[int, str]]:
    """(speaker, text) per turn: consecutive sentences (or segments without sentences) of one speaker joined."""
    from funasr_nano.engine import join_texts

    turns: list[tuple[int, list[str]]] = []
    for segment in transcript.segments:
        units = [(s.speaker, s.text) for s in segment.sentences if s.speaker is not None]
        if not units:
            units = [(segment.speaker, segment.text)]
        for speaker, text in units:
            if not text.strip() or speaker is None:
                continue
            if turns and turns[-1][0] == speaker:
                turns[-1][1].append(text)
            else:
                turns.append((speaker, [text]))
    return [(speaker, join_texts(parts)) for speaker, parts in turns]


def render_json(transcript: Transcript, *, compact: bool = False) -> str:
    """Indented JSON; `compact`: on one line, a JSON Lines record (several inputs on one stream)."""
    return json.dumps(transcript.to_dict(), ensure_ascii=False, indent=None if compact else 2) + "\n"


def render_srt_file(transcript: Transcript, max_cue_seconds: float = DEFAULT_MAX_CUE_SECONDS) -> str:
    return render_srt(transcript_cues(transcript.segments, max_cue_seconds))


def render_vtt_file(transcript: Transcript, max_cue_seconds: float = DEFAULT_MAX_CUE_SECONDS) -> str:
    return render_vtt(transcript_cues(transcript.segments, max_cue_seconds))


RENDERERS: dict[str, Callable[[Transcript], str]] = {"txt": render_txt, "json": render_json,
                                                     "srt": render_srt_file, "vtt": render_vtt_file}
SUBTITLE_FORMATS = ("srt", "vtt")


class WriteError(OSError):
    """An output file or folder that cannot be written; the message names it: ``"<path>: <problem>"``."""

    def __init__(self, path: Path | str, problem: str) -> None:
        super().__init__(f"{path}: {problem}")


def output_path(source: Path | str, output_dir: Path, fmt: str) -> Path:
    """Where one input's transcript goes when it is the only input: ``<output_dir>/<stem>.<fmt>``."""
    return output_dir / f"{Path(source).stem}.{fmt}"


def output_paths(sources: Sequence[Path | str], output_dir: Path, fmt: str) -> list[Path]:
    """One output file per input, no two alike, in input order.

    Inputs from several folders keep their folders relative to the folder all of them share
    (``a.mp3`` and ``sub/a.mp3`` -> ``a.txt`` and ``sub/a.txt``); inputs of one folder whose
    names differ only in the extension keep it (``a.mp3``, ``a.wav`` -> ``a.mp3.txt``,
    ``a.wav.txt``). Names that still clash (on a case-insensitive file system too) get ``-2``,
    ``-3``, ... So every input keeps its own transcript, whatever the set of inputs.
    """
    paths = [Path(os.path.abspath(s)) for s in sources]
    try:
        base = Path(os.path.commonpath([p.parent for p in paths])) if paths else Path()
    except ValueError:  # different drives (Windows): no common folder, names stay flat
        base = None
    folders = [p.parent.relative_to(base) if base is not None else Path() for p in paths]

    def key(folder: Path, name: str) -> str:
        return str(folder / name).casefold()

    stems: dict[str, int] = {}
    for folder, p in zip(folders, paths):
        stems[key(folder, p.stem)] = stems.get(key(folder, p.stem), 0) + 1
    taken: set[str] = set()
    out = []
    for folder, p in zip(folders, paths):
        name = p.stem if stems[key(folder, p.stem)] == 1 else p.name
        candidate, n = f"{name}.{fmt}", 1
        while key(folder, candidate) in taken:
            n += 1
            candidate = f"{name}-{n}.{fmt}"
        taken.add(key(folder, candidate))
        out.append(output_dir / folder / candidate)
    return out


def check_writable(folder: Path) -> None:
    """Create `folder` if needed and prove a file can be written there, before any work is done.

    Raises WriteError naming the folder (not a temporary file) and the reason.
    """
    folder = Path(folder)
    if folder.exists() and not folder.is_dir():
        raise WriteError(folder, "exists and is not a folder")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except FileExistsError as e:  # a file where a folder of the path should be
        raise WriteError(folder, "cannot create the folder (a file stands in its path)") from e
    except OSError as e:
        problem = "a file stands in its path" if e.errno == errno.ENOTDIR else (e.strerror or str(e))
        raise WriteError(folder, f"cannot create the folder ({problem})") from e
    try:
        fd, probe = tempfile.mkstemp(prefix=".write-test.", dir=folder)
    except OSError as e:
        raise WriteError(folder, f"cannot write there ({e.strerror or e})") from e
    os.close(fd)
    os.unlink(probe)


def _umask_file_mode() -> int:
    """The mode open() gives a new file under this process's umask (0o644 with umask 022).

    Read once, at import: reading the umask means setting it, which must not race with other threads.
    """
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


NEW_FILE_MODE = _umask_file_mode()


def render(transcript: Transcript, fmt: str, *, max_cue_seconds: float = DEFAULT_MAX_CUE_SECONDS) -> str:
    if fmt not in RENDERERS:
        raise ValueError(f"unknown output format {fmt!r}; choose from {', '.join(RENDERERS)}")
    if fmt in SUBTITLE_FORMATS:
        return RENDERERS[fmt](transcript, max_cue_seconds)
    return RENDERERS[fmt](transcript)


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary file in the same folder and an atomic rename.

    The file gets the umask's usual mode. Errors are WriteError naming `path`, never the temporary.
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    except OSError as e:
        raise WriteError(path, f"cannot write ({e.strerror or e})") from e
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            os.chmod(tmp, NEW_FILE_MODE)
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        if isinstance(e, OSError) and not isinstance(e, WriteError):
            raise WriteError(path, f"cannot write ({e.strerror or e})") from e
        raise
