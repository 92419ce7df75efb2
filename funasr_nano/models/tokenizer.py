"""Qwen3's tokenizer, read from the GGUF's vocabulary: safe to call from any thread.

llama.cpp's vocabulary (`llama_vocab`) is immutable once the model is loaded, and its tokenize
and token-to-piece calls only read it (llama.cpp's own server tokenizes on its HTTP threads while
the context decodes on another). So callers' threads tokenize prompts and detokenize results
through this object, while the context (`LlamaDecoder`) stays with the one thread that owns it.
"""

from __future__ import annotations

import ctypes
from collections.abc import Iterable
from pathlib import Path

import llama_cpp as L


class TokenizerError(RuntimeError):
    pass


class Tokenizer:
    """tokenize / detokenize on a loaded model's vocabulary; valid while that model is loaded."""

    def __init__(self, vocab: L.llama_vocab_p, path: Path) -> None:
        self._vocab = vocab
        self.path = path

    def tokenize(self, text: str) -> list[int]:
        """llama.cpp's tokenizer with special tokens parsed, no BOS: what funasr's HF tokenizer gives."""
        data = text.encode("utf-8")
        cap = len(data) + 16
        buf = (L.llama_token * cap)()
        n = L.llama_tokenize(self._vocab, data, len(data), buf, cap, False, True)
        if n < 0:
            raise TokenizerError(f"{self.path}: tokenization needs {-n} tokens, more than {cap}")
        return list(buf[:n])

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


__all__ = ["Tokenizer", "TokenizerError"]
