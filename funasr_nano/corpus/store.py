"""The output folder of a corpus run: one Parquet dataset, one row per input file.

    OUT/transcripts.parquet          the dataset: every file's row once, sorted by path
    OUT/_parts/part-<hash>.parquet   rows of the current run as they were finished (its journal)
    OUT/_files/...                   per-file txt/srt/vtt/json (--formats), as the 03 scripts write them

Why this layout: a reader pointed at the folder (`pandas.read_parquet("OUT")`, `pyarrow.dataset`,
Spark) reads every file below it except those whose name, or the name of a folder on the way,
starts with `_` or `.`; a non-Parquet file it does read is an error. So the journal and the
per-file outputs live in `_` folders and temporary files start with `.`: what a reader of the
folder sees is transcripts.parquet alone, one row per file, during a run and after one.

A part is written to a temporary name and renamed, so a part exists whole or not at all: an
interrupted run leaves only whole parts, and a re-run reads their keys to skip what is done. Its
name is a hash of its rows' keys, so writing the same rows again replaces the file. At the end of
every run, interrupted or not, `consolidate` merges transcripts.parquet and the parts, writes the
result to a temporary name, renames it over transcripts.parquet and only then deletes the parts
it merged. A crash before the rename leaves the old dataset and the parts; a crash after it,
parts whose rows the dataset already holds; the next run merges again and, merging being
idempotent, ends with the same rows. Consolidations take a lock on the folder, so two runs on
one folder never delete parts the other has not merged.

Rows of one key can meet in a merge (a file retried after a failure, parts a crash left behind):
one is kept per key, a row without an error before one with an error, then the one merged first
(transcripts.parquet, then the parts, oldest first). Failed files keep their row in the dataset,
`text` null and `error` saying why, so the dataset has one row per input file. A file changed
since its row was written (another size or mtime) is another key: a run with that file among its
inputs drops the row of the old key when it consolidates.

Folders written before this layout (`OUT/parts/`, `OUT/files/`) are taken over: their parts are
merged and deleted like `_parts/`'s, and `files/` is renamed `_files/`.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from funasr_nano.corpus.inputs import Key

try:
    import fcntl
except ImportError:  # Windows: no lock; one run per folder at a time is then the user's care
    fcntl = None  # type: ignore[assignment]

log = logging.getLogger(__name__)

CONSOLIDATED = "transcripts.parquet"
PARTS = "_parts"
FILES = "_files"
LOCK = ".lock"  # in PARTS
LEGACY_PARTS, LEGACY_FILES = "parts", "files"  # the layout before the folder was one dataset

ROW_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("duration", pa.float64()),       # seconds of audio decoded (null: failed before decoding)
    ("language", pa.string()),        # the language asked for (null: the model decides)
    ("hotwords", pa.string()),
    ("text", pa.string()),            # null on error
    ("segments", pa.string()),        # JSON list, the 03 scripts' `--format json` segments (times in seconds;
                                      # with --diarize each has `speaker`, 0 for the first voice heard)
    ("n_segments", pa.int32()),
    ("n_tokens", pa.int64()),
    ("model", pa.string()),           # the model folder
    ("preset", pa.string()),
    ("timings", pa.string()),         # JSON: seconds per stage, the 03 scripts' `timings`
    ("seconds", pa.float64()),        # wall time the worker spent on the file
    ("error", pa.string()),           # one line naming the file and the problem; null when transcribed
    # --diarize: how many speakers the file has (null without --diarize, and in rows written before the
    # column existed: readers fill it). Who spoke each segment is its `speaker` in `segments`.
    ("speakers", pa.int32()),
])
KEY_COLUMNS = ("path", "size", "mtime_ns")
TIMING_COLUMNS = ("timings", "seconds")  # the only columns that differ between two runs of one corpus


def part_name(keys: Iterable[Key]) -> str:
    digest = hashlib.sha1("\n".join(f"{p}\0{s}\0{m}" for p, s, m in keys).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


class CorpusStore:
    """One output folder: write parts, read the rows back (one per key), consolidate them into the dataset."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.parts = self.folder / PARTS

    @property
    def consolidated(self) -> Path:
        return self.folder / CONSOLIDATED

    @property
    def files(self) -> Path:
        return self.folder / FILES

    def prepare(self) -> None:
        """Create the journal folder; take over a folder of the earlier layout (its parts stay to be merged)."""
        self.parts.mkdir(parents=True, exist_ok=True)
        legacy_files = self.folder / LEGACY_FILES
        if (self.folder / LEGACY_PARTS).is_dir() and legacy_files.is_dir() and not self.files.exists():
            # the earlier layout's per-file outputs: a reader of the folder would fail on them
            os.replace(legacy_files, self.files)
            log.info("%s: moved the per-file outputs from %s/ to %s/", self.folder, LEGACY_FILES, FILES)

    def write_part(self, rows: list[dict]) -> Path:
        """Write rows (dicts of ROW_SCHEMA's columns) as one part, atomically; the part's path."""
        table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
        target = self.parts / part_name((r["path"], r["size"], r["mtime_ns"]) for r in rows)
        _write_atomic(table, target)
        return target

    def part_files(self) -> list[Path]:
        """Whole parts not yet consolidated, oldest first (an interrupted write's temporary file is not one)."""
        files = [p for folder in (self.folder / LEGACY_PARTS, self.parts) if folder.is_dir()
                 for p in folder.iterdir() if p.name.startswith("part-") and p.suffix == ".parquet"]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def rows(self) -> pa.Table:
        """The dataset and the parts not yet merged into it, one row per key, sorted by key."""
        return self._merge(self.part_files())

    def done_keys(self) -> set[Key]:
        """Keys of the files transcribed without error: a re-run skips them (failed files are retried)."""
        table = self.rows()
        ok = table.filter(pc.is_null(table["error"]))
        return set(zip(*(ok[c].to_pylist() for c in KEY_COLUMNS))) if ok.num_rows else set()

    def consolidate(self, current: Mapping[str, Key] | None = None) -> pa.Table:
        """Merge the parts into OUT/transcripts.parquet (replaced atomically), then delete them; the dataset.

        `current`: path -> key of the run's inputs; a row of one of these paths under another key
        (the file changed since) is dropped.
        """
        self.prepare()
        with self._locked():
            for leftover in self.folder.glob(f".{CONSOLIDATED}.*.tmp"):  # a consolidation killed mid-write
                leftover.unlink(missing_ok=True)
            parts = self.part_files()
            table = self._merge(parts)
            if current:
                table = _drop_stale(table, current)
            if parts or table.num_rows != self._dataset_rows():  # else the file already holds these rows
                _write_atomic(table, self.consolidated)
            # only now: a crash before this line leaves parts the next consolidation merges again
            for part in parts:
                part.unlink(missing_ok=True)
            with contextlib.suppress(OSError):  # the earlier layout's folder, if now empty
                (self.folder / LEGACY_PARTS).rmdir()
        return table

    def _merge(self, parts: list[Path]) -> pa.Table:
        tables = [read_rows(p) for p in parts]
        if self.consolidated.is_file():
            tables.insert(0, read_rows(self.consolidated))
        if not tables:
            return ROW_SCHEMA.empty_table()
        return one_row_per_key(pa.concat_tables(tables))

    def _dataset_rows(self) -> int:
        """Rows in transcripts.parquet; -1 when there is none yet (so an empty dataset gets written too)."""
        return pq.ParquetFile(self.consolidated).metadata.num_rows if self.consolidated.is_file() else -1

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        """Hold the folder's lock: waits for another run's consolidation to finish."""
        if fcntl is None:
            yield
            return
        with open(self.parts / LOCK, "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)


def read_rows(path: Path) -> pa.Table:
    """A part or dataset file as ROW_SCHEMA: columns added since it was written (`speakers`) are null, so a
    folder an earlier version wrote merges with this version's parts."""
    table = pq.read_table(path)
    for name in ROW_SCHEMA.names:
        if name not in table.column_names:
            table = table.append_column(ROW_SCHEMA.field(name), pa.nulls(table.num_rows, ROW_SCHEMA.field(name).type))
    return table.select(ROW_SCHEMA.names).cast(ROW_SCHEMA)


def one_row_per_key(table: pa.Table) -> pa.Table:
    """One row per (path, size, mtime): the first without an error, else the first; sorted by key."""
    ok = pc.is_null(table["error"]).to_pylist()
    keys = list(zip(*(table[c].to_pylist() for c in KEY_COLUMNS)))
    chosen: dict[Key, int] = {}
    for index, key in enumerate(keys):
        if key not in chosen or (ok[index] and not ok[chosen[key]]):
            chosen[key] = index
    order = sorted(chosen, key=lambda k: k)
    return table.take(pa.array([chosen[k] for k in order], type=pa.int64()))


def _drop_stale(table: pa.Table, current: Mapping[str, Key]) -> pa.Table:
    """The rows, less those of a path in `current` whose key is not its current one."""
    keys = zip(*(table[c].to_pylist() for c in KEY_COLUMNS))
    keep = [current.get(key[0], key) == key for key in keys]
    return table if all(keep) else table.filter(pa.array(keep, type=pa.bool_()))


def read_corpus(folder: Path | str) -> pa.Table:
    """The rows of a corpus output folder, one per file, sorted by path (parts not yet merged included, so mid-run too).

    After a run this equals `pyarrow.parquet.read_table(folder)`; during one, or after the driver was
    killed, it also holds the rows of the parts the next consolidation will merge.
    """
    return CorpusStore(folder).rows()


def _write_atomic(table: pa.Table, target: Path) -> None:
    # the temporary name starts with "." so that a reader of the folder never sees a file half written
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
