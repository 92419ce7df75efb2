"""Export the Qwen3 decoder of Fun-ASR-Nano (`llm.*` in model.pt) to GGUF for llama.cpp.

The `llm.*` weights with the prefix removed are a stock Hugging Face
`Qwen3ForCausalLM` state dict, so the file written here follows what llama.cpp's
own `convert_hf_to_gguf.py` writes for Qwen3 (arch `qwen3`, gpt2/qwen2 BPE
vocabulary padded to the embedding rows). Inference then needs neither torch nor
the release folder.

Unquantized files (f32/f16/bf16) are written directly with `gguf.GGUFWriter`,
one tensor at a time from a memory-mapped model.pt, so peak memory stays near
one tensor. Quantized files are made by llama.cpp's own quantizer
(`llama_model_quantize`), which knows the per-tensor type rules of each
`*_K_M` mix; re-implementing them would drift from upstream.

torch, transformers and llama_cpp are imported inside functions: importing
this module for `gguf_file_name` must stay cheap and torch-free.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np
    import torch

GGUF_STEM = "qwen3-0.6b-asr"
DEFAULT_TYPE = "f16"
ARCH = "qwen3"
MODEL_NAME = "Fun-ASR-Nano-2512 LLM (Qwen3-0.6B)"

# Types written by GGUFWriter itself: name -> gguf.LlamaFileType member name.
BASE_TYPES: dict[str, str] = {"f32": "ALL_F32", "f16": "MOSTLY_F16", "bf16": "MOSTLY_BF16"}
# Types made by llama.cpp's quantizer: name -> LlamaFileType / LLAMA_FTYPE_* suffix.
QUANT_TYPES: dict[str, str] = {
    "q8_0": "MOSTLY_Q8_0",
    "q6_k": "MOSTLY_Q6_K",
    "q5_k_m": "MOSTLY_Q5_K_M",
    "q5_k_s": "MOSTLY_Q5_K_S",
    "q5_0": "MOSTLY_Q5_0",
    "q4_k_m": "MOSTLY_Q4_K_M",
    "q4_k_s": "MOSTLY_Q4_K_S",
    "q4_0": "MOSTLY_Q4_0",
}
SUPPORTED_TYPES: tuple[str, ...] = (*BASE_TYPES, *QUANT_TYPES)


class ExportError(RuntimeError):
    """A problem with the export, phrased as one line for the user."""


def gguf_file_name(type: str = DEFAULT_TYPE) -> str:
    """File name of the GGUF for one output type; f16 gets the plain name, the one the runtime loads by default."""
    name = type.strip().lower()
    return f"{GGUF_STEM}.gguf" if name == DEFAULT_TYPE else f"{GGUF_STEM}.{name}.gguf"


def parse_types(spec: str | Sequence[str]) -> tuple[str, ...]:
    """Normalise `"f16,q8_0"` (or a list) to known type names, keeping order and dropping repeats."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: list[str] = []
    for item in items:
        name = item.strip().lower()
        if not name:
            continue
        if name not in SUPPORTED_TYPES:
            raise ExportError(f"unknown type {item!r}; supported: {', '.join(SUPPORTED_TYPES)}")
        if name not in out:
            out.append(name)
    if not out:
        raise ExportError("no output type given")
    return tuple(out)


# --------------------------------------------------------------------------- hyper-parameters


@dataclass(frozen=True)
class Qwen3Params:
    """The Qwen3 hyper-parameters llama.cpp needs, read from the release's config.json."""

    n_layers: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    vocab_size: int
    tie_word_embeddings: bool


