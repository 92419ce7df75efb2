"""Prompt prefixes' cells saved on disk (`funasr_nano.decoding.prefix_store`): a fresh context that
loads them gets the logits, bit for bit, of one that decodes the prefix; damaged or refused files
are replaced, unwritable folders and the off switch mean no store, never an error."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

from funasr_nano.decoding.prefix_store import STORE_ENV, PrefixStore
from funasr_nano.decoding.prefixes import PrefixCache, Prompt
from funasr_nano.models.llm import DecoderOptions, LlamaDecoder

PREFIX = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n语音转写："


class _CountingDecoder:
    """The real decoder, counting the passes that decode prefix tokens."""

    def __init__(self, decoder: LlamaDecoder) -> None:
        self.decoder = decoder
        self.token_passes = 0

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the decoder's
        return getattr(self.decoder, name)

    def decode_tokens(self, tokens, start, seq=0, **kwargs) -> None:
        self.token_passes += 1
        self.decoder.decode_tokens(tokens, start, seq, **kwargs)


@pytest.fixture()
def gguf(tiny_models: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A private copy of the tiny f16 GGUF (its own store folder), the user cache in tmp."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "user-cache"))
    monkeypatch.delenv(STORE_ENV, raising=False)
    path = tmp_path / "models" / "qwen3-0.6b-asr.gguf"
    path.parent.mkdir()
    shutil.copy2(tiny_models / "qwen3-0.6b-asr.gguf", path)
    return path


def _options(unified: bool) -> DecoderOptions:
    """One sequence in a split cache, or the second of two in a unified one (the server's)."""
    return DecoderOptions(threads=2, n_ctx=128, n_seq_max=2 if unified else 1, kv_unified=unified)


def _admit(gguf: Path, store: PrefixStore | None, rows: np.ndarray, unified: bool = False) -> tuple[np.ndarray, int]:
    """Logits after a 40-row prompt in a fresh context, and how many token passes it took."""
    decoder = _CountingDecoder(LlamaDecoder(gguf, _options(unified)))
    try:
        logits = PrefixCache(decoder, store=store).admit(Prompt(PREFIX, rows, [11, 12]), int(unified))
    finally:
        decoder.close()
    return logits, decoder.token_passes


def _rows(gguf: Path) -> np.ndarray:
    decoder = LlamaDecoder(gguf, DecoderOptions(threads=2, n_ctx=64, n_seq_max=1))
    n_embd = decoder.n_embd
    decoder.close()
    return np.random.default_rng(3).standard_normal((40, n_embd)).astype(np.float32)


def _store_files(gguf: Path) -> list[Path]:
    folder = gguf.parent / ".prompt-cache"
    return sorted(folder.glob("*.kv")) if folder.is_dir() else []


def _store_for(gguf: Path, unified: bool = False) -> PrefixStore:
    decoder = LlamaDecoder(gguf, _options(unified))
    try:
        return PrefixStore.for_decoder(decoder)
    finally:
        decoder.close()


@pytest.mark.parametrize("unified", [False, True], ids=["split", "unified"])
def test_saved_cells_give_a_fresh_context_the_logits_of_decoding_the_prefix(gguf, unified):
    rows = _rows(gguf)
    decoded, passes_without = _admit(gguf, None, rows, unified)
    written, passes_writing = _admit(gguf, _store_for(gguf, unified), rows, unified)
    assert len(_store_files(gguf)) == 1
    loaded, passes_loading = _admit(gguf, _store_for(gguf, unified), rows, unified)
    assert (passes_without, passes_writing, passes_loading) == (1, 1, 0)  # loaded: no pass over the prefix
    assert np.array_equal(decoded, written) and np.array_equal(decoded, loaded)


@pytest.mark.parametrize("damage", ["truncated", "flipped", "empty"])
def test_a_damaged_file_is_replaced_and_the_logits_stay_the_same(gguf, damage):
    rows = _rows(gguf)
    want, _ = _admit(gguf, _store_for(gguf), rows)
    (path,) = _store_files(gguf)
    raw = path.read_bytes()
    path.write_bytes({"truncated": raw[: len(raw) // 2], "flipped": raw[:-9] + bytes([raw[-9] ^ 1]) + raw[-8:],
                      "empty": b""}[damage])
    got, passes = _admit(gguf, _store_for(gguf), rows)
    assert passes == 1 and np.array_equal(got, want)
    assert path.read_bytes() == raw  # decoded again and rewritten


def test_cells_llama_cpp_refuses_are_deleted_and_the_prefix_decoded(gguf):
    """A file with a valid checksum but cells of another prompt length (as if keys collided)."""
    rows = _rows(gguf)
    want, _ = _admit(gguf, _store_for(gguf), rows)
    (path,) = _store_files(gguf)
    store = _store_for(gguf)
    decoder = LlamaDecoder(gguf, DecoderOptions(threads=2, n_ctx=128, n_seq_max=1))
    try:
        decoder.decode_tokens(list(range(100, 103)), 0, 0)  # three positions, not the prefix's
        other = decoder.sequence_state(0)
        ids = decoder.tokenize(PREFIX)
    finally:
        decoder.close()
    store.save(ids, other)
    got, passes = _admit(gguf, _store_for(gguf), rows)
    assert passes == 1 and np.array_equal(got, want)
    assert store.load(ids) != other  # replaced by the prefix's own cells


def test_another_gguf_or_prefix_gets_its_own_file(gguf):
    store = _store_for(gguf)
    store.save([1, 2, 3], b"a")
    store.save([1, 2, 4], b"b")
    assert store.load([1, 2, 3]) == b"a" and store.load([1, 2, 4]) == b"b"
    other = gguf.with_name("other.gguf")
    shutil.copy2(gguf, other)
    assert PrefixStore(other, "sig").load([1, 2, 3]) is None
    assert PrefixStore(gguf, "another llama.cpp").load([1, 2, 3]) is None


def test_an_unwritable_model_folder_falls_back_to_the_user_cache(gguf, tmp_path):
    # a file where the store folder would go: that folder cannot be written (as in a read-only
    # install, which a test running as root cannot make with permissions)
    (gguf.parent / ".prompt-cache").write_text("not a folder")
    rows = _rows(gguf)
    want, _ = _admit(gguf, _store_for(gguf), rows)
    (user,) = (tmp_path / "user-cache" / "funasr-nano" / "prompts").iterdir()  # one sub-folder per model folder
    assert len(list(user.glob("*.kv"))) == 1
    got, passes = _admit(gguf, _store_for(gguf), rows)
    assert passes == 0 and np.array_equal(got, want)


def test_no_writable_folder_or_switched_off_means_no_store_and_no_error(gguf, tmp_path, monkeypatch):
    (gguf.parent / ".prompt-cache").write_text("not a folder")
    (tmp_path / "blocked").write_text("a file")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "blocked"))
    rows = _rows(gguf)
    for _ in range(2):
        _, passes = _admit(gguf, _store_for(gguf), rows)
        assert passes == 1
    monkeypatch.setenv(STORE_ENV, "0")
    assert _store_for(gguf) is None


