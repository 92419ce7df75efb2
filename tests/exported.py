"""Exported model folders (ONNX + GGUF) made from the tiny test checkpoints, shared by the inference tests."""

from __future__ import annotations

from pathlib import Path

from funasr_nano.models.llm import DecoderOptions

GGUF_TYPES = ("f32", "f16", "q8_0")


def export_model_dir(checkpoint: Path, out_dir: Path) -> Path:
    """Run both exporters on a release-shaped folder, the way 01 and 02 do."""
    from funasr_nano.export.export_gguf import export_gguf
    from funasr_nano.export.export_onnx import export_onnx

    if not (out_dir / "funasr_nano.json").is_file():
        export_onnx(checkpoint, out_dir, int8=True)
        export_gguf(checkpoint, out_dir, types=GGUF_TYPES, progress=False)
    return out_dir


def parity_engine(model_dir: Path, gguf: str = "qwen3-0.6b-asr.f32.gguf"):
    """fp32 encoder + the given GGUF with an f32 KV cache and no flash attention: the parity set-up."""
    from funasr_nano.engine import Engine

    return Engine(model_dir, gguf_path=model_dir / gguf,
                  decoder_options=DecoderOptions(kv_f32=True, flash_attn=False, n_seq_max=1))
