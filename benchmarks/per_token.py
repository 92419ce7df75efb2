"""Decode milliseconds per token: our 03 script against FunASR's own C++ runtime, alternating runs.

    python benchmarks/per_token.py --cli /tmp/official-cpp/llama.cpp/build/bin/llama-funasr-cli \\
        --enc /tmp/official-cpp/gguf/funasr-encoder-f16.gguf --wav /tmp/official-cpp/zh_news_10s.wav --runs 5

Both decode the same clip (no VAD, one window) for exactly `--tokens` tokens with `--threads` threads, as
whole processes, one of each in turn, so that the machine's state (other load, thermal, page cache) is
shared by the pair. The C++ side (built by `../shared/peers/build_official_cpp.sh`, its timing patch)
prints `decode_ms_per_tok`: its greedy loop's milliseconds over its single-token `llama_decode` calls;
ours is the JSON's `timings.decode` (the decode rounds) over the rounds run (`ours_ms_per_token`): per
call of the same kind on both sides.

Both map the same q8_0 GGUF by default, our export (`--models`), which the C++ runtime loads as it is:
two files of the same tensors do not decode at the same speed. Where a file's pages lie in memory
moved the same bytes by up to 4 % on a 2-core VM (a fresh copy of one GGUF against the original), and
such a gap lasts as long as the file stays cached, so a comparison across two files measures their
placement as much as the programs. `--llm` gives the C++ side another file (e.g. its own conversion).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from funasr_nano.presets import GGUF_Q8_0  # noqa: E402

TIMING = re.compile(r"^\[timing\] (.*)$", re.M)


def official(args: argparse.Namespace) -> dict[str, float]:
    cmd = [str(args.cli), "--enc", str(args.enc), "-m", str(args.llm), "-a", str(args.wav), "-n", str(args.tokens),
           "-t", str(args.threads)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    match = TIMING.search(proc.stderr)
    if proc.returncode != 0 or match is None:
        raise SystemExit(f"llama-funasr-cli failed ({proc.returncode}): {proc.stderr[-2000:]}")
    fields = dict(item.split("=", 1) for item in match.group(1).split())
    return {"decode_ms_per_tok": float(fields["decode_ms_per_tok"]), "n_gen": int(fields["n_gen"]),
            "prefill_ms": float(fields["prefill_ms"]), "encoder_ms": float(fields["encoder_ms"]),
            "total_ms": float(fields["total_ms"])}


def ours_ms_per_token(timings: dict[str, float], n_tokens: int) -> float:
    """The decode rounds' milliseconds per token they produced: the first token is the prompt's (prefill),
    each later one costs one round, as in the C++ loop (`n_gen` single-token decodes after its prefill)."""
    return 1000 * timings["decode"] / max(1, n_tokens - 1)


def ours(args: argparse.Namespace, env: dict[str, str]) -> dict[str, float]:
    # exactly --tokens tokens, as the C++ loop's `-n`: forced alone, random weights run on to the
    # repetition guard, and every later token attends over a longer context
    cmd = [sys.executable, str(ROOT / "03_inference_cpu_int8.py"), str(args.wav), "--model-dir", str(args.models),
           "--vad", "none", "--force-tokens", str(args.tokens), "--max-new-tokens", str(args.tokens),
           "--threads", str(args.threads), "--format", "json", "--no-speculative", *args.ours_args]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=ROOT)
    if proc.returncode != 0:
        raise SystemExit(f"03_inference_cpu_int8.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
    result = json.loads(proc.stdout)
    timings = result["timings"]
    return {"decode_ms_per_tok": ours_ms_per_token(timings, result["n_tokens"]), "n_gen": result["n_tokens"],
            "prefill_ms": 1000 * timings.get("prefill", 0.0), "encoder_ms": 1000 * timings.get("encoder", 0.0),
            "total_ms": 1000 * timings.get("total", 0.0)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--cli", type=Path, required=True, help="llama-funasr-cli (build_official_cpp.sh)")
    p.add_argument("--enc", type=Path, required=True, help="its encoder GGUF")
    p.add_argument("--llm", type=Path, default=None,
                   help="the q8_0 LLM GGUF the C++ side loads (default: ours, the file our side maps)")
    p.add_argument("--wav", type=Path, required=True, help="16 kHz mono WAV both read")
    p.add_argument("--models", type=Path, default=Path.home() / ".cache" / "funasr-nano-bench" / "full-seed0" / "models",
                   help="our export of the same checkpoint (benchmarks/runner.py builds it)")
    p.add_argument("--tokens", type=int, default=45)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--ours-arg", dest="ours_args", action="append", default=[], metavar="ARG",
                   help="an extra argument for our 03 script (e.g. --ours-arg=--batch-size --ours-arg=1); repeatable")
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="extra environment for our runs (e.g. OMP_WAIT_POLICY=PASSIVE); repeatable")
    args = p.parse_args(argv)
    if args.llm is None:
        args.llm = args.models / GGUF_Q8_0
    env = dict(os.environ)
    env.update(item.split("=", 1) for item in args.env)
    rows: dict[str, list[dict[str, float]]] = {"ours": [], "official": []}
    for i in range(args.runs):
        rows["ours"].append(ours(args, env))
        rows["official"].append(official(args))
        generated = {name: runs[-1]["n_gen"] for name, runs in rows.items()}
        if set(generated.values()) != {args.tokens}:
            raise SystemExit(f"tokens generated {generated}, not {args.tokens} on both sides: not the same work")
        print(f"run {i + 1}: ours {rows['ours'][-1]['decode_ms_per_tok']:.2f} ms/token, official "
              f"{rows['official'][-1]['decode_ms_per_tok']:.2f} ms/token", file=sys.stderr, flush=True)
    print(f"| {args.tokens} tokens, {args.threads} threads, {args.runs} alternating runs | decode ms/token (median) "
          "| min | max | prefill ms | encoder ms | whole process ms |\n|---|---|---|---|---|---|---|")
    for name, runs in rows.items():
        per = [r["decode_ms_per_tok"] for r in runs]
        print(f"| {name} | {statistics.median(per):.2f} | {min(per):.2f} | {max(per):.2f} | "
              f"{statistics.median(r['prefill_ms'] for r in runs):.0f} | "
              f"{statistics.median(r['encoder_ms'] for r in runs):.0f} | "
              f"{statistics.median(r['total_ms'] for r in runs):.0f} |")
    ratios = [o["decode_ms_per_tok"] / c["decode_ms_per_tok"] for o, c in zip(rows["ours"], rows["official"])]
    print(f"\nours / official per token, pair by pair: {', '.join(f'{r:.3f}' for r in ratios)} "
          f"(median {statistics.median(ratios):.3f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
