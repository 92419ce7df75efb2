"""The output folder of a corpus run: Parquet parts written atomically, and one consolidated file.

    OUT/parts/part-<hash>.parquet   rows as they were finished (the run's journal; never edited)
    OUT/transcripts.parquet         every file's row once, sorted by path (rewritten at the end)
    OUT/files/...                   per-file txt/srt/vtt/json (--formats), as the 03 scripts write them

A part is written to a temporary name and renamed, so a part either exists whole or not at all:
an interrupted run leaves only whole parts, and a re-run reads their keys to skip what is done.
Its name is a hash of its rows' keys, so writing the same rows again replaces the file instead of
adding one. Rows of one key can still appear in two parts (a file retried after a failure, two
runs racing on one folder): readers keep one per key, a row without an error before one with an
error, then the part written first; the consolidated file is that view.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterable
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from common.corpus.inputs import Key

PARTS = "parts"
CONSOLIDATED = "transcripts.parquet"
FILES = "files"

ROW_SCHEMA = pa.schema([
    ("path", pa.string()),
    ("size", pa.int64()),
    ("mtime_ns", pa.int64()),
    ("duration", pa.float64()),       # seconds of audio decoded (null: failed before decoding)
    ("language", pa.string()),        # the language asked for (null: the model decides)
    ("hotwords", pa.string()),
    ("text", pa.string()),            # null on error
    ("segments", pa.string()),        # JSON list, the 03 scripts' `--format json` segments (times in seconds)
    ("n_segments", pa.int32()),
    ("n_tokens", pa.int64()),
    ("model", pa.string()),           # the model folder
    ("preset", pa.string()),
    ("timings", pa.string()),         # JSON: seconds per stage, the 03 scripts' `timings`
    ("seconds", pa.float64()),        # wall time the worker spent on the file
    ("error", pa.string()),           # one line naming the file and the problem; null when transcribed
])
KEY_COLUMNS = ("path", "size", "mtime_ns")
TIMING_COLUMNS = ("timings", "seconds")  # the only columns that differ between two runs of one corpus


def part_name(keys: Iterable[Key]) -> str:
    digest = hashlib.sha1("\n".join(f"{p}\0{s}\0{m}" for p, s, m in keys).encode()).hexdigest()[:20]
    return f"part-{digest}.parquet"


class CorpusStore:
    """One output folder: write parts, read the rows back (one per key), consolidate."""

    def __init__(self, folder: Path | str) -> None:
        self.folder = Path(folder)
        self.parts = self.folder / PARTS

    def prepare(self) -> None:
        self.parts.mkdir(parents=True, exist_ok=True)

    def write_part(self, rows: list[dict]) -> Path:
        """Write rows (dicts of ROW_SCHEMA's columns) as one part, atomically; the part's path."""
        table = pa.Table.from_pylist(rows, schema=ROW_SCHEMA)
        target = self.parts / part_name((r["path"], r["size"], r["mtime_ns"]) for r in rows)
        _write_atomic(table, target)
        return target

    def part_files(self) -> list[Path]:
        """Whole parts, oldest first (temporary files of an interrupted write are not parts)."""
        if not self.parts.is_dir():
            return []
        files = [p for p in self.parts.iterdir() if p.name.startswith("part-") and p.suffix == ".parquet"]
        return sorted(files, key=lambda p: (p.stat().st_mtime_ns, p.name))

    def rows(self) -> pa.Table:
        """Every row of every part and of the consolidated file, one per key, sorted by path."""
        tables = [pq.read_table(p, schema=ROW_SCHEMA) for p in self.part_files()]
        if self.consolidated.is_file():  # parts may have been deleted by hand after consolidating
            tables.insert(0, pq.read_table(self.consolidated, schema=ROW_SCHEMA))
        if not tables:
            return ROW_SCHEMA.empty_table()
        return one_row_per_key(pa.concat_tables(tables))

    def done_keys(self) -> set[Key]:
        """Keys of the files transcribed without error: a re-run skips them (failed files are retried)."""
        table = self.rows()
        ok = table.filter(pc.is_null(table["error"]))
        return set(zip(*(ok[c].to_pylist() for c in KEY_COLUMNS))) if ok.num_rows else set()

    @property
    def consolidated(self) -> Path:
        return self.folder / CONSOLIDATED

    def consolidate(self) -> pa.Table:
        """Write the one-row-per-key view to OUT/transcripts.parquet (atomically); that view."""
        table = self.rows()
        _write_atomic(table, self.consolidated)
        return table


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


def read_corpus(folder: Path | str) -> pa.Table:
    """The rows of a corpus output folder, one per file, sorted by path (parts included, so mid-run too)."""
    return CorpusStore(folder).rows()


def _write_atomic(table: pa.Table, target: Path) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    try:
        pq.write_table(table, tmp)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
