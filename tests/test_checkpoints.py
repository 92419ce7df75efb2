"""The family's checkpoints: Fun-ASR-MLT-Nano-2512's 31 languages, releases without CTC weights.

A release-layout MLT checkpoint (testing/checkpoint.py: Nano's layout, config.yaml naming the CTC head,
no CTC tensors, a folder named after the model) is recognised at export, transcribes Korean equal to
funasr's FunASRNano token for token, and says what it cannot do (no CTC head) in the JSON output
and /health. Each checkpoint refuses the languages it does not take, with its own list.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from funasr_nano.audio.load import load_audio
from funasr_nano.engine import TranscribeOptions
from funasr_nano.models.prompt import MLT, MLT_LANGUAGES, NANO, PromptOptions
from funasr_nano.models.settings import ModelSettings
from tests.exported import export_model_dir, parity_engine

ROOT = Path(__file__).resolve().parent.parent
STEPS = 16
NO_CTC = {"aligned_timestamps": False, "live_partials": False, "speculative_decoding": False}


@pytest.fixture(scope="module")
def mlt_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from testing.checkpoint import build_mlt_checkpoint

    return build_mlt_checkpoint(tmp_path_factory.mktemp("releases"), "tiny", seed=3)


@pytest.fixture(scope="module")
def mlt_models(mlt_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return export_model_dir(mlt_ckpt, tmp_path_factory.mktemp("models") / "mlt")


def _transcribe(models: Path, audio: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "03_inference_cpu.py"), str(audio), "--model-dir", str(models),
           "--threads", "2", "--max-new-tokens", str(STEPS), "--vad", "none", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)


def test_the_mlt_release_is_recognised_and_exported_without_a_ctc_head(mlt_ckpt, mlt_models):
    import torch

    state = torch.load(mlt_ckpt / "model.pt", weights_only=True)
    assert not any(k.startswith(("ctc.", "ctc_decoder.")) for k in state)
    assert "ctc_decoder" in (mlt_ckpt / "config.yaml").read_text()  # the config names the head all the same
    settings = ModelSettings.load(mlt_models)
    assert settings.checkpoint == MLT and not settings.has_ctc
    assert settings.languages == MLT_LANGUAGES and len(settings.languages) == 31
    assert settings.capabilities == NO_CTC
    assert not any(p.name.startswith("FunASR_Nano_CTC") for p in mlt_models.iterdir())


def test_mlt_transcribes_korean_equal_to_funasr(mlt_ckpt, mlt_models, zh_mp3, oracle_factory):
    """Prompt `语音转写成韩文`, asked as 韩文 or ko: the same tokens and text as funasr's FunASRNano."""
    oracle = oracle_factory(mlt_ckpt)
    ref = oracle.run(zh_mp3, max_new_tokens=STEPS, language="韩文", itn=True, hotwords=[])
    engine = parity_engine(mlt_models)
    try:
        options = PromptOptions(language="韩文")
        prepared = engine.prepare(load_audio(zh_mp3), options)
        assert prepared.prefix_ids + [0] * prepared.audio_rows.shape[0] + prepared.suffix_ids == ref.prompt_ids
        transcript = engine.transcribe(zh_mp3, TranscribeOptions(prompt=options, max_new_tokens=STEPS, vad="none"))
    finally:
        engine.close()
    assert transcript.segments[0].token_ids == ref.token_ids
    assert transcript.text == ref.text
    assert transcript.language == "ko" and transcript.model["checkpoint"] == MLT

    # the command line, with the parity decoder: ko and 韩文 ask for the same prompt
    outputs = []
    for language in ("ko", "韩文"):
        proc = _transcribe(mlt_models, zh_mp3, "--language", language, "--format", "json",
                           "--gguf", str(mlt_models / "qwen3-0.6b-asr.f32.gguf"), "--batch-invariant")
        assert proc.returncode == 0, proc.stderr
        outputs.append(json.loads(proc.stdout))
    assert outputs[0]["text"] == outputs[1]["text"] == ref.text
    assert outputs[0]["language"] == "ko" and outputs[0]["language_from"] == "request"
    assert outputs[0]["model"] == {"checkpoint": MLT, "languages": list(MLT_LANGUAGES), "capabilities": NO_CTC}


