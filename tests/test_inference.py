"""Our ONNX + GGUF transcription against the official funasr FunASRNano, on two tiny shapes.

Parity set-up: fp32 ONNX encoder, f32 GGUF, f32 KV cache, flash attention off.
Logits are compared teacher-forced on funasr's own tokens, after the prompt and
after each of the first 16 generated tokens, with a tolerance of 1e-3 of the
logits' standard deviation.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from funasr_nano.audio.load import load_audio
from funasr_nano.engine import TranscribeOptions
from funasr_nano.models.prompt import PromptOptions
from tests.exported import parity_engine

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16
TOLERANCE = 1e-3  # of the logits' std

CASES = {
    "default": PromptOptions(),
    "language": PromptOptions(language="中文"),
    "no_itn": PromptOptions(itn=False),
    "hotwords": PromptOptions(hotwords=("通义", "魔搭", "Fun-ASR")),
}


@pytest.fixture(scope="session")
def en_wav(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.audio_fixtures import espeak_wav

    return espeak_wav(tmp_path_factory.mktemp("audio") / "en.wav",
                      "The quick brown fox jumps over the lazy dog. Speech recognition on a small computer.")


@pytest.fixture(scope="module")
def engines(tiny_models: Path, tiny2_models: Path):
    made = {"tiny": parity_engine(tiny_models), "tiny2": parity_engine(tiny2_models)}
    yield made
    for engine in made.values():
        engine.close()


def _oracle_kwargs(options: PromptOptions) -> dict:
    return {"language": options.language, "itn": options.itn, "hotwords": list(options.hotwords)}


def _check_parity(engine, oracle, audio: Path, options: PromptOptions) -> None:
    ref = oracle.run(audio, max_new_tokens=STEPS, **_oracle_kwargs(options))
    wave = load_audio(audio)

    prepared = engine.prepare(wave, options)
    ours_prompt = prepared.prefix_ids + [0] * prepared.audio_rows.shape[0] + prepared.suffix_ids
    assert ours_prompt == ref.prompt_ids, "prompt token layout differs from funasr's"
    assert prepared.audio_rows.shape[0] == ref.audio_len

    want = oracle.teacher_forced_logits(ref.prompt_embeds, ref.token_ids)
    got = engine.teacher_forced_logits(wave, options, ref.token_ids)
    assert got.shape == want.shape == (STEPS + 1, want.shape[1])
    diff = float(np.abs(got - want).max())
    bound = TOLERANCE * float(want.std())
    assert diff <= bound, f"max |logit diff| {diff:.3g} > {bound:.3g} (1e-3 of std)"

    transcript = engine.transcribe(wave, TranscribeOptions(prompt=options, max_new_tokens=STEPS, vad="none"))
    assert transcript.segments[0].token_ids == ref.token_ids
    assert transcript.text == ref.text


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_and_tokens_equal_funasr_on_shared_mp3(case, engines, tiny_ckpt, tiny2_ckpt, zh_mp3, oracle_factory):
    for name, ckpt in (("tiny", tiny_ckpt), ("tiny2", tiny2_ckpt)):
        _check_parity(engines[name], oracle_factory(ckpt), zh_mp3, CASES[case])


def test_logits_and_tokens_equal_funasr_on_english_wav(engines, tiny_ckpt, tiny2_ckpt, en_wav, oracle_factory):
    for name, ckpt in (("tiny", tiny_ckpt), ("tiny2", tiny2_ckpt)):
        _check_parity(engines[name], oracle_factory(ckpt), en_wav, PromptOptions())


def test_f16_gguf_tokens_equal_or_explained(tiny_models, tiny2_models, tiny_ckpt, tiny2_ckpt, zh_mp3, en_wav,
                                            oracle_factory):
    """f16 weights round the bf16 checkpoint's values differently; tokens must match unless funasr's
    own top-2 logits were closer than the f16 error at the step where we differ."""
    from funasr_nano.engine import Engine

    for models, ckpt in ((tiny_models, tiny_ckpt), (tiny2_models, tiny2_ckpt)):
        oracle = oracle_factory(ckpt)
        engine = Engine(models, gguf_path=models / "qwen3-0.6b-asr.gguf")
        try:
            for audio in (zh_mp3, en_wav):
                ref = oracle.run(audio, max_new_tokens=STEPS)
                ours = engine.transcribe(audio, TranscribeOptions(max_new_tokens=STEPS, vad="none")).segments[0].token_ids
                if ours == ref.token_ids:
                    continue
                k = next(i for i, (a, b) in enumerate(zip(ours, ref.token_ids)) if a != b)
                want = oracle.teacher_forced_logits(ref.prompt_embeds, ref.token_ids[:k])[k]
                got = engine.teacher_forced_logits(load_audio(audio), PromptOptions(), ref.token_ids[:k])[k]
                gap = float(want[ref.token_ids[k]] - want[ours[k]])
                err = float(np.abs(got - want).max())
                assert gap <= 2 * err, f"step {k}: funasr's margin {gap:.3g} exceeds twice the f16 error {err:.3g}"
        finally:
            engine.close()


def test_audio_reaches_the_llm(engines, zh_mp3, en_wav):
    for engine in engines.values():
        a = engine.teacher_forced_logits(load_audio(zh_mp3), PromptOptions(), [])[0]
        b = engine.teacher_forced_logits(load_audio(en_wav), PromptOptions(), [])[0]
        assert np.abs(a - b).max() > 100 * TOLERANCE * a.std()


def test_long_input_is_cut_into_segments_that_cover_it(engines, tiny_ckpt, zh_mp3, oracle_factory):
    """75 s (the clip 7.5 times) -> three segments of at most 30 s tiling the file; each equals funasr on it."""
    engine = engines["tiny"]
    clip = load_audio(zh_mp3)
    reps = int(np.ceil(75 * 16000 / clip.shape[0]))
    wave = np.tile(clip, reps)[: 75 * 16000]
    transcript = engine.transcribe(wave, TranscribeOptions(max_new_tokens=8, vad="none"))
    segs = transcript.segments
    assert len(segs) == 3
    assert segs[0].start == 0.0 and segs[-1].end == pytest.approx(75.0)
    for a, b in zip(segs, segs[1:]):
        assert a.end == b.start
    assert all(s.end - s.start <= 30.0 for s in segs)
    oracle = oracle_factory(tiny_ckpt)
    for seg in segs:
        piece = wave[int(round(seg.start * 16000)): int(round(seg.end * 16000))]
        assert oracle.run(piece, max_new_tokens=8).token_ids == seg.token_ids


def test_sub_frame_audio_gives_empty_text(engines):
    transcript = engines["tiny"].transcribe(np.zeros(200, np.float32))
    assert transcript.text == "" and transcript.n_tokens == 0


# --------------------------------------------------------------------------- the 03 scripts


def _run_script(script: str, *args: str, env_extra: dict | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, **(env_extra or {})}
    return subprocess.run([sys.executable, str(ROOT / script), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=env)


@pytest.mark.parametrize("script,encoder,gguf", [
    ("03_inference_cpu.py", "FunASR_Nano_Encoder.onnx", "qwen3-0.6b-asr.gguf"),
    ("03_inference_cpu_int8.py", "FunASR_Nano_Encoder.int8.onnx", "qwen3-0.6b-asr.q8_0.gguf"),
    ("03_inference_gpu.py", "FunASR_Nano_Encoder.onnx", "qwen3-0.6b-asr.gguf"),
])
def test_scripts_print_what_the_engine_computes(script, encoder, gguf, tiny_models, zh_mp3):
    from funasr_nano.engine import Engine
    from funasr_nano.models.llm import DecoderOptions

    proc = _run_script(script, str(zh_mp3), "--model-dir", str(tiny_models), "--max-new-tokens", "12",
                       "--threads", "2", "--vad", "none")
    assert proc.returncode == 0, proc.stderr
    engine = Engine(tiny_models, encoder_path=tiny_models / encoder, gguf_path=tiny_models / gguf,
                         decoder_options=DecoderOptions(threads=2))
    try:
        expected = engine.transcribe(zh_mp3, TranscribeOptions(max_new_tokens=12, vad="none")).text
    finally:
        engine.close()
    assert proc.stdout == expected + "\n"
    if script == "03_inference_gpu.py":
        assert "running on the CPU" in proc.stderr or "runs on the CPU" in proc.stderr
        assert "-DGGML_CUDA=on" in proc.stderr and "pip install" in proc.stderr  # how to get a GPU build


def test_json_output_has_segments_timings_and_speed(tiny_models, zh_mp3, tmp_path):
    proc = _run_script("03_inference_cpu.py", str(zh_mp3), "--model-dir", str(tiny_models), "--max-new-tokens", "6",
                       "--format", "json", "--output-dir", str(tmp_path), "--language", "中文", "--vad", "none")
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "zh_news_10s.json").read_text(encoding="utf-8"))
    assert data["language"] == "zh" and data["language_from"] == "request"  # --language 中文, as its ISO code
    assert data["segments"][0]["start"] == 0.0 and data["segments"][0]["end"] == pytest.approx(data["duration"])
    for stage in ("load_audio", "features", "encoder", "prefill", "decode", "total"):
        assert data["timings"][stage] >= 0
    assert data["tokens_per_second"] > 0 and data["n_tokens"] == 6


def test_no_torch_transformers_or_funasr_at_inference(tiny_models, zh_mp3):
    code = (
        "import sys, runpy\n"
        f"sys.argv = ['03_inference_cpu_int8.py', {str(zh_mp3)!r}, '--model-dir', {str(tiny_models)!r},"
        " '--max-new-tokens', '4']\n"
        "try:\n"
        "    runpy.run_path('03_inference_cpu_int8.py', run_name='__main__')\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'funasr'))\n"
        "print('HEAVY', heavy)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


HEAVY = ("torch", "transformers", "funasr", "testing")
INFERENCE_PACKAGES = ("audio", "models", "decoding", "output")


def test_inference_modules_never_import_torch_transformers_or_funasr():
    """Only funasr_nano/export/ may import torch; every other module of funasr_nano/ is on the inference path.

    Static (every import statement, lazy ones included) and dynamic (importing each module in a fresh
    interpreter loads none of them).
    """
    import ast

    package = ROOT / "funasr_nano"
    modules = [p for p in package.rglob("*.py") if "export" not in p.relative_to(package).parts]
    assert {p.parent.name for p in modules} >= set(INFERENCE_PACKAGES)
    for path in modules:
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            bad = [n for n in names if n.split(".")[0] in HEAVY]
            assert not bad, f"{path.relative_to(ROOT)} imports {bad}"
    names = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__") for p in modules)
    code = (f"import importlib, sys\nfor m in {names!r}:\n    importlib.import_module(m)\n"
            "print('HEAVY', sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'transformers', 'funasr')))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "HEAVY []" in proc.stdout, proc.stdout


def test_tokens_equal_funasr_as_shipped_with_bf16_rounded_rope(engines, tiny_ckpt, tiny2_ckpt, zh_mp3, en_wav,
                                                               oracle_factory):
    """funasr as shipped rounds the RoPE frequencies to bf16 (see docs/testing.md): the tokens must still agree;
    the logit drift it causes is reported, and bounded well below what would flip a clear argmax."""
    for name, ckpt in (("tiny", tiny_ckpt), ("tiny2", tiny2_ckpt)):
        oracle = oracle_factory(ckpt, rope="as_loaded")
        for audio in (zh_mp3, en_wav):
            ref = oracle.run(audio, max_new_tokens=STEPS)
            got = engines[name].transcribe(audio, TranscribeOptions(max_new_tokens=STEPS, vad="none"))
            assert got.segments[0].token_ids == ref.token_ids
            ours = engines[name].teacher_forced_logits(load_audio(audio), PromptOptions(), ref.token_ids)
            want = oracle.teacher_forced_logits(ref.prompt_embeds, ref.token_ids)
            drift = float(np.abs(ours - want).max() / want.std())
            print(f"{name} {audio.name}: as-shipped RoPE drift {drift:.2e} of the logits' std")
            assert drift < 0.05


def test_cli_default_path_equals_funasr_on_each_segment(tiny_models, tiny_ckpt, zh_mp3, tmp_path, oracle_factory):
    """The 03 script as users run it (Silero VAD, batch 4, speculation from the CTC head): funasr run on
    each segment the JSON reports gives that segment's tokens and text."""
    import soundfile

    clip = load_audio(zh_mp3)
    silence = np.zeros(16000, np.float32)
    path = tmp_path / "two_takes.wav"
    soundfile.write(str(path), np.concatenate([silence, clip, silence, clip[: 6 * 16000], silence]), 16000)
    proc = _run_script("03_inference_cpu.py", str(path), "--model-dir", str(tiny_models), "--max-new-tokens",
                       str(STEPS), "--threads", "2", "--format", "json", "--gguf",
                       str(tiny_models / "qwen3-0.6b-asr.f32.gguf"))
    assert proc.returncode == 0, proc.stderr
    data = json.loads(proc.stdout)
    assert data["vad"] == "silero" and len(data["segments"]) >= 2
    assert sum(s["draft_proposed"] for s in data["segments"]) > 0  # speculation was on
    wave = load_audio(path)
    oracle = oracle_factory(tiny_ckpt)
    for seg in data["segments"]:
        piece = wave[int(round(seg["start"] * 16000)): int(round(seg["end"] * 16000))]
        ref = oracle.run(piece, max_new_tokens=STEPS)
        assert seg["token_ids"] == ref.token_ids, (seg["start"], seg["end"])
        assert seg["text"] == ref.text
