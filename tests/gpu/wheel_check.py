"""Does a llama-cpp-python wheel load and decode on the CPU with no GPU visible? (issue 28, step 1)

The first step of `tests/gpu/prepare.sh`, on the CUDA wheel that the GPU check carries, so that a
build which cannot load (the H200's of 2026-12-01 died with SIGSEGV in llama.cpp's `print_info`
at every model load) is caught here, before a GPU is at hand:

- the wheel goes into its own folder (`pip install --target`), imported through PYTHONPATH in a
  child process with `CUDA_VISIBLE_DEVICES=` (no GPU) and the CUDA libraries it needs (cuBLAS,
  cudart) on LD_LIBRARY_PATH;
- the child loads a tiny random Qwen3 GGUF through `funasr_nano.models.llm.LlamaDecoder` (the
  project's one guarded loader) with every layer asked for the GPU, as `03_inference_gpu.py`
  asks, and decodes a few greedy tokens; llama.cpp's log must show `print_info` ran;
- the same child on this interpreter's own llama-cpp-python (the CPU build) gives the reference
  tokens: both must agree;
- recorded for the report: `ldd` of the wheel's libraries (which libstdc++, libgomp, cuBLAS,
  cudart they resolve), the libstdc++ the child process has mapped (/proc/self/maps), the newest
  GLIBC/GLIBCXX/CXXABI symbol versions they need, and llama.cpp's system info (the CPU features
  compiled in: the wheel must not carry AMX or AVX-512, so that no host's CPU was baked in).

usage: python -m tests.gpu.wheel_check WHEEL --cuda-lib DIR [--cuda-lib DIR...] [--out report.json]
Exit 0 when the wheel loads and decodes as the CPU build does; 1 otherwise (the reasons printed).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

PROMPT = "<|im_start|>user\nTranscribe the audio.<|im_end|>\n<|im_start|>assistant\n"
STEPS = 8
RUNTIME_LIBS = re.compile(r"stdc\+\+|gcc_s|gomp|cudart|cublas|libcuda\.|not found")
FORBIDDEN_CPU_FEATURES = ("AMX", "AVX512")  # what a host-native build would bring in


# --------------------------------------------------------------------------- the child


def child(gguf: Path) -> dict[str, Any]:
    """In a fresh process: import llama_cpp, load through the guarded loader, decode greedy tokens."""
    import llama_cpp
    import numpy as np

    from funasr_nano.models import llama_log
    from funasr_nano.models.llm import DecoderOptions, LlamaDecoder, gpu_offload_supported, llama_system_info

    log: list[str] = []
    llama_log.install()
    with llama_log.capture(lambda _level, text: log.append(text)):
        decoder = LlamaDecoder(gguf, DecoderOptions(n_ctx=256, n_batch=256, n_seq_max=1, n_gpu_layers=-1,
                                                    kv_f32=True, flash_attn=False))
        prompt = decoder.tokenize(PROMPT)
        decoder.decode_tokens(prompt, 0)
        logits = np.array(decoder.logits())
        first_logits = logits.copy()
        tokens: list[int] = []
        for pos in range(len(prompt), len(prompt) + STEPS):
            token = int(np.argmax(logits))
            tokens.append(token)
            logits = np.array(decoder.step(token, pos))
        decoder.close()
    maps = sorted({line.split()[-1] for line in Path("/proc/self/maps").read_text().splitlines()
                   if len(line.split()) >= 6 and re.search(r"stdc\+\+|gcc_s|gomp|cudart|cublas|libllama|libggml",
                                                          line.split()[-1])})
    text = "".join(log)
    return {"llama_cpp_file": llama_cpp.__file__, "llama_cpp_version": llama_cpp.__version__,
            "system_info": llama_system_info(), "gpu_offload_supported": gpu_offload_supported(),
            "print_info_ran": "print_info: arch" in text,
            "cuda_log": [line.strip() for line in text.splitlines() if "cuda" in line.lower()][:6],
            "prompt_tokens": len(prompt), "tokens": tokens,
            "first_logits": [float(x) for x in first_logits], "mapped_libs": maps}


# --------------------------------------------------------------------------- the parent


def run_child(gguf: Path, env: dict[str, str], timeout: int = 600) -> dict[str, Any]:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = Path(f.name)
    try:
        proc = subprocess.run([sys.executable, "-X", "faulthandler", "-m", "tests.gpu.wheel_check", "--child",
                               str(gguf), "--result", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=timeout)
        if proc.returncode != 0 or not out.stat().st_size:
            return {"exit_code": proc.returncode, "stderr_tail": proc.stderr.strip().splitlines()[-25:]}
        return {"exit_code": 0, **json.loads(out.read_text(encoding="utf-8"))}
    finally:
        out.unlink(missing_ok=True)


def ldd(libdir: Path, env: dict[str, str]) -> dict[str, list[str]]:
    out = {}
    for lib in sorted(libdir.glob("lib*.so*")):
        text = subprocess.run(["ldd", str(lib)], env=env, capture_output=True, text=True).stdout
        out[lib.name] = [" ".join(line.split()) for line in text.splitlines() if RUNTIME_LIBS.search(line)]
    return out


def runpaths(libdir: Path) -> dict[str, str]:
    """Each library's RUNPATH: `$ORIGIN` alone, or the wheel would find libraries only on the machine that built it."""
    out = {}
    for lib in sorted(libdir.glob("lib*.so*")):
        text = subprocess.run(["readelf", "-d", str(lib)], capture_output=True, text=True).stdout
        found = re.search(r"Library (?:runpath|rpath): \[(.*?)\]", text)
        out[lib.name] = found.group(1) if found else ""
    return out


