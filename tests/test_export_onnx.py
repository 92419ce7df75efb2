"""ONNX export of the audio encoder + adaptor and CTC head, checked against funasr (the oracle).

Each tiny checkpoint is exported once per session through the real CLI (01_export_onnx.py
--quiet), then the graphs are run with onnxruntime through funasr_nano/encoder.py.

Encoder input: the fbank+LFR features from funasr's own frontend. Not `OracleResult.features`:
funasr's SenseVoice encoder scales its input in place (`xs_pad *= sqrt(d)`), so the tensor the
oracle records after the run is the *scaled* one.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from funasr_nano.audio.vad import VAD_FILE, find_vad_model
from funasr_nano.models.ctc import CTCVocabulary, greedy_ctc, read_tiktoken
from funasr_nano.models.encoder import AudioEncoder, CTCHead, OnnxModelError
from funasr_nano.models.settings import (
    CTC_FILE,
    CTC_INT8_FILE,
    CTC_VOCAB_FILE,
    ENCODER_FILE,
    ENCODER_INT8_FILE,
    SETTINGS_FILE,
    ModelSettings,
)

ROOT = Path(__file__).resolve().parent.parent
CLI = ROOT / "01_export_onnx.py"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


@dataclass
class Exported:
    ckpt: Path
    out: Path
    cli: subprocess.CompletedProcess
    settings: ModelSettings


def _cli(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(CLI), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="session")
def exported(any_ckpt: Path, tmp_path_factory: pytest.TempPathFactory) -> Exported:
    out = tmp_path_factory.mktemp("onnx") / any_ckpt.name
    proc = _cli("--release-dir", str(any_ckpt), "--model-dir", str(out), "--quiet")
    assert proc.returncode == 0, proc.stderr[-3000:]
    return Exported(any_ckpt, out, proc, ModelSettings.load(out))


@pytest.fixture(scope="session")
def funasr_run(any_ckpt: Path, zh_mp3: Path, oracle_factory):
    """(oracle, its result on the shared clip, the unscaled features funasr's frontend computes)."""
    from funasr.utils.load_utils import extract_fbank, load_audio_text_image_video

    oracle = oracle_factory(any_ckpt)
    result = oracle.run(zh_mp3, max_new_tokens=1)
    frontend = oracle.auto.kwargs["frontend"]
    wave = load_audio_text_image_video(str(zh_mp3), fs=frontend.fs)
    speech, _ = extract_fbank(wave, data_type="sound", frontend=frontend, is_final=True)
    feats = speech[0].numpy().astype(np.float32)
    assert feats.shape == result.features.shape
    return oracle, result, feats


def _rel(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def _min_cos(a: np.ndarray, b: np.ndarray) -> float:
    num = (a * b).sum(axis=1)
    return float((num / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))).min())


