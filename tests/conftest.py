"""Shared fixtures: release-shaped tiny checkpoints (built once per session) and their funasr oracles."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

# `testing` and `tests.*` are importable through pytest's `pythonpath = ["."]` (pyproject.toml), and
# `funasr_nano` through the install (`pip install -e ".[test]"`) or that same entry: no sys.path here.
from testing.checkpoint import build_checkpoint

ROOT = Path(__file__).resolve().parent.parent

# CI's rules (testing/ci_rules.py): FUNASR_STRICT_SKIPS fails a run with skipped tests, FUNASR_FAULT_LOG
# receives the Python stacks of a native crash; both set by .ci/run, neither changes a plain local run.
pytest_plugins = ["testing.ci_rules"]

SHARED_AUDIO = ROOT.parent / "shared" / "audio"
ZH_MP3 = SHARED_AUDIO / "zh_news_10s.mp3"

os.environ.setdefault("OMP_NUM_THREADS", "2")


@pytest.fixture(scope="session")
def zh_mp3() -> Path:
    if not ZH_MP3.is_file():
        pytest.fail(f"{ZH_MP3}: the shared test clip is missing")
    return ZH_MP3


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shape `tiny` with the CTC head: the main parity checkpoint."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", "tiny", seed=0, ctc=True)


@pytest.fixture(scope="session")
def tiny2_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Shape `tiny2` without CTC (like the Hugging Face copy of the release), large adaptor outputs."""
    return build_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny2", "tiny2", seed=1, ctc=False, adaptor_std=28.0)


@pytest.fixture(scope="session", params=["tiny", "tiny2"])
def any_ckpt(request: pytest.FixtureRequest) -> Path:
    """Each tiny shape in turn, for tests that must hold on more than one shape."""
    return request.getfixturevalue(f"{request.param}_ckpt")


@pytest.fixture(scope="session")
def oracle_factory():
    from testing.oracle import oracle_for

    return lambda path, rope="fp32": oracle_for(str(path), rope)


@pytest.fixture(scope="session")
def tiny_models(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """model-gguf/ exported from the tiny checkpoint: fp32 + int8 ONNX (with CTC), f32/f16/q8_0 GGUF."""
    from tests.exported import export_model_dir

    return export_model_dir(tiny_ckpt, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="session")
def tiny2_models(tiny2_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.exported import export_model_dir

    return export_model_dir(tiny2_ckpt, tmp_path_factory.mktemp("models") / "tiny2")


@pytest.fixture(scope="session", params=["tiny", "tiny2"])
def any_models(request: pytest.FixtureRequest) -> tuple[Path, Path]:
    """(checkpoint, exported folder) for each tiny shape."""
    return request.getfixturevalue(f"{request.param}_ckpt"), request.getfixturevalue(f"{request.param}_models")


@pytest.fixture(scope="session")
def clip(zh_mp3: Path):
    """The shared clip as the engine reads it (16 kHz mono float32)."""
    from funasr_nano.audio.load import load_audio

    return load_audio(zh_mp3)


@pytest.fixture(scope="session")
def layout(tmp_path_factory: pytest.TempPathFactory):
    """espeak-ng sentences separated by exact silences, and where each one is (seconds)."""
    from tests.audio_fixtures import speech_layout

    return speech_layout(tmp_path_factory.mktemp("espeak"))


# A two-voice espeak-ng dialogue and a model folder with FSMN-VAD and CAM++ beside the tiny2 export: the
# diarization tests' fixtures (tests/test_diarize_pipeline.py; the server, corpus and real-time ones too)
DIALOGUE_LINES = [("en", "Good morning, did you read the report I sent yesterday afternoon?"),
                  ("en+f3", "Yes, I read all of it last night, and I have a few questions about the numbers."),
                  ("en", "Of course, the numbers in the second table come from the spring survey."),
                  ("en+f3", "Then the totals should match the first table, but they do not match at all."),
                  ("en", "You are right, I will check them again and send you a corrected version."),
                  ("en+f3", "Thank you, please send it before the meeting on Thursday morning.")]


@pytest.fixture(scope="session")
def dialogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two espeak-ng voices taking turns, 2 s of silence between turns (the loudness FSMN-VAD cuts at 2 s, not at 1.2 s)."""
    import numpy as np
    import soundfile

    from funasr_nano.audio.load import load_audio
    from tests.audio_fixtures import espeak_wav

    folder = tmp_path_factory.mktemp("dialogue")
    parts = []
    for i, (voice, text) in enumerate(DIALOGUE_LINES):
        parts += [load_audio(espeak_wav(folder / f"{i}.wav", text, voice=voice, speed=150)),
                  np.zeros(2 * 16000, np.float32)]
    path = folder / "dialogue.wav"
    soundfile.write(str(path), np.concatenate(parts), 16000, subtype="PCM_16")
    return path


@pytest.fixture(scope="session")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Release-layout FSMN-VAD (its score follows loudness) and CAM++ (full shape, random weights) checkpoints."""
    from testing.campplus_checkpoint import build_campplus_checkpoint
    from testing.fsmn_checkpoint import build_fsmn_checkpoint

    base = tmp_path_factory.mktemp("releases")
    return {"fsmn": build_fsmn_checkpoint(base / "fsmn", "energy", 0),
            "campplus": build_campplus_checkpoint(base / "campplus", seed=11)}


@pytest.fixture(scope="session")
def diarize_models(tiny2_models: Path, releases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny2 export (no CTC head: funasr's timestamps need torchaudio) with FSMN-VAD and CAM++ beside it."""
    from funasr_nano.export.export_campplus import export_campplus
    from funasr_nano.export.export_fsmn_vad import export_fsmn_vad

    extra = tmp_path_factory.mktemp("diarize_export")
    export_fsmn_vad(releases["fsmn"], extra)
    export_campplus(releases["campplus"], extra)
    folder = tmp_path_factory.mktemp("diarize_models") / "tiny2"
    folder.mkdir()
    for item in [*tiny2_models.iterdir(), *extra.iterdir()]:
        if not item.name.startswith("."):  # not the session caches: each folder makes its own
            (folder / item.name).symlink_to(item)
    return folder
