"""The torch-free front end (funasr_nano/audio.py, funasr_nano/features.py) against funasr as the oracle.

The oracle is what ``FunASRNano.data_load_speech`` does with a file path:
``load_audio_text_image_video(path, fs=16000)`` then ``extract_fbank(..., frontend=WavFrontend)``,
with the release's frontend settings and dither 0. No checkpoint is needed for that.
"""

from __future__ import annotations

import math
import shutil
import struct
import time
import types
from pathlib import Path

import numpy as np
import pytest

from funasr_nano.audio.features import (
    FrontendConfig,
    apply_lfr,
    audio_token_count,
    compute_features,
    fbank,
    lfr_frame_count,
)
from funasr_nano.audio.load import AudioError, audio_duration, iter_audio_blocks, load_audio
from tests.audio_fixtures import espeak_wav, have_espeak, make_aac_m4a, make_tone_wav, tone_signal

TOL = 1e-4
EXPORT_REQUIREMENTS = "pip install torch==2.13.0 && pip install -r requirements.txt"  # funasr, the reference
RELEASE_FRONTEND_CONF = {  # frontend_conf of the Fun-ASR-Nano config.yaml
    "fs": 16000,
    "window": "hamming",
    "n_mels": 80,
    "frame_length": 25,
    "frame_shift": 10,
    "lfr_m": 7,
    "lfr_n": 6,
    "cmvn_file": None,
    "dither": 1.0,
}
CFG = FrontendConfig.from_dict(RELEASE_FRONTEND_CONF)


@pytest.fixture(scope="module")
def funasr_frontend():
    pytest.importorskip("funasr", reason=EXPORT_REQUIREMENTS)
    from funasr.frontends.wav_frontend import WavFrontend

    return WavFrontend(
        fs=16000, window="hamming", n_mels=80, frame_length=25, frame_shift=10, lfr_m=7, lfr_n=6, dither=0.0
    )


def funasr_load(path: Path) -> np.ndarray:
    from funasr.utils.load_utils import load_audio_text_image_video

    return load_audio_text_image_video(str(path), fs=16000).numpy()


def funasr_features(path: Path, frontend) -> np.ndarray:
    """The oracle: funasr's own loading + WavFrontend, as FunASRNano.data_load_speech runs them."""
    from funasr.utils.load_utils import extract_fbank, load_audio_text_image_video

    data = load_audio_text_image_video(str(path), fs=16000)
    feats, lens = extract_fbank(data, data_type="sound", frontend=frontend, is_final=True)
    assert int(lens[0]) == feats.shape[1]
    return feats[0].numpy()


def assert_features_match(path: Path, frontend) -> np.ndarray:
    ours = compute_features(load_audio(path), CFG)
    ref = funasr_features(path, frontend)
    assert ours.shape == ref.shape
    assert ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= TOL
    return ours


# --- parity with funasr -------------------------------------------------------------------


def test_shared_mp3_matches_funasr(zh_mp3: Path, funasr_frontend) -> None:
    wave = load_audio(zh_mp3)
    # 48 kHz stereo mp3: libsndfile decode, channel mean, soxr HQ, exactly as funasr.
    np.testing.assert_array_equal(wave, funasr_load(zh_mp3))
    feats = assert_features_match(zh_mp3, funasr_frontend)
    assert feats.shape == (167, 560)
    # The doc's example: 10 s of audio -> 21 audio embeddings.
    assert audio_token_count(feats.shape[0]) == 21


@pytest.mark.parametrize(
    ("name", "sr", "channels", "subtype"),
    [
        ("stereo44k.wav", 44100, 2, "PCM_16"),
        ("six48k.wav", 48000, 6, "PCM_16"),
        ("mono8k.wav", 8000, 1, "PCM_16"),
        ("stereo22k_24bit.flac", 22050, 2, "PCM_24"),
        ("mono16k_float.wav", 16000, 1, "FLOAT"),
    ],
)
def test_synthetic_files_match_funasr(
    tmp_path: Path, funasr_frontend, name: str, sr: int, channels: int, subtype: str
) -> None:
    path = make_tone_wav(tmp_path / name, sr=sr, channels=channels, seconds=2.3, subtype=subtype)
    np.testing.assert_array_equal(load_audio(path), funasr_load(path))
    assert_features_match(path, funasr_frontend)