def test_a_sequence_moved_out_keeps_its_cells_when_the_next_job_comes_from_the_store(gguf):
    """The scheduler moves sequence 1 into 0 (compaction) and admits a job into 1 whose prefix is
    saved. llama.cpp copies stream buffers only at the next llama_decode, while restored cells are
    written at once: restored before that decode, they would become the moved sequence's cells."""
    rows = _rows(gguf)
    other = PREFIX + "魔搭"
    store = _store_for(gguf)
    decoder = LlamaDecoder(gguf, DecoderOptions(threads=2, n_ctx=128, n_seq_max=2))
    try:
        PrefixCache(decoder, store=store).admit(Prompt(other, rows[:10], [11]), 0)  # `other` saved
        decoder.clear()
        prompt = Prompt(PREFIX, rows, [11, 12])
        cache = PrefixCache(decoder, store=store)
        token = int(np.argmax(cache.admit(prompt, 1)))
        pos = cache.prompt_length(prompt)
        decoder.copy_sequence(1, 0)
        decoder.clear(1)
        cache.moved(1, 0)
        cache.admit(Prompt(other, rows[:10], [11]), 1)
        moved = np.array(decoder.step(token, pos, 0), copy=True)
        decoder.clear()
        PrefixCache(decoder).admit(prompt, 0)
        unmoved = np.array(decoder.step(token, pos, 0), copy=True)
    finally:
        decoder.close()
    assert np.array_equal(moved, unmoved)


def test_only_the_most_recently_used_files_are_kept(gguf):
    """Every new hotword list is a new prefix: a server must not fill the disk with them."""
    import os

    from funasr_nano.decoding.prefix_store import MAX_FILES

    store = PrefixStore(gguf, "sig")
    for i in range(MAX_FILES):  # written long ago, in this order (whatever the file system's clock)
        before = set(_store_files(gguf))
        store.save([i], b"cells %d" % i)
        (new,) = set(_store_files(gguf)) - before
        os.utime(new, ns=((10**9 + i) * 10**9,) * 2)
    assert store.load([0]) is not None  # used now: the most recent
    for i in range(MAX_FILES, MAX_FILES + 5):
        store.save([i], b"cells %d" % i)
    assert len(_store_files(gguf)) == MAX_FILES
    assert [store.load([i]) is not None for i in (0, 1, 5, 6, MAX_FILES + 4)] == [True, False, False, True, True]
