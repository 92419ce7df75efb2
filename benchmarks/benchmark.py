"""Benchmark the 03 presets at the real Fun-ASR-Nano shapes against funasr (PyTorch) and raw llama.cpp.

    python benchmarks/benchmark.py                        # full shapes, 3 runs, 45 tokens
    python benchmarks/benchmark.py --out benchmarks/RESULTS.md
    python benchmarks/benchmark.py --variants cpu-int8 --skip-baselines --runs 5
    python benchmarks/benchmark.py --smoke                # tiny checkpoint, 1 run, 8 tokens (CI)

The real weights are not needed: a checkpoint of the full shapes with random weights
(tests/checkpoint.py) is built once and exported with 01 and 02 (fp32 + int8 ONNX, f16 +
q8_0 GGUF) into a cache folder outside git (default ~/.cache/funasr-nano-bench/,
`--cache DIR`; `--checkpoint DIR` / `--models DIR` reuse folders built elsewhere).
Random weights give meaningless text, so every run is forced to generate exactly
`--tokens` tokens (stop tokens suppressed), the same in every engine compared.

Every engine runs in its own child process (so its peak RSS is its own) with the same
thread count: our Transcriber per 03 preset, funasr's AutoModel in fp32 and with
llm_dtype=bf16, and llama.cpp generating from a text prompt of the same length on the
same GGUFs (the ceiling for our decode speed). Stage times are medians of `--runs`
runs after `--warmup` runs; the warm-up leaves the constant prompt prefix in the KV
cache, as in a multi-file run, and the prefill with that prefix recomputed is
reported separately. Results: one markdown table on stdout (and in `--out FILE`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import datetime
import fcntl
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from common.cli import GGUF_F16, GGUF_Q8_0, PRESETS, Preset, context_per_sequence  # noqa: E402  (stdlib-only import)

DEFAULT_AUDIO = ROOT.parent / "shared" / "audio" / "zh_news_10s.mp3"
DEFAULT_CACHE = Path.home() / ".cache" / "funasr-nano-bench"
SETTINGS_FILE = "funasr_nano.json"
COMPLETE_MARK = ".bench-complete"
DEFAULT_PROMPT_TOKENS = 44  # the prompt length quoted in issue 6; the measured one is used when known
GIB = 1024**3

# Published figures of the peer FunASR llama.cpp runtime on this machine, quoted from issue 6
# (int8 encoder + q8_0 decoder, 10 s clip, 2 threads). Constants, not measured here.
PEER = {
    "after_load_s": 2.13,
    "encoder_s": 0.67,
    "prefill_s": 0.30,
    "decode_tok_s": 41.0,
    "peak_rss_gib": 1.47,
}

# Targets of issue 6 (checked against the cpu-int8 run).
TARGET_VS_FUNASR_FP32 = 5.0
TARGET_VS_FUNASR_BF16 = 3.5
TARGET_DECODE_VS_LLAMA = 0.95
TARGET_INT8_ENCODER_SPEEDUP = 1.8
TARGET_INT8_RSS_GB = 1.5  # GB = 1e9 bytes, as the issue writes it

RAW_PROMPT_TEXT = (
    "You are a helpful assistant. 语音转写成中文：今天的新闻报道了天气、交通和经济情况，"
    "记者在现场采访了很多市民。The weather is fine and the market opened higher today. "
)


# =========================================================================== children
# Each child gets a JSON spec, does its measurement in-process and writes a JSON result file.


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(rss if sys.platform == "darwin" else rss * 1024)


def median(values: list[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


def child_build(spec: dict[str, Any]) -> dict[str, Any]:
    """Checkpoint with random weights, then 01's and 02's exports (in-process: one torch import)."""
    from common.export_gguf import export_gguf
    from common.export_onnx import export_onnx
    from tests.checkpoint import build_checkpoint

    t0 = time.perf_counter()
    ckpt = Path(spec["checkpoint"])
    if not (ckpt / "model.pt").is_file():
        build_checkpoint(ckpt, spec["size"], seed=spec["seed"], ctc=True)
    t1 = time.perf_counter()
    models = Path(spec["models"])
    log = None if spec.get("quiet") else (lambda msg: print(f"  {msg}", file=sys.stderr, flush=True))
    export_onnx(ckpt, models, int8=True, log=log)
    t2 = time.perf_counter()
    export_gguf(ckpt, models, spec["gguf_types"].split(","), progress=False)
    t3 = time.perf_counter()
    return {"checkpoint_s": t1 - t0, "onnx_s": t2 - t1, "gguf_s": t3 - t2}


def child_variant(spec: dict[str, Any]) -> dict[str, Any]:
    """One 03 preset through common.transcriber.Transcriber, in-process."""
    t_import = time.perf_counter()
    from common.llm import DecoderOptions
    from common.transcriber import TranscribeOptions, Transcriber

    imports_s = time.perf_counter() - t_import  # a fresh child: the engine's imports (numpy, ORT, llama.cpp)

    threads, n = spec["threads"], spec["tokens"]
    engine = Transcriber(
        spec["model_dir"], encoder_path=spec["encoder"], gguf_path=spec["gguf"], threads=threads,
        providers=spec.get("providers"),
        decoder_options=DecoderOptions(threads=threads, n_gpu_layers=spec.get("n_gpu_layers", 0)),
    )
    extra: dict[str, Any] = {}
    if "speculative" in {f.name for f in dataclasses.fields(TranscribeOptions)}:
        extra["speculative"] = bool(spec.get("speculative", False))
    options = TranscribeOptions(max_new_tokens=n, min_new_tokens=n, **extra)
    audio = spec["audio"]

    warm = [engine.transcribe(audio, options) for _ in range(max(1, spec["warmup"]))]
    runs = [engine.transcribe(audio, options) for _ in range(spec["runs"])]

    # Prefill with the constant prefix recomputed (a new prompt / the first file), in steady state.
    from common.audio import load_audio

    wave = load_audio(audio, engine.frontend.sample_rate)
    prepared = engine.prepare(wave, options.prompt)
    uncached = []
    for _ in range(spec["runs"]):
        engine._cached_before = None  # forget the cached prefix: the next prefill decodes it again
        t0 = time.perf_counter()
        engine.prefill(prepared)
        uncached.append(time.perf_counter() - t0)
    engine.close()

    def stage(name: str) -> float:
        return median([t.timings[name] for t in runs])

    n_tokens = sorted({t.n_tokens for t in warm + runs})
    proposed = sum(getattr(s, "draft_proposed", 0) for t in runs for s in t.segments)
    accepted = sum(getattr(s, "draft_accepted", 0) for t in runs for s in t.segments)
    return {
        "speculative": extra.get("speculative", False),
        "draft_s": median([t.timings.get("draft", 0.0) for t in runs]),
        "draft_acceptance": accepted / proposed if proposed else None,
        "draft_proposed": proposed // max(1, len(runs)),
        "load_s": engine.load_seconds,
        "imports_s": imports_s,
        "load_times": dict(getattr(engine, "load_times", {})),  # seconds per model (loaded side by side)
        "encoder_session": getattr(engine.encoder, "session_origin", None),
        "features_s": median([t.timings["load_audio"] + t.timings.get("vad", 0.0) + t.timings["features"]
                              for t in runs]),
        "encoder_s": stage("encoder"),
        "prefill_s": stage("prefill"),
        "prefill_uncached_s": median(uncached),
        "prefill_first_run_s": warm[0].timings["prefill"],
        "first_run_total_s": warm[0].timings["total"],
        "decode_s": stage("decode"),
        "decode_tok_s": median([t.n_tokens / t.timings["decode"] for t in runs]),
        "total_s": stage("total"),
        "rtf": median([t.real_time_factor for t in runs]),
        "duration_s": runs[0].duration,
        "n_tokens": n_tokens,
        "prompt_positions": prepared.length,
        "prompt_prefix_tokens": len(prepared.before_ids),
        "audio_rows": int(prepared.audio_rows.shape[0]),
        "peak_rss": peak_rss_bytes(),
        "all_totals_s": [round(t.timings["total"], 4) for t in runs],
    }


def _raw_prompt(tokenize: Callable[[str], list[int]], length: int) -> list[int]:
    """A text prompt of exactly `length` tokens (real words, no special tokens)."""
    ids: list[int] = []
    while len(ids) < length:
        ids += tokenize(RAW_PROMPT_TEXT)
    return ids[:length]


def child_raw(spec: dict[str, Any]) -> dict[str, Any]:
    """llama.cpp alone on a GGUF: text prompt of the same length, the same number of forced tokens.

    Two ways: llama-cpp-python's high-level `Llama` API (with llama.cpp's own C-side timings,
    llama_perf_context: the ceiling) and our LlamaDecoder (same context settings and greedy
    loop as the Transcriber, no audio).
    """
    import gc

    import llama_cpp as L

    from common.llm import DecoderOptions, LlamaDecoder, use_extra_buffers

    threads, n, length = spec["threads"], spec["tokens"], spec["prompt_tokens"]
    gguf = spec["gguf"]
    out: dict[str, Any] = {}

    # --- high-level API, with LlamaDecoder's choice of llama.cpp's extra buffer types (like with like;
    # `Llama` has no switch for it, so its default model params are adjusted in this child process)
    default_params = L.llama_cpp.llama_model_default_params

    def params_like_ours() -> Any:
        params = default_params()
        params.use_extra_bufts = use_extra_buffers(DecoderOptions().extra_buffers)
        return params

    L.llama_cpp.llama_model_default_params = params_like_ours
    llm = L.Llama(model_path=gguf, n_ctx=max(512, length + n + 8), n_threads=threads, n_threads_batch=threads,
                  n_gpu_layers=spec.get("n_gpu_layers", 0), verbose=False)
    L.llama_cpp.llama_model_default_params = default_params
    text_ids = llm.tokenize(RAW_PROMPT_TEXT.encode(), add_bos=False, special=False)
    prompt = _raw_prompt(lambda _text: list(text_ids), length)
    stops = {llm.token_eos()} | set(llm.tokenize(b"<|im_end|><|endoftext|>", add_bos=False, special=True))
    bias = {int(t): -1e9 for t in stops}
    ctx = llm._ctx.ctx
    walls, prefills, decodes, c_rates, counts = [], [], [], [], []
    for i in range(spec["warmup"] + spec["runs"]):
        llm.reset()  # no prompt reuse between runs
        L.llama_perf_context_reset(ctx)
        t0 = time.perf_counter()
        res = llm.create_completion(prompt, max_tokens=n, temperature=0.0, logit_bias=bias)
        wall = time.perf_counter() - t0
        perf = L.llama_perf_context(ctx)
        if i < spec["warmup"]:
            continue
        got = int(res["usage"]["completion_tokens"])
        counts.append(got)
        walls.append(wall)
        prefills.append(perf.t_p_eval_ms / 1000)
        decodes.append(got / max(wall - perf.t_p_eval_ms / 1000, 1e-9))
        c_rates.append(perf.n_eval / (perf.t_eval_ms / 1000) if perf.t_eval_ms > 0 else float("nan"))
    out["api"] = {
        "prefill_s": median(prefills),  # C-side prompt eval time
        "decode_tok_s": median(decodes),  # wall, Python sampling loop included
        "c_decode_tok_s": median(c_rates),  # llama.cpp's own eval timer: pure llama_decode per token
        "total_s": median(walls),
        "n_tokens": sorted(set(counts)),
    }
    del llm
    gc.collect()

    # --- our decoder, same options as the Transcriber
    t0 = time.perf_counter()
    dec = LlamaDecoder(gguf, DecoderOptions(threads=threads, n_gpu_layers=spec.get("n_gpu_layers", 0)))
    load_s = time.perf_counter() - t0
    prompt = _raw_prompt(dec.tokenize, length)
    prefills, decodes, totals, counts = [], [], [], []
    for i in range(spec["warmup"] + spec["runs"]):
        dec.clear(0, 0)
        t0 = time.perf_counter()
        dec.decode_tokens(prompt, 0)
        logits = dec.logits(-1)
        t1 = time.perf_counter()
        tokens = dec.greedy(logits, len(prompt), n, min_new_tokens=n)
        t2 = time.perf_counter()
        if i < spec["warmup"]:
            continue
        counts.append(len(tokens))
        prefills.append(t1 - t0)
        decodes.append(len(tokens) / (t2 - t1))
        totals.append(t2 - t0)
    dec.close()
    out["decoder"] = {
        "load_s": load_s,
        "prefill_s": median(prefills),
        "decode_tok_s": median(decodes),
        "total_s": median(totals),
        "n_tokens": sorted(set(counts)),
    }
    out["prompt_tokens"] = length
    out["peak_rss"] = peak_rss_bytes()
    return out


def child_funasr(spec: dict[str, Any]) -> dict[str, Any]:
    """The official funasr AutoModel (PyTorch), loaded offline as tests/oracle.py does, instrumented."""
    for var in ("MODELSCOPE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    import torch

    threads, n = spec["threads"], spec["tokens"]
    torch.set_num_threads(threads)
    import funasr.models.fun_asr_nano.model as nano_module
    from funasr import AutoModel

    from tests.oracle import quiet_funasr

    # CTC timestamps need torchaudio's forced_align, absent here (and not installed on purpose).
    nano_module.forced_align = lambda *args, **kwargs: []
    t0 = time.perf_counter()
    with quiet_funasr():
        auto = AutoModel(model=spec["checkpoint"], disable_update=True, device="cpu", ncpu=threads, hub="ms",
                         frontend_conf={"dither": 0.0}, disable_pbar=True, log_level="ERROR")
    load_s = time.perf_counter() - t0
    torch.set_num_threads(threads)
    model = auto.model

    rec: dict[str, Any] = {}

    def reset() -> None:
        rec.update(prepare=0.0, encoder=0.0, adaptor=0.0, generate=0.0, forwards=[], n_tokens=0)

    def timed_hooks(module: Any, key: str) -> None:
        start: list[float] = []
        module.register_forward_pre_hook(lambda *_: start.append(time.perf_counter()))

        def post(*_: Any) -> None:
            dt = time.perf_counter() - start.pop()
            if key == "forwards":
                rec["forwards"].append(dt)
            else:
                rec[key] += dt

        module.register_forward_hook(post)

    timed_hooks(model.audio_encoder, "encoder")
    timed_hooks(model.audio_adaptor, "adaptor")
    timed_hooks(model.llm, "forwards")

    original_prepare = model.inference_prepare

    def prepare(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        out = original_prepare(*args, **kwargs)
        rec["prepare"] += time.perf_counter() - t
        return out

    original_generate = model.llm.generate

    def generate(*args: Any, **kwargs: Any) -> Any:
        t = time.perf_counter()
        ids = original_generate(*args, **kwargs)
        rec["generate"] += time.perf_counter() - t
        rec["n_tokens"] = int(ids.shape[-1])
        return ids

    model.inference_prepare = prepare
    model.llm.generate = generate

    cfg: dict[str, Any] = {"language": None, "itn": True, "hotwords": [], "max_length": n,
                           "llm_kwargs": {"min_new_tokens": n}}
    if spec["llm_dtype"] != "fp32":
        cfg["llm_dtype"] = spec["llm_dtype"]
    samples = []
    for i in range(spec["warmup"] + spec["runs"]):
        reset()
        t = time.perf_counter()
        with torch.no_grad(), quiet_funasr():
            auto.generate(input=spec["audio"], cache={}, batch_size=1, **cfg)
        total = time.perf_counter() - t
        if i < spec["warmup"]:
            continue
        prefill = rec["forwards"][0] if rec["forwards"] else float("nan")
        decode = rec["generate"] - prefill
        samples.append({
            "features_s": rec["prepare"] - rec["encoder"] - rec["adaptor"],
            "encoder_s": rec["encoder"] + rec["adaptor"],
            "prefill_s": prefill,
            "decode_tok_s": rec["n_tokens"] / decode if decode > 0 else float("nan"),
            "total_s": total,
            "n_tokens": rec["n_tokens"],
        })
    duration = _duration_seconds(spec["audio"])
    result = {k: median([s[k] for s in samples]) for k in ("features_s", "encoder_s", "prefill_s",
                                                            "decode_tok_s", "total_s")}
    result.update(
        load_s=load_s,
        rtf=result["total_s"] / duration,
        n_tokens=sorted({s["n_tokens"] for s in samples}),
        llm_param_dtype=str(next(model.llm.parameters()).dtype),
        peak_rss=peak_rss_bytes(),
        all_totals_s=[round(s["total_s"], 4) for s in samples],
    )
    return result


def _duration_seconds(audio: str) -> float:
    from common.audio import load_audio

    return load_audio(audio, 16000).shape[0] / 16000


def child_speculative(spec: dict[str, Any]) -> dict[str, Any]:
    """Decode speed of plain greedy vs speculative decoding with synthetic drafts (issue 9).

    Random weights make the real CTC draft meaningless, so the drafts are made from the decoder's
    own greedy output: all right (the upper bound), every second token wrong, random tokens.
    """
    from common.audio import load_audio
    from common.llm import DecoderOptions
    from common.speculative import bench_speculative
    from common.transcriber import Transcriber

    threads = spec["threads"]
    engine = Transcriber(spec["model_dir"], encoder_path=spec["encoder"], gguf_path=spec["gguf"], threads=threads,
                         decoder_options=DecoderOptions(threads=threads))
    wave = load_audio(spec["audio"], engine.frontend.sample_rate)
    bench_speculative(engine, wave, spec["tokens"], draft_kinds=("own",), repeats=1)  # warm-up
    result = bench_speculative(engine, wave, spec["tokens"], draft_kinds=tuple(spec["kinds"]),
                               repeats=spec["runs"])
    engine.close()
    return {**result, "peak_rss": peak_rss_bytes()}


def child_long(spec: dict[str, Any]) -> dict[str, Any]:
    """One long file through the VAD path, `n_seq_max` segments decoded at a time (issue 7)."""
    from common.llm import DecoderOptions
    from common.transcriber import TranscribeOptions, Transcriber

    threads, n = spec["threads"], spec["tokens"]
    rate = spec.get("rate", 0.0)  # tokens per second of segment audio instead of a fixed count
    if rate:
        n = math.ceil(rate * 30.0) + 1  # the VAD's longest segment
    engine = Transcriber(spec["model_dir"], encoder_path=spec["encoder"], gguf_path=spec["gguf"], threads=threads,
                         decoder_options=DecoderOptions(threads=threads, n_seq_max=spec["n_seq_max"],
                                                        n_ctx=context_per_sequence(n)))
    options = TranscribeOptions(max_new_tokens=n, min_new_tokens=0 if rate else n, vad="silero", speculative=False,
                                forced_tokens_per_second=rate, refill=spec.get("refill", True))
    t0 = time.perf_counter()
    transcript = engine.transcribe(spec["audio"], options)
    wall = time.perf_counter() - t0
    engine.close()
    return {
        "wall_s": wall, "duration_s": transcript.duration, "segments": len(transcript.segments),
        "n_tokens": transcript.n_tokens, "timings": transcript.timings, "peak_rss": peak_rss_bytes(),
        "transcript_bytes": len(json.dumps(transcript.to_dict(), ensure_ascii=False).encode()),
        "n_seq_max": spec["n_seq_max"], "tokens_per_segment": f"{rate:g}/s" if rate else n,
    }


CHILDREN: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "build": child_build, "variant": child_variant, "raw": child_raw, "funasr": child_funasr,
    "speculative": child_speculative, "long": child_long,
}


def _die_with_parent() -> None:
    """Linux: end this child when the benchmark process goes (killed, timed out), not orphan it."""
    if sys.platform.startswith("linux"):
        import ctypes
        import signal

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


def child_main(spec_json: str, result_path: str) -> int:
    _die_with_parent()
    spec = json.loads(spec_json)
    result = CHILDREN[spec["kind"]](spec)
    Path(result_path).write_text(json.dumps(result), encoding="utf-8")
    return 0


# =========================================================================== parent


def run_child(spec: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; returns its result or {'error': ...}."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child-spec", json.dumps(spec),
               "--child-result", str(result_file)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not result_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}
        return json.loads(result_file.read_text(encoding="utf-8"))


def whole_process(args: argparse.Namespace, models: Path, preset: Preset) -> dict[str, Any]:
    """Wall clock of the 03 script itself on the clip, a fresh process per run (imports, loads, exit).

    What a user waits for on one file: `03_inference_cpu_int8.py CLIP --vad none` with the script's
    defaults (speculative decoding: the CTC head loads too), forced to --tokens tokens. Warm-up runs
    fill the page cache (and ONNX Runtime's optimized-graph cache, if the exports have none yet).
    """
    cmd = [sys.executable, str(ROOT / preset.script), str(args.audio), "--vad", "none", "--model-dir", str(models),
           "--encoder", str(models / preset.encoder_file), "--gguf", str(models / preset.gguf_file),
           "--max-new-tokens", str(args.tokens), "--force-tokens", str(args.tokens), "--threads", str(args.threads),
           "--quiet"]
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(args.threads)
    walls = []
    for i in range(max(1, args.warmup) + args.runs):
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.child_timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            return {"error": f"exit code {proc.returncode}: " + " | ".join(proc.stderr.strip().splitlines()[-4:])}
        if i >= max(1, args.warmup):
            walls.append(wall)
    return {"whole_s": median(walls), "whole_min_s": min(walls), "whole_max_s": max(walls),
            "command": " ".join(Path(c).name if c == sys.executable else c for c in cmd)}


def startup_section(results: dict[str, dict[str, Any]]) -> list[str]:
    """Issue 17: where the start-up goes (imports, each model's load) beside the whole-process time."""
    rows = []
    for name, r in results.items():
        if not name.startswith("ours") or "error" in r or "imports_s" not in r:
            continue
        times = r.get("load_times") or {}
        whole = results.get(f"whole process {name.removeprefix('ours ')}", {})
        whole_text = "—" if not whole else whole.get("error", "")[:80] or (
            f"{fmt(whole['whole_s'])} ({fmt(whole['whole_min_s'])}-{fmt(whole['whole_max_s'])})")
        rows.append([name, fmt(r["imports_s"]), fmt(times.get("encoder")) + f" ({r.get('encoder_session') or '—'})",
                     fmt(times.get("ctc")), fmt(times.get("vad")), fmt(times.get("llama.cpp")), fmt(r["load_s"]),
                     fmt(r["first_run_total_s"]), fmt(r["total_s"]), whole_text])
    if not rows:
        return []
    out = ["", "## Start-up: load time and whole process (issue 17)", "",
           markdown_table(["run", "imports s", "encoder session s (from)", "CTC session s", "VAD session s",
                           "llama.cpp s", "load s (side by side)", "1st run after load s", "after load s",
                           "whole process s (min-max)"], rows), ""]
    out += ["- *load*: wall time of Transcriber(); llama.cpp loads in a thread while the encoder session is "
            "created, so it is less than the sum. *from*: `cache` = ONNX Runtime's optimized graph loaded "
            "from the session cache (common/session_cache.py), `written`/`uncached` = optimized at this start.",
            "- *CTC/VAD session*: opened only when a run needs them (plain greedy rows: neither).",
            "- *whole process*: a fresh `03` process per run, wall clock from start to exit, "
            f"`{next((w['command'] for k, w in results.items() if k.startswith('whole') and 'command' in w), '')}`."]
    return out


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


def fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and value != value):
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


def ratio(a: float | None, b: float | None) -> float | None:
    if a is None or b is None or not b or a != a or b != b:
        return None
    return a / b


def speedup(reference: float | None, ours: float | None) -> str:
    value = ratio(reference, ours)
    return "—" if value is None else f"{value:.2f}x"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def build_report(args: argparse.Namespace, info: dict[str, str], results: dict[str, dict[str, Any]],
                 notes: list[str], ckpt: Path, models: Path) -> str:
    fp32 = results.get("funasr fp32", {})
    bf16 = results.get("funasr bf16", {})
    ref32 = fp32.get("total_s") if "error" not in fp32 else None
    ref16 = bf16.get("total_s") if "error" not in bf16 else None

    header = ["run", "load s", "audio+features s", "encoder s", "prefill s (prefix cached / uncached)",
              "decode tok/s", "total s", "RTF", "peak RSS GiB", "vs funasr fp32", "vs funasr bf16"]
    rows = []
    for name, r in results.items():
        if name in SECTION_RESULTS or name.startswith(LONG_CASES) or name.startswith("whole process"):
            continue
        if "error" in r:
            rows.append([name, f"failed: {r['error'][:150]}"] + [""] * (len(header) - 2))
            continue
        if name.startswith("llama.cpp"):
            decode = fmt(r.get("decode_tok_s"), 1)
            if r.get("c_decode_tok_s") is not None:
                decode += f" (C: {fmt(r['c_decode_tok_s'], 1)})"
            rows.append([name, fmt(r.get("load_s"), 2), "—", "—", fmt(r.get("prefill_s")), decode,
                         fmt(r.get("total_s")) + " (LLM only)", "—", fmt(r["peak_rss"] / GIB, 2), "—", "—"])
            continue
        prefill = fmt(r.get("prefill_s"))
        if "prefill_uncached_s" in r:
            prefill += f" / {fmt(r['prefill_uncached_s'])} (1st run {fmt(r['prefill_first_run_s'])})"
        encoder = fmt(r.get("encoder_s"))
        if r.get("speculative"):
            encoder += f" + CTC draft {fmt(r.get('draft_s'))}"
        rows.append([
            name, fmt(r.get("load_s"), 2), fmt(r.get("features_s")), encoder, prefill,
            fmt(r.get("decode_tok_s"), 1), fmt(r.get("total_s")), fmt(r.get("rtf"), 3),
            fmt(r["peak_rss"] / GIB, 2), speedup(ref32, r.get("total_s")), speedup(ref16, r.get("total_s")),
        ])

    ours = results.get("ours cpu-int8", {})
    peer_rows = []
    if ours and "error" not in ours:
        after_load = ours["total_s"]
        for label, peer, mine, better in (
            ("end to end after model load, s", PEER["after_load_s"], after_load, "lower"),
            ("encoder, s", PEER["encoder_s"], ours["encoder_s"], "lower"),
            (f"prefill, s (peer: 44 positions; ours: {ours['prompt_positions']}, prefix cached)",
             PEER["prefill_s"], ours["prefill_s"], "lower"),
            ("prefill with the prefix uncached, s", PEER["prefill_s"], ours["prefill_uncached_s"], "lower"),
            ("decode, tok/s", PEER["decode_tok_s"], ours["decode_tok_s"], "higher"),
            ("peak RSS, GiB", PEER["peak_rss_gib"], ours["peak_rss"] / GIB, "lower"),
        ):
            gain = peer / mine if better == "lower" else mine / peer
            peer_rows.append([label, fmt(peer, 2), fmt(mine, 3), f"{gain:.2f}x"])

    out = [f"# Fun-ASR-Nano benchmark ({'smoke, ' if args.smoke else ''}{args.size} shapes, random weights)", ""]
    out += [f"- date: {datetime.datetime.now().strftime('%Y-%m-%d %H:%M')}",
            f"- machine: {info['cpu']}, RAM {info['ram']}, {info['os']}",
            f"- python {info['python']}; {info['versions']}",
            f"- llama.cpp CPU features: {info['llama.cpp']}",
            f"- audio: {args.audio} ({_fmt_duration(results)}); every engine forced to {args.tokens} tokens; "
            f"{args.threads} threads; median of {args.runs} run(s) after {args.warmup} warm-up run(s)",
            f"- checkpoint: {ckpt}; exports: {models}", ""]
    if rows:
        out += ["## Our 03 presets vs funasr (PyTorch) and raw llama.cpp", "", markdown_table(header, rows), ""]
        out += [
            "- *speed-up* = funasr's end-to-end time / this run's end-to-end time (after model load).",
            "- *prefill*: the first number is the steady state of a multi-file run (the constant prompt prefix "
            "is in the KV cache, only audio rows + suffix are decoded); *uncached* recomputes that prefix "
            "every time; *1st run* is the very first transcription after loading (prefix uncached, cold caches).",
            "- *decode tok/s* = generated tokens / time after the prompt (our Python greedy loop included). "
            "llama.cpp rows: a text prompt of the same length as ours, no audio; *C* = llama.cpp's own "
            "timer (llama_perf_context), pure llama_decode per token: the ceiling for our decode speed.",
            "- funasr: *audio+features* is inference_prepare minus encoder and adaptor (audio load, fbank, "
            "prompt, embeddings); *encoder* includes the adaptor; its total also runs the CTC head.",
            "- peak RSS = the child process's ru_maxrss (GGUF pages mapped by llama.cpp count).",
        ]
    for name, r in results.items():
        if name.startswith("ours") and r.get("speculative"):
            acc = r.get("draft_acceptance")
            seen = "no draft token was proposed" if acc is None else \
                f"{acc:.0%} of {r.get('draft_proposed', 0)} proposed draft tokens per run accepted"
            out.append(f"- *{name}*: speculative decoding verifies the CTC head's greedy transcript as a draft "
                       f"(the 03 scripts' default). Here {seen}; with random weights the CTC draft and the "
                       "decoder's forced tokens have nothing in common, so this row shows the cost of "
                       "rejected drafts, not the gain on real speech. The other *ours* rows decode plain "
                       "greedy, one token per llama_decode, and are what the speed-ups and targets use.")
    out += [f"- {n}" for n in notes]
    if peer_rows:
        out += ["", "## cpu-int8 vs the peer FunASR llama.cpp runtime", "",
                "Peer figures are constants quoted from issue 6 (published for this machine), not measured here.",
                "", markdown_table(["stage", "peer (issue 6)", "ours cpu-int8", "ours better by"], peer_rows)]
    out += startup_section(results)
    out += speculative_section(results.get("speculative"))
    out += long_audio_section(results, args)
    targets = check_targets(results)
    if targets:
        out += ["", "## Targets (issues 6, 7 and 9)", "",
                markdown_table(["target", "measured", "met"], targets)]
    return "\n".join(out) + "\n"


SECTION_RESULTS = ("speculative",)
TARGET_SPEC_OWN = 2.5
TARGET_SPEC_USELESS = 0.95
TARGET_BATCHED = 3.0
LONG_CASES = ("long ", "mixed ", "rss ")  # result-name prefixes of the long-audio section
MIXED_RATE = 4.5  # forced tokens per second of segment audio in the mixed-length case (the clip: 45 in 10 s)


def speculative_section(r: dict[str, Any] | None) -> list[str]:
    """Issue 9's table: decode speed with synthetic drafts vs plain greedy, same run, same prompt."""
    if not r:
        return []
    if "error" in r:
        return ["", "## Speculative decoding", "", f"failed: {r['error']}"]
    rows = [["plain greedy", "—", fmt(r["greedy_tokens_per_second"], 1), "1.00x", "—", "—"]]
    names = {"own": "draft = the decoder's own output (upper bound)", "half": "every second draft token wrong",
             "third": "every third draft token wrong", "random": "random tokens (useless draft)",
             "empty": "empty draft"}
    for kind, k in r["speculative"].items():
        rows.append([names.get(kind, kind), str(k["rounds"]), fmt(k["tokens_per_second"], 1), f"{k['speedup']:.2f}x",
                     str(k["proposed"]), str(k["accepted"])])
    return ["", "## Speculative decoding (CTC-drafted, lossless)", "",
            f"Decode of {r['n_tokens']} forced tokens after the {r['prompt_length']}-position prompt, cpu-int8 "
            f"preset (q8_0), median of the runs, greedy and speculative runs alternating. Random weights make "
            f"the real CTC draft meaningless, so the drafts are synthetic, made from the decoder's own greedy "
            f"output: the first row is the upper bound a perfect CTC draft would give, not a measurement "
            f"of real speech. Tokens identical to plain greedy in every run: {'yes' if r['identical'] else 'NO'}.",
            "", markdown_table(["draft", "llama_decode calls", "tok/s", "vs greedy", "proposed", "accepted"], rows)]


def long_audio_section(results: dict[str, dict[str, Any]], args: argparse.Namespace) -> list[str]:
    """Issue 7's cases: batched vs sequential throughput on a long file, peak RSS vs file length."""
    runs = {k: v for k, v in results.items() if k.startswith(LONG_CASES)}
    if not runs:
        return []
    rows = []
    for name, r in runs.items():
        if "error" in r:
            rows.append([name, f"failed: {r['error'][:150]}", "", "", "", "", "", ""])
            continue
        gain = "—"
        seq = results.get(name.split(" ")[0] + " sequential", {})
        if not name.startswith("rss ") and "wall_s" in seq and "error" not in seq:
            gain = f"{seq['wall_s'] / r['wall_s']:.2f}x"
        rows.append([name, f"{r['duration_s'] / 60:.1f}", str(r["segments"]), str(r["tokens_per_segment"]),
                     fmt(r["wall_s"], 1), f"{r['duration_s'] / r['wall_s']:.1f}x", gain,
                     f"{r['peak_rss'] / GIB:.2f} (transcript {r['transcript_bytes'] / 1024:.0f} KiB)"])
    return ["", "## Long audio (Silero VAD, batched decoding)", "",
            f"cpu-int8 preset, `--vad silero`, the clip plus 1 s of silence repeated; every segment forced to "
            f"the stated token count, speculation off. *long*: throughput, one segment at a time vs "
            f"{args.long_batch} at once; *mixed*: slices of the clip from 1 to 10 s long, 1 s of silence "
            f"after each, every segment forced to {MIXED_RATE:g} tokens per second of its audio (the clip's "
            f"own rate), so segments end at different times: one at a time, {args.long_batch} at once in "
            f"fixed groups (a group ends with its longest segment), and {args.long_batch} at once with each "
            f"freed sequence taking the next segment; *rss*: peak RSS with 1 token per segment and batch 4 "
            f"(the CLI's default), a short and a long file.", "",
            markdown_table(["run", "audio min", "segments", "tokens/segment", "wall s", "speed (audio/wall)",
                            "vs sequential", "peak RSS GiB"], rows)]


def _fmt_duration(results: dict[str, dict[str, Any]]) -> str:
    for r in results.values():
        if "prompt_positions" in r:
            return f"{r['duration_s']:.2f} s, prompt {r['prompt_positions']} positions: " \
                   f"{r['prompt_prefix_tokens']} constant prefix tokens + {r['audio_rows']} audio rows + suffix"
    return "duration unknown"


def check_targets(results: dict[str, dict[str, Any]]) -> list[list[str]]:
    def ok(r: dict[str, Any] | None) -> bool:
        return bool(r) and "error" not in r

    i8, f32 = results.get("ours cpu-int8"), results.get("ours cpu")
    fp32, bf16 = results.get("funasr fp32"), results.get("funasr bf16")
    raw = results.get("llama.cpp q8_0 (Llama API)")
    rows: list[list[str]] = []

    def add(label: str, value: float | None, passed: bool, text: str) -> None:
        rows.append([label, text if value is not None else "—", "yes" if passed else "NO"])

    if ok(i8):
        _preset_targets(i8, f32, fp32, bf16, raw, add)
    spec = results.get("speculative")
    if ok(spec):
        kinds = spec["speculative"]
        if "own" in kinds:
            v = kinds["own"]["speedup"]
            add(f"speculative, perfect draft: decode >= {TARGET_SPEC_OWN}x plain greedy", v, v >= TARGET_SPEC_OWN,
                f"{v:.2f}x")
        if "half" in kinds:
            v = kinds["half"]["speedup"]
            add("speculative, half the draft wrong: faster than plain greedy", v, v > 1.0, f"{v:.2f}x")
        if "random" in kinds:
            v = kinds["random"]["speedup"]
            add(f"speculative, useless draft: at most {1 - TARGET_SPEC_USELESS:.0%} slower", v,
                v >= TARGET_SPEC_USELESS, f"{v:.2f}x")
    seq = results.get("long sequential")
    batched = next((v for k, v in results.items() if k.startswith("long batched")), None)
    if ok(seq) and ok(batched):
        v = seq["wall_s"] / batched["wall_s"]
        add(f"long audio: batched >= {TARGET_BATCHED}x sequential throughput", v, v >= TARGET_BATCHED, f"{v:.2f}x")
    rss = sorted((v for k, v in results.items() if k.startswith("rss ") and ok(v)), key=lambda r: r["duration_s"])
    if len(rss) == 2:
        short, long_ = rss
        growth = long_["peak_rss"] - short["peak_rss"]
        extra = long_["transcript_bytes"] - short["transcript_bytes"]
        add("long audio: peak RSS does not grow with length beyond the transcript", growth,
            growth <= max(4 * extra, 32 * 1024**2),
            f"{short['duration_s'] / 60:.0f} min {short['peak_rss'] / GIB:.2f} GiB, {long_['duration_s'] / 60:.0f} "
            f"min {long_['peak_rss'] / GIB:.2f} GiB (+{growth / 1024**2:.0f} MiB; transcript +{extra / 1024:.0f} KiB)")
    return rows


def _preset_targets(i8: dict[str, Any], f32: dict[str, Any] | None, fp32: dict[str, Any] | None,
                    bf16: dict[str, Any] | None, raw: dict[str, Any] | None,
                    add: Callable[[str, float | None, bool, str], None]) -> None:
    """Issue 6's targets, all about the cpu-int8 preset's run."""
    def ok(r: dict[str, Any] | None) -> bool:
        return bool(r) and "error" not in r

    if ok(fp32):
        v = fp32["total_s"] / i8["total_s"]
        add(f"cpu-int8 >= {TARGET_VS_FUNASR_FP32}x faster than funasr fp32", v, v >= TARGET_VS_FUNASR_FP32,
            f"{v:.2f}x")
    if ok(bf16):
        v = bf16["total_s"] / i8["total_s"]
        add(f"cpu-int8 >= {TARGET_VS_FUNASR_BF16}x faster than funasr bf16", v, v >= TARGET_VS_FUNASR_BF16,
            f"{v:.2f}x")
    add(f"int8 encoder < {PEER['encoder_s']} s", i8["encoder_s"], i8["encoder_s"] < PEER["encoder_s"],
        f"{i8['encoder_s']:.3f} s")
    add(f"prefill < {PEER['prefill_s']} s (prefix cached)", i8["prefill_s"], i8["prefill_s"] < PEER["prefill_s"],
        f"{i8['prefill_s']:.3f} s (uncached {i8['prefill_uncached_s']:.3f} s)")
    if ok(raw):
        # Per-step rates on both sides: our N tokens take N-1 llama_decode calls after the prompt.
        n = max(i8["n_tokens"])
        ours_step = (n - 1) / i8["decode_s"] if n > 1 else i8["decode_tok_s"]
        v = ours_step / raw["c_decode_tok_s"]
        add(f"decode >= {TARGET_DECODE_VS_LLAMA:.0%} of llama.cpp's C decode rate (q8_0)", v,
            v >= TARGET_DECODE_VS_LLAMA,
            f"{v:.1%} ({ours_step:.1f} vs {raw['c_decode_tok_s']:.1f} steps/s)")
    if ok(f32):
        v = f32["encoder_s"] / i8["encoder_s"]
        add(f"int8 encoder >= {TARGET_INT8_ENCODER_SPEEDUP}x faster than fp32", v,
            v >= TARGET_INT8_ENCODER_SPEEDUP, f"{v:.2f}x")
    gb = i8["peak_rss"] / 1e9
    add(f"cpu-int8 peak RSS <= {TARGET_INT8_RSS_GB} GB", gb, gb <= TARGET_INT8_RSS_GB,
        f"{gb:.2f} GB ({i8['peak_rss'] / GIB:.2f} GiB)")


# --------------------------------------------------------------------------- main


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
    p.add_argument("--size", default=None, help="checkpoint shape from tests/checkpoint.py (default full; smoke tiny)")
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


def long_audio_file(clip: Path, minutes: float, folder: Path) -> Path:
    """`clip` + 1 s of silence, repeated to last `minutes`, as an mp3 (built once, cached by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{clip.stem}-{minutes:g}min.mp3"
    if out.is_file():
        return out
    unit = folder / f"{clip.stem}-unit.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(clip), "-af", "apad=pad_dur=1", "-ar", "16000",
                    "-ac", "1", str(unit)], check=True)
    repeats = max(1, round(minutes * 60 / _duration_seconds(str(unit))))
    part = out.with_name(out.name + ".part.mp3")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", str(repeats - 1), "-i", str(unit),
                    "-c:a", "libmp3lame", "-b:a", "48k", str(part)], check=True)
    part.rename(out)
    return out


def mixed_audio_file(clip: Path, minutes: float, folder: Path, seed: int = 0) -> Path:
    """Slices of `clip` 1 to 10 s long (seeded), each followed by 1 s of silence, for `minutes` (a wav)."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{clip.stem}-mixed-{minutes:g}min.wav"
    if out.is_file():
        return out
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(clip), "-f", "f32le", "-ac", "1", "-ar", "16000", "-"],
                         check=True, capture_output=True).stdout
    wave = np.frombuffer(raw, dtype=np.float32)
    sr, rng = 16000, np.random.default_rng(seed)
    gap = np.zeros(sr, dtype=np.float32)
    parts, total = [], 0
    while total < minutes * 60 * sr:
        length = int(rng.uniform(1.0, min(10.0, len(wave) / sr)) * sr)
        start = int(rng.integers(0, len(wave) - length + 1))
        parts += [wave[start:start + length], gap]
        total += length + len(gap)
    part = out.with_name(out.name + ".part.wav")
    sf.write(part, np.concatenate(parts), sr, subtype="PCM_16")
    part.rename(out)
    return out