def _torch_audio(oracle, feats: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """funasr's own encoder + adaptor on `feats` (a copy: the encoder scales its input in place)."""
    import torch

    model = oracle.model
    x = torch.from_numpy(feats.copy())[None]
    lens = torch.tensor([x.shape[1]])
    with torch.no_grad():
        enc, enc_lens = model.audio_encoder(x, lens)
        ada, _ = model.audio_adaptor(enc, enc_lens)
    return enc[0].float().numpy(), ada[0].float().numpy()


# --------------------------------------------------------------------------- encoder + adaptor


def test_fp32_matches_funasr(exported: Exported, funasr_run) -> None:
    """fp32 graph vs funasr on the 10 s clip. relative error = max|ours - funasr| / max|funasr| <= 1e-4."""
    _, result, feats = funasr_run
    enc, ada = AudioEncoder(exported.settings.path("encoder")).run(feats)
    assert enc.shape == result.encoder_out.shape and ada.shape == result.adaptor_out.shape
    rel_enc, rel_ada = _rel(enc, result.encoder_out), _rel(ada, result.adaptor_out)
    assert rel_enc <= 1e-4, f"encoder_out relative error {rel_enc:.2e}"
    assert rel_ada <= 1e-4, f"adaptor_out relative error {rel_ada:.2e}"


def test_int8_cosine(exported: Exported, funasr_run) -> None:
    """int8 graph vs fp32 graph: per-frame cosine similarity >= 0.99 on both outputs."""
    _, _, feats = funasr_run
    enc32, ada32 = AudioEncoder(exported.settings.path("encoder")).run(feats)
    enc8, ada8 = AudioEncoder(exported.settings.path("encoder_int8")).run(feats)
    cos_enc, cos_ada = _min_cos(enc8, enc32), _min_cos(ada8, ada32)
    print(f"\n[{exported.ckpt.name}] int8 min per-frame cosine: encoder_out {cos_enc:.5f}, adaptor_out {cos_ada:.5f}")
    assert np.isfinite(enc8).all() and np.isfinite(ada8).all()
    assert min(cos_enc, cos_ada) >= 0.99, f"min cosine encoder_out {cos_enc:.5f} adaptor_out {cos_ada:.5f}"


@pytest.mark.parametrize("t", [1, 2, 7, 50])
def test_short_lengths_match_torch(exported: Exported, funasr_run, t: int) -> None:
    """T is dynamic in the graph (not baked at the export example's length): any T equals funasr's torch."""
    oracle, _, _ = funasr_run
    feats = np.random.default_rng(t).standard_normal((t, exported.settings.input_size)).astype(np.float32)
    enc, ada = AudioEncoder(exported.settings.path("encoder")).run(feats)
    ref_enc, ref_ada = _torch_audio(oracle, feats)
    assert enc.shape == (t, exported.settings.encoder_dim) and ada.shape == (t, exported.settings.adaptor_dim)
    assert _rel(enc, ref_enc) <= 1e-4 and _rel(ada, ref_ada) <= 1e-4


@pytest.mark.parametrize("key", ["encoder", "encoder_int8"])
def test_60s_input_runs(exported: Exported, key: str) -> None:
    """60 s of audio is T_lfr = 1000 LFR rows: both graphs run and stay finite."""
    feats = np.random.default_rng(60).standard_normal((1000, exported.settings.input_size)).astype(np.float32)
    enc, ada = AudioEncoder(exported.settings.path(key)).run(feats)
    assert enc.shape[0] == ada.shape[0] == 1000
    assert np.isfinite(enc).all() and np.isfinite(ada).all()


def test_empty_input(exported: Exported) -> None:
    encoder = AudioEncoder(exported.settings.path("encoder"))
    enc, ada = encoder.run(np.zeros((0, exported.settings.input_size), np.float32))
    assert enc.shape == (0, encoder.encoder_dim) and ada.shape == (0, encoder.adaptor_dim)


# --------------------------------------------------------------------------- CTC


def _has_ctc(exported: Exported) -> bool:
    """CTC tests check the head where it exists; without it they check that no CTC graph was written."""
    if exported.settings.has_ctc:
        return True
    assert not (exported.out / "FunASR_Nano_CTC.onnx").exists()
    assert not (exported.out / "FunASR_Nano_CTC.int8.onnx").exists()
    return False


def test_ctc_text_matches_funasr(exported: Exported, funasr_run) -> None:
    """Greedy CTC text from our graphs + funasr_nano/models/ctc.py equals funasr's `ctc_text` exactly."""
    _, result, feats = funasr_run
    if not _has_ctc(exported):
        assert result.ctc_text is None
        return
    s = exported.settings
    vocab = CTCVocabulary(s.path("ctc_vocab"), s.ctc)
    enc, _ = AudioEncoder(s.path("encoder")).run(feats)
    head = CTCHead(s.path("ctc"))
    ids = head.run(enc)
    log_probs = head.run(enc, log_probs=True)
    assert log_probs.shape == (enc.shape[0], s.ctc.vocab_size)
    np.testing.assert_array_equal(ids, log_probs.argmax(-1))
    assert result.ctc_text is not None
    assert vocab.ctc_text(ids) == result.ctc_text
    assert vocab.ctc_text(log_probs) == result.ctc_text


def test_ctc_int8_runs(exported: Exported, funasr_run) -> None:
    if not _has_ctc(exported):
        return
    _, _, feats = funasr_run
    s = exported.settings
    enc, _ = AudioEncoder(s.path("encoder")).run(feats)
    ids32 = CTCHead(s.path("ctc")).run(enc)
    ids8 = CTCHead(s.path("ctc_int8")).run(enc)
    agree = float((ids32 == ids8).mean())
    print(f"\n[{exported.ckpt.name}] CTC int8 vs fp32 frame-id agreement: {agree:.3f} (random weights: near ties)")
    assert ids8.shape == ids32.shape and ids8.min() >= 0 and ids8.max() < s.ctc.vocab_size


def test_ctc_decode_matches_funasr_tokenizer(exported: Exported, funasr_run) -> None:
    """Our id -> text equals funasr's SenseVoice tokenizer on random ids: byte pieces, specials, timestamps."""
    if not _has_ctc(exported):
        return
    oracle, _, _ = funasr_run
    s = exported.settings
    vocab = CTCVocabulary(s.path("ctc_vocab"), s.ctc)
    tokenizer = oracle.model.ctc_tokenizer
    assert tokenizer.timestamp_begin == s.ctc.timestamp_begin
    assert tokenizer.encoding.n_vocab == s.ctc.vocab_size
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, s.ctc.vocab_size, size=int(rng.integers(1, 30))).tolist()
        ids += rng.integers(0, 256, size=3).tolist()  # raw bytes: invalid UTF-8 must be replaced the same way
        assert vocab.decode(ids) == tokenizer.decode(ids), ids