def symbol_versions(libdir: Path) -> dict[str, str]:
    """The newest GLIBC_ / GLIBCXX_ / CXXABI_ version any of the libraries needs (what the host must have)."""
    newest: dict[str, tuple[int, ...]] = {}
    for lib in libdir.glob("lib*.so*"):
        text = subprocess.run(["objdump", "-T", str(lib)], capture_output=True, text=True).stdout
        for family, version in re.findall(r"\b(GLIBCXX|GLIBC|CXXABI)_([0-9.]+)\b", text):
            v = tuple(int(x) for x in version.split("."))
            newest[family] = max(newest.get(family, v), v)
    return {k: ".".join(map(str, v)) for k, v in sorted(newest.items())}


def check(wheel: Path, cuda_libs: list[Path], work: Path) -> dict[str, Any]:
    from tests.gpu.check import make_gguf

    site = work / "site"
    shutil.rmtree(site, ignore_errors=True)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                    "--target", str(site), str(wheel)], check=True)
    libdir = site / "llama_cpp" / "lib"
    gguf = make_gguf(work / "gguf", "tiny", ("f32",))["f32"]

    base = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "LD_LIBRARY_PATH", "LD_PRELOAD")}
    base["FUNASR_DEBUG"] = ""
    ld_path = os.pathsep.join(str(p) for p in cuda_libs)
    wheel_env = {**base, "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)]), "CUDA_VISIBLE_DEVICES": "",
                 "LD_LIBRARY_PATH": ld_path}
    report: dict[str, Any] = {"wheel": str(wheel), "wheel_mb": round(wheel.stat().st_size / 2**20, 1),
                              "libs": {p.name: round(p.stat().st_size / 2**20, 1) for p in sorted(libdir.iterdir())},
                              "ldd": ldd(libdir, wheel_env), "runpath": runpaths(libdir),
                              "needs": symbol_versions(libdir)}
    report["wheel_run"] = run_child(gguf, wheel_env)
    report["cpu_build_run"] = run_child(gguf, {**base, "PYTHONPATH": str(ROOT)})

    w, c = report["wheel_run"], report["cpu_build_run"]
    problems = []
    for lib, lines in report["ldd"].items():
        problems += [f"{lib}: {line}" for line in lines if "not found" in line]
    problems += [f"{lib}: RUNPATH {path!r} (only $ORIGIN travels)" for lib, path in report["runpath"].items()
                 if path not in ("", "$ORIGIN")]
    if w["exit_code"] != 0:
        problems.append(f"the wheel's load/decode exited {w['exit_code']}: " + " / ".join(w["stderr_tail"][-6:]))
    else:
        if not w["llama_cpp_file"].startswith(str(site)):
            problems.append(f"llama_cpp came from {w['llama_cpp_file']}, not the wheel")
        if not w["print_info_ran"]:
            problems.append("llama.cpp's log has no print_info line")
        baked = [f for f in FORBIDDEN_CPU_FEATURES if f in w["system_info"]]
        if baked:
            problems.append(f"the wheel's CPU backend has {baked} compiled in (a host-native build)")
    if c["exit_code"] != 0:
        problems.append(f"the CPU build's reference run exited {c['exit_code']}: " + " / ".join(c["stderr_tail"][-6:]))
    if w["exit_code"] == 0 and c["exit_code"] == 0:
        import numpy as np

        a, b = np.array(w.pop("first_logits")), np.array(c.pop("first_logits"))
        report["first_logits_max_err_over_std"] = float(np.max(np.abs(a - b)) / (np.std(b) or 1.0))
        report["tokens_equal"] = w["tokens"] == c["tokens"]
        if not report["tokens_equal"]:
            problems.append(f"greedy tokens differ: wheel {w['tokens']} vs CPU build {c['tokens']}")
    report["problems"] = problems
    return report


