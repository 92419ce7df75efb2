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
import os
import sys
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import llama_cpp as L
import numpy as np

from common.repetition import RepetitionGuard

log = logging.getLogger(__name__)

IM_END = "<|im_end|>"
END_OF_TEXT = "<|endoftext|>"
_GGUF_MAGIC = b"GGUF"


class DecoderError(RuntimeError):
    """A llama.cpp failure, phrased as one line that names the file."""


@dataclass(frozen=True)
class DecoderOptions:
    """llama.cpp context settings. `kv_f32` and `flash_attn=False` are for bit-level parity tests."""

    n_ctx: int = 1280  # per sequence: a 30 s segment with hotwords and 512 new tokens fits; KV memory grows with it
    n_batch: int = 1024
    threads: int = 2
    n_gpu_layers: int = 0
    n_seq_max: int = 1
    kv_f32: bool = False
    flash_attn: bool | None = None  # None: llama.cpp decides
    # Several sequences (n_seq_max > 1): by default each gets its own KV stream of n_ctx cells (the
    # cache is n_seq_max times larger); a unified cache (kv_unified=True) holds n_ctx cells shared by
    # all sequences, and a prefix copied with copy_sequence() is stored once.
    kv_unified: bool = False
    # Ops on weights kept in host memory may run on a GPU backend for large batches (llama.cpp's
    # default). False keeps a CPU context entirely on the CPU, e.g. as a reference for GPU results.
    op_offload: bool = True
    # llama.cpp's CPU "extra" buffer types (AMX tiles, repacked weight layouts): wanted (k-quants
    # decode faster), but never where llama.cpp reports AMX; see extra_buffers_safe().
    extra_buffers: bool = True


_log_lock = threading.Lock()
_log_lines: list[str] = []
_log_callback_ref = None  # keep the ctypes callback alive for the process lifetime


