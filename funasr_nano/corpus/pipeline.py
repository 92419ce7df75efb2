"""The Ray Data pipeline of a corpus run: files -> transcription actors -> parts on the driver.

    from_items(files not yet done)          one block per file (up to MAX_BLOCKS), so actors share
        |                                   the work evenly and a retry redoes one file
    map_batches(Transcriber, concurrency=(min, max), num_cpus=threads, batch_size=1)
        |                                   one Engine per actor (funasr_nano/corpus/worker.py); Ray
        |                                   restarts a dead actor and retries its call
    iter_batches() on the driver            rows written as Parquet parts (funasr_nano/corpus/store.py)
                                            and per-file outputs, at least every flush_seconds
    CorpusStore.consolidate()               the parts merged into OUT/transcripts.parquet, the
                                            folder's one dataset (interrupted runs too)

Execution streams: Ray Data's backpressure keeps only a few rows per actor in flight, whatever the
corpus size, and a file is decoded inside its actor in 60 s blocks. The driver writes because the
rows are small (text, JSON) and that way the output folder only has to exist on the driver's
machine, not on shared storage; the per-file outputs are rendered by the actors and written here.

Resumable: the driver first reads the keys (path, size, mtime) already in the output folder (the
dataset and any parts a killed run left) and sends only the other files to Ray. An interrupted
run flushes the rows it has received and consolidates them, so a re-run redoes only the files
that were in flight. Rows of one key written twice (a retry, a race) are reduced to one when
merged (`CorpusStore.consolidate`), so the final dataset is the same as an uninterrupted run's,
apart from the timing columns.
"""

from __future__ import annotations

import json
import logging
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from funasr_nano.corpus.inputs import AudioFile, FileState, Key
from funasr_nano.corpus.store import FILES, ROW_SCHEMA, CorpusStore
from funasr_nano.corpus.worker import Transcriber, WorkerSettings

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
MAX_BLOCKS = 10_000  # above this many files, blocks hold several files (a retry then redoes a block)


@dataclass(frozen=True)
class Plan:
    """How the run is spread over the cluster, and how often rows are saved."""

    min_actors: int = 1
    max_actors: int = 1
    cpus_per_actor: float = 2.0
    gpus_per_actor: float = 0.0
    max_task_retries: int = 3  # calls retried after their actor died; then the file gets an error row
    rows_per_part: int = 64
    flush_seconds: float = 30.0  # a part is written at least this often while rows arrive
    progress: bool = True


@dataclass
class Summary:
    """What a run did; `line()` is the final line the command prints."""

    files: int = 0  # in the dataset after the run
    skipped: int = 0  # already done before the run
    transcribed: int = 0  # rows received in this run (errors included)
    failed: int = 0  # rows of the dataset with an error
    audio_seconds: float = 0.0  # decoded in this run
    wall_seconds: float = 0.0
    interrupted: bool = False
    dataset: Path | None = None

    def line(self) -> str:
        hours = self.audio_seconds / 3600
        rate = hours / (self.wall_seconds / 3600) if self.wall_seconds > 0 else 0.0
        state = "interrupted (re-run the same command to go on)" if self.interrupted else "done"
        return (f"corpus {state}: {self.files} files ({self.transcribed} this run, {self.skipped} already done), "
                f"{self.failed} failed, {hours:.3f} h of audio this run, wall {self.wall_seconds:.1f} s, "
                f"{rate:.1f} audio hours per wall hour -> {self.dataset}")


def connect(address: str | None = None, num_cpus: int | None = None) -> None:
    """Join the cluster at `address` (or RAY_ADDRESS), or start a local one of `num_cpus` CPUs (all: None).

    The `funasr_nano` package travels to the workers in the runtime environment (`py_modules`), so a
    cluster's nodes need the Python dependencies installed but not this project's code; the model
    folder, too large for a runtime environment, must be at the same path on every node.
    Does nothing when Ray is already initialized (a test's cluster, a notebook's).
    """
    import os

    import ray

    if ray.is_initialized():
        return
    runtime_env = {"py_modules": [str(ROOT / "funasr_nano")]}
    if address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=address, runtime_env=runtime_env)
    else:
        ray.init(num_cpus=num_cpus, runtime_env=runtime_env)


def run(files: list[AudioFile], store: CorpusStore, settings: WorkerSettings, plan: Plan,
        targets: dict[str, dict[str, Path]] | None = None, *, transcriber: type[Transcriber] = Transcriber,
        on_row: Callable[[dict], None] | None = None) -> Summary:
    """Transcribe the files not yet in `store`, write their rows, consolidate them into its dataset; the summary.

    `targets[path][fmt]`: where each file's rendered outputs go. KeyboardInterrupt (Ctrl-C, or raised
    by `on_row`) is caught: what has arrived is written, and the summary says `interrupted`.
    `transcriber`: the actor class, made with `(settings,)` on the workers (Ray pickles it by
    reference: its module must be importable there). `on_row(row)`: called on the driver for each
    row once it is collected. Both are for fault injection (testing/corpus_faults.py: an actor that
    dies mid-run, a driver stopped after some rows).
    """
    t0 = time.perf_counter()
    store.prepare()
    states = [FileState.of(f) for f in files]
    done = store.done_keys()
    todo = [s for s in states if s.key not in done]
    summary = Summary(skipped=len(states) - len(todo))
    writer = _RowWriter(store, targets or {}, plan)
    if todo:
        try:
            for batch in _dataset(todo, settings, plan, transcriber).iter_batches(batch_size=None,
                                                                                   batch_format="pyarrow"):
                rows = batch.to_pylist()
                writer.add(rows)
                for row in rows if on_row is not None else ():
                    on_row(row)
        except KeyboardInterrupt:
            summary.interrupted = True
        finally:
            writer.flush()
        if not summary.interrupted:
            _account_for_lost(todo, store, writer, plan)
    summary.transcribed = writer.received
    summary.audio_seconds = writer.audio_seconds
    # the files' current keys: a row left from before a file changed is dropped, one row per input stays
    table = store.consolidate({s.file.path: s.key for s in states})
    summary.dataset = store.consolidated
    summary.files = table.num_rows
    summary.failed = table.num_rows - table["error"].null_count
    summary.wall_seconds = time.perf_counter() - t0
    return summary