@pytest.mark.skipif(not have_espeak(), reason="espeak-ng is not installed (apt-get install espeak-ng)")
def test_espeak_speech_matches_funasr(tmp_path: Path, funasr_frontend) -> None:
    path = espeak_wav(tmp_path / "speech.wav", "The quick brown fox jumps over the lazy dog, twice.")
    assert_features_match(path, funasr_frontend)  # 22050 Hz mono speech


def test_truncated_mp3_decodes_what_is_there(tmp_path: Path, zh_mp3: Path, funasr_frontend) -> None:
    """A cut mp3 is short audio, not an error: libsndfile (mpg123) decodes the complete frames."""
    part = tmp_path / "part.mp3"
    part.write_bytes(zh_mp3.read_bytes()[:20000])
    assert_features_match(part, funasr_frontend)
    # The first 1000 bytes hold a few frames: after the encoder delay 47 samples at 48 kHz remain,
    # 16 at 16 kHz, less than one 25 ms window: no audio at all out of a file that announced 10 s, an
    # error naming the file (issue 26), and such a wave has no feature rows. (funasr itself crashes on
    # it: it shrinks the window to the clip and kaldi-native-fbank rejects the tiny FFT.)
    tiny = tmp_path / "tiny.mp3"
    tiny.write_bytes(zh_mp3.read_bytes()[:1000])
    with pytest.raises(AudioError, match="no audio decoded") as caught:
        load_audio(tiny)
    assert caught.value.path == str(tiny)
    assert compute_features(np.zeros(16, np.float32), CFG).shape == (0, 560)


@pytest.mark.skipif(shutil.which("ffmpeg") is None,
                    reason="funasr's fallback for m4a needs the ffmpeg CLI (apt-get install ffmpeg)")
def test_m4a_goes_through_ffmpeg_like_funasr(tmp_path: Path) -> None:
    """libsndfile cannot read AAC; funasr then runs the ffmpeg CLI (16 kHz mono s16), we run the
    same libswresample via PyAV. Different FFmpeg builds: equal within a 16-bit step or two."""
    path = make_aac_m4a(tmp_path / "tone.m4a", sr=44100, channels=2, seconds=2.0)
    ours, ref = load_audio(path), funasr_load(path)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= 4 / 32768


def test_numpy_backend_is_close_to_the_oracle(zh_mp3: Path) -> None:
    """The float64 numpy fbank differs from kaldi-native-fbank only by that library's float32
    FFT rounding, which matters only in bands far below the frame's loudest band."""
    wave = load_audio(zh_mp3)
    ref = fbank(wave, CFG, backend="knf")
    ours = fbank(wave, CFG, backend="numpy")
    diff = np.abs(ours - ref)
    assert diff.mean() < 1e-5
    assert diff.max() < 2e-3
    quiet = ref < ref.max(axis=1, keepdims=True) - 12.0  # bands 12 nats (52 dB) below the peak
    assert diff[~quiet].max() <= TOL


def test_fbank_speed_smoke() -> None:
    """60 s of audio: tens of milliseconds for numpy, ~0.1-0.2 s for kaldi-native-fbank.
    Generous bound: shared CI machines are noisy; this only catches a per-frame Python loop."""
    wave = np.random.default_rng(0).standard_normal(16000 * 60).astype(np.float32) * 0.1
    for backend in ("numpy", "knf"):
        t0 = time.perf_counter()
        feats = fbank(wave, CFG, backend=backend)
        assert feats.shape == (5998, 80)
        assert time.perf_counter() - t0 < 2.0


# --- features: shapes, LFR, CMVN, config --------------------------------------------------


def test_lfr_matches_funasr() -> None:
    torch = pytest.importorskip("torch", reason=EXPORT_REQUIREMENTS)
    from funasr.frontends.wav_frontend import apply_lfr as funasr_apply_lfr

    rng = np.random.default_rng(0)
    for t in range(1, 80):
        feats = rng.standard_normal((t, 4)).astype(np.float32)
        for m, n in [(7, 6), (5, 3), (3, 2), (1, 1)]:
            ref = funasr_apply_lfr(torch.from_numpy(feats), m, n).numpy()
            np.testing.assert_array_equal(apply_lfr(feats, m, n), ref)
    assert apply_lfr(np.zeros((0, 80), np.float32), 7, 6).shape == (0, 560)