def _install_quiet_logger() -> None:
    """Keep llama.cpp's chatter (model card, tensor lists) off the user's terminal.

    Warnings and errors are remembered so a failure message can include them; with FUNASR_DEBUG
    set, the whole log also goes to stderr.
    """
    global _log_callback_ref
    if _log_callback_ref is not None:
        return

    passthrough = bool(os.environ.get("FUNASR_DEBUG"))

    @ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
    def _callback(level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        if passthrough and text:
            sys.stderr.write(text.decode("utf-8", "replace"))
        if text and level in (3, 4):  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR
            with _log_lock:
                _log_lines.append(text.decode("utf-8", "replace").rstrip())
                del _log_lines[:-50]

    _log_callback_ref = _callback
    L.llama_log_set(_callback, ctypes.c_void_p())


def llama_warnings() -> list[str]:
    """Warnings and errors llama.cpp logged so far in this process (last 50)."""
    with _log_lock:
        return list(_log_lines)


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


def _check_gguf_file(path: Path) -> None:
    if not path.is_file():
        raise DecoderError(f"{path}: GGUF file not found")
    with open(path, "rb") as f:
        if f.read(4) != _GGUF_MAGIC:
            raise DecoderError(f"{path}: not a GGUF file")


class LlamaDecoder:
    """One llama.cpp model + context. Not thread-safe; one per worker."""

    def __init__(self, gguf_path: Path | str, options: DecoderOptions = DecoderOptions()) -> None:
        self.path = Path(gguf_path)
        self.options = options
        _check_gguf_file(self.path)
        _install_quiet_logger()
        L.llama_backend_init()

        mparams = L.llama_model_default_params()
        mparams.n_gpu_layers = options.n_gpu_layers
        mparams.use_extra_bufts = use_extra_buffers(options.extra_buffers)
        self._model = L.llama_model_load_from_file(str(self.path).encode(), mparams)
        if not self._model:
            raise DecoderError(f"{self.path}: llama.cpp cannot load this GGUF ({self._last_error()})")

        cparams = L.llama_context_default_params()
        cparams.n_ctx = options.n_ctx * (1 if options.kv_unified else max(1, options.n_seq_max))
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
        self._memory = L.llama_get_memory(self._ctx)
        self.n_embd = int(L.llama_model_n_embd(self._model))
        self.n_vocab = int(L.llama_vocab_n_tokens(self._vocab))
        self.n_batch = int(L.llama_n_batch(self._ctx))
        self.n_ctx = int(L.llama_n_ctx_seq(self._ctx))  # positions one sequence may use
        self.n_seq_max = int(L.llama_n_seq_max(self._ctx))
        self._tok_batch = L.llama_batch_init(self.n_batch, 0, options.n_seq_max)
        self._emb_batch = L.llama_batch_init(self.n_batch, self.n_embd, options.n_seq_max)
        self._embedding_rows: _EmbeddingTable | None = None
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
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            raise DecoderError(f"{self.path}: tokenization needs {-n} tokens, more than {cap}")
        return list(buf[:n])

    def _special_id(self, text: str) -> int:
        ids = self.tokenize(text)
        if len(ids) != 1:
            raise DecoderError(f"{self.path}: vocabulary lacks the special token {text}")
        return ids[0]

    def token_bytes(self, token: int) -> bytes:
        """The raw bytes of one token; control tokens (<|im_end|> ...) give b"" like skip_special_tokens."""
        buf = ctypes.create_string_buffer(64)
        n = L.llama_token_to_piece(self._vocab, token, buf, 64, 0, False)
        if n < 0:
            buf = ctypes.create_string_buffer(-n)
            n = L.llama_token_to_piece(self._vocab, token, buf, -n, 0, False)
        return buf.raw[:n]

    def detokenize(self, tokens: Iterable[int]) -> str:
        """Bytes of all tokens joined, then decoded, as Hugging Face's byte-level BPE decoder does."""
        return b"".join(self.token_bytes(t) for t in tokens).decode("utf-8", "replace")

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

    def decode_tokens(self, tokens: Sequence[int], start: int, seq: int = 0, *, all_logits: bool = False) -> None:
        """Put `tokens` at positions start.. of `seq`; logits of the last one (or all) become readable."""
        self._decode(len(tokens), start, seq, all_logits, tokens=tokens)

    def decode_embeddings(self, rows: np.ndarray, start: int, seq: int = 0, *, all_logits: bool = False) -> None:
        """Put embedding rows (n, n_embd) at positions start.. of `seq`, in as few llama_decode calls as n_batch allows."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != self.n_embd:
            raise DecoderError(f"{self.path}: embedding rows of shape {rows.shape}, the model expects (n, {self.n_embd})")
        self._decode(rows.shape[0], start, seq, all_logits, rows=rows)

    def decode_prompt(self, tokens: Sequence[int], rows: np.ndarray, seq: int = 0) -> None:
        """Text tokens at positions 0.., then embedding rows (audio, text after it), in one pass when n_batch allows.

        The tokens go in as their rows of the embedding table, the floats llama.cpp's own lookup
        would give, so the logits are those of decoding the tokens and the rows apart; but the
        weights are read once, not twice (a 44-position prompt of the full model: 0.17 s in one
        call, 0.20 s as 20 tokens then 24 rows, q8_0, 2 threads).

        The first llama_decode of a fresh context costs no more than later ones (0.174 s against
        0.172 s for those 44 rows, measured in fresh processes): the weights are mapped with
        MAP_POPULATE at load and the KV cache is cleared when the context is created, so there is
        no first-touch cost left to hide, and a 1-token warm-up while the encoder runs would cost
        21 ms to save 2.
        """
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if len(tokens):
            rows = np.concatenate([self.token_embeddings(tokens), rows], axis=0)
        self.decode_embeddings(rows, 0, seq)

    def _decode(self, n: int, start: int, seq: int, all_logits: bool, *, tokens: Sequence[int] | None = None,
                rows: np.ndarray | None = None) -> None:
        if n == 0:
            return
        if start + n > self.n_ctx:
            raise DecoderError(f"{self.path}: prompt and output need {start + n} positions, context has {self.n_ctx}")
        batch = self._tok_batch if rows is None else self._emb_batch
        for lo in range(0, n, self.n_batch):
            hi = min(n, lo + self.n_batch)
            m = hi - lo
            if rows is None:
                np.ctypeslib.as_array(batch.token, shape=(self.n_batch,))[:m] = tokens[lo:hi]
            else:
                ctypes.memmove(batch.embd, rows[lo:hi].ctypes.data, rows[lo:hi].nbytes)
            np.ctypeslib.as_array(batch.pos, shape=(self.n_batch,))[:m] = np.arange(start + lo, start + hi)
            np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n_batch,))[:m] = 1
            for i in range(m):
                batch.seq_id[i][0] = seq
            flags = np.ctypeslib.as_array(batch.logits, shape=(self.n_batch,))
            flags[:m] = 1 if all_logits else 0
            flags[m - 1] = 1
            batch.n_tokens = m
            rc = L.llama_decode(self._ctx, batch)
            if rc != 0:
                raise DecoderError(f"{self.path}: llama_decode failed with code {rc} ({self._last_error()})")

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
        if n > self.n_batch:
            raise DecoderError(f"{self.path}: {n} rows in one batch, more than n_batch={self.n_batch}")
        batch = self._tok_batch
        np.ctypeslib.as_array(batch.token, shape=(self.n_batch,))[:n] = tokens
        np.ctypeslib.as_array(batch.pos, shape=(self.n_batch,))[:n] = positions
        np.ctypeslib.as_array(batch.n_seq_id, shape=(self.n_batch,))[:n] = 1
        np.ctypeslib.as_array(batch.logits, shape=(self.n_batch,))[:n] = np.asarray(outputs, dtype=np.int8)
        for i, seq in enumerate(seqs):
            batch.seq_id[i][0] = seq
        batch.n_tokens = n
        rc = L.llama_decode(self._ctx, batch)
        if rc != 0:
            raise DecoderError(f"{self.path}: llama_decode failed with code {rc} ({self._last_error()})")

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
        return np.ctypeslib.as_array(L.llama_get_logits_ith(self._ctx, -1), shape=(self.n_vocab,))

    def greedy(self, first_logits: np.ndarray, pos: int, max_new_tokens: int, seq: int = 0,
               min_new_tokens: int = 0, guard: RepetitionGuard | None = None) -> list[int]:
        """Greedy decoding from the prompt's logits, stopping on <|im_end|> / <|endoftext|>.

        `min_new_tokens` forces a length (benchmarks on random weights): stop tokens are
        skipped in favour of the next best until that many tokens exist. `guard` stops
        early when the output has fallen into a loop (the caller trims and reports it).
        """
        out: list[int] = []
        logits = first_logits
        stop = self.stop_ids
        while len(out) < max_new_tokens:
            token = int(np.argmax(logits))
            if token in stop:
                if len(out) >= min_new_tokens:
                    break
                masked = np.array(logits, copy=True)
                masked[list(stop)] = -np.inf
                token = int(np.argmax(masked))
            out.append(token)
            if len(out) == max_new_tokens:
                break
            if guard is not None and len(out) >= min_new_tokens and guard.looping(out):
                break
            logits = self.step(token, pos, seq)
            pos += 1
        return out


class _EmbeddingTable:
    """Reads single rows of `token_embd.weight` out of a GGUF without loading the whole table.

    gguf-py's GGUFReader parses every metadata value into Python objects (seconds
    for a 150k-token vocabulary), so the header is walked here with struct, skipping
    values, and the tensor is memory-mapped. F32, F16 and Q8_0 rows are converted here
    (the same float32 values llama.cpp's own row lookup gives: one f16 scale times int8);
    other types go through gguf-py, imported only then (80 ms).
    """

    def __init__(self, path: Path) -> None:
        offset, qtype, dims = _locate_tensor(path, "token_embd.weight")
        self._type = qtype
        n_embd, n_rows = dims[0], dims[1]
        if qtype in _ROW_TYPES:
            block, type_size = _ROW_TYPES[qtype]
        else:
            from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

            block, type_size = GGML_QUANT_SIZES[GGMLQuantizationType(qtype)]
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


# GGUF metadata value types -> struct format of a scalar (8: string, 9: array)
_GGUF_SCALARS = {0: "B", 1: "b", 2: "H", 3: "h", 4: "I", 5: "i", 6: "f", 7: "?", 10: "Q", 11: "q", 12: "d"}


def _locate_tensor(path: Path, name: str) -> tuple[int, int, list[int]]:
    """(absolute data offset, ggml type, dims) of one tensor, from the GGUF header alone."""
    import mmap
    import struct

    with open(path, "rb") as f, mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
        if buf[:4] != _GGUF_MAGIC:
            raise DecoderError(f"{path}: not a GGUF file")
        _version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
        pos = 24
        alignment = 32

        def read_str(p: int) -> tuple[str, int]:
            (n,) = struct.unpack_from("<Q", buf, p)
            return buf[p + 8 : p + 8 + n].decode("utf-8", "replace"), p + 8 + n

        def skip_value(p: int, vtype: int) -> int:
            if vtype == 8:
                (n,) = struct.unpack_from("<Q", buf, p)
                return p + 8 + n
            if vtype == 9:
                itype, count = struct.unpack_from("<IQ", buf, p)
                p += 12
                if itype in _GGUF_SCALARS:
                    return p + count * struct.calcsize(_GGUF_SCALARS[itype])
                for _ in range(count):
                    p = skip_value(p, itype)
                return p
            return p + struct.calcsize(_GGUF_SCALARS[vtype])

        for _ in range(n_kv):
            key, pos = read_str(pos)
            (vtype,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if key == "general.alignment" and vtype == 4:
                (alignment,) = struct.unpack_from("<I", buf, pos)
            pos = skip_value(pos, vtype)
        found: tuple[int, int, list[int]] | None = None
        for _ in range(n_tensors):
            tname, pos = read_str(pos)
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = list(struct.unpack_from(f"<{n_dims}Q", buf, pos + 4))
            pos += 4 + 8 * n_dims
            qtype, offset = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if tname == name:
                found = (offset, qtype, dims)
        if found is None:
            raise DecoderError(f"{path}: GGUF has no tensor {name}")
        data_start = (pos + alignment - 1) // alignment * alignment
        return data_start + found[0], found[1], found[2]


def warn(message: str) -> None:
    """One line on stderr: how the engine tells the user about a fallback or a skipped step."""
    print(message, file=sys.stderr, flush=True)