def read_qwen3_params(llm_path: Path) -> Qwen3Params:
    """Parse config.json; every value comes from the file so a differently sized LLM exports correctly."""
    path = Path(llm_path) / "config.json"
    try:
        hp: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ExportError(f"{path}: cannot read ({type(exc).__name__}: {exc})") from exc
    if "text_config" in hp:  # multimodal wrappers keep the LLM config one level down
        hp = {**hp, **hp["text_config"]}
    rope = hp.get("rope_parameters") or hp.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in (None, "default"):
        # The release uses plain RoPE; scaled variants would need extra GGUF keys, refuse rather than guess.
        raise ExportError(f"{path}: rope scaling {rope_type!r} is not supported by this exporter")
    rope_theta = hp.get("rope_theta", rope.get("rope_theta"))
    try:
        n_head = int(hp["num_attention_heads"])
        n_embd = int(hp["hidden_size"])
        return Qwen3Params(
            n_layers=int(hp["num_hidden_layers"]),
            n_embd=n_embd,
            n_ff=int(hp["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(hp.get("num_key_value_heads") or n_head),
            head_dim=int(hp.get("head_dim") or n_embd // n_head),
            n_ctx=int(hp["max_position_embeddings"]),
            rope_theta=float(rope_theta if rope_theta is not None else 10000.0),
            rms_eps=float(hp["rms_norm_eps"]),
            vocab_size=int(hp["vocab_size"]),
            tie_word_embeddings=bool(hp.get("tie_word_embeddings", False)),
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise ExportError(f"{path}: missing or bad hyper-parameter ({type(exc).__name__}: {exc})") from exc


# --------------------------------------------------------------------------- vocabulary


@dataclass
class Vocab:
    """Token strings and llama.cpp token types, one per embedding row."""

    tokens: list[str]
    token_types: list[int]
    n_real: int
    special: Any  # gguf.SpecialVocab: merges, bos/eos/pad ids, add_bos, chat template


def _looks_special(text: str) -> bool:
    """Added tokens spelled like `<|...|>` are control tokens even when not flagged special (llama.cpp rule)."""
    return (text.startswith("<|") and text.endswith("|>")) or (
        text.startswith("<｜") and text.endswith("｜>")
    )


def build_vocab(llm_path: Path, n_rows: int) -> Vocab:
    """Read the BPE vocabulary with transformers and pad it to the embedding rows.

    Qwen3 has 151,669 real tokens but 151,936 embedding rows; llama.cpp wants one
    token per row, so the gap is filled with `[PAD{i}]` tokens of type UNUSED,
    exactly as the official converter does. Added tokens are CONTROL when special
    (e.g. `<|im_end|>`) and USER_DEFINED otherwise (e.g. `<think>`), which is what
    makes `parse_special=True` tokenization match Hugging Face.
    """
    import gguf
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(llm_path))
    vocab: dict[str, int] = tokenizer.get_vocab()
    if max(vocab.values()) >= n_rows:
        raise ExportError(
            f"{llm_path}: tokenizer has ids up to {max(vocab.values())} but only {n_rows} embedding rows"
        )
    reverse = {i: tok for tok, i in vocab.items()}
    added = tokenizer.get_added_vocab()
    added_decoder = tokenizer.added_tokens_decoder
    tokens: list[str] = []
    types: list[int] = []
    for i in range(n_rows):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
            continue
        if tok in added:
            info = added_decoder.get(i)
            if info is not None and not info.normalized:
                # llama.cpp assumes added tokens are stored pre-normalised.
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            if (info is not None and info.special) or _looks_special(tok):
                types.append(gguf.TokenType.CONTROL)
            else:
                types.append(gguf.TokenType.USER_DEFINED)
        else:
            types.append(gguf.TokenType.NORMAL)
        tokens.append(tok)
    special = gguf.SpecialVocab(llm_path, load_merges=True, n_vocab=len(tokens))
    if not special.merges:
        raise ExportError(f"{llm_path}: no BPE merges found (tokenizer.json / merges.txt)")
    return Vocab(tokens=tokens, token_types=types, n_real=len(vocab), special=special)


# --------------------------------------------------------------------------- tensors


@dataclass(frozen=True)
class TensorPlan:
    """One GGUF tensor: where it comes from and how it is stored."""

    gguf_name: str
    hf_name: str
    shape: tuple[int, ...]
    out_type: str  # "f32" | "f16" | "bf16"


def _is_tied(state: dict[str, torch.Tensor], params: Qwen3Params) -> bool:
    """Write no output.weight when the head is the embedding: llama.cpp then reuses token_embd."""
    import torch

    head = state.get("lm_head.weight")
    if head is None or params.tie_word_embeddings:
        return True
    return bool(torch.equal(head, state["model.embed_tokens.weight"]))


def plan_tensors(state: dict[str, torch.Tensor], params: Qwen3Params, out_type: str) -> list[TensorPlan]:
    """Map Hugging Face names to GGUF names; 1-D tensors (norms) stay f32 as llama.cpp requires."""
    import gguf

    if "model.embed_tokens.weight" not in state:
        raise ExportError("model.pt has no llm.model.embed_tokens.weight: not a Qwen3 LLM")
    name_map = gguf.get_tensor_name_map(gguf.MODEL_ARCH.QWEN3, params.n_layers)
    tied = _is_tied(state, params)
    plans: list[TensorPlan] = []
    for hf_name, tensor in state.items():
        if hf_name == "lm_head.weight" and tied:
            continue
        if hf_name.endswith("rotary_emb.inv_freq"):
            continue  # recomputed by llama.cpp from rope_freq_base
        gguf_name = name_map.get_name(hf_name, try_suffixes=(".weight", ".bias"))
        if gguf_name is None:
            raise ExportError(f"cannot map LLM tensor {hf_name!r} to a GGUF name")
        shape = tuple(int(d) for d in tensor.shape)
        plans.append(TensorPlan(gguf_name, hf_name, shape, "f32" if len(shape) == 1 else out_type))
    plans.sort(key=lambda p: _tensor_order(p.gguf_name))
    _check_shapes(plans, params)
    return plans


def _tensor_order(name: str) -> tuple[int, int, str]:
    """token_embd first, then blocks in numeric order, then output tensors (the converter's order)."""
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name.startswith("token_embd") else 2, 0, name)


def _check_shapes(plans: list[TensorPlan], params: Qwen3Params) -> None:
    """Catch a config.json that does not describe these weights before llama.cpp does, with a clearer message."""
    by_name = {p.gguf_name: p.shape for p in plans}
    expected = {
        "token_embd.weight": (params.vocab_size, params.n_embd),
        "blk.0.attn_q.weight": (params.n_head * params.head_dim, params.n_embd),
        "blk.0.attn_k.weight": (params.n_head_kv * params.head_dim, params.n_embd),
        "blk.0.ffn_up.weight": (params.n_ff, params.n_embd),
        f"blk.{params.n_layers - 1}.attn_norm.weight": (params.n_embd,),
    }
    for name, shape in expected.items():
        if by_name.get(name) != shape:
            raise ExportError(
                f"tensor {name}: shape {by_name.get(name)} does not match config.json ({shape})"
            )


def _np_storage(out_type: str) -> tuple[Any, Any]:
    """numpy dtype used to hold the bytes, and the raw GGML type to declare (None = inferred)."""
    import gguf
    import numpy as np

    if out_type == "f32":
        return np.float32, None
    if out_type == "f16":
        return np.float16, None
    return np.uint16, gguf.GGMLQuantizationType.BF16


_CHUNK_ELEMENTS = 1 << 22  # rows converted per step: keeps f32 temporaries at ~16 MB


def convert_tensor(tensor: torch.Tensor, out_type: str) -> np.ndarray:
    """bf16 -> f32 through torch (exact), then to the stored type; bf16 output keeps the original bits.

    The conversion runs over row chunks into one preallocated output, so the
    151,936-row embedding never exists as a whole f32 copy next to its f16 copy.
    """
    import numpy as np
    import torch

    if out_type == "bf16":
        return tensor.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)
    dtype = torch.float16 if out_type == "f16" else torch.float32
    src = tensor.detach().reshape(tensor.shape[0] if tensor.dim() > 1 else 1, -1)
    out = torch.empty(src.shape, dtype=dtype)
    step = max(1, _CHUNK_ELEMENTS // max(1, src.shape[1]))
    for start in range(0, src.shape[0], step):
        chunk = src[start : start + step].to(torch.float32).to(dtype)
        if out_type == "f16" and not bool(torch.isfinite(chunk).all()):
            raise ExportError("a weight overflows float16; export as bf16 or f32 instead")
        out[start : start + step] = chunk
    return out.reshape(tensor.shape).numpy()


def release_pages(tensor: torch.Tensor) -> None:
    """Ask Linux to page out a memory-mapped source tensor once it has been written.

    Without this every touched page of the 2 GB model.pt stays in the process's
    RSS until the export ends. MADV_PAGEOUT never changes contents (anonymous
    pages would be swapped, not zeroed), so it is safe whatever backs the tensor;
    where it is unsupported the call simply fails and is ignored.
    """
    if not sys.platform.startswith("linux") or tensor.numel() == 0:
        return
    import ctypes
    import mmap

    page = mmap.PAGESIZE
    start = tensor.data_ptr()
    end = start + tensor.numel() * tensor.element_size()
    first, last = (start + page - 1) // page * page, end // page * page
    if last <= first:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise(ctypes.c_void_p(first), ctypes.c_size_t(last - first), 21)  # 21 = MADV_PAGEOUT


# --------------------------------------------------------------------------- writing


def _add_metadata(writer: Any, params: Qwen3Params, vocab: Vocab, out_type: str) -> None:
    """The keys llama.cpp's converter writes for a Qwen3 model, so the file behaves like an official one."""
    import gguf

    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(MODEL_NAME)
    writer.add_block_count(params.n_layers)
    writer.add_context_length(params.n_ctx)
    writer.add_embedding_length(params.n_embd)
    writer.add_feed_forward_length(params.n_ff)
    writer.add_head_count(params.n_head)
    writer.add_head_count_kv(params.n_head_kv)
    writer.add_rope_freq_base(params.rope_theta)
    writer.add_layer_norm_rms_eps(params.rms_eps)
    writer.add_key_length(params.head_dim)
    writer.add_value_length(params.head_dim)
    writer.add_file_type(int(getattr(gguf.LlamaFileType, BASE_TYPES[out_type])))
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")  # Qwen2/2.5/3 share this pre-tokenizer regex in llama.cpp
    writer.add_token_list(vocab.tokens)
    writer.add_token_types(vocab.token_types)
    # Qwen3's tokenizer_config.json states add_bos_token (false) but not add_eos_token; llama.cpp's own
    # converter writes both, false: a prompt tokenized by llama.cpp then gets no BOS/EOS appended.
    for kind in ("bos", "eos"):
        vocab.special.add_special_token.setdefault(kind, False)
    vocab.special.add_to_gguf(writer, quiet=True)


def write_base_gguf(
    state: dict[str, torch.Tensor],
    params: Qwen3Params,
    vocab: Vocab,
    out_path: Path,
    out_type: str,
    progress: bool = False,
) -> Path:
    """Write an unquantized GGUF by streaming tensors: infos first, then data one tensor at a time.

    Declaring all tensor infos up front lets GGUFWriter write the header before any
    data exists, so only the tensor being converted is in memory. The file appears
    under its final name only when complete.
    """
    import gguf
    from tqdm import tqdm

    plans = plan_tensors(state, params, out_type)
    tmp_path = out_path.with_name(out_path.name + ".part")
    writer = gguf.GGUFWriter(tmp_path, ARCH)
    try:
        _add_metadata(writer, params, vocab, out_type)
        for plan in plans:
            np_dtype, raw = _np_storage(plan.out_type)
            n = 1
            for d in plan.shape:
                n *= d
            writer.add_tensor_info(
                plan.gguf_name, plan.shape, np_dtype, n * (4 if plan.out_type == "f32" else 2), raw
            )
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        bar = tqdm(plans, desc=f"gguf {out_type}", unit="tensor", file=sys.stderr, disable=not progress)
        for plan in bar:
            source = state[plan.hf_name]
            writer.write_tensor_data(convert_tensor(source, plan.out_type))
            release_pages(source)
        writer.close()
        os.replace(tmp_path, out_path)
    except BaseException:
        writer.close()
        tmp_path.unlink(missing_ok=True)
        raise
    return out_path


@contextlib.contextmanager
def _llama_log(verbose: bool) -> Iterator[None]:
    """llama.cpp's log on stderr only when verbose (quantization logs a line per tensor)."""
    from funasr_nano.models import llama_log

    with llama_log.capture(lambda _level, text: sys.stderr.write(text) if verbose else None):
        yield


def quantize_gguf(
    src: Path, dst: Path, qtype: str, progress: bool = False, n_threads: int | None = None
) -> Path:
    """Quantize with llama.cpp's own `llama_model_quantize` (same result as the `llama-quantize` tool)."""
    import ctypes

    import llama_cpp

    ftype = getattr(llama_cpp, f"LLAMA_FTYPE_{QUANT_TYPES[qtype]}", None)
    if ftype is None:
        raise ExportError(f"this llama_cpp build does not know LLAMA_FTYPE_{QUANT_TYPES[qtype]}")
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = ftype
    params.nthread = n_threads or os.cpu_count() or 1
    tmp = dst.with_name(dst.name + ".part")
    if progress:
        print(f"quantizing {src.name} -> {dst.name} ({qtype})", file=sys.stderr, flush=True)
    with _llama_log(verbose=progress):
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(tmp).encode(), ctypes.byref(params))
    if rc != 0 or not tmp.is_file():
        tmp.unlink(missing_ok=True)
        raise ExportError(f"llama_model_quantize failed for {qtype} (return code {rc})")
    os.replace(tmp, dst)
    return dst


# --------------------------------------------------------------------------- entry point


def _quant_source_type(types: Sequence[str]) -> str:
    """The lossless base to quantize from: f32 or bf16 if asked for (model.pt is bf16), else a temporary bf16."""
    for t in ("f32", "bf16"):
        if t in types:
            return t
    return "bf16"


def export_gguf(
    model_dir: Path | str,
    out_dir: Path | str,
    types: Sequence[str] = (DEFAULT_TYPE,),
    progress: bool = True,
) -> list[Path]:
    """Write one GGUF per requested type into out_dir and return their paths in request order.

    Quantized types are made from a lossless base (f32 or bf16, both exact copies
    of the bf16 checkpoint); if no such base was requested, a temporary bf16 file
    is written and removed afterwards.
    """
    from funasr_nano.export.release import (
        llm_dir,
        load_state_dict,
        read_config,
        sub_state_dict,
        write_export_record,
    )

    types = parse_types(types)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    llm_path = llm_dir(model_dir, read_config(model_dir))
    params = read_qwen3_params(llm_path)
    state = sub_state_dict(load_state_dict(model_dir, mmap=True), "llm")
    if "model.embed_tokens.weight" not in state:
        raise ExportError(
            f"{model_dir / 'model.pt'}: no llm.model.embed_tokens.weight (not a Fun-ASR-Nano checkpoint?)"
        )
    vocab = build_vocab(llm_path, int(state["model.embed_tokens.weight"].shape[0]))
    out_dir.mkdir(parents=True, exist_ok=True)

    written: dict[str, Path] = {}
    for t in types:
        if t in BASE_TYPES:
            written[t] = write_base_gguf(state, params, vocab, out_dir / gguf_file_name(t), t, progress)
    quant = [t for t in types if t in QUANT_TYPES]
    if quant:
        src_type = _quant_source_type(types)
        src = written.get(src_type)
        temporary = src is None
        if src is None:
            src = write_base_gguf(
                state,
                params,
                vocab,
                out_dir / f".{GGUF_STEM}.tmp-{src_type}.gguf",
                src_type,
                progress,
            )
        try:
            for t in quant:
                written[t] = quantize_gguf(src, out_dir / gguf_file_name(t), t, progress)
        finally:
            if temporary:
                src.unlink(missing_ok=True)
    write_export_record(out_dir, "gguf", model_dir)
    return [written[t] for t in types]
