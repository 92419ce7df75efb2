"""Start-up (issue 17): the optimized-graph cache of ONNX Runtime sessions, loading only what a run
needs, side by side, and the whole prompt in one llama_decode.

The cache must never change a result: every test that loads from it compares the outputs with a
session optimized the ordinary way, bit for bit.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from funasr_nano.audio.load import load_audio
from funasr_nano.engine import Engine, TranscribeOptions
from funasr_nano.models.encoder import AudioEncoder, CTCHead, OnnxModelError
from funasr_nano.models.llm import LlamaDecoder
from funasr_nano.models.session_cache import CACHE_ENV, CACHE_FOLDER, CACHE_WRITTEN, FROM_CACHE, UNCACHED
from tests.exported import parity_engine

ENCODER_INT8 = "FunASR_Nano_Encoder.int8.onnx"
CTC = "FunASR_Nano_CTC.onnx"


@pytest.fixture
def model_copy(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The tiny int8 encoder and CTC head in a folder of their own; the user cache in tmp_path too."""
    folder = tmp_path / "models"
    folder.mkdir()
    for name in (ENCODER_INT8, CTC):
        shutil.copy2(tiny_models / name, folder / name)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.delenv(CACHE_ENV, raising=False)
    return folder


def _features(encoder: AudioEncoder, frames: int = 37) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((frames, encoder.input_size)).astype(np.float32)


def _cache_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []


def test_cache_is_written_beside_the_model_then_loaded_with_identical_outputs(model_copy):
    plain = AudioEncoder(model_copy / ENCODER_INT8, cache=False)
    assert plain.session_origin == UNCACHED
    assert not (model_copy / CACHE_FOLDER).exists()

    first = AudioEncoder(model_copy / ENCODER_INT8)
    assert first.session_origin == CACHE_WRITTEN
    files = _cache_files(model_copy / CACHE_FOLDER)
    assert len(files) == 2 and files[0].endswith(".onnx") and files[1] == files[0] + ".data", files
    second = AudioEncoder(model_copy / ENCODER_INT8)
    assert second.session_origin == FROM_CACHE
    assert _cache_files(model_copy / CACHE_FOLDER) == files  # reused, nothing new written

    feats = _features(plain)
    expected = plain.run(feats)
    for engine in (first, second):
        got = engine.run(feats)
        assert all(np.array_equal(a, b) for a, b in zip(expected, got))


def test_ctc_head_outputs_are_identical_from_the_cache(model_copy):
    encoder_out = np.random.default_rng(1).standard_normal((23, CTCHead(model_copy / CTC, cache=False).encoder_dim))
    plain = CTCHead(model_copy / CTC, cache=False)
    CTCHead(model_copy / CTC)  # writes the cache
    cached = CTCHead(model_copy / CTC)
    assert cached.session_origin == FROM_CACHE
    assert np.array_equal(plain.run(encoder_out, log_probs=True), cached.run(encoder_out, log_probs=True))
    assert np.array_equal(plain.run(encoder_out), cached.run(encoder_out))


def test_a_changed_model_file_gets_a_new_cache_and_the_old_one_goes(model_copy):
    AudioEncoder(model_copy / ENCODER_INT8)
    old = _cache_files(model_copy / CACHE_FOLDER)
    st = (model_copy / ENCODER_INT8).stat()
    os.utime(model_copy / ENCODER_INT8, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))  # a re-export
    again = AudioEncoder(model_copy / ENCODER_INT8)
    assert again.session_origin == CACHE_WRITTEN
    new = _cache_files(model_copy / CACHE_FOLDER)
    assert len(new) == 2 and not set(new) & set(old)