def summary(report: dict[str, Any]) -> str:
    w, c = report["wheel_run"], report["cpu_build_run"]
    lines = [f"wheel: {report['wheel']} ({report['wheel_mb']} MB)",
             "libraries: " + ", ".join(f"{k} {v} MB" for k, v in report["libs"].items()),
             f"needs from the host: {report['needs']}; RUNPATH: {sorted(set(report['runpath'].values()))}"]
    for lib in ("libllama.so", "libggml-cuda.so.0"):
        if lib in report["ldd"]:
            lines += [f"ldd {lib}: {line}" for line in report["ldd"][lib]]
    if w["exit_code"] == 0:
        lines += [f"wheel, CUDA_VISIBLE_DEVICES='': loaded from {w['llama_cpp_file']}; print_info ran: "
                  f"{w['print_info_ran']}; GPU offload: {w['gpu_offload_supported']}",
                  f"  system info: {w['system_info']}",
                  f"  mapped: {', '.join(w['mapped_libs'])}",
                  f"  tokens: {w['tokens']}"]
    if c["exit_code"] == 0:
        lines += [f"CPU build: system info: {c['system_info']}", f"  tokens: {c['tokens']}"]
    if "tokens_equal" in report:
        lines.append(f"tokens equal: {report['tokens_equal']}; first logits max error "
                     f"{report['first_logits_max_err_over_std']:.2e} of their std")
    lines += [f"PROBLEM: {p}" for p in report["problems"]] or ["wheel check: OK"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("wheel", type=Path, nargs="?")
    parser.add_argument("--cuda-lib", type=Path, action="append", default=[],
                        help="folder with libcublas.so.13 / libcudart.so.13 (repeatable)")
    parser.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "funasr-wheel-check")
    parser.add_argument("--out", type=Path, help="write the JSON report here")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        args.result.write_text(json.dumps(child(args.child)), encoding="utf-8")
        return 0
    if not args.wheel:
        parser.error("WHEEL is required")
    report = check(args.wheel.resolve(), [p.resolve() for p in args.cuda_lib], args.work)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2), encoding="utf-8")
    print(summary(report))
    return 1 if report["problems"] else 0


if __name__ == "__main__":
    sys.exit(main())
