"""`funasr-nano corpus` with faults injected, for the tests of its recovery (tests/test_corpus.py).

    python -m testing.corpus_faults --crash-after 3 -- INPUT... --output-dir OUT [corpus options]
    corpus_faults.main([...corpus options...], crash_after=3)         # in the test's process

Runs the real command (`funasr_nano.corpus.cli.main`) with a pipeline that, through the pipeline's
own parameters (`funasr_nano.corpus.pipeline.run`'s `transcriber` and `on_row`):

- `crash_after=N`: each actor's process exits, as a crash in a native library would, after
  transcribing N files, once per output folder (OUT/.test-crash-hook records that it happened):
  Ray must replace the actor and retry its call, and no file may be lost or written twice;
- `stop_after=N`: the driver stops (KeyboardInterrupt, as Ctrl-C) after receiving N rows: the run
  must save what it has and a re-run must go on from there.

Ray pickles the actor class by reference: its workers import this module, which they find because
Ray puts the driver's current folder (the checkout, where the tests run) on their sys.path.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass
from pathlib import Path

from funasr_nano.corpus import pipeline
from funasr_nano.corpus.cli import main as corpus_main
from funasr_nano.corpus.worker import Transcriber, WorkerSettings

CRASH_MARKER = ".test-crash-hook"


@dataclass(frozen=True)
class CrashSettings(WorkerSettings):
    """The run's WorkerSettings, and when its actors exit."""

    crash_after: int = 0
    crash_marker: str = ""


class CrashingTranscriber(Transcriber):
    """A Transcriber whose process exits after `crash_after` files, unless the marker file says one did already."""

    settings: CrashSettings

    def transcribe(self, record: dict) -> dict:
        row = super().transcribe(record)
        if self.files_done > self.settings.crash_after:
            marker = Path(self.settings.crash_marker)
            if not marker.exists():
                marker.write_text(f"pid {os.getpid()} exited after {self.files_done - 1} files\n")
                os._exit(1)
        return row


def faulty_run(*, crash_after: int = 0, stop_after: int = 0):
    """A stand-in for `pipeline.run` with these faults (0: none of that kind)."""

    def run(files, store, settings: WorkerSettings, plan, targets=None):  # noqa: ANN001 - pipeline.run's
        transcriber: type[Transcriber] = Transcriber
        if crash_after:
            fields = {f.name: getattr(settings, f.name) for f in dataclasses.fields(settings)}
            settings = CrashSettings(**fields, crash_after=crash_after, crash_marker=str(store.folder / CRASH_MARKER))
            transcriber = CrashingTranscriber
        received = 0

        def on_row(row: dict) -> None:
            nonlocal received
            received += 1
            if stop_after and received >= stop_after:
                raise KeyboardInterrupt

        return pipeline.run(files, store, settings, plan, targets, transcriber=transcriber, on_row=on_row)

    return run


def main(argv: list[str] | None = None, *, crash_after: int = 0, stop_after: int = 0) -> int:
    """The corpus command's exit code for `argv` (its own arguments), run with these faults."""
    return corpus_main(argv, run=faulty_run(crash_after=crash_after, stop_after=stop_after))


def _cli(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testing.corpus_faults", description=__doc__.splitlines()[0])
    parser.add_argument("--crash-after", type=int, default=0, metavar="N", help="each actor exits after N files")
    parser.add_argument("--stop-after", type=int, default=0, metavar="N", help="the driver stops after N rows")
    parser.add_argument("corpus", nargs=argparse.REMAINDER, help="the corpus command's arguments (after --)")
    args = parser.parse_args(argv)
    rest = args.corpus[1:] if args.corpus[:1] == ["--"] else args.corpus
    return main(rest, crash_after=args.crash_after, stop_after=args.stop_after)


if __name__ == "__main__":
    raise SystemExit(_cli())
