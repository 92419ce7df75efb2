"""The decoder on every x86 CPU: no llama.cpp code path that crashes on a CPU reporting a feature.

llama.cpp puts q8_0 weights in AMX buffers when the CPU reports AMX_INT8, and its AMX kernels die
with SIGILL in OpenMP worker threads (tile permission requested on the main thread only). The
decoder must never take that path; these tests fail on such a machine if it does (a crash is a
non-zero exit of the subprocess), and check the decision itself on every machine.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from funasr_nano.models import llm
from funasr_nano.models.gguf_file import GGUF_MAGIC
from funasr_nano.models.llm import extra_buffers_safe, llama_system_info

ROOT = Path(__file__).resolve().parent.parent

SAPPHIRE_RAPIDS = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
                   "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | AMX_INT8 = 1 | "
                   "LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
EPYC = ("CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX_VNNI = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | "
        "AVX512 = 1 | AVX512_VBMI = 1 | AVX512_VNNI = 1 | AVX512_BF16 = 1 | LLAMAFILE = 1 | OPENMP = 1 | REPACK = 1 | ")
AVX2_ONLY = "CPU : SSE3 = 1 | SSSE3 = 1 | AVX = 1 | AVX2 = 1 | F16C = 1 | FMA = 1 | BMI2 = 1 | OPENMP = 1 | REPACK = 1 | "


@pytest.mark.parametrize(("info", "safe"), [(SAPPHIRE_RAPIDS, False), (EPYC, True), (AVX2_ONLY, True),
                                            ("CUDA : ARCHS = 900 | CPU : AVX2 = 1 | AMX_INT8 = 1 | ", False)])
def test_extra_buffers_refused_exactly_where_llama_cpp_reports_amx(info: str, safe: bool):
    assert extra_buffers_safe(info) is safe


@pytest.mark.parametrize(("info", "wanted", "used"), [(SAPPHIRE_RAPIDS, True, False), (SAPPHIRE_RAPIDS, False, False),
                                                      (EPYC, True, True), (EPYC, False, False)])
def test_every_way_of_loading_takes_the_guard(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, info: str,
                                              wanted: bool, used: bool):
    """The guarded loader, LlamaDecoder (through it) and the high-level `Llama` API (benchmarks) all ask
    llama.cpp for extra buffer types only where it reports no AMX. llama.cpp's load is replaced by a
    recorder of the parameters it gets, so this holds on any CPU."""
    import llama_cpp.llama as api

    got: list[bool] = []

    def record(_path: bytes, params: object) -> None:  # llama.cpp refusing the file: a None model
        got.append(bool(params.use_extra_bufts))
        return None

    monkeypatch.setattr(llm, "llama_system_info", lambda: info)
    monkeypatch.setattr(llm.L, "llama_model_load_from_file", record)  # what the guarded loader calls
    monkeypatch.setattr(api.llama_cpp, "llama_model_load_from_file", record)  # what `Llama` calls
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(GGUF_MAGIC + bytes(60))

    assert llm.load_llama_model(gguf, extra_buffers=wanted) is None
    with pytest.raises(llm.DecoderError):
        llm.LlamaDecoder(gguf, llm.DecoderOptions(extra_buffers=wanted))
    defaults = api.llama_cpp.llama_model_default_params
    with pytest.raises(ValueError, match="Failed to load model"):
        llm.load_llama_api(gguf, extra_buffers=wanted, verbose=False)
    assert api.llama_cpp.llama_model_default_params is defaults  # llama-cpp-python's own defaults are back
    assert got == [used] * 3


def test_system_info_is_llama_cpps_feature_line():
    info = llama_system_info()
    assert info.startswith("CPU :") or "CPU :" in info, info
    assert " = 1 |" in info


DECODE_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, {root!r})
    from funasr_nano.models.llm import DecoderOptions, LlamaDecoder
    decoder = LlamaDecoder({gguf!r}, DecoderOptions(threads=2, extra_buffers={extra}))
    prompt = decoder.tokenize("<|im_start|>user\\n语音转写：<|im_end|>\\n<|im_start|>assistant\\n")
    decoder.decode_tokens(prompt, 0)
    logits, tokens = decoder.logits(), []
    for pos in range(len(prompt), len(prompt) + 8):
        tokens.append(int(logits.argmax()))
        logits = decoder.step(tokens[-1], pos)
    print("tokens", len(tokens))
""")


@pytest.mark.parametrize("extra", [True, False], ids=["default", "no-extra-buffers"])
def test_q8_0_gguf_decodes_in_a_fresh_process(tiny_models: Path, extra: bool):
    """A fresh process, as a user's first run: loading and the first llama_decode of q8_0 weights.

    By default (`extra_buffers=True`) the decoder still refuses AMX buffers where llama.cpp reports
    AMX, and on other CPUs takes llama.cpp's repacked layouts; neither may crash.
    """
    gguf = tiny_models / "qwen3-0.6b-asr.q8_0.gguf"
    script = DECODE_SCRIPT.format(root=str(ROOT), gguf=str(gguf), extra=extra)
    try:
        proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{gguf.name}: decoding hung for 300 s")
    assert proc.returncode == 0, (f"{gguf.name}: the decoder process ended with {proc.returncode} "
                                  f"(-4 is SIGILL) on a CPU whose llama.cpp reports: {llama_system_info()}\n"
                                  f"{proc.stderr[-2000:]}")
    assert "tokens 8" in proc.stdout
