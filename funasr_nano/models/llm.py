"""The Qwen3 decoder in llama.cpp (llama-cpp-python's low-level API), fed with audio embeddings.

Why the low-level API: the high-level `Llama` class has no way to decode
embedding rows, and `embeddings=True` would make every position an output
(slow, and a warning per call). Here the context is a plain causal-LM context;
audio rows go in through `llama_batch.embd` with no token ids, and only the
positions whose logits we read are marked as outputs.

Text tokens of the prompt that follow the audio are turned into embedding rows
by reading their rows of `token_embd.weight` from the GGUF itself, so audio and
text after it go to llama.cpp in one `llama_decode` (one pass over the weights).
"""

from __future__ import annotations

import ctypes
import logging
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import llama_cpp as L
import numpy as np

from funasr_nano.models import llama_log
from funasr_nano.models.gguf_file import GGUF_MAGIC, read_gguf
from funasr_nano.models.tokenizer import Tokenizer
from funasr_nano.presets import DEFAULT_BATCH_SIZE, context_per_sequence

log = logging.getLogger(__name__)

IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"


class DecoderError(RuntimeError):
    """A llama.cpp failure, phrased as one line that names the file."""


@dataclass(frozen=True)
class DecoderOptions:
    """llama.cpp context settings. `kv_f32` and `flash_attn=False` are for bit-level parity tests."""

    n_ctx: int = context_per_sequence()  # cells per sequence: a 30 s segment and 512 new tokens (funasr_nano.presets)
    n_batch: int = 1024
    threads: int = 2
    n_gpu_layers: int = 0
    n_seq_max: int = DEFAULT_BATCH_SIZE  # sequences decoded together (segments of a batch)
    kv_f32: bool = False
    flash_attn: bool | None = None  # None: llama.cpp decides
    # Several sequences (n_seq_max > 1): by default each gets its own KV stream of n_ctx cells; a
    # unified cache (kv_unified=True) holds n_ctx * n_seq_max cells shared by all sequences, a prefix
    # copied with copy_sequence() is stored once, and a llama_decode may mix rows of any sequences in
    # one pass over the weights (the split cache gives each run of sequences with equal rows a pass).
    kv_unified: bool = False
    # Ops on weights kept in host memory may run on a GPU backend for large batches (llama.cpp's
    # default). False keeps a CPU context entirely on the CPU, e.g. as a reference for GPU results.
    op_offload: bool = True
    # llama.cpp's CPU "extra" buffer types (AMX tiles, repacked weight layouts): wanted (k-quants
    # decode faster), but never where llama.cpp reports AMX; see extra_buffers_safe().
    extra_buffers: bool = True


def llama_warnings() -> list[str]:
    """Warnings and errors llama.cpp logged so far in this process (last 50)."""
    return llama_log.recent_warnings()


def gpu_offload_supported() -> bool:
    """Whether this llama.cpp build has a GPU backend (CUDA, Vulkan, Metal...) with a device."""
    return bool(L.llama_supports_gpu_offload())


def llama_system_info() -> str:
    """llama.cpp's own line of CPU features and backends, e.g. `CPU : SSE3 = 1 | ... | AMX_INT8 = 1 | ...`."""
    return L.llama_print_system_info().decode("utf-8", "replace").strip()


def extra_buffers_safe(system_info: str) -> bool:
    """Whether llama.cpp may put weights in its CPU "extra" buffer types (AMX tiles, repacked layouts).

    Not where llama.cpp reports AMX: it then keeps q8_0 weights in AMX buffers whose kernels run in
    OpenMP worker threads that never asked the kernel for tile permission (only the main thread
    calls arch_prctl(ARCH_REQ_XCOMP_PERM)), and the first matrix product dies with SIGILL on
    `tilezero` (llama.cpp PR #26954, open). AMX brings this decoder no speed anyway.

    Elsewhere they stay on, measured on the CI machine kind (AMD EPYC, AVX-512, full Qwen3-0.6B
    shapes, 44-token prompt + 45 decode steps, fresh processes, interleaved A/B): q8_0 is the same
    with and without them (19.7-19.9 ms per step, prefill 0.17-0.18 s both ways), while q4_k_m's
    repacked layout decodes 1.25x faster (13.4-13.6 vs 16.7-17.5 ms per step) for a slightly slower
    prefill (0.11-0.12 vs 0.09-0.11 s).
    """
    return "AMX_INT8 = 1" not in system_info and "AMX = 1" not in system_info


