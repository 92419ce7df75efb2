"""Test helpers around llama-cpp-python's low-level API (the same C calls the runtime makes).

Tests compare llama.cpp against a Hugging Face reference; these helpers load a
GGUF with controlled numerics (f32 KV cache, no flash attention, CPU only),
feed token ids or raw embeddings, and return logits as numpy arrays. They are
deliberately independent of the project's inference engine so that they can
check it.
"""

from __future__ import annotations

import contextlib
import ctypes
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import llama_cpp
import numpy as np

from funasr_nano.engine import Engine
from funasr_nano.models.llm import DecoderOptions, load_llama_model


@contextlib.contextmanager
def capture_llama_log() -> Iterator[list[str]]:
    """Collect everything llama.cpp logs inside the block (through the project's one log hook)."""
    from funasr_nano.models import llama_log

    lines: list[str] = []
    with llama_log.capture(lambda _level, text: lines.append(text)):
        yield lines


class GGUFModel:
    """One GGUF model plus one context, driven through llama_decode.

    `f32_cache=True` stores K/V in f32 and flash attention is off so that an f32
    GGUF reproduces an f32 reference to ~1e-5; the runtime defaults (f16 cache)
    would add their own rounding on top of the weights' format.
    """

    def __init__(
        self,
        path: Path | str,
        *,
        n_ctx: int = 512,
        n_batch: int = 512,
        n_threads: int = 2,
        f32_cache: bool = True,
    ) -> None:
        self.path = Path(path)
        # the project's one guarded load: llama.cpp's default params would take its AMX kernels on
        # AMX Xeons, which crashed this helper (SIGSEGV in the q8_0 export tests)
        self.model = load_llama_model(self.path, n_gpu_layers=0)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {self.path}")
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = n_ctx
        cparams.n_batch = n_batch
        cparams.n_ubatch = n_batch
        cparams.n_seq_max = 1
        cparams.n_threads = n_threads
        cparams.n_threads_batch = n_threads
        cparams.flash_attn_type = llama_cpp.LLAMA_FLASH_ATTN_TYPE_DISABLED
        cparams.embeddings = False  # outputs are chosen per position via batch.logits
        cparams.no_perf = True
        if f32_cache:
            cparams.type_k = llama_cpp.GGML_TYPE_F32
            cparams.type_v = llama_cpp.GGML_TYPE_F32
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            llama_cpp.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context for {self.path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = int(llama_cpp.llama_vocab_n_tokens(self.vocab))
        self.n_embd = int(llama_cpp.llama_model_n_embd(self.model))
        self.n_past = 0

    # ----------------------------------------------------------------- lifetime

    def close(self) -> None:
        if getattr(self, "ctx", None):
            llama_cpp.llama_free(self.ctx)
            self.ctx = None
        if getattr(self, "model", None):
            llama_cpp.llama_model_free(self.model)
            self.model = None

    def __enter__(self) -> GGUFModel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def reset(self) -> None:
        """Forget the KV cache so the next decode starts at position 0."""
        llama_cpp.llama_memory_clear(llama_cpp.llama_get_memory(self.ctx), True)
        self.n_past = 0

    # ----------------------------------------------------------------- decoding

    def _decode(self, n: int, fill: Any, embd_dim: int, all_logits: bool) -> np.ndarray:
        batch = llama_cpp.llama_batch_init(n, embd_dim, 1)
        try:
            batch.n_tokens = n
            fill(batch)
            for i in range(n):
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = 1 if (all_logits or i == n - 1) else 0
            rc = llama_cpp.llama_decode(self.ctx, batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")
        finally:
            llama_cpp.llama_batch_free(batch)
        self.n_past += n
        rows = range(n) if all_logits else [n - 1]
        return np.stack([self._logits(i) for i in rows])

    def _logits(self, i: int) -> np.ndarray:
        ptr = llama_cpp.llama_get_logits_ith(self.ctx, i)
        return np.ctypeslib.as_array(ptr, shape=(self.n_vocab,)).astype(np.float32, copy=True)

    def decode_tokens(self, tokens: Sequence[int], all_logits: bool = True) -> np.ndarray:
        """Append tokens after what is cached; logits [n or 1, n_vocab]."""

        def fill(batch: Any) -> None:
            for i, t in enumerate(tokens):
                batch.token[i] = int(t)

        return self._decode(len(tokens), fill, 0, all_logits)

    def decode_embeddings(self, embd: np.ndarray, all_logits: bool = True) -> np.ndarray:
        """Append rows of input embeddings (token = NULL, as the ASR runtime injects audio); logits per row."""
        arr = np.ascontiguousarray(embd, dtype=np.float32)
        if arr.ndim != 2 or arr.shape[1] != self.n_embd:
            raise ValueError(f"embeddings must be [n, {self.n_embd}], got {arr.shape}")

        def fill(batch: Any) -> None:
            ctypes.memmove(batch.embd, arr.ctypes.data, arr.nbytes)

        return self._decode(arr.shape[0], fill, self.n_embd, all_logits)

    def greedy(self, prompt: Sequence[int], n_new: int) -> list[int]:
        """Greedy continuation of a token prompt from an empty cache."""
        self.reset()
        logits = self.decode_tokens(prompt, all_logits=False)[-1]
        out: list[int] = []
        for _ in range(n_new):
            nxt = int(np.argmax(logits))
            out.append(nxt)
            logits = self.decode_tokens([nxt], all_logits=False)[-1]
        return out

    # ----------------------------------------------------------------- vocabulary

    def tokenize(self, text: str, *, parse_special: bool = True, add_special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (llama_cpp.llama_token * cap)()
        n = llama_cpp.llama_tokenize(self.vocab, data, len(data), buf, cap, add_special, parse_special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} slots")
        return list(buf[:n])

    def detokenize(
        self, tokens: Sequence[int], *, remove_special: bool = False, unparse_special: bool = False
    ) -> str:
        arr = (llama_cpp.llama_token * max(len(tokens), 1))(*tokens)
        cap = 16 * len(tokens) + 16
        buf = ctypes.create_string_buffer(cap)
        n = llama_cpp.llama_detokenize(
            self.vocab, arr, len(tokens), buf, cap, remove_special, unparse_special
        )
        if n < 0:
            raise RuntimeError(f"llama_detokenize needs {-n} bytes")
        return buf.raw[:n].decode("utf-8")

    def eos_ids(self) -> tuple[int, int]:
        return int(llama_cpp.llama_vocab_eos(self.vocab)), int(llama_cpp.llama_vocab_eot(self.vocab))

    def is_eog(self, token: int) -> bool:
        return bool(llama_cpp.llama_vocab_is_eog(self.vocab, token))


# Context set-ups the batching and timestamp tests run on: f32 for bit-level checks, f16 as shipped.
ENGINES = {
    "f32-split": dict(gguf="qwen3-0.6b-asr.f32.gguf", kv_f32=True, flash_attn=False, kv_unified=False),
    "f16-split": dict(gguf="qwen3-0.6b-asr.gguf", kv_f32=False, flash_attn=None, kv_unified=False),
    # one cache for all sequences: new prompts join the running round (the server's default)
    "f32-unified": dict(gguf="qwen3-0.6b-asr.f32.gguf", kv_f32=True, flash_attn=False, kv_unified=True),
}


def small_engine(models: Path, cfg: dict, n_seq: int, engine: type[Engine] = Engine, **kwargs) -> Engine:
    options = DecoderOptions(threads=2, n_ctx=512, n_seq_max=n_seq, kv_f32=cfg["kv_f32"],
                             flash_attn=cfg["flash_attn"], kv_unified=cfg["kv_unified"])
    return engine(models, gguf_path=models / cfg["gguf"], decoder_options=options, **kwargs)
