"""The GPU check script (tests/gpu/check.py) in its CPU-only dry run: every step but the CUDA build.

On a GPU machine `tests/gpu/run.sh` runs the same script at the real shapes; here the tiny shape
and llama.cpp's CPU backend show that each step runs and reports what docs/gpu.md describes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_reports_every_step(tiny_models: Path, tmp_path: Path):
    from tests.audio_fixtures import make_tone_wav

    clip = make_tone_wav(tmp_path / "clip.wav", seconds=3.0)
    report_path = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.check", "--shape", "tiny", "--work", str(tmp_path / "work"),
                           "--model", str(tiny_models), "--audio", str(clip), "--out", str(report_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["errors"] == {}

    injection = report["injection"]
    assert injection["llama_decode_calls"] == 1 and injection["prompt_rows"] > 8 and injection["finite"]
    logits = report["logits"]
    assert logits["nan"] == 0 and logits["positions"] == injection["prompt_rows"]
    assert logits["greedy_tokens_equal"] and logits["max_abs_err"] == 0.0  # CPU against CPU in the dry run
    assert [d["sequences"] for d in report["decode"]] == [1, 8]
    assert all(d["tokens_per_s"] > 0 for d in report["decode"])

    e2e = report["end_to_end"]
    for script in ("03_inference_gpu.py", "03_inference_cpu.py"):
        assert e2e[script]["exit_code"] == 0, e2e[script]
        assert e2e[script]["text"], f"{script} decoded nothing: {e2e[script]}"
    assert e2e["texts_equal"]
    assert "03_inference_gpu.py" in proc.stdout and "one llama_decode" in proc.stdout  # the Markdown summary


# --------------------------------------------------------------------------- issue 28: the carried CUDA wheel

GPU_DIR = ROOT / "tests" / "gpu"


def _code(path: Path) -> str:
    """A shell script without its comments (what runs, not what is said about it)."""
    return "\n".join(line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
                     for line in path.read_text(encoding="utf-8").splitlines())


def test_the_wheel_build_keeps_the_hosts_cpu_out():
    """build_wheel.sh: sm_90 SASS only, no -march=native / AVX-512 / AMX / CPU variants in the CPU backend."""
    code = _code(GPU_DIR / "build_wheel.sh")
    for flag in ("-DGGML_CUDA=ON", "-DCMAKE_CUDA_ARCHITECTURES=${ARCH}-real", "-DGGML_NATIVE=OFF", "-DGGML_AVX512=OFF",
                 "-DGGML_AMX_TILE=OFF", "-DGGML_AMX_INT8=OFF", "-DGGML_BACKEND_DL=OFF", "-DGGML_CPU_ALL_VARIANTS=OFF"):
        assert flag in code, flag
    assert "GGML_NATIVE=ON" not in code and "nice -n 19" in code
    assert 'ARCH="${CUDA_ARCH:-90}"' in code


def test_run_sh_installs_the_carried_wheel_and_builds_only_as_a_fallback():
    code = _code(GPU_DIR / "run.sh")
    assert "GGML_NATIVE=ON" not in code and "-DGGML_NATIVE=OFF" in code
    wheel_install = code.index('--target "$SITE" "$wheel"')
    fallback_build = code.index("llama_cpp_python-*-trimmed.tar.gz")
    assert wheel_install < fallback_build
    assert "LD_LIBRARY_PATH" in code and ".gpu-carry/cuda-lib" in code  # cuBLAS/cudart found before the import
    assert "tests.gpu.check --shape full" in code


def test_prepare_sh_checks_the_wheel_first():
    """The wheel's CPU load/decode check fails prepare.sh before it gathers anything else."""
    code = _code(GPU_DIR / "prepare.sh")
    check = code.index("python -m tests.gpu.wheel_check")
    assert check < code.index("pip download -q --no-deps --only-binary=:all: --python-version")
    assert check < code.index("tests.gpu.check --prepare-model")
    assert 'PIPESTATUS[0]}" -eq 0 ] || {' in code and "exit 1" in code
    assert "build_wheel.sh" in code and "64 * 1024 * 1024" in code and "git ls-files" in code


def test_wheel_check_child_loads_and_decodes_on_the_cpu_build(tiny_models: Path, tmp_path: Path):
    """The child that prepare.sh runs on the CUDA wheel, here on the CPU build: the guarded load, print_info, tokens."""
    result = tmp_path / "child.json"
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.wheel_check", "--child",
                           str(tiny_models / "qwen3-0.6b-asr.f32.gguf"), "--result", str(result)],
                          cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    child = json.loads(result.read_text(encoding="utf-8"))
    assert child["print_info_ran"] and len(child["tokens"]) == 8
    assert "CPU :" in child["system_info"]
    assert any("libstdc++" in lib for lib in child["mapped_libs"])
    assert any("libllama" in lib for lib in child["mapped_libs"])


def test_wheel_check_flags_a_host_native_cpu_backend():
    from tests.gpu.wheel_check import FORBIDDEN_CPU_FEATURES

    native = "CPU : SSE3 = 1 | AVX2 = 1 | AVX512 = 1 | AMX_INT8 = 1 | OPENMP = 1 |"
    portable = "CUDA : ARCHS = 900 | CPU : SSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | OPENMP = 1 |"
    assert [f for f in FORBIDDEN_CPU_FEATURES if f in native] == ["AMX", "AVX512"]
    assert not [f for f in FORBIDDEN_CPU_FEATURES if f in portable]