def use_extra_buffers(wanted: bool) -> bool:
    """`llama_model_params.use_extra_bufts` for a caller that wants them or not, refused where unsafe."""
    if extra_buffers_safe(llama_system_info()):
        return wanted
    log.debug("llama.cpp reports AMX: loading without extra buffer types (its AMX kernels crash in worker threads)")
    return False


def llama_model_params(*, n_gpu_layers: int = 0, extra_buffers: bool = True) -> L.llama_model_params:
    """llama.cpp's model parameters with the AMX guard applied: what every model load in this project uses.

    llama.cpp's defaults turn its extra buffer types on, so a load that starts from them anywhere
    else (a test helper, a benchmark) takes the AMX kernels that crash on AMX Xeons: the test suite
    died with SIGSEGV that way while the runtime was safe. Hence one place builds these parameters,
    and a test fails on any other file that loads a model (tests/test_ci_rules.py).
    """
    params = L.llama_model_default_params()
    params.n_gpu_layers = n_gpu_layers
    params.use_extra_bufts = use_extra_buffers(extra_buffers)
    return params


def load_llama_model(path: Path | str, *, n_gpu_layers: int = 0,
                     extra_buffers: bool = True) -> L.llama_model_p | None:
    """The one guarded llama.cpp model load (`llama_model_params`); the `llama_model` pointer, or None
    where llama.cpp refuses the file (its log says why). The caller frees it with `llama_model_free`."""
    L.llama_backend_init()
    params = llama_model_params(n_gpu_layers=n_gpu_layers, extra_buffers=extra_buffers)
    return L.llama_model_load_from_file(str(path).encode(), params)


_high_level_lock = threading.Lock()


def load_llama_api(path: Path | str, *, n_gpu_layers: int = 0, extra_buffers: bool = True,
                   **kwargs: Any) -> L.Llama:
    """llama-cpp-python's high-level `Llama` on a GGUF (the benchmarks' ceiling), with the same guard.

    `Llama` builds its model parameters from `llama_model_default_params()` and has no switch for
    the extra buffer types, so that function is swapped for `llama_model_params` while it loads
    (under a lock: the swap is process-wide). `kwargs` go to `Llama` (context settings, verbose...).
    """
    import llama_cpp.llama as api

    with _high_level_lock:
        default = api.llama_cpp.llama_model_default_params
        api.llama_cpp.llama_model_default_params = lambda: llama_model_params(extra_buffers=extra_buffers)
        try:
            return L.Llama(model_path=str(path), n_gpu_layers=n_gpu_layers, **kwargs)
        finally:
            api.llama_cpp.llama_model_default_params = default


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise DecoderError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        if f.read(4) != GGUF_MAGIC:
            raise DecoderError(f"{path}: not a GGUF file")


