"""The measurements, each run in a child process of its own (so that its peak RSS is its own).

A child gets a JSON spec, measures in-process and writes a JSON result file; `run_child` starts one.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from funasr_nano.presets import context_per_sequence  # noqa: E402

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
    from funasr_nano.export.export_gguf import export_gguf
    from funasr_nano.export.export_onnx import export_onnx
    from testing.checkpoint import build_checkpoint

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
    """One 03 preset through funasr_nano.engine.Engine, in-process.

    The whole clip as one segment (no VAD) in a one-sequence context of 1280 cells: the set-up every
    earlier result in RESULTS.md was measured with, so that runs compare across commits.
    """
    t_import = time.perf_counter()
    from funasr_nano.engine import Engine, TranscribeOptions
    from funasr_nano.models.llm import DecoderOptions

    imports_s = time.perf_counter() - t_import  # a fresh child: the engine's imports (numpy, ORT, llama.cpp)
    threads, n = spec["threads"], spec["tokens"]
    engine = Engine(
        spec["model_dir"], encoder_path=spec["encoder"], gguf_path=spec["gguf"], threads=threads,
        providers=spec.get("providers"), min_new_tokens=n,
        decoder_options=DecoderOptions(threads=threads, n_gpu_layers=spec.get("n_gpu_layers", 0), n_ctx=1280,
                                       n_seq_max=1),
    )
    extra: dict[str, Any] = {"speculative": bool(spec.get("speculative", False))}
    options = TranscribeOptions(max_new_tokens=n, vad="none", **extra)
    audio = spec["audio"]

    warm = [engine.transcribe(audio, options) for _ in range(max(1, spec["warmup"]))]
    runs = [engine.transcribe(audio, options) for _ in range(spec["runs"])]

    # Prefill with the constant prefix recomputed (a new prompt / the first file), in steady state.
    from funasr_nano.audio.load import load_audio

    wave = load_audio(audio, engine.frontend.sample_rate)
    prepared = engine.prepare(wave, options.prompt)

    def prefill_uncached(_decoder: Any, prefixes: Any) -> float:
        prefixes.forget()  # the next admission decodes the prefix again,
        store, prefixes.store = prefixes.store, None  # not loaded from the saved cells
        try:
            t0 = time.perf_counter()
            prefixes.admit(prepared.prompt, 0)
            return time.perf_counter() - t0
        finally:
            prefixes.store = store

    uncached = [engine.scheduler.call(prefill_uncached) for _ in range(spec["runs"])]
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
        "load_times": dict(engine.load_times),  # seconds per model (encoder and llama.cpp side by side)
        "encoder_session": engine.encoder.session_origin,
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
        "prompt_prefix_tokens": len(prepared.prefix_ids),
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
    loop as the engine, no audio).
    """
    import gc

    import llama_cpp as L

    from funasr_nano.models.llm import DecoderOptions, LlamaDecoder, load_llama_api

    threads, n, length = spec["threads"], spec["tokens"], spec["prompt_tokens"]
    gguf = spec["gguf"]
    out: dict[str, Any] = {}

    # --- high-level API, loaded through the project's guarded loader: LlamaDecoder's choice of
    # llama.cpp's extra buffer types (like with like, and never the AMX kernels that crash)
    llm = load_llama_api(gguf, n_gpu_layers=spec.get("n_gpu_layers", 0),
                         extra_buffers=DecoderOptions().extra_buffers, n_ctx=max(512, length + n + 8),
                         n_threads=threads, n_threads_batch=threads, verbose=False)
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

    # --- our decoder, the same context settings as the preset runs, a plain greedy loop
    from testing.reference import greedy

    t0 = time.perf_counter()
    dec = LlamaDecoder(gguf, DecoderOptions(threads=threads, n_gpu_layers=spec.get("n_gpu_layers", 0), n_ctx=1280,
                                            n_seq_max=1))
    load_s = time.perf_counter() - t0
    prompt = _raw_prompt(dec.tokenize, length)
    prefills, decodes, totals, counts = [], [], [], []
    for i in range(spec["warmup"] + spec["runs"]):
        dec.clear(0, 0)
        t0 = time.perf_counter()
        dec.decode_tokens(prompt, 0)
        logits = dec.logits(-1)
        t1 = time.perf_counter()
        tokens = greedy(dec, logits, len(prompt), n, min_new_tokens=n)
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
    """The official funasr AutoModel (PyTorch), loaded offline as testing/oracle.py does, instrumented."""
    for var in ("MODELSCOPE_OFFLINE", "HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(var, "1")
    import torch

    threads, n = spec["threads"], spec["tokens"]
    torch.set_num_threads(threads)
    import funasr.models.fun_asr_nano.model as nano_module
    from funasr import AutoModel

    from testing.oracle import quiet_funasr

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
    from funasr_nano.audio.load import load_audio

    return load_audio(audio, 16000).shape[0] / 16000


def child_speculative(spec: dict[str, Any]) -> dict[str, Any]:
    """Decode speed of plain greedy vs speculative decoding with synthetic drafts (issue 9).

    Random weights make the real CTC draft meaningless, so the drafts are made from the decoder's
    own greedy output: all right (the upper bound), every second token wrong, random tokens.
    """
    from benchmarks.speculative import bench_speculative
    from funasr_nano.audio.load import load_audio
    from funasr_nano.engine import Engine
    from funasr_nano.models.llm import DecoderOptions

    threads = spec["threads"]
    engine = Engine(spec["model_dir"], encoder_path=spec["encoder"], gguf_path=spec["gguf"], threads=threads,
                    decoder_options=DecoderOptions(threads=threads, n_ctx=1280, n_seq_max=1))
    wave = load_audio(spec["audio"], engine.frontend.sample_rate)
    bench_speculative(engine, wave, spec["tokens"], draft_kinds=("own",), repeats=1)  # warm-up
    result = bench_speculative(engine, wave, spec["tokens"], draft_kinds=tuple(spec["kinds"]),
                               repeats=spec["runs"])
    engine.close()
    return {**result, "peak_rss": peak_rss_bytes()}


def child_long(spec: dict[str, Any]) -> dict[str, Any]:
    """One long file through the VAD path, `n_seq_max` segments decoded at a time (issue 7)."""
    from funasr_nano.engine import TranscribeOptions
    from funasr_nano.models.llm import DecoderOptions
    from testing.bench_engine import BenchmarkEngine

    threads, n = spec["threads"], spec["tokens"]
    rate = spec.get("rate", 0.0)  # tokens per second of segment audio instead of a fixed count
    if rate:
        n = math.ceil(rate * 30.0) + 1  # the VAD's longest segment
    engine = BenchmarkEngine(spec["model_dir"], encoder_path=spec["encoder"], gguf_path=spec["gguf"], threads=threads,
                             decoder_options=DecoderOptions(threads=threads, n_seq_max=spec["n_seq_max"],
                                                            n_ctx=context_per_sequence(n)),
                             min_new_tokens=0 if rate else n, tokens_per_second=rate, refill=spec.get("refill", True))
    options = TranscribeOptions(max_new_tokens=n, vad="silero", speculative=False)
    t0 = time.perf_counter()
    transcript = engine.transcribe(spec["audio"], options)
    wall = time.perf_counter() - t0
    engine.close()
    return {
        "wall_s": wall, "duration_s": transcript.duration, "segments": len(transcript.segments),
        "n_tokens": transcript.n_tokens, "timings": transcript.timings.to_dict(), "peak_rss": peak_rss_bytes(),
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



def whole_process(args: Any, models: Path, preset: Any) -> dict[str, Any]:
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


def run_child(spec: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    """Run one measurement in a fresh interpreter; returns its result or {'error': ...}."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env.setdefault("PYTHONWARNINGS", "ignore")
    with tempfile.TemporaryDirectory(prefix="bench-") as tmp:
        result_file = Path(tmp) / "result.json"
        cmd = [sys.executable, str(ROOT / "benchmarks" / "benchmark.py"), "--child-spec", json.dumps(spec),
               "--child-result", str(result_file)]
        try:
            proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        except subprocess.TimeoutExpired:
            return {"error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not result_file.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-6:]
            return {"error": f"exit code {proc.returncode}: " + " | ".join(tail)}
        return json.loads(result_file.read_text(encoding="utf-8"))
