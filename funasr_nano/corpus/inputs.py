"""The files of a corpus run: folders, globs and manifests expanded into one list, each with its key.

An input names a folder (every audio file under it, recursively, by extension), a glob
(`"data/**/*.flac"`, quoted so the shell leaves it alone), an audio file, or a manifest:
`.txt` (one path per line, `#` comments), `.csv` or `.jsonl` with a `path` column and optional
`language` and `hotwords` columns for that file. Relative paths in a manifest are relative to
the manifest's folder. Paths become absolute, so every node of a cluster reads the same file.

A file is identified by its key, (path, size, mtime): a re-run skips files whose key already has
a row, and a file changed since (new size or mtime) is transcribed again.
"""

from __future__ import annotations

import csv
import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

# What the audio loader reads (libsndfile, then FFmpeg through PyAV); a folder is searched for these.
AUDIO_EXTENSIONS = frozenset({
    ".wav", ".flac", ".mp3", ".ogg", ".oga", ".opus", ".m4a", ".mp4", ".aac", ".webm", ".wma", ".amr",
    ".aif", ".aiff", ".caf", ".mka", ".mkv", ".mov", ".pcm",
})
MANIFEST_SUFFIXES = (".txt", ".csv", ".jsonl")
GLOB_CHARS = frozenset("*?[")

Key = tuple[str, int, int]  # (absolute path, size in bytes, mtime in ns)


class InputError(ValueError):
    """An input that names nothing usable (no such path, a glob matching nothing, a bad manifest); one line."""


@dataclass(frozen=True)
class AudioFile:
    """One file to transcribe, with its manifest's per-file prompt choices (None: the run's options)."""

    path: str  # absolute
    language: str | None = None
    hotwords: str | None = None


@dataclass(frozen=True)
class FileState:
    """A file's size and mtime when the run starts (-1, -1: it could not be read, its row says why)."""

    file: AudioFile
    size: int
    mtime_ns: int

    @property
    def key(self) -> Key:
        return (self.file.path, self.size, self.mtime_ns)

    @classmethod
    def of(cls, file: AudioFile) -> FileState:
        try:
            st = os.stat(file.path)
        except OSError:
            return cls(file, -1, -1)
        return cls(file, st.st_size, st.st_mtime_ns)


def collect_inputs(specs: Iterable[str]) -> list[AudioFile]:
    """Every file the inputs name, in order, each path once (the first mention's manifest options win)."""
    seen: set[str] = set()
    out: list[AudioFile] = []
    for spec in specs:
        for item in _expand(spec):
            if item.path not in seen:
                seen.add(item.path)
                out.append(item)
    return out


def _expand(spec: str) -> Iterator[AudioFile]:
    path = Path(spec)
    if path.is_dir():
        found = sorted(p for p in path.rglob("*") if p.suffix.lower() in AUDIO_EXTENSIONS and p.is_file())
        if not found:
            raise InputError(f"{spec}: no audio files in this folder (extensions: "
                             f"{', '.join(sorted(AUDIO_EXTENSIONS))})")
        yield from (AudioFile(os.path.abspath(p)) for p in found)
    elif path.is_file() and path.suffix.lower() in MANIFEST_SUFFIXES:
        yield from _manifest(path)
    elif path.exists():
        yield AudioFile(os.path.abspath(path))
    elif GLOB_CHARS & set(spec):
        matches = sorted(m for m in glob.glob(spec, recursive=True) if os.path.isfile(m))
        if not matches:
            raise InputError(f"{spec}: the pattern matches no file")
        yield from (AudioFile(os.path.abspath(m)) for m in matches)
    else:  # a missing file is that file's failure (an error row), as in the 03 scripts, not the run's
        yield AudioFile(os.path.abspath(path))


def _manifest(path: Path) -> Iterator[AudioFile]:
    """The files of a .txt, .csv or .jsonl manifest; InputError names the manifest and the line."""
    base = path.parent
    suffix = path.suffix.lower()
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"{path}: cannot read the manifest ({e})") from e
    if suffix == ".txt":
        records: Iterable[tuple[int, dict]] = (
            (n, {"path": line.strip()}) for n, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#"))
    elif suffix == ".csv":
        reader = csv.DictReader(text.splitlines())
        if "path" not in (reader.fieldnames or []):
            raise InputError(f"{path}: a CSV manifest needs a 'path' column (found: {reader.fieldnames})")
        records = enumerate(reader, 2)
    else:
        records = _jsonl_records(path, text)
    count = 0
    for line, record in records:
        value = record.get("path")
        if not isinstance(value, str) or not value.strip():
            raise InputError(f"{path}:{line}: no path")
        count += 1
        yield AudioFile(os.path.abspath(base / value.strip()), _optional(record, "language"),
                        _optional(record, "hotwords"))
    if count == 0:
        raise InputError(f"{path}: the manifest lists no file")


def _jsonl_records(path: Path, text: str) -> Iterator[tuple[int, dict]]:
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise InputError(f"{path}:{n}: not JSON ({e.msg})") from e
        if not isinstance(record, dict):
            raise InputError(f"{path}:{n}: a JSON object with a 'path' is needed")
        yield n, record


def _optional(record: dict, name: str) -> str | None:
    value = record.get(name)
    return str(value).strip() or None if value is not None else None