def test_short_audio_gives_no_rows() -> None:
    for n in (0, 1, 100, 399):
        assert compute_features(np.zeros(n, np.float32), CFG).shape == (0, 560)
        assert lfr_frame_count(n, CFG) == 0
    assert compute_features(np.zeros(400, np.float32), CFG).shape == (1, 560)


def test_lfr_frame_count_matches_compute_features() -> None:
    wave = tone_signal(16000, 1, 3.0)[:, 0]
    for n in [400, 401, 559, 560, 1360, 1361, 16000, 16001, 47999, 48000]:
        assert compute_features(wave[:n], CFG).shape == (lfr_frame_count(n, CFG), 560)
        t = 1 + (n - 400) // 160
        assert lfr_frame_count(n, CFG) == math.ceil(t / 6)


def test_float64_and_float32_input_agree() -> None:
    wave = tone_signal(16000, 1, 1.0)[:, 0]
    np.testing.assert_array_equal(compute_features(wave.astype(np.float64), CFG), compute_features(wave, CFG))


def test_frontend_config_from_release_dict() -> None:
    assert CFG == FrontendConfig()  # the defaults are this model's settings, dither forced to 0
    assert CFG.feature_dim == 560 and CFG.frame_length == 400 and CFG.frame_shift == 160
    assert FrontendConfig.from_dict(RELEASE_FRONTEND_CONF, keep_dither=True).dither == 1.0
    with pytest.raises(ValueError, match="window"):
        FrontendConfig.from_dict({**RELEASE_FRONTEND_CONF, "window": "kaiser"})


def test_cmvn_matches_funasr(tmp_path: Path) -> None:
    pytest.importorskip("funasr", reason=EXPORT_REQUIREMENTS)
    from funasr.frontends.wav_frontend import WavFrontend

    rng = np.random.default_rng(1)
    shift, scale = rng.standard_normal(560), rng.uniform(0.5, 2.0, 560)
    mvn = tmp_path / "am.mvn"
    mvn.write_text(
        "<Nnet>\n<Splice> 560 560\n[ 0 ]\n<AddShift> 560 560\n"
        f"<LearnRateCoef> 0 [ {' '.join(f'{v:.6f}' for v in shift)} ]\n<Rescale> 560 560\n"
        f"<LearnRateCoef> 0 [ {' '.join(f'{v:.6f}' for v in scale)} ]\n</Nnet>\n"
    )
    wave = tone_signal(16000, 1, 1.5)[:, 0]
    cfg = FrontendConfig.from_dict({**RELEASE_FRONTEND_CONF, "cmvn_file": str(mvn)})
    frontend = WavFrontend(cmvn_file=str(mvn), lfr_m=7, lfr_n=6, dither=0.0)
    import torch

    ref, _ = frontend(torch.from_numpy(wave)[None], [len(wave)])
    assert np.abs(compute_features(wave, cfg) - ref[0].numpy()).max() <= TOL


# --- the number of audio rows fed to the LLM ----------------------------------------------


def _conv_len(n: int, kernel: int = 3, stride: int = 2, pad: int = 1) -> int:
    return (n + 2 * pad - kernel) // stride + 1


def test_audio_token_count_matches_independent_formula() -> None:
    for t in range(1, 2001):
        expected = math.ceil(_conv_len(_conv_len(t)) / 2)
        assert audio_token_count(t) == expected
    assert audio_token_count(0) == 0


def test_audio_token_count_matches_funasr_data_load_speech() -> None:
    """Run the official FunASRNano.data_load_speech with stand-ins for the model, tokenizer and
    frontend (the frontend returns as many rows as the 'audio' has samples) and read the
    fake_token_len it computes: the official count, for every length, without a checkpoint."""
    torch = pytest.importorskip("torch", reason=EXPORT_REQUIREMENTS)
    pytest.importorskip("funasr", reason=EXPORT_REQUIREMENTS)
    from funasr.models.fun_asr_nano.model import FunASRNano

    class Frontend:
        fs, frame_shift, lfr_n = 16000, 10, 6

        def __call__(self, data, lengths, **kwargs):
            n = int(lengths[0])
            return torch.zeros(1, n, 560), torch.tensor([n])

    tokenizer = types.SimpleNamespace(encode=lambda s: [1] * len(s))
    model = types.SimpleNamespace(use_low_frame_rate=True)
    for t in list(range(1, 300)) + [997, 1000, 1999, 2000]:
        contents = {
            "system": ["You are a helpful assistant."],
            "user": [("<|startofspeech|>!!<|endofspeech|>", np.zeros(t, np.float32))],
            "assistant": ["x"],
        }
        out = FunASRNano.data_load_speech(model, contents, tokenizer, Frontend())
        assert int(out["fake_token_len"][0, 0]) == audio_token_count(t), t