class LlamaDecoder:
    """One llama.cpp model + context: the thin binding. Not thread-safe: `funasr_nano.decoding.Scheduler` owns
    it; its `tokenizer` (the vocabulary alone) is, and is what other threads use."""

    def __init__(self, gguf_path: Path | str, options: DecoderOptions = DecoderOptions()) -> None:
        self.path = Path(gguf_path)
        self.options = options
        _check_gguf_file(self.path)
        llama_log.install()
        L.llama_backend_init()

        self._model = load_llama_model(self.path, n_gpu_layers=options.n_gpu_layers,
                                       extra_buffers=options.extra_buffers)
        if not self._model:
            raise DecoderError(f"{self.path}: llama.cpp cannot load this GGUF ({self._last_error()})")

        cparams = L.llama_context_default_params()
        cparams.n_ctx = options.n_ctx * max(1, options.n_seq_max)
        cparams.kv_unified = options.kv_unified
        cparams.n_batch = options.n_batch
        cparams.n_ubatch = options.n_batch
        cparams.n_seq_max = options.n_seq_max
        cparams.n_threads = options.threads
        cparams.n_threads_batch = options.threads
        cparams.embeddings = False
        cparams.no_perf = True
        cparams.op_offload = options.op_offload
        if options.flash_attn is not None:
            cparams.flash_attn_type = (
                L.LLAMA_FLASH_ATTN_TYPE_ENABLED if options.flash_attn else L.LLAMA_FLASH_ATTN_TYPE_DISABLED
            )
        if options.kv_f32:
            cparams.type_k = L.GGML_TYPE_F32
            cparams.type_v = L.GGML_TYPE_F32
        self._ctx = L.llama_init_from_model(self._model, cparams)
        if not self._ctx:
            L.llama_model_free(self._model)
            self._model = None
            raise DecoderError(f"{self.path}: cannot create a llama.cpp context ({self._last_error()})")

        self._vocab = L.llama_model_get_vocab(self._model)
        # the vocabulary only: callers' threads may use it while this context decodes on the owner's
        self.tokenizer = Tokenizer(self._vocab, self.path)
        self._memory = L.llama_get_memory(self._ctx)
        self.n_embd = int(L.llama_model_n_embd(self._model))
        self.n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        self.n_batch = int(L.llama_n_batch(self._ctx))
        self.n_ctx = int(L.llama_n_ctx_seq(self._ctx))  # positions one sequence may use
        if options.kv_unified:
            self.n_ctx = min(self.n_ctx, options.n_ctx)  # its share of the shared cells
        self.kv_unified = bool(options.kv_unified)
        self.n_seq_max = int(L.llama_n_seq_max(self._ctx))
        self._tok_batch = L.llama_batch_init(self.n_batch, 0, options.n_seq_max)
        self._emb_batch = L.llama_batch_init(self.n_batch, self.n_embd, options.n_seq_max)
        self._embedding_rows: _EmbeddingTable | None = None
        # Streams a cross-stream copy_sequence() involves: llama.cpp copies their buffers only at the
        # next llama_decode, so until then no cells may be written into them directly.
        self._copies_pending: set[int] = set()
        self.stop_ids = frozenset(self._special_id(s) for s in (IM_END, END_OF_TEXT))

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        if getattr(self, "_ctx", None):
            L.llama_batch_free(self._tok_batch)
            L.llama_batch_free(self._emb_batch)
            L.llama_free(self._ctx)
            self._ctx = None
        if getattr(self, "_model", None):
            L.llama_model_free(self._model)
            self._model = None

    def __del__(self) -> None:  # pragma: no cover - interpreter shutdown order varies
        try:
            self.close()
        except Exception:
            pass

    def _last_error(self) -> str:
        lines = [x for x in llama_warnings() if x]
        return lines[-1][:200] if lines else "see llama.cpp log"

    # ------------------------------------------------------------------ text

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenizer with special tokens parsed, no BOS: what funasr's HF tokenizer gives."""
        return self.tokenizer.tokenize(text)

    def _special_id(self, text: str) -> int:
        ids = self.tokenize(text)
        if len(ids) != 1:
            raise DecoderError(f"{self.path}: vocabulary lacks the special token {text}")
        return ids[0]

    def token_bytes(self, token: int) -> bytes:
        return self.tokenizer.token_bytes(token)

    def detokenize(self, tokens: Iterable[int]) -> str:
        return self.tokenizer.detokenize(tokens)

    def token_embeddings(self, tokens: Sequence[int]) -> np.ndarray:
        """Rows of the GGUF's input embedding table for these tokens, as float32 (n, n_embd)."""
        return self.load_embedding_table().rows(tokens)

    def load_embedding_table(self) -> _EmbeddingTable:
        """Locate the embedding table in the GGUF (30 ms of header walking: done once, ideally while loading)."""
        if self._embedding_rows is None:
            self._embedding_rows = _EmbeddingTable(self.path)
        return self._embedding_rows

    # ------------------------------------------------------------------ decoding

    def clear(self, seq: int = -1, start: int = 0) -> None:
        """Forget KV cache entries of `seq` (all sequences with -1) from position `start` on."""
        if not L.llama_memory_seq_rm(self._memory, seq, start, -1):
            raise DecoderError(f"{self.path}: cannot remove KV cache entries of sequence {seq}")

    def copy_sequence(self, src: int, dst: int) -> None:
        """Give `dst` all KV entries of `src` (shared cells in a unified cache, a buffer copy otherwise).

        `dst` should be empty; with a split cache the copy happens at the next decode.
        """
        L.llama_memory_seq_cp(self._memory, src, dst, -1, -1)
        if not self.options.kv_unified and src != dst:
            self._copies_pending.update((src, dst))

    def copy_pending(self, seq: int) -> bool:
        """Whether `seq` is the source or target of a copy llama.cpp has not made yet (it makes it at
        the next llama_decode): its buffer must not be written by `restore_sequence_state` before."""
        return seq in self._copies_pending

    def sequence_state(self, seq: int) -> bytes:
        """`seq`'s KV cells as llama.cpp serializes them (`funasr_nano.decoding.prefix_store` keeps them on disk)."""
        size = L.llama_state_seq_get_size(self._ctx, seq)
        buf = (ctypes.c_uint8 * size)()
        n = L.llama_state_seq_get_data(self._ctx, buf, size, seq)
        return ctypes.string_at(buf, n)

    def restore_sequence_state(self, seq: int, data: bytes, n_positions: int) -> bool:
        """Put cells saved by `sequence_state` into `seq` (emptied first); False, with `seq` empty,
        when llama.cpp refuses them or they do not hold exactly positions 0 .. n_positions - 1.

        llama.cpp writes them into the stream's buffer at once, while a copy from or into that
        stream waits for the next llama_decode (`copy_pending`): restoring then would corrupt the
        copy (a sequence moved out of `seq` would get these cells), so that is refused.
        """
        if self.copy_pending(seq):
            raise DecoderError(f"{self.path}: sequence {seq} has a KV copy pending; decode before restoring into it")
        self.clear(seq)
        src = (ctypes.c_uint8 * len(data)).from_buffer_copy(data)
        if L.llama_state_seq_set_data(self._ctx, src, len(data), seq) == 0:
            return False
        if (L.llama_memory_seq_pos_min(self._memory, seq), L.llama_memory_seq_pos_max(self._memory, seq)) \
                != (0, n_positions - 1):
            self.clear(seq)
            return False
        return True

    def state_signature(self) -> str:
        """What a sequence's cells depend on besides its tokens and the GGUF: llama.cpp's build and
        CPU features, and the context settings that choose kernels or the cache's type."""
        o = self.options
        return "|".join([L.__version__, llama_system_info(), f"kv_f32={o.kv_f32}", f"flash_attn={o.flash_attn}",
                         f"n_gpu_layers={o.n_gpu_layers}", f"kv_unified={o.kv_unified}", f"op_offload={o.op_offload}",
                         f"extra_buffers={use_extra_buffers(o.extra_buffers)}"])

    def decode_tokens(self, tokens: Sequence[int], start: int, seq: int = 0, *, all_logits: bool = False) -> None:
        """Put `tokens` at positions start.. of `seq`; logits of the last one (or all) become readable."""
        self._decode(len(tokens), start, seq, all_logits, tokens=tokens)

    def decode_embeddings(self, rows: np.ndarray, start: int, seq: int = 0, *, all_logits: bool = False) -> None:
        """Put embedding rows (n, n_embd) at positions start.. of `seq`, in as few llama_decode calls as n_batch allows."""
        rows = self._embedding_rows_checked(rows)
        self._decode(rows.shape[0], start, seq, all_logits, rows=rows)

    def _embedding_rows_checked(self, rows: np.ndarray) -> np.ndarray:
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise DecoderError(f"{self.path}: embedding rows of shape {rows.shape}, the model expects (n, {self.n_embd})")
        return rows

    def _decode(self, n: int, start: int, seq: int, all_logits: bool, *, tokens: Sequence[int] | None = None,
                rows: np.ndarray | None = None) -> None:
        """One sequence's tokens or rows at positions start.., n_batch at a time; the last one an output."""
        if n == 0:
            return
        if start + n > self.n_ctx:
            raise DecoderError(f"{self.path}: prompt and output need {start + n} positions, context has {self.n_ctx}")
        batch = self._tok_batch if rows is None else self._emb_batch
        for lo in range(0, n, self.n_batch):
            hi = min(n, lo + self.n_batch)
            if rows is None:
                np.ctypeslib.as_array(batch.token, shape=(self.n_batch,))[:hi - lo] = tokens[lo:hi]
            else:
                ctypes.memmove(batch.embd, rows[lo:hi].ctypes.data, rows[lo:hi].nbytes)
            outputs = np.full(hi - lo, all_logits, dtype=bool)
            outputs[-1] = True
            self._decode_batch(batch, range(start + lo, start + hi), [seq] * (hi - lo), outputs)

    def decode_many(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
                    outputs: Sequence[bool]) -> None:
        """One llama_decode for tokens of several sequences at once (batched and speculative decoding).

        Entry i puts `tokens[i]` at `positions[i]` of sequence `seqs[i]`; `outputs[i]` marks
        whether its logits are wanted. Read them with `logits(j)` where j counts the marked
        entries in order (llama.cpp numbers outputs, not batch rows). Reading all weights once
        for many rows is what makes this cheaper than one call per row.
        """
        n = len(tokens)
        if n == 0:
            return
        self._check_rows(n)
        np.ctypeslib.as_array(self._tok_batch.token, shape=(self.n_batch,))[:n] = tokens
        self._decode_batch(self._tok_batch, positions, seqs, outputs)

    def decode_rows(self, rows: np.ndarray, positions: Sequence[int], seqs: Sequence[int],
                    outputs: Sequence[bool]) -> None:
        """`decode_many` for embedding rows (n, n_embd): prompt rows and token rows (`token_embeddings`)
        of several sequences in one llama_decode."""
        rows = self._embedding_rows_checked(rows)
        n = rows.shape[0]
        if n == 0:
            return
        self._check_rows(n)
        ctypes.memmove(self._emb_batch.embd, rows.ctypes.data, rows.nbytes)
        self._decode_batch(self._emb_batch, positions, seqs, outputs)

    def _check_rows(self, n: int) -> None:
        if n > self.n_batch:
            raise DecoderError(f"{self.path}: {n} rows in one batch, more than n_batch={self.n_batch}")

    def _decode_batch(self, batch, positions: Sequence[int], seqs: Sequence[int],  # noqa: ANN001 - llama_batch
                      outputs: Sequence[bool]) -> None:
        n = len(positions)
        np.ctypeslib.as_array(batch.pos, shape=(self.n_batch,))[:n] = positions
        np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n_batch,))[:n] = 1
        np.ctypeslib.as_array(batch.logits, shape=(self.n_batch,))[:n] = np.asarray(outputs, dtype=np.int8)
        for i, seq in enumerate(seqs):
            batch.seq_id[i][0] = seq
        batch.n_tokens = n
        rc = L.llama_decode(self._ctx, batch)
        if rc != 0:
            raise DecoderError(f"{self.path}: llama_decode failed with code {rc} ({self._last_error()})")
        self._copies_pending.clear()

    def logits_rows(self, count: int) -> np.ndarray:
        """Logits of the first `count` outputs of the last decode as one (count, n_vocab) view."""
        ptr = L.llama_get_logits(self._ctx)
        if not ptr:
            raise DecoderError(f"{self.path}: no logits after decode")
        return np.ctypeslib.as_array(ptr, shape=(count, self.n_vocab))

    def logits(self, index: int = -1) -> np.ndarray:
        """A view of the logits of output `index` of the last decode (valid until the next decode)."""
        ptr = L.llama_get_logits_ith(self._ctx, index)
        if not ptr:
            raise DecoderError(f"{self.path}: no logits for output {index}")
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,))

    def lone_row_matches_batched(self, seq: int = 0) -> bool:
        """Whether a one-row decode gives a row the logits it gets among other rows, bit for bit.

        It depends on the weights' type and the CPU's kernels (see `funasr_nano.decoding.rounds`), so it
        is measured: eight tokens go into `seq`, the last one is decoded alone, then again with a
        second row; `seq` is emptied afterwards, so call it while the sequence is unused. This is
        the weights' side only: past 256 cells flash attention computes a lone row apart whatever
        the weights, which is why `batch_invariant` pads without asking.
        """
        tokens = list(range(1000, 1008))
        last = len(tokens) - 1
        self.clear(seq)
        try:
            self.decode_tokens(tokens[:last], 0, seq)
            alone = self.step(tokens[last], last, seq).copy()
            self.clear(seq, last)
            self.decode_many([tokens[last], tokens[0]], [last, last + 1], [seq, seq], [True, True])
            return bool(np.array_equal(alone, self.logits_rows(1)[0]))
        finally:
            self.clear(seq)

    def step(self, token: int, pos: int, seq: int = 0) -> np.ndarray:
        """Decode one token and return its logits: the hot loop of greedy decoding, kept minimal."""
        batch = self._tok_batch
        batch.token[0] = token
        batch.pos[0] = pos
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = seq
        batch.logits[0] = 1
        batch.n_tokens = 1
        rc = L.llama_decode(self._ctx, batch)
        if rc != 0:
            raise DecoderError(f"{self.path}: llama_decode failed with code {rc} ({self._last_error()})")
        self._copies_pending.clear()
        return np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))


