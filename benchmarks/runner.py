"""The parent: builds or reuses the models, runs every case in a child, writes the report."""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.long_audio import run_long_cases  # noqa: E402
from benchmarks.report import DEFAULT_PROMPT_TOKENS, build_report  # noqa: E402
from benchmarks.workers import child_main, run_child, whole_process  # noqa: E402
from funasr_nano.presets import GGUF_F16, GGUF_Q8_0, PRESETS  # noqa: E402

DEFAULT_AUDIO = ROOT.parent / "shared" / "audio" / "zh_news_10s.mp3"
DEFAULT_CACHE = Path.home() / ".cache" / "funasr-nano-bench"
SETTINGS_FILE = "funasr_nano.json"
COMPLETE_MARK = ".bench-complete"
def models_complete(models: Path) -> bool:
    needed = [SETTINGS_FILE, GGUF_F16, GGUF_Q8_0] + sorted({p.encoder_file for p in PRESETS.values()})
    needed.append("FunASR_Nano_Encoder.int8.onnx")
    return all((models / name).is_file() for name in needed)


def ensure_models(args: argparse.Namespace, say: Callable[[str], None]) -> tuple[Path, Path, dict[str, Any]]:
    """(checkpoint, models) folders, building and exporting what is missing (once, under a file lock)."""
    key = f"{args.size}-seed{args.seed}"
    base = args.cache / key
    ckpt = args.checkpoint or base / "checkpoint"
    models = args.models or base / "models"
    if models_complete(models) and (ckpt / "model.pt").is_file():
        return ckpt, models, {"built": False}
    base.mkdir(parents=True, exist_ok=True)
    with open(base / ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another benchmark building the same cache: wait for it
        if models_complete(models) and (ckpt / "model.pt").is_file():
            return ckpt, models, {"built": False}
        partial = models.with_name(models.name + ".partial")
        shutil.rmtree(partial, ignore_errors=True)
        say(f"building the {args.size} checkpoint in {ckpt} and exporting it to {models} (first run only) ...")
        spec = {"kind": "build", "checkpoint": str(ckpt), "models": str(partial), "size": args.size,
                "seed": args.seed, "gguf_types": "f16,q8_0", "quiet": args.quiet}
        info = run_child(spec, args.threads, args.child_timeout)
        if "error" in info:
            raise SystemExit(f"error: building the benchmark models failed: {info['error']}")
        (partial / COMPLETE_MARK).write_text(json.dumps({"size": args.size, "seed": args.seed, **info}))
        if models.exists():
            shutil.rmtree(models)
        partial.rename(models)
        info["built"] = True
        return ckpt, models, info


def gpu_probe() -> tuple[bool, list[str]]:
    """(llama.cpp has a GPU backend, GPU execution providers of onnxruntime)."""
    import llama_cpp as L
    import onnxruntime as ort

    gpu_eps = [p for p in ("CUDAExecutionProvider", "ROCMExecutionProvider", "DmlExecutionProvider",
                           "CoreMLExecutionProvider") if p in ort.get_available_providers()]
    return bool(L.llama_supports_gpu_offload()), gpu_eps


def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    mem = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    with contextlib.suppress(OSError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 1024**2:.1f} GiB"
                break
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = []
    for dist in ("onnxruntime", "llama_cpp_python", "numpy", "torch", "funasr", "transformers"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{dist} {metadata.version(dist)}")
    flags = ""
    with contextlib.suppress(Exception):
        import llama_cpp as L

        flags = L.llama_print_system_info().decode().strip().rstrip("|").strip()
    return {
        "cpu": f"{cpu}, {os.cpu_count()} logical cores ({usable} usable)",
        "ram": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": ", ".join(versions),
        "llama.cpp": flags,
    }


# --------------------------------------------------------------------------- formatting


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--smoke", action="store_true",
                   help="tiny checkpoint in a temporary folder, 1 run, 8 tokens: checks the script works")
    p.add_argument("--audio", type=Path, default=DEFAULT_AUDIO, help=f"clip to transcribe (default: {DEFAULT_AUDIO})")
    p.add_argument("--runs", type=int, default=None, help="timed runs per engine (default 3; smoke 1)")
    p.add_argument("--warmup", type=int, default=1, help="warm-up runs per engine before timing (default 1)")
    p.add_argument("--tokens", type=int, default=None, help="tokens every engine generates (default 45; smoke 8)")
    p.add_argument("--threads", type=int, default=2, help="CPU threads for every engine (default 2)")
    p.add_argument("--variants", default="cpu,cpu-int8,cpu-int8+spec,gpu",
                   help="03 presets to run, plain greedy; NAME+spec: with the CTC-drafted speculative decoding "
                        "(default cpu,cpu-int8,cpu-int8+spec,gpu; gpu is skipped without a GPU)")
    p.add_argument("--spec-drafts", default="own,half,random",
                   help="speculative decoding table (issue 9): synthetic draft kinds to time against plain greedy "
                        "on the cpu-int8 preset (own, half, third, random, empty; '' to skip)")
    p.add_argument("--long", action="store_true",
                   help="also the long-audio cases (issue 7): a --long-minutes file decoded sequentially and "
                        "batched, and peak RSS for a --rss-minutes file (several minutes at full shapes)")
    p.add_argument("--long-minutes", type=float, default=None, help="long-audio throughput file (default 10)")
    p.add_argument("--rss-minutes", type=float, default=None, help="long-audio memory file (default 120)")
    p.add_argument("--mixed-minutes", type=float, default=None,
                   help="long-audio file of mixed segment lengths (default 5)")
    p.add_argument("--long-batch", type=int, default=8, help="segments decoded at once in the batched run (8)")
    p.add_argument("--skip-baselines", action="store_true", help="no funasr and no raw llama.cpp runs")
    p.add_argument("--skip-funasr", action="store_true", help="no funasr runs")
    p.add_argument("--prompt-tokens", type=int, default=None,
                   help="raw llama.cpp prompt length (default: our measured prompt length, else 44)")
    p.add_argument("--cache", type=Path, default=None, help=f"folder for built models (default: {DEFAULT_CACHE})")
    p.add_argument("--checkpoint", type=Path, default=None, help="use this release-shaped checkpoint folder")
    p.add_argument("--models", type=Path, default=None, help="use these exports (01 + 02 output folder)")
    p.add_argument("--size", default=None, help="checkpoint shape from testing/checkpoint.py (default full; smoke tiny)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=None, help="also write the report to this markdown file")
    p.add_argument("--json", type=Path, default=None, help="also write the raw measurements as JSON")
    p.add_argument("--child-timeout", type=float, default=3600.0, help="seconds one child may take (default 3600)")
    p.add_argument("--quiet", action="store_true", help="only the report on stdout")
    p.add_argument("--child-spec", default=None, help=argparse.SUPPRESS)
    p.add_argument("--child-result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child_spec is None:
        args.size = args.size or ("tiny" if args.smoke else "full")
        args.runs = args.runs if args.runs is not None else (1 if args.smoke else 3)
        args.tokens = args.tokens if args.tokens is not None else (8 if args.smoke else 45)
        args.long_minutes = args.long_minutes if args.long_minutes is not None else (0.5 if args.smoke else 10.0)
        args.rss_minutes = args.rss_minutes if args.rss_minutes is not None else (1.0 if args.smoke else 120.0)
        args.mixed_minutes = args.mixed_minutes if args.mixed_minutes is not None else (0.5 if args.smoke else 5.0)
        if args.runs < 1 or args.tokens < 1 or args.threads < 1 or args.warmup < 0:
            p.error("--runs, --tokens and --threads must be positive, --warmup not negative")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.child_spec is not None:
        return child_main(args.child_spec, args.child_result)

    def say(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    if not args.audio.is_file():
        print(f"error: {args.audio}: audio clip not found (use --audio)", file=sys.stderr)
        return 2
    tmp_cache = None
    if args.cache is None:
        if args.smoke:
            tmp_cache = tempfile.TemporaryDirectory(prefix="funasr-nano-bench-smoke-")
            args.cache = Path(tmp_cache.name)
        else:
            args.cache = DEFAULT_CACHE
    try:
        return _run(args, say)
    finally:
        if tmp_cache is not None:
            tmp_cache.cleanup()


def _run(args: argparse.Namespace, say: Callable[[str], None]) -> int:
    t_start = time.perf_counter()
    ckpt, models, build_info = ensure_models(args, say)
    if build_info.get("built"):
        say(f"built in {sum(v for k, v in build_info.items() if k.endswith('_s')):.0f} s")
    info = machine_info()
    notes: list[str] = []
    common = {"threads": args.threads, "tokens": args.tokens, "runs": args.runs, "warmup": args.warmup,
              "audio": str(args.audio)}
    results: dict[str, dict[str, Any]] = {}

    def save_json() -> None:  # after every child, so a long run interrupted keeps what it measured
        if args.json is not None:
            args.json.write_text(json.dumps({"machine": info, "results": results, "notes": notes}, indent=2),
                                 encoding="utf-8")

    llama_gpu, gpu_eps = gpu_probe()
    for variant in [v.strip() for v in args.variants.split(",") if v.strip()]:
        name, _, suffix = variant.partition("+")
        if name not in PRESETS or suffix not in ("", "spec"):
            print(f"error: unknown variant {variant!r}; choose from {', '.join(PRESETS)} (each optionally "
                  f"with +spec)", file=sys.stderr)
            return 2
        preset = PRESETS[name]
        spec = {"kind": "variant", "model_dir": str(models), "encoder": str(models / preset.encoder_file),
                "gguf": str(models / preset.gguf_file), "speculative": suffix == "spec", **common}
        if preset.gpu:
            if not llama_gpu and not gpu_eps:
                notes.append("gpu preset not run: no GPU here (llama.cpp has no GPU backend, onnxruntime no GPU "
                             "execution provider).")
                continue
            spec.update(n_gpu_layers=-1 if llama_gpu else 0, providers=(gpu_eps + ["CPUExecutionProvider"])
                        if gpu_eps else None)
        label = f"ours {name}" + (" +spec" if suffix else "")
        say(f"{label}: {preset.description}{', speculative decoding' if suffix else ''} ...")
        if not suffix and not preset.gpu:  # first: its warm-up run writes any missing ONNX session cache
            say(f"whole process: {preset.script} on the clip, a fresh process per run ...")
            results[f"whole process {name}"] = whole_process(args, models, preset)
            save_json()
        results[label] = run_child(spec, args.threads, args.child_timeout)
        save_json()
        if suffix and results[label].get("speculative") is False:
            notes.append(f"{label}: this engine has no speculative decoding option; ran plain greedy.")

    kinds = [k.strip() for k in args.spec_drafts.split(",") if k.strip()]
    if kinds:
        preset = PRESETS["cpu-int8"]
        say(f"speculative decoding, synthetic drafts {', '.join(kinds)} vs plain greedy (cpu-int8) ...")
        results["speculative"] = run_child(
            {"kind": "speculative", "model_dir": str(models), "encoder": str(models / preset.encoder_file),
             "gguf": str(models / preset.gguf_file), "kinds": kinds, **common}, args.threads, args.child_timeout)
        save_json()
    if args.long:
        run_long_cases(args, models, common, results, say)
        save_json()

    if not args.skip_baselines:
        measured = next((r["prompt_positions"] for r in results.values() if "prompt_positions" in r), None)
        length = args.prompt_tokens or measured or DEFAULT_PROMPT_TOKENS
        for label, gguf in (("f16", GGUF_F16), ("q8_0", GGUF_Q8_0)):
            say(f"raw llama.cpp on {gguf}: {length}-token text prompt + {args.tokens} tokens ...")
            raw = run_child({"kind": "raw", "gguf": str(models / gguf), "prompt_tokens": length, **common},
                            args.threads, args.child_timeout)
            if "error" in raw:
                results[f"llama.cpp {label}"] = raw
                continue
            results[f"llama.cpp {label} (LlamaDecoder)"] = {**raw["decoder"], "peak_rss": raw["peak_rss"]}
            results[f"llama.cpp {label} (Llama API)"] = {**raw["api"], "peak_rss": raw["peak_rss"]}
            save_json()
        if not args.skip_funasr:
            for dtype in ("fp32", "bf16"):
                say(f"funasr AutoModel, LLM {dtype} ...")
                results[f"funasr {dtype}"] = run_child(
                    {"kind": "funasr", "checkpoint": str(ckpt), "llm_dtype": dtype, **common},
                    args.threads, args.child_timeout)
                save_json()

    failures = [f"{name}: {r['error']}" for name, r in results.items() if "error" in r]
    if "error" not in results.get("speculative", {}) and results.get("speculative", {}).get("identical") is False:
        failures.append("speculative: tokens differ from plain greedy")
    for name, r in results.items():
        counts = r.get("n_tokens")
        if isinstance(counts, list) and counts != [args.tokens]:
            failures.append(f"{name}: generated {counts} tokens, not {args.tokens}")
    report = build_report(args, info, results, notes, ckpt, models)
    print(report, end="", flush=True)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(report, encoding="utf-8")
    save_json()
    say(f"benchmark finished in {time.perf_counter() - t_start:.0f} s")
    for f in failures:
        print(f"error: {f}", file=sys.stderr)
    return 1 if failures else 0
