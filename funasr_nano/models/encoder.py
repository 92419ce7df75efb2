"""Run the exported audio encoder + adaptor and CTC graphs with onnxruntime (no torch).

Inference shares the machine's cores with llama.cpp, so the sessions are tuned to stay out of
its way: a fixed intra-op thread count, one inter-op thread, sequential execution and no
spin-waiting (idle ORT threads would otherwise burn a core while the LLM decodes).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnxruntime as ort

from funasr_nano.models.session_cache import OpenedSession, open_cached


class OnnxModelError(RuntimeError):
    """An ONNX file is missing, truncated or not the graph we expect (one line naming the file)."""


def session_options(threads: int) -> ort.SessionOptions:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = max(1, int(threads))
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.add_session_config_entry("session.inter_op.allow_spinning", "0")
    opts.log_severity_level = 3  # errors only: ORT warns about unused initializers etc. on stderr
    return opts


def load_session(path: Path | str, *, threads: int = 2, providers: list[str] | None = None,
                 cache: bool = True) -> OpenedSession:
    """Create an InferenceSession (through the optimized-graph cache, funasr_nano/models/session_cache.py), turning
    ORT's multi-line failures into one line that names the file."""
    path = Path(path)
    if not path.is_file():
        raise OnnxModelError(f"{path}: file not found (export the model first: funasr-nano export, or 01_export_onnx.py)")
    try:
        return open_cached(path, lambda: session_options(threads), providers, cache=cache)
    except Exception as exc:  # ORT raises Fail/InvalidProtobuf/InvalidGraph/RuntimeException...
        detail = " ".join(str(exc).split())[:200]
        raise OnnxModelError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {detail})") from exc


def open_session(path: Path | str, *, threads: int = 2, providers: list[str] | None = None) -> ort.InferenceSession:
    """The session alone (see `load_session`)."""
    return load_session(path, threads=threads, providers=providers).session


def _output_dim(session: ort.InferenceSession, name: str, path: Path) -> int:
    for out in session.get_outputs():
        if out.name == name:
            dim = out.shape[-1]
            if isinstance(dim, int):
                return dim
    raise OnnxModelError(f"{path}: graph has no output {name!r} with a fixed last dimension")


def _input_dim(session: ort.InferenceSession, name: str, path: Path) -> int:
    for inp in session.get_inputs():
        if inp.name == name and isinstance(inp.shape[-1], int):
            return inp.shape[-1]
    raise OnnxModelError(f"{path}: graph has no input {name!r} with a fixed last dimension")


class _OnnxGraph:
    """One exported graph and its session, opened through the optimized-graph cache."""

    def __init__(self, path: Path | str, *, threads: int, providers: list[str] | None, cache: bool) -> None:
        self.path = Path(path)
        opened = load_session(self.path, threads=threads, providers=providers, cache=cache)
        self.session = opened.session
        self.session_origin = opened.origin  # "cache", "written" or "uncached" (funasr_nano/models/session_cache.py)


class AudioEncoder(_OnnxGraph):
    """features (T, input_size) -> (encoder_out (T, enc_dim), adaptor_out (T, llm_dim)).

    adaptor_out is the adaptor's full output; the caller keeps only the official number of rows.
    """

    def __init__(self, path: Path | str, *, threads: int = 2, providers: list[str] | None = None,
                 cache: bool = True) -> None:
        super().__init__(path, threads=threads, providers=providers, cache=cache)
        self.input_size = _input_dim(self.session, "features", self.path)
        self.encoder_dim = _output_dim(self.session, "encoder_out", self.path)
        self.adaptor_dim = _output_dim(self.session, "adaptor_out", self.path)

    def run(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        feats = np.ascontiguousarray(features, dtype=np.float32)
        if feats.ndim != 2 or feats.shape[1] != self.input_size:
            raise ValueError(f"features must be (T, {self.input_size}), got {feats.shape}")
        t = feats.shape[0]
        if t == 0:  # ORT cannot run a zero-length sequence; nothing to encode anyway
            return (np.zeros((0, self.encoder_dim), np.float32), np.zeros((0, self.adaptor_dim), np.float32))
        enc, ada = self.session.run(["encoder_out", "adaptor_out"], {"features": feats[None]})
        return enc[0], ada[0]


class CTCHead(_OnnxGraph):
    """encoder_out (T, enc_dim) -> per-frame log-probs (T, V) or greedy ids (T,).

    Greedy decoding only needs the ids, which the graph computes itself (argmax inside ORT) so the
    T x 60515 log-prob matrix is only materialized when asked for.
    """

    def __init__(self, path: Path | str, *, threads: int = 2, providers: list[str] | None = None,
                 cache: bool = True) -> None:
        super().__init__(path, threads=threads, providers=providers, cache=cache)
        self.encoder_dim = _input_dim(self.session, "encoder_out", self.path)
        self.vocab_size = _output_dim(self.session, "log_probs", self.path)

    def run(self, encoder_out: np.ndarray, *, log_probs: bool = False) -> np.ndarray:
        """ids (T,) int64 by default; (T, V) float32 log-probs with log_probs=True."""
        x = np.ascontiguousarray(encoder_out, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.encoder_dim:
            raise ValueError(f"encoder_out must be (T, {self.encoder_dim}), got {x.shape}")
        if x.shape[0] == 0:
            return np.zeros((0, self.vocab_size), np.float32) if log_probs else np.zeros((0,), np.int64)
        name = "log_probs" if log_probs else "ids"
        (out,) = self.session.run([name], {"encoder_out": x[None]})
        return out[0]
