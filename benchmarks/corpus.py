"""Corpus throughput of 07_transcribe_corpus.py: actors x threads per actor on this machine, in audio hours per wall hour.

    python benchmarks/corpus.py                          # full shapes: 1 actor x 2 threads vs 2 actors x 1 thread
    python benchmarks/corpus.py --configs 1x2,2x1,1x1 --files 8 --minutes 3 --out corpus.md
    python benchmarks/corpus.py --smoke                  # tiny checkpoint, seconds of audio: checks the script runs

The models are the main benchmark's (random weights at the real shapes, built once into its cache,
benchmarks/runner.py); random weights never stop, so every segment decodes exactly --tokens tokens
(45 per segment, the rate of the shared clip's real transcript). The corpus is the clip plus 1 s of
silence repeated to --minutes, copied --files times. Each configuration is a separate run of the
07 script (its own local Ray cluster of --num-cpus CPUs, its own output folder), so it pays Ray's
start and the actors' model loads as a real run does; `wall` is the script's own wall time after
Ray started (its summary line), `busy` the time the actors spent inside files (sum of the rows'
`seconds` / actors).
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.long_audio import long_audio_file  # noqa: E402
from benchmarks.runner import DEFAULT_AUDIO, DEFAULT_CACHE, ensure_models, machine_info  # noqa: E402

WALL = re.compile(r"wall ([0-9.]+) s")


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="tiny checkpoint, 4 files of 0.25 min, 8 tokens")
    p.add_argument("--configs", default="1x2,2x1", help="ACTORSxTHREADS list (default 1x2,2x1)")
    p.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster (default 2)")
    p.add_argument("--preset", default="cpu-int8")
    p.add_argument("--files", type=int, default=None, help="files in the corpus (default 6; smoke 4)")
    p.add_argument("--minutes", type=float, default=None, help="minutes per file (default 2; smoke 0.25)")
    p.add_argument("--tokens", type=int, default=None, help="tokens decoded per segment (default 45; smoke 8)")
    p.add_argument("--audio", type=Path, default=DEFAULT_AUDIO)
    p.add_argument("--size", default=None, help="checkpoint shape (default full; smoke tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cache", type=Path, default=None, help=f"models cache (default {DEFAULT_CACHE})")
    p.add_argument("--checkpoint", type=Path, default=None)
    p.add_argument("--models", type=Path, default=None)
    p.add_argument("--threads", type=int, default=2, help="threads for building the models")
    p.add_argument("--child-timeout", type=float, default=3600.0)
    p.add_argument("--out", type=Path, default=None, help="also write the report to this markdown file")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    defaults = {"size": ("full", "tiny"), "files": (6, 4), "minutes": (2.0, 0.25), "tokens": (45, 8)}
    for name, (full, smoke) in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, smoke if args.smoke else full)
    return args


def run_config(actors: int, threads: int, corpus: Path, models: Path, out: Path, args: argparse.Namespace) -> dict:
    """One 07 run with `actors` actors of `threads` threads; its measurements."""
    import pyarrow.compute as pc

    from funasr_nano.corpus.store import read_corpus

    cmd = [sys.executable, str(ROOT / "07_transcribe_corpus.py"), str(corpus), "--output-dir", str(out),
           "--model-dir", str(models), "--preset", args.preset, "--num-cpus", str(args.num_cpus),
           "--threads", str(threads), "--min-actors", str(actors), "--max-actors", str(actors),
           "--force-tokens", str(args.tokens), "--max-new-tokens", str(args.tokens), "--quiet"]
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    process_wall = time.perf_counter() - t0
    match = WALL.search(done.stdout)
    if done.returncode != 0 or match is None:
        raise SystemExit(f"error: {actors}x{threads} failed (exit {done.returncode}): {done.stderr[-2000:]}")
    table = read_corpus(out)
    audio = float(pc.sum(table["duration"]).as_py() or 0.0)
    busy = float(pc.sum(table["seconds"]).as_py() or 0.0) / actors
    wall = float(match.group(1))
    return {"config": f"{actors}x{threads}", "actors": actors, "threads": threads, "files": table.num_rows,
            "audio_s": audio, "wall_s": wall, "process_s": process_wall, "busy_s": busy,
            "rate": audio / wall, "segments": int(pc.sum(table["n_segments"]).as_py() or 0)}


def report(results: list[dict], args: argparse.Namespace, models: Path) -> str:
    info = machine_info()
    base = results[0]["rate"]
    lines = [
        "# Corpus throughput (07_transcribe_corpus.py on a local Ray cluster)", "",
        f"- machine: {info['cpu']}, RAM {info['ram']}; Ray cluster of {args.num_cpus} CPUs",
        f"- models: {models} ({args.size} shapes, random weights), preset {args.preset}; "
        f"{args.tokens} tokens forced per segment",
        f"- corpus: {args.files} files of {args.minutes:g} min ({args.audio.name} + 1 s silence, repeated)", "",
        "| actors x threads | files | segments | audio h | wall s | audio h per wall h | vs first | "
        "busy s per actor | script s (Ray start included) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        lines.append(f"| {r['config']} | {r['files']} | {r['segments']} | {r['audio_s'] / 3600:.3f} | {r['wall_s']:.1f} "
                     f"| {r['rate']:.2f} | {r['rate'] / base:.2f}x | {r['busy_s']:.1f} | {r['process_s']:.1f} |")
    lines += ["", "- *wall*: the script's own time after Ray started (actor start and model loads included); "
              "*audio h per wall h* = audio / wall.",
              "- *busy s per actor*: time inside files (decode, VAD, encoder, llama.cpp) over the actors; "
              "wall minus busy is start-up, model load and the tail where one actor finishes alone."]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="funasr-corpus-bench-") as tmp:
        work = Path(tmp)
        if args.cache is None:
            args.cache = work / "cache" if args.smoke else DEFAULT_CACHE
        _, models, _ = ensure_models(args, say)
        corpus = work / "corpus"
        corpus.mkdir()
        source = long_audio_file(args.audio, args.minutes, work / "audio")
        for i in range(args.files):
            shutil.copyfile(source, corpus / f"file{i:03d}.mp3")
        results = []
        for config in args.configs.split(","):
            actors, threads = (int(x) for x in config.lower().split("x"))
            say(f"{actors} actor(s) x {threads} thread(s) ...")
            results.append(run_config(actors, threads, corpus, models, work / f"out-{config}", args))
            say(f"  {results[-1]['rate']:.2f} audio hours per wall hour")
    text = report(results, args, models)
    print(text)
    if args.out is not None:
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