def test_each_checkpoint_refuses_the_languages_it_does_not_take(tiny_models, mlt_models, zh_mp3):
    nano = _transcribe(tiny_models, zh_mp3, "--language", "ko")
    assert nano.returncode == 2 and nano.stdout == ""
    assert nano.stderr.splitlines() == [
        f"error: --language: unknown language 'ko'; {NANO} takes 中文 (zh), 英文 (en), 日文 (ja), auto"]
    mlt = _transcribe(mlt_models, zh_mp3, "--language", "xx")
    assert mlt.returncode == 2 and mlt.stdout == ""
    (line,) = mlt.stderr.splitlines()
    assert line.startswith(f"error: --language: unknown language 'xx'; {MLT} takes 中文 (zh), 英文 (en), 粤语 (yue), ")
    assert "韩文 (ko)" in line and "瑞典语 (sv)" in line and line.endswith(", auto")
    # MLT takes funasr's names, ISO codes with a region, and Cantonese's 639-3 code
    from funasr_nano.models.prompt import resolve_language

    assert [resolve_language(v, MLT_LANGUAGES, MLT) for v in ("ko", "ko-KR", "韩文", "yue", "tl", "PT_br")] == [
        "韩文", "韩文", "韩文", "粤语", "菲律宾语", "葡萄牙语"]


def test_the_server_says_what_a_checkpoint_without_ctc_can_do_and_refuses_its_other_languages(mlt_models, zh_mp3):
    from tests.server_process import Server

    server = Server(mlt_models, "--max-new-tokens", str(STEPS))
    try:
        health = httpx.get(f"{server.url}/health", timeout=10).json()
        assert health["checkpoint"] == {"checkpoint": MLT, "languages": list(MLT_LANGUAGES), "capabilities": NO_CTC}
        with open(zh_mp3, "rb") as f:
            bad = httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("a.mp3", f)},
                             data={"language": "xx"}, timeout=60)
        assert bad.status_code == 400
        error = bad.json()["error"]
        assert error["param"] == "language" and "韩文 (ko)" in error["message"] and MLT in error["message"]
        with open(zh_mp3, "rb") as f:
            ok = httpx.post(f"{server.url}/v1/audio/transcriptions", files={"file": ("a.mp3", f)},
                            data={"language": "ko", "response_format": "verbose_json"}, timeout=120)
        assert ok.status_code == 200, ok.text
        assert ok.json()["language"] == "ko"
    finally:
        assert server.stop() in (0, -15)  # -SIGTERM: uvicorn re-raises it after a clean shutdown


def test_a_release_with_part_of_the_ctc_head_exports_without_it_as_funasr_loads_it(tmp_path, oracle_factory):
    """Fail closed (funasr #3211): no CTC graph unless every CTC tensor is in model.pt; funasr disables its head."""
    from testing.checkpoint import build_checkpoint

    release = build_checkpoint(tmp_path / "release", "tiny", seed=5, ctc=True, ctc_weights="partial")
    lines: list[str] = []
    from funasr_nano.export.export_onnx import export_onnx

    export_onnx(release, tmp_path / "models", int8=False, log=lines.append)
    settings = ModelSettings.load(tmp_path / "models")
    assert not settings.has_ctc and settings.capabilities == NO_CTC
    assert any(line.startswith("note: model.pt has ") and "exported without it" in line for line in lines), lines
    assert f"checkpoint: {NANO} (assumed" in "\n".join(lines)
    oracle = oracle_factory(release)
    assert getattr(oracle.model, "ctc_decoder", None) is None  # funasr turned its CTC head off too


def test_which_checkpoint_a_release_folder_holds(tmp_path):
    from funasr_nano.export.release import detect_checkpoint

    other = tmp_path / "weights"
    other.mkdir()
    assert detect_checkpoint(other)[0] == NANO and "assumed" in detect_checkpoint(other)[1]
    assert detect_checkpoint(other, explicit="mlt") == (MLT, "--checkpoint")
    (other / "configuration.json").write_text(json.dumps({"model_name_in_hub": {"ms": "FunAudioLLM/Fun-ASR-MLT-Nano-2512"}}))
    assert detect_checkpoint(other) == (MLT, "named in configuration.json")
    cache = tmp_path / "models--FunAudioLLM--Fun-ASR-MLT-Nano-2512" / "snapshots" / "abc"
    cache.mkdir(parents=True)
    assert detect_checkpoint(cache)[0] == MLT
    assert detect_checkpoint(tmp_path / "FunAudioLLM" / "Fun-ASR-Nano-2512")[0] == NANO


@pytest.mark.parametrize("text,nano,mlt", [
    ("안녕하세요 여러분", None, "ko"), ("สวัสดีครับ", None, "th"), ("Привет всем", None, "bg"),
    ("Dzień dobry wszystkim", "en", None), ("The quick brown fox", "en", None), ("今天天气很好", "zh", "zh"),
    ("こんにちは世界", "ja", "ja"), ("مرحبا", None, "ar"), ("123 !", None, None),
])
def test_the_language_of_a_text_among_a_checkpoints_languages(text, nano, mlt):
    from funasr_nano.models.prompt import NANO_LANGUAGES
    from funasr_nano.output.language import text_language

    assert text_language(text, NANO_LANGUAGES) == nano
    assert text_language(text, MLT_LANGUAGES) == mlt
    assert text_language(text) == nano  # Nano's rules are the default
