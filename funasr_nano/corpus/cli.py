"""`funasr-nano corpus` and 07_transcribe_corpus.py: transcribe's model options, plus inputs, output and Ray.

Checked before Ray starts: the options, the inputs (folders, globs, manifests), the model files
(exported on first use into the default folder, as the 03 scripts do) and the output folder. Exit
codes as the 03 scripts: 0 every file transcribed, 1 some file failed (its row says why), 2 the
options, the model folder or the output folder, 130 interrupted (re-run to go on).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
from collections.abc import Callable

from funasr_nano.cli import (
    EXIT_FAILED_INPUTS,
    EXIT_OK,
    SetupError,
    check_folders,
    engine_config,
    hotword_chars,
    log_to_stderr,
    one_line,
    prompt_options,
    transcribe_options,
)
from funasr_nano.native_lines import RAY_ACTOR_ARGUMENTS, lines_dropped
from funasr_nano.options import (
    DEFAULT_MODEL_DIR,
    DEFAULT_PRESET,
    EXIT_SETUP,
    OneLineParser,
    add_deprecated_alias,
    add_diarize_options,
    add_format_option,
    add_model_options,
    add_output_dir_option,
    add_preset_option,
    add_quiet_option,
    add_transcription_options,
    examples,
    positive,
)
from funasr_nano.paths import CONSOLE_SCRIPT
from funasr_nano.presets import PRESETS

PROG = f"{CONSOLE_SCRIPT} corpus"
EXIT_INTERRUPTED = 130


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    run = f"python {prog}" if prog.endswith(".py") else prog
    epilog = examples(
        f"{run} recordings/ --output-dir out/",
        f'{run} "archive/**/*.mp3" manifest.csv --output-dir out/ --format txt,srt',
        f"RAY_ADDRESS=auto {run} /data/lectures --output-dir /data/out --threads 4",
        notes="""\