def test_greedy_ctc_frames() -> None:
    blank = 9
    ids = np.array([9, 3, 3, 9, 9, 3, 5, 5, 5, 9, 7])
    tokens = greedy_ctc(ids, blank)
    assert [(t.token_id, t.first_frame, t.last_frame) for t in tokens] == [(3, 1, 2), (3, 5, 5), (5, 6, 8), (7, 10, 10)]
    one_hot = np.eye(10, dtype=np.float32)[ids]
    assert greedy_ctc(np.log(one_hot + 1e-6), blank) == tokens
    assert greedy_ctc(np.zeros(0, np.int64), blank) == []


# --------------------------------------------------------------------------- output folder + CLI


def test_output_folder(exported: Exported) -> None:
    out, s = exported.out, exported.settings
    ctc = (exported.ckpt / "multilingual.tiktoken").is_file()
    expected = {ENCODER_FILE, ENCODER_INT8_FILE} | ({CTC_FILE, CTC_INT8_FILE} if ctc else set())
    if find_vad_model() is not None:  # silero-vad installed: its ONNX model is copied for long audio
        expected.add(VAD_FILE)
    onnx_files = {p.name for p in out.glob("*.onnx")}
    assert onnx_files == expected
    assert (out / CTC_VOCAB_FILE).is_file() == ctc
    for name in TOKENIZER_FILES:
        assert (out / "tokenizer" / name).read_bytes() == (exported.ckpt / "Qwen3-0.6B" / name).read_bytes()
    shape = json.loads((exported.ckpt / "shape.json").read_text())
    assert s.encoder_dim == shape["enc_dim"] and s.adaptor_dim == s.llm_hidden == shape["llm_hidden"]
    assert s.input_size == shape["n_mels"] * shape["lfr_m"]
    assert s.sys_prompt is True and s.do_think is True and s.use_low_frame_rate is True
    assert s.frontend["lfr_m"] == 7 and s.frontend["lfr_n"] == 6 and s.frontend["dither"] == 0.0
    assert s.has_ctc == ctc
    if ctc:
        assert s.ctc.blank_id == s.ctc.vocab_size - 1
        assert len(read_tiktoken(out / CTC_VOCAB_FILE)) == s.ctc.n_ranks
    raw = json.loads((out / SETTINGS_FILE).read_text())
    assert set(raw) == {"format_version", "frontend", "prompt", "use_low_frame_rate", "encoder", "adaptor", "llm",
                        "ctc", "files", "checkpoint"}
    assert raw["checkpoint"] == s.checkpoint == "Fun-ASR-Nano-2512"  # a folder that names no model: Nano


def test_cli_quiet(exported: Exported) -> None:
    """The fixture's export ran through the CLI with --quiet: exit 0 and nothing on stdout/stderr."""
    assert exported.cli.returncode == 0
    assert exported.cli.stdout == ""
    assert "Traceback" not in exported.cli.stderr


def test_cli_missing_release_folder(tmp_path: Path) -> None:
    """A folder with a config but no model.pt: one `error:` line, exit code 2, no traceback."""
    bad = tmp_path / "release"
    bad.mkdir()
    (bad / "config.yaml").write_text("model: FunASRNano\n")
    proc = _cli("--release-dir", str(bad), "--model-dir", str(tmp_path / "out"), "--quiet", timeout=60)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "model.pt" in lines[0], proc.stderr


def test_cli_download_impossible(tmp_path: Path) -> None:
    """An empty --release-dir (a download target) with no network: it fails (exit 2) with an `error:` line."""
    (tmp_path / "empty").mkdir()
    proc = _cli("--release-dir", str(tmp_path / "empty"), "--model-dir", str(tmp_path / "out"), "--quiet",
                timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and proc.stderr.strip().splitlines()[-1] == errors[0]
    assert "then pass --release-dir" in errors[0], errors[0]


def test_cli_missing_release_folder_is_not_downloaded(tmp_path: Path) -> None:
    """A --release-dir that does not exist (a typo) is an error naming the download command, not a download."""
    proc = _cli("--release-dir", str(tmp_path / "nowhere"), "--model-dir", str(tmp_path / "out"), "--quiet",
                timeout=60)
    assert proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {tmp_path / 'nowhere'}: release folder not found; get it with `modelscope download")
    assert "--release-dir" in line
    assert not (tmp_path / "nowhere").exists() and not (tmp_path / "out").exists()


def test_corrupt_onnx_one_line_error(exported: Exported, tmp_path: Path) -> None:
    data = exported.settings.path("encoder").read_bytes()
    broken = tmp_path / "truncated.onnx"
    broken.write_bytes(data[: len(data) // 3])
    with pytest.raises(OnnxModelError) as info:
        AudioEncoder(broken)
    msg = str(info.value)
    assert msg.startswith(f"{broken}: not a valid ONNX model") and "\n" not in msg
    with pytest.raises(OnnxModelError, match="file not found"):
        CTCHead(tmp_path / "missing.onnx")