def run_long_cases(args: argparse.Namespace, models: Path, common: dict[str, Any],
                   results: dict[str, dict[str, Any]], say: Callable[[str], None]) -> None:
    """Issue 7's cases on the cpu-int8 preset through the VAD path (speculation off: random weights)."""
    preset = PRESETS["cpu-int8"]
    base = {"kind": "long", "model_dir": str(models), "encoder": str(models / preset.encoder_file),
            "gguf": str(models / preset.gguf_file), **common}
    folder = args.cache / "audio"
    throughput = long_audio_file(args.audio, args.long_minutes, folder)
    for label, width in (("sequential", 1), (f"batched x{args.long_batch}", args.long_batch)):
        say(f"long audio {args.long_minutes:g} min, {label}, {args.tokens} tokens per segment ...")
        results[f"long {label}"] = run_child({**base, "audio": str(throughput), "n_seq_max": width},
                                             args.threads, args.child_timeout)
    mixed = mixed_audio_file(args.audio, args.mixed_minutes, folder)
    b = args.long_batch
    for label, width, refill in (("sequential", 1, True), (f"batched x{b}, fixed groups", b, False),
                                 (f"batched x{b}", b, True)):
        say(f"mixed-length audio {args.mixed_minutes:g} min, {label}, {MIXED_RATE:g} tokens/s ...")
        results[f"mixed {label}"] = run_child({**base, "audio": str(mixed), "n_seq_max": width, "rate": MIXED_RATE,
                                               "refill": refill}, args.threads, args.child_timeout)
    memory = long_audio_file(args.audio, args.rss_minutes, folder)
    for minutes, path in ((args.long_minutes, throughput), (args.rss_minutes, memory)):
        say(f"long audio peak RSS, {minutes:g} min file, 1 token per segment, batch 4 ...")
        results[f"rss {minutes:g} min"] = run_child({**base, "audio": str(path), "n_seq_max": 4, "tokens": 1},
                                                    args.threads, args.child_timeout)


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


if __name__ == "__main__":
    sys.exit(main())