@pytest.mark.parametrize("damage", ["garbage graph", "truncated weights", "weights missing"])
def test_a_damaged_cache_is_rebuilt_and_outputs_stay_identical(model_copy, damage):
    plain = AudioEncoder(model_copy / ENCODER_INT8, cache=False)
    AudioEncoder(model_copy / ENCODER_INT8)
    graph = next((model_copy / CACHE_FOLDER).glob("*.onnx"))
    data = graph.with_name(graph.name + ".data")
    if damage == "garbage graph":
        graph.write_bytes(b"\x08\x07not a protobuf" * 100)
    elif damage == "truncated weights":
        with open(data, "r+b") as f:
            f.truncate(data.stat().st_size // 2)
    else:
        data.unlink()
    rebuilt = AudioEncoder(model_copy / ENCODER_INT8)
    assert rebuilt.session_origin == CACHE_WRITTEN
    assert AudioEncoder(model_copy / ENCODER_INT8).session_origin == FROM_CACHE
    feats = _features(plain)
    assert all(np.array_equal(a, b) for a, b in zip(plain.run(feats), rebuilt.run(feats)))


def test_unwritable_model_folder_falls_back_to_the_user_cache(model_copy, tmp_path):
    # a file where the cache folder would go: that folder cannot be written (as in a read-only install,
    # which a test running as root cannot make with permissions)
    (model_copy / CACHE_FOLDER).write_text("not a folder")
    first = AudioEncoder(model_copy / ENCODER_INT8)
    assert first.session_origin == CACHE_WRITTEN
    (user,) = (tmp_path / "user-cache" / "funasr-nano" / "ort").iterdir()  # one sub-folder per model folder
    assert len(_cache_files(user)) == 2
    assert AudioEncoder(model_copy / ENCODER_INT8).session_origin == FROM_CACHE


def test_no_writable_folder_means_no_cache_not_an_error(model_copy, tmp_path, monkeypatch):
    (model_copy / CACHE_FOLDER).write_text("not a folder")
    (tmp_path / "blocked").write_text("a file")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    for _ in range(2):
        assert AudioEncoder(model_copy / ENCODER_INT8).session_origin == UNCACHED


def test_the_cache_can_be_switched_off(model_copy, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "0")
    assert AudioEncoder(model_copy / ENCODER_INT8).session_origin == UNCACHED
    assert not (model_copy / CACHE_FOLDER).exists()


def test_a_broken_model_is_still_one_line_naming_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    bad = tmp_path / "broken.onnx"
    bad.write_bytes(b"\x00garbage" * 50)
    with pytest.raises(OnnxModelError, match=r"broken\.onnx: not a valid ONNX model"):
        AudioEncoder(bad)


# ---------------------------------------------------------------------------- what a run opens


def test_a_plain_run_opens_neither_vad_nor_ctc(tiny_models, zh_mp3):
    engine = Engine(tiny_models, gguf_path=tiny_models / "qwen3-0.6b-asr.q8_0.gguf")
    try:
        assert set(engine.load_times) == {"encoder", "llama.cpp"}
        engine.transcribe(zh_mp3, TranscribeOptions(vad="none", speculative=False, max_new_tokens=8))
        assert set(engine.load_times) == {"encoder", "llama.cpp"}
        engine.transcribe(zh_mp3, TranscribeOptions(vad="none", speculative=True, max_new_tokens=8))
        assert set(engine.load_times) == {"encoder", "llama.cpp", "ctc"}  # speculation needs the CTC head
    finally:
        engine.close()


def test_preloading_opens_what_the_options_need_and_changes_no_token(tiny_models, zh_mp3):
    options = TranscribeOptions(vad="silero", speculative=True, max_new_tokens=12)
    gguf = tiny_models / "qwen3-0.6b-asr.q8_0.gguf"
    for preload, opened in ((None, set()), (TranscribeOptions(vad="none", speculative=False), set()),
                            (TranscribeOptions(vad="silero", speculative=False), {"vad"}),
                            (TranscribeOptions(vad="none", speculative=False, timestamps=True), {"ctc"}),
                            (options, {"vad", "ctc"})):
        engine = Engine(tiny_models, gguf_path=gguf, preload=preload)
        engine.close()  # waits for the background loads
        assert set(engine.load_times) == {"encoder", "llama.cpp"} | opened, preload
    lazy = Engine(tiny_models, gguf_path=gguf)
    eager = Engine(tiny_models, gguf_path=gguf, preload=options)
    try:
        a, b = lazy.transcribe(zh_mp3, options), eager.transcribe(zh_mp3, options)
        assert [s.token_ids for s in a.segments] == [s.token_ids for s in b.segments]
        assert set(eager.load_times) == set(lazy.load_times) == {"encoder", "llama.cpp", "vad", "ctc"}
    finally:
        lazy.close()
        eager.close()


def test_tokens_are_the_same_with_and_without_the_session_cache(tiny_models, zh_mp3, tmp_path, monkeypatch):
    folder = tmp_path / "models"
    shutil.copytree(tiny_models, folder, ignore=shutil.ignore_patterns(CACHE_FOLDER))
    wave = load_audio(zh_mp3)
    options = TranscribeOptions(vad="none", speculative=False, max_new_tokens=16)
    results = []
    for setting in ("0", "1", "1"):  # no cache, cache written, cache loaded
        monkeypatch.setenv(CACHE_ENV, setting)
        engine = parity_engine(folder)
        try:
            results.append((engine.encoder.session_origin, engine.transcribe(wave, options)))
        finally:
            engine.close()
    assert [origin for origin, _ in results] == [UNCACHED, CACHE_WRITTEN, FROM_CACHE]
    tokens = [[s.token_ids for s in t.segments] for _, t in results]
    assert tokens[0] == tokens[1] == tokens[2]


# ---------------------------------------------------------------------------- embedding rows


def test_embedding_rows_equal_the_gguf_reference_dequantization(tiny_models):
    from gguf import GGUFReader
    from gguf.quants import dequantize

    for name in ("qwen3-0.6b-asr.f32.gguf", "qwen3-0.6b-asr.gguf", "qwen3-0.6b-asr.q8_0.gguf"):
        decoder = LlamaDecoder(tiny_models / name)
        try:
            tokens = [0, 7, decoder.n_vocab - 1]
            got = decoder.token_embeddings(tokens)
            assert decoder.token_embeddings([]).shape == (0, decoder.n_embd)
        finally:
            decoder.close()
        tensor = next(t for t in GGUFReader(tiny_models / name).tensors if t.name == "token_embd.weight")
        table = dequantize(np.asarray(tensor.data), tensor.tensor_type).reshape(-1, decoder.n_embd)
        assert np.array_equal(got, table[tokens].astype(np.float32)), name