def _dataset(todo: list[FileState], settings: WorkerSettings, plan: Plan, transcriber: type[Transcriber]):
    import ray

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = plan.progress
    # A call whose actor died more than max_task_retries times fails its block; the run goes on and
    # `_account_for_lost` gives those files an error row, instead of one file stopping the corpus.
    context.max_errored_blocks = -1
    records = [{"path": s.file.path, "size": s.size, "mtime_ns": s.mtime_ns, "language": s.file.language,
                "hotwords": s.file.hotwords} for s in todo]
    ds = ray.data.from_items(records, override_num_blocks=min(len(records), MAX_BLOCKS))
    # min..max actors (Ray 2.51+ spells `concurrency=(min, max)` this way); two calls queued per actor
    # keep it busy while a finished row travels, and no more, so long files spread over the actors
    pool = ray.data.ActorPoolStrategy(min_size=plan.min_actors, max_size=plan.max_actors,
                                      max_tasks_in_flight_per_actor=2)
    with warnings.catch_warnings():
        # Ray Data documents max_restarts/max_task_retries as map_batches' extra keyword arguments and
        # warns that these "ray_remote_args" go in Ray 2.64; after that its defaults (-1: restart and
        # retry for ever) apply, and a file that kills its worker every time is retried for ever.
        warnings.filterwarnings("ignore", message=".*ray_remote_args.*", category=DeprecationWarning)
        return ds.map_batches(
            transcriber, fn_constructor_args=(settings,), batch_size=1, batch_format="pyarrow", compute=pool,
            num_cpus=plan.cpus_per_actor, num_gpus=plan.gpus_per_actor or None,
            max_restarts=-1, max_task_retries=plan.max_task_retries,
        )


class _RowWriter:
    """Collects rows on the driver; writes each file's outputs, then parts of rows_per_part rows."""

    def __init__(self, store: CorpusStore, targets: dict[str, dict[str, Path]], plan: Plan) -> None:
        self.store, self.targets, self.plan = store, targets, plan
        self.pending: list[dict] = []
        self.first_pending = 0.0
        self.received = 0
        self.audio_seconds = 0.0

    def add(self, rows: list[dict]) -> None:
        for row in rows:
            self._write_outputs(row)
            self.received += 1
            self.audio_seconds += row["duration"] or 0.0
            if row["error"]:
                log.warning("%s", row["error"])
            if not self.pending:
                self.first_pending = time.monotonic()
            self.pending.append({name: row[name] for name in ROW_SCHEMA.names})
        if (len(self.pending) >= self.plan.rows_per_part
                or time.monotonic() - self.first_pending >= self.plan.flush_seconds):
            self.flush()

    def flush(self) -> None:
        if self.pending:
            self.store.write_part(self.pending)
            self.pending = []

    def _write_outputs(self, row: dict) -> None:
        """A file's txt/srt/vtt/json, written before its row so that a row promises its files exist."""
        from funasr_nano.output.writers import WriteError, write_atomic

        rendered = json.loads(row.get("outputs") or "{}")
        for fmt, text in rendered.items():
            try:
                write_atomic(self.targets[row["path"]][fmt], text)
            except WriteError as exc:
                row["error"] = str(exc)


def _account_for_lost(todo: list[FileState], store: CorpusStore, writer: _RowWriter, plan: Plan) -> None:
    """Give an error row to every file sent to Ray that has none now (its calls died every time)."""
    present: set[Key] = set(zip(*(store.rows()[c].to_pylist() for c in ("path", "size", "mtime_ns"))))
    lost = [s for s in todo if s.key not in present]
    for state in lost:
        row = dict.fromkeys(ROW_SCHEMA.names)
        row.update(path=state.file.path, size=state.size, mtime_ns=state.mtime_ns,
                   error=f"{state.file.path}: no result: the worker process died on each of "
                         f"{plan.max_task_retries + 1} tries (see the Ray logs)")
        writer.add([row])
    writer.flush()


def output_targets(files: list[AudioFile], folder: Path, formats: tuple[str, ...]) -> dict[str, dict[str, Path]]:
    """Where each file's outputs go, under OUT/_files/, named as the 03 scripts' --output-dir names them.

    Computed from every input of the run (done or not), so the names do not change when a run resumes.
    """
    from funasr_nano.output.writers import output_paths

    paths = [f.path for f in files]
    targets: dict[str, dict[str, Path]] = {p: {} for p in paths}
    for fmt in formats:
        for path, target in zip(paths, output_paths(paths, folder / FILES, fmt)):
            targets[path][fmt] = target
    return targets