class _EmbeddingTable:
    """Reads single rows of `token_embd.weight` out of a GGUF without loading the whole table.

    gguf-py's GGUFReader parses every metadata value into Python objects (seconds
    for a 150k-token vocabulary), so the header is walked by `funasr_nano.models.gguf_file`,
    skipping values, and the tensor is memory-mapped. F32, F16 and Q8_0 rows are converted here
    (the same float32 values llama.cpp's own row lookup gives: one f16 scale times int8); other
    types go through gguf-py, imported only then (80 ms).
    """

    def __init__(self, path: Path) -> None:
        tensor = read_gguf(path, values=False).tensors.get("token_embd.weight")
        if tensor is None:
            raise DecoderError(f"{path}: GGUF has no tensor token_embd.weight")
        offset, self._type = tensor.offset, tensor.ggml_type
        n_rows, n_embd = tensor.shape
        if self._type in _ROW_TYPES:
            block, type_size = _ROW_TYPES[self._type]
        else:
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(self._type)]
        self.n_embd = n_embd
        row_bytes = n_embd // block * type_size
        self._data = np.memmap(path, dtype=np.uint8, mode="r", offset=offset, shape=(n_rows, row_bytes))

    def rows(self, tokens: Sequence[int]) -> np.ndarray:
        raw = np.asarray(self._data[np.asarray(tokens, dtype=np.int64)])
        if raw.shape[0] == 0:
            return np.zeros((0, self.n_embd), np.float32)
        if self._type == _GGML_F32:
            return raw.view(np.float32)
        if self._type == _GGML_F16:
            return raw.view(np.float16).astype(np.float32)
        if self._type == _GGML_Q8_0:
            blocks = raw.reshape(raw.shape[0], self.n_embd // 32, 34)
            scale = blocks[:, :, :2].copy().view(np.float16).astype(np.float32)
            return (blocks[:, :, 2:].view(np.int8).astype(np.float32) * scale).reshape(raw.shape[0], self.n_embd)
        from gguf import GGMLQuantizationType
        from gguf.quants import dequantize

        return dequantize(raw, GGMLQuantizationType(self._type)).astype(np.float32)


_GGML_F32, _GGML_F16, _GGML_Q8_0 = 0, 1, 8
_ROW_TYPES = {_GGML_F32: (1, 4), _GGML_F16: (1, 2), _GGML_Q8_0: (32, 34)}  # ggml type -> (block, bytes per block)