Output: out/ is one Parquet dataset (pandas.read_parquet("out/")): out/transcripts.parquet,
one row per file (path, size, mtime_ns, duration, text, segments as JSON with times, model,
preset, timings, error: set for a file that failed; with --diarize, speakers and a speaker per
segment). out/_parts/ holds the rows of a run in
progress, merged into transcripts.parquet when it ends; out/_files/ the per-file outputs of
--format (readers of the folder skip names starting with _). Re-running the same command on
the same --output-dir skips the files already transcribed (same path, size and mtime) and retries
the failed ones. A manifest is .txt (one path per line), or .csv/.jsonl with a path column
and optional language and hotwords columns.""")
    p = OneLineParser(prog=prog, description="Transcribe a corpus with Fun-ASR-Nano on Ray Data, "
                      "locally or on a cluster; resumable.", epilog=epilog)
    p.add_argument("inputs", nargs="+", metavar="INPUT",
                   help="audio file, folder (searched recursively), glob pattern, or manifest (.txt/.csv/.jsonl)")
    output = add_output_dir_option(p, "output folder, created if needed: the Parquet dataset and _files/ "
                                      "(required; no default)")
    add_deprecated_alias(p, "--output", output)
    add_preset_option(p, DEFAULT_PRESET)
    fmt = add_format_option(p, None, "also write per-file outputs under DIR/_files/: one format or a "
                                     "comma-separated list of txt, json, srt, vtt (default: none)")
    add_deprecated_alias(p, "--formats", fmt)
    add_model_options(p)
    add_transcription_options(p)
    add_diarize_options(p)
    ray_group = p.add_argument_group("Ray")
    ray_group.add_argument("--address", default=None,
                           help="join this Ray cluster ('auto': the one on this node; default: RAY_ADDRESS, "
                                "else a local cluster of this machine)")
    ray_group.add_argument("--num-cpus", type=positive(int), default=None,
                           help="CPUs of the local cluster (default: all; ignored with a cluster)")
    ray_group.add_argument("--min-actors", type=positive(int), default=1, help="transcription actors kept (default: 1)")
    ray_group.add_argument("--max-actors", type=positive(int), default=None,
                           help="most transcription actors (default: the cluster's CPUs / --threads)")
    ray_group.add_argument("--gpus-per-actor", type=float, default=None,
                           help="GPUs each actor reserves (default: 1 with --preset gpu, else 0)")
    ray_group.add_argument("--max-retries", type=int, default=3,
                           help="retries of a file whose worker process died (default: 3)")
    ray_group.add_argument("--rows-per-part", type=positive(int), default=64,
                           help="rows per Parquet part file (default: 64; a part is also written every 30 s)")
    add_quiet_option(p, "no progress bars")
    p.add_argument("--verbose", action="store_true", help="Ray's own start-up and execution logs too")
    return p


def main(argv: list[str] | None = None, *, prog: str = PROG, run: Callable | None = None) -> int:
    """Transcribe the corpus: 0 every file done, 1 some failed (their rows say why), 2 set-up, 130 interrupted.

    `run`: what runs the pipeline once everything is checked, called as `funasr_nano.corpus.pipeline.run`
    (the default) is; testing/corpus_faults.py passes one that injects faults.
    """
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    if args.output_dir is None:  # not argparse's `required`: the deprecated --output may give it instead
        parser.error("the following arguments are required: --output-dir")
    log_to_stderr()
    try:
        return _run(args, run)
    except SetupError as exc:
        print(f"error: {exc}", file=sys.stderr, flush=True)
        return EXIT_SETUP


def _run(args: argparse.Namespace, run: Callable | None) -> int:
    from funasr_nano.corpus import pipeline
    from funasr_nano.corpus.inputs import InputError, collect_inputs
    from funasr_nano.corpus.pipeline import connect, output_targets
    from funasr_nano.corpus.store import CorpusStore
    from funasr_nano.corpus.worker import WorkerSettings
    from funasr_nano.output.writers import WriteError, check_writable

    formats = args.format or ()
    prompt_options(args)  # a language no checkpoint takes fails here; each worker checks against its model
    try:
        files = collect_inputs(args.inputs)
    except InputError as exc:
        raise SetupError(str(exc)) from exc
    try:
        check_writable(args.output_dir)
    except WriteError as exc:
        raise SetupError(str(exc)) from exc

    check_folders(args)
    args.model_dir = (args.model_dir or DEFAULT_MODEL_DIR).resolve()
    # every node reads the same files: absolute paths, checked (and exported on first use) here; the KV cache
    # holds the longest hotwords of any input
    config = engine_config(args.preset, args, max_hotword_chars=max(
        hotword_chars(h) for h in [args.hotwords, *(f.hotwords for f in files)]))
    config = dataclasses.replace(config, encoder_path=config.encoder_file.resolve(),
                                 gguf_path=config.gguf_file.resolve())
    # the language again, now that the model folder holds an export: its checkpoint's languages; the speaker
    # counts (--min-speakers above --max-speakers, --speakers with either: one line)
    options = transcribe_options(args, prompt_options(args), timestamps=True)
    _check_speakers(args)

    output = args.output_dir.resolve()
    settings = WorkerSettings(engine=config, options=options, language=args.language, hotwords=args.hotwords,
                              formats=formats, max_cue_seconds=args.max_cue_seconds)
    _connect(connect, args)
    plan = _plan(args)
    # Ray's core worker logs one `E ... core_worker.cc` line per actor about its constructor arguments being in
    # the object store with restarts on: Ray Data always puts them there, and the restarts are ours to keep.
    quiet_ray = contextlib.nullcontext() if args.verbose else lines_dropped(RAY_ACTOR_ARGUMENTS)
    with quiet_ray:
        summary = (run or pipeline.run)(files, CorpusStore(output), settings, plan,
                                        output_targets(files, output, formats))
    print(summary.line(), flush=True)
    if summary.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_FAILED_INPUTS if summary.failed else EXIT_OK


def _check_speakers(args: argparse.Namespace) -> None:
    """--diarize (or a speaker count): CAM++ in the model folder and the diarize extra, checked here, before
    Ray starts: each actor would otherwise fail every file with the same error."""
    from funasr_nano import requirements
    from funasr_nano.cli import _diarize
    from funasr_nano.speakers.embeddings import SPK_MODEL_FILE, find_speaker_model

    if not _diarize(args):
        return
    if find_speaker_model(args.model_dir) is None:
        raise SetupError(f"{args.model_dir}/{SPK_MODEL_FILE}: not found: --diarize needs CAM++ (get it with "
                         "`funasr-nano export --spk-release-dir DIR`, which downloads "
                         "iic/speech_campplus_sv_zh-cn_16k-common into DIR)")
    try:
        requirements.check(PROG, "diarize")
    except requirements.MissingRequirement as exc:
        raise SetupError(str(exc)) from exc


def _connect(connect, args: argparse.Namespace) -> None:
    """Join the cluster (or start a local one); no cluster at --address is one line, not Ray's traceback.

    Without --verbose, Ray's start-up logs (none about the corpus) stay in Ray's log files: Ray is
    initialized here with its logging at ERROR (`connect` then finds it initialized and keeps it),
    and Ray Data's execution logs (which it configures itself when a dataset runs) at ERROR through
    its RAY_DATA_LOG_LEVEL; the progress shown is ours.
    """
    if not args.verbose:
        os.environ.setdefault("RAY_DATA_LOG_LEVEL", "ERROR")
    import ray

    if not args.verbose and not ray.is_initialized():  # initialized: a caller (a test) joined it already
        import logging

        from funasr_nano.corpus.pipeline import ROOT

        init = {"address": args.address} if args.address or os.environ.get("RAY_ADDRESS") else {
            "num_cpus": args.num_cpus}
        try:
            ray.init(**init, runtime_env={"py_modules": [str(ROOT / "funasr_nano")]}, logging_level=logging.ERROR)
        except ConnectionError:
            pass  # connect() below fails the same way and says so
        for name in ("ray", "ray.data"):
            logging.getLogger(name).setLevel(logging.ERROR)
    try:
        connect(args.address, args.num_cpus)
    except ConnectionError as exc:
        address = args.address or os.environ.get("RAY_ADDRESS")
        raise SetupError(f"--address {address}: no Ray cluster there ({one_line(exc).rstrip('.')}); start one "
                         "with `ray start --head`, or leave --address and RAY_ADDRESS unset for a local cluster") from exc


def _plan(args: argparse.Namespace):
    import ray

    from funasr_nano.corpus.pipeline import Plan

    gpus = args.gpus_per_actor if args.gpus_per_actor is not None else (1.0 if PRESETS[args.preset].gpu else 0.0)
    cpus = float(ray.cluster_resources().get("CPU", os.cpu_count() or 1))
    largest_node = max((n["Resources"].get("CPU", 0.0) for n in ray.nodes() if n.get("Alive")), default=cpus)
    if args.threads > largest_node:  # an actor that fits on no node would wait for ever
        raise SetupError(f"--threads {args.threads}: each actor reserves that many CPUs, and the largest node "
                         f"of the cluster has {largest_node:g}")
    max_actors = args.max_actors or max(1, int(cpus // args.threads))
    return Plan(min_actors=min(args.min_actors, max_actors), max_actors=max_actors, cpus_per_actor=args.threads,
                gpus_per_actor=gpus, max_task_retries=args.max_retries, rows_per_part=args.rows_per_part,
                progress=not args.quiet)