# --- audio loading: errors, streaming, metadata -------------------------------------------


def _corrupt_wav(path: Path) -> Path:
    fmt = b"\xff" * 16  # a 'fmt ' chunk full of nonsense
    path.write_bytes(
        b"RIFF"
        + struct.pack("<I", 844)
        + b"WAVEfmt "
        + struct.pack("<I", 16)
        + fmt
        + b"data"
        + struct.pack("<I", 800)
        + bytes(800)
    )
    return path


def _bad_path(d: Path, kind: str) -> Path:
    if kind == "missing":
        return d / "missing.wav"
    if kind == "directory":
        (d / "folder.wav").mkdir()
        return d / "folder.wav"
    if kind == "empty":
        (d / "empty.wav").write_bytes(b"")
        return d / "empty.wav"
    if kind == "text-as-mp3":
        (d / "notes.mp3").write_text("hello, this is not audio\n")
        return d / "notes.mp3"
    return _corrupt_wav(d / "corrupt.wav")


@pytest.mark.parametrize(
    ("kind", "problem"),
    [
        ("missing", "no such file"),
        ("directory", "is a directory"),
        ("empty", "empty file"),
        ("text-as-mp3", "not a readable audio file"),
        ("corrupt-wav-header", "not a readable audio file"),
    ],
)
def test_audio_errors_name_the_file_in_one_line(tmp_path: Path, kind: str, problem: str) -> None:
    path = _bad_path(tmp_path, kind)
    for call in (load_audio, iter_audio_blocks):  # iter_audio_blocks fails at the call
        with pytest.raises(AudioError) as err:
            call(path)
        message = str(err.value)
        assert message.startswith(f"{path}: ")
        assert problem in message
        assert "\n" not in message


def test_valid_wav_without_samples_is_empty(tmp_path: Path) -> None:
    import soundfile

    path = tmp_path / "nothing.wav"
    soundfile.write(str(path), np.zeros((0, 2), np.float32), 44100, subtype="PCM_16")
    wave = load_audio(path)
    assert wave.shape == (0,) and wave.dtype == np.float32
    assert list(iter_audio_blocks(path)) == []
    assert compute_features(wave, CFG).shape == (0, 560)


def test_blocks_concatenate_to_load_audio(zh_mp3: Path, tmp_path: Path) -> None:
    """Streaming gives the very same samples: soxr's stream equals its one-shot call, and the
    final length fix (librosa's ceil(n * 16000 / rate)) is applied to the last block."""
    full = load_audio(zh_mp3)
    blocks = list(iter_audio_blocks(zh_mp3, block_seconds=0.7))
    assert all(len(b) == 11200 for b in blocks[:-1]) and 0 < len(blocks[-1]) <= 11200
    np.testing.assert_array_equal(np.concatenate(blocks), full)
    odd = make_tone_wav(tmp_path / "odd.wav", sr=44100, channels=2, seconds=1.2345)
    np.testing.assert_array_equal(np.concatenate(list(iter_audio_blocks(odd, 0.25))), load_audio(odd))
    assert len(load_audio(odd)) == math.ceil(round(44100 * 1.2345) * 16000 / 44100)


def test_audio_duration(zh_mp3: Path, tmp_path: Path) -> None:
    assert audio_duration(zh_mp3) == pytest.approx(10.0, abs=0.05)
    wav = make_tone_wav(tmp_path / "a.wav", sr=8000, seconds=1.5)
    assert audio_duration(wav) == pytest.approx(1.5)
    assert audio_duration(make_aac_m4a(tmp_path / "a.m4a", seconds=2.0)) == pytest.approx(2.0, abs=0.1)
    with pytest.raises(AudioError):
        audio_duration(tmp_path / "missing.wav")
