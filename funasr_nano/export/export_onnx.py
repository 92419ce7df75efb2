"""Export Fun-ASR-Nano's audio encoder + adaptor (and the CTC head) to ONNX, plus int8 variants.

The torch modules are funasr's own classes (SenseVoiceEncoderSmall, the llm_asr `Transformer`
adaptor, the fun_asr_nano `CTC`), built from config.yaml and loaded strictly from model.pt, so the
graphs compute exactly what the official code computes. funasr and torch are needed here only;
inference runs the graphs with onnxruntime (funasr_nano/encoder.py).

Besides the graphs the output folder gets what inference reads instead of the release:
`funasr_nano.json` (funasr_nano/settings.py), the Qwen3 tokenizer files and the CTC vocabulary.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from funasr_nano.audio.vad import copy_vad_model
from funasr_nano.export.release import (
    ReleaseError,
    detect_checkpoint,
    llm_dir,
    load_state_dict,
    read_config,
    sub_state_dict,
    write_export_record,
)
from funasr_nano.models.settings import (
    CTC_FILE,
    CTC_INT8_FILE,
    CTC_VOCAB_FILE,
    ENCODER_FILE,
    ENCODER_INT8_FILE,
    FORMAT_VERSION,
    SETTINGS_FILE,
    TOKENIZER_DIR,
)

OPSET = 17
DEFAULT_CTC_VOCAB_SIZE = 60515  # funasr FunASRNano: kwargs.get("ctc_vocab_size", 60515)
TOKENIZER_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer_config.json")
# funasr WavFrontend defaults for keys a config may omit (funasr/frontends/wav_frontend.py).
FRONTEND_DEFAULTS: dict[str, Any] = {
    "fs": 16000, "window": "hamming", "n_mels": 80, "frame_length": 25, "frame_shift": 10,
    "lfr_m": 1, "lfr_n": 1,
}
# Extra frontend keys passed through when a config sets them (they change the features).
FRONTEND_OPTIONAL = ("snip_edges", "upsacle_samples", "energy_floor", "filter_length_min", "filter_length_max")

Log = Callable[[str], None]


class ExportError(RuntimeError):
    """The release cannot be exported as it is (one line for the user)."""


# --------------------------------------------------------------------------- torch modules


@dataclass
class NanoModules:
    """funasr's torch modules for the audio side, fp32, eval, weights loaded strictly."""

    encoder: torch.nn.Module
    adaptor: torch.nn.Module
    ctc_decoder: torch.nn.Module | None
    ctc: torch.nn.Module | None
    input_size: int
    encoder_dim: int
    adaptor_dim: int
    ctc_vocab_size: int
    blank_id: int
    ctc_note: str = ""  # why a CTC head the config names was not exported (its weights are missing or incomplete)


def _register_funasr_classes() -> Any:
    """Importing these modules fills funasr's registry (`tables`) with the classes we need."""
    import funasr.models.llm_asr.adaptor  # noqa: F401
    import funasr.models.sense_voice.model  # noqa: F401
    from funasr.register import tables

    return tables


def input_size_of(config: dict[str, Any]) -> int:
    """funasr passes frontend.output_size() = n_mels * lfr_m as the encoder's input_size."""
    front = {**FRONTEND_DEFAULTS, **(config.get("frontend_conf") or {})}
    return int(front["n_mels"]) * int(front["lfr_m"])


def _load_strict(module: torch.nn.Module, state: dict[str, torch.Tensor], prefix: str) -> None:
    """Load `prefix.*` into module, failing on any missing/unexpected key or shape mismatch.

    funasr itself only logs such problems and keeps random weights; an exporter must not.
    """
    sub = sub_state_dict(state, prefix)
    try:
        module.load_state_dict(sub, strict=True)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])[:400]
        raise ExportError(f"model.pt does not match config.yaml for {prefix}: {detail}") from exc
    module.float().eval()
    for p in module.parameters():
        p.requires_grad_(False)


def llm_hidden_size(model_dir: Path, config: dict[str, Any]) -> int:
    """The LLM width, read like funasr does (the Qwen3 config), since funasr overrides adaptor llm_dim with it."""
    path = llm_dir(model_dir, config) / "config.json"
    try:
        with open(path, encoding="utf-8") as f:
            return int(json.load(f)["hidden_size"])
    except (OSError, ValueError, KeyError) as exc:
        raise ReleaseError(f"{path}: cannot read hidden_size ({type(exc).__name__})") from exc


def build_modules(model_dir: Path, config: dict[str, Any], state: dict[str, torch.Tensor]) -> NanoModules:
    """Instantiate funasr's classes exactly as FunASRNano.__init__ does and load model.pt into them."""
    tables = _register_funasr_classes()
    enc_name = config.get("audio_encoder")
    enc_cls = tables.encoder_classes.get(enc_name)
    if enc_cls is None:
        raise ExportError(f"config.yaml: audio_encoder {enc_name!r} is not a funasr encoder class")
    input_size = input_size_of(config)
    encoder = enc_cls(input_size=input_size, **dict(config.get("audio_encoder_conf") or {}))
    encoder_dim = int(encoder.output_size())
    _load_strict(encoder, state, "audio_encoder")

    ad_name = config.get("audio_adaptor")
    ad_cls = tables.adaptor_classes.get(ad_name)
    if ad_cls is None:
        raise ExportError(f"config.yaml: audio_adaptor {ad_name!r} is not a funasr adaptor class")
    ad_conf = dict(config.get("audio_adaptor_conf") or {})
    ad_conf["encoder_dim"] = encoder_dim
    ad_conf["llm_dim"] = llm_hidden_size(model_dir, config)
    adaptor = ad_cls(**ad_conf)
    _load_strict(adaptor, state, "audio_adaptor")

    ctc_vocab = int(config.get("ctc_vocab_size", DEFAULT_CTC_VOCAB_SIZE))
    blank_id = int((config.get("ctc_conf") or {}).get("blank_id", ctc_vocab - 1))
    ctc_decoder = ctc = None
    note = ""
    if config.get("ctc_decoder"):
        ctc_decoder, ctc, note = _build_ctc(tables, config, state, encoder_dim, ctc_vocab, blank_id)
    return NanoModules(encoder, adaptor, ctc_decoder, ctc, input_size, encoder_dim, int(ad_conf["llm_dim"]),
                       ctc_vocab, blank_id, note)


def _build_ctc(tables: Any, config: dict[str, Any], state: dict[str, torch.Tensor], encoder_dim: int,
               ctc_vocab: int, blank_id: int) -> tuple[torch.nn.Module | None, torch.nn.Module | None, str]:
    """The CTC head the config names, only when every one of its tensors is in model.pt (fail closed).

    The Hugging Face copy of Nano and MLT-Nano name a CTC decoder in config.yaml but ship none or part of
    its weights (FunASR #3496, #3208); funasr then disables everything CTC-based rather than run a head
    with random layers (#3211), and so does the export: (None, None, why).
    """
    from funasr.models.fun_asr_nano.ctc import CTC

    dec_cls = tables.adaptor_classes.get(config["ctc_decoder"])
    if dec_cls is None:
        raise ExportError(f"config.yaml: ctc_decoder {config['ctc_decoder']!r} is not a funasr adaptor class")
    dec_conf = dict(config.get("ctc_decoder_conf") or {})
    dec_conf["encoder_dim"] = encoder_dim
    decoder = dec_cls(**dec_conf)
    ctc_conf = {k: v for k, v in (config.get("ctc_conf") or {}).items() if k != "blank_id"}
    ctc = CTC(odim=ctc_vocab, encoder_output_size=encoder_dim, blank_id=blank_id, **ctc_conf)
    wanted = [f"{prefix}.{key}" for prefix, module in (("ctc_decoder", decoder), ("ctc", ctc))
              for key in module.state_dict()]
    missing = [key for key in wanted if key not in state]
    if missing:
        return None, None, (f"model.pt has {len(wanted) - len(missing)} of the CTC head's {len(wanted)} tensors: "
                            "exported without it (no timestamps aligned to the audio, no live partial text, no "
                            "speculative decoding; FunASR #3496)")
    _load_strict(decoder, state, "ctc_decoder")
    _load_strict(ctc, state, "ctc")
    return decoder, ctc, ""


class EncoderAdaptorGraph(torch.nn.Module):
    """features (1, T, input_size) -> (encoder_out, adaptor_out), with lengths = T (no padding)."""

    def __init__(self, encoder: torch.nn.Module, adaptor: torch.nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.adaptor = adaptor

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # Lengths come from the input's shape through tensor ops, so the traced graph keeps T dynamic.
        ilens = torch.ones_like(features[:, :, 0], dtype=torch.int64).sum(dim=1)
        # The encoder scales its input in place; never let it write into the caller's tensor.
        encoder_out, olens = self.encoder(features.clone(), ilens)
        adaptor_out, _ = self.adaptor(encoder_out, olens)
        return encoder_out, adaptor_out


class CTCGraph(torch.nn.Module):
    """encoder_out (1, T, enc_dim) -> (log_probs (1, T, V), ids (1, T)) as FunASRNano.inference_llm does."""

    def __init__(self, decoder: torch.nn.Module, ctc: torch.nn.Module) -> None:
        super().__init__()
        self.decoder = decoder
        self.ctc = ctc

    def forward(self, encoder_out: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        ilens = torch.ones_like(encoder_out[:, :, 0], dtype=torch.int64).sum(dim=1)
        decoder_out, _ = self.decoder(encoder_out, ilens)
        logits = self.ctc.ctc_lo(decoder_out)
        # argmax of the logits equals argmax of their log-softmax; taking it from the logits keeps the
        # 60515-wide normalisation off the path when only `ids` is fetched.
        return torch.log_softmax(logits, dim=-1), logits.argmax(dim=-1)


# --------------------------------------------------------------------------- ONNX


def _onnx_export(module: torch.nn.Module, example: torch.Tensor, path: Path, input_name: str,
                 output_names: list[str]) -> None:
    """TorchScript-based export (dynamo=False): the most reliable path for these funasr modules."""
    import warnings

    axes = {input_name: {1: "T"}}
    for name in output_names:
        axes[name] = {1: "T"}
    path.parent.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # tracer warnings about Python ints; T stays dynamic (tested)
        torch.onnx.export(
            module, (example,), str(path), input_names=[input_name], output_names=output_names,
            dynamic_axes=axes, opset_version=OPSET, do_constant_folding=True, dynamo=False,
        )


def _traceable_pad_mask(lengths: torch.Tensor, xs: Any = None, length_dim: int = -1,
                        maxlen: Any = None) -> torch.Tensor:
    """make_pad_mask for the (B,) lengths case, built from tensor ops only.

    funasr's version sizes the mask with Python ints, which the tracer freezes to the example's
    T (the exported adaptor then fails for any other length). Same values: True where padded.
    """
    if xs is not None or maxlen is not None or length_dim != -1:
        raise ExportError("unexpected make_pad_mask call while tracing the adaptor")
    positions = torch.arange(lengths.max(), device=lengths.device)
    return positions[None, :] >= lengths[:, None]


@contextlib.contextmanager
def _dynamic_adaptor_masks() -> Iterator[None]:
    """Swap funasr's adaptor-module make_pad_mask for the traceable one during an export."""
    import funasr.models.llm_asr.adaptor as adaptor_module

    original = adaptor_module.make_pad_mask
    adaptor_module.make_pad_mask = _traceable_pad_mask
    try:
        yield
    finally:
        adaptor_module.make_pad_mask = original


# The layer stacks of funasr's SenseVoice encoder and of the Transformer adaptor / CTC decoder.
LAYER_STACKS = ("encoders0", "encoders", "tp_encoders", "blocks")


@contextlib.contextmanager
def _unmasked_layers(*modules: torch.nn.Module) -> Iterator[None]:
    """Trace the encoder/adaptor layers without their padding mask.

    The graphs take one unpadded sequence (lengths = T), so every mask is all-true and masking is
    the identity: scores.masked_fill(~mask, -inf), softmax.masked_fill(~mask, 0) and the FSMN's
    inputs * mask change nothing. funasr's layers skip all of it when given mask=None; each layer
    is called that way here and hands the caller's mask back unchanged, so the code around the
    layers (output lengths) traces as before. Same values, minus ~6 graph ops per layer
    (Where/Cast/Mul over every frame of all 72 layers: ~2-3% of the int8 encoder's time).
    """
    patched: list[tuple[torch.nn.Module, Any]] = []

    def unmasked(forward: Callable[..., Any]) -> Callable[..., Any]:
        def call(x: torch.Tensor, mask: Any, *args: Any, **kwargs: Any) -> Any:
            out = forward(x, None, *args, **kwargs)
            return (out[0], mask, *out[2:])
        return call

    try:
        for module in modules:
            for stack in LAYER_STACKS:
                for layer in getattr(module, stack, None) or ():
                    patched.append((layer, layer.__dict__.get("forward")))
                    layer.forward = unmasked(layer.forward)
        yield
    finally:
        for layer, own in reversed(patched):
            if own is None:
                del layer.forward
            else:
                layer.forward = own


def export_encoder_graph(mods: NanoModules, path: Path) -> Path:
    graph = EncoderAdaptorGraph(mods.encoder, mods.adaptor).eval()
    example = torch.randn(1, 23, mods.input_size)
    with _dynamic_adaptor_masks(), _unmasked_layers(mods.encoder, mods.adaptor):
        _onnx_export(graph, example, path, "features", ["encoder_out", "adaptor_out"])
    return path


def export_ctc_graph(mods: NanoModules, path: Path) -> Path:
    assert mods.ctc_decoder is not None and mods.ctc is not None
    graph = CTCGraph(mods.ctc_decoder, mods.ctc).eval()
    example = torch.randn(1, 23, mods.encoder_dim)
    with _dynamic_adaptor_masks(), _unmasked_layers(mods.ctc_decoder):
        _onnx_export(graph, example, path, "encoder_out", ["log_probs", "ids"])
    return path


def quantize_int8(src: Path, dst: Path, *, exclude_prefixes: tuple[str, ...] = ()) -> Path:
    """Dynamic int8 quantization of the constant-weight MatMuls (activations quantized per call).

    Chosen by measurement on the full shape, 2 threads, T=167 (AVX2 machine without VNNI):
    QInt8 per-tensor weights gave per-frame cosine >= 0.999 against fp32 and about 1.5-1.8x the
    speed (ORT fuses each into one DynamicQuantizeMatMul; the ratio is highest when the cores
    are contended, since fp32 then suffers more from its 4x larger weights). Per-channel QInt8
    was no faster but less accurate (cos ~0.995: u8 x s8 products saturate in AVX2's
    vpmaddubsw), QUInt8 was slower, reduce_range no faster and less accurate (cos ~0.996), and
    MatMulNBits (8 or 4 bit, weight-only or 8 bit with accuracy_level 4) was slower than fp32
    here (4-bit also fell to cos ~0.91). Quantizing the attention score MatMuls too (no constant
    operand, MatMulConstBOnly=False) measured no faster, so they stay fp32, like LayerNorm,
    softmax and the FSMN convolution. Nodes whose name starts with one of `exclude_prefixes`
    stay fp32 too.
    """
    import onnx
    from onnxruntime.quantization import QuantType, quantize_dynamic

    model = onnx.load(str(src))
    exclude = [n.name for n in model.graph.node if n.name.startswith(exclude_prefixes)] if exclude_prefixes else []
    del model
    with _quiet_logging():  # the quantizer logs one INFO line per tensor through the root logger
        quantize_dynamic(
            str(src), str(dst), weight_type=QuantType.QInt8, per_channel=False, op_types_to_quantize=["MatMul"],
            nodes_to_exclude=exclude, extra_options={"MatMulConstBOnly": True},
        )
    return dst


@contextlib.contextmanager
def _quiet_logging() -> Iterator[None]:
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# --------------------------------------------------------------------------- side files


def ctc_special_tokens(num_languages: int = 8749) -> tuple[list[str], int]:
    """The SenseVoice tokenizer's specials before the timestamps, and how many timestamps follow.

    Same order as funasr's whisper_lib/tokenizer.py get_encoding (its SenseVoice branch), taken
    from funasr's own tables so that inference reproduces the id layout without importing funasr.
    """
    from funasr.models.sense_voice.whisper_lib.tokenizer import AUDIO_EVENT, EMOTION, LANGUAGES

    return [
        "<|endoftext|>", "<|startoftranscript|>",
        *[f"<|{lang}|>" for lang in list(LANGUAGES.keys())[:num_languages]],
        *[f"<|{ev}|>" for ev in AUDIO_EVENT], *[f"<|{em}|>" for em in EMOTION],
        "<|translate|>", "<|transcribe|>", "<|startoflm|>", "<|startofprev|>", "<|nospeech|>", "<|notimestamps|>",
        *[f"<|SPECIAL_TOKEN_{i}|>" for i in range(1, 51)],
    ], 1501


def ctc_vocab_source(model_dir: Path, config: dict[str, Any]) -> Path:
    conf = ((config.get("dataset_conf") or {}).get("ctc_tokenizer_conf") or {})
    name = conf.get("vocab_path") or "multilingual.tiktoken"
    path = Path(name) if Path(name).is_absolute() else model_dir / name
    if not path.is_file():
        raise ReleaseError(f"{path}: CTC vocabulary not found")
    return path


def _ctc_settings(model_dir: Path, config: dict[str, Any], mods: NanoModules) -> dict[str, Any]:
    if mods.ctc is None:
        return {"present": False}
    with open(ctc_vocab_source(model_dir, config), encoding="utf-8") as f:
        n_ranks = sum(1 for line in f if line.strip())
    conf = ((config.get("dataset_conf") or {}).get("ctc_tokenizer_conf") or {})
    # funasr's SenseVoiceTokenizer default for num_languages is 8749 (i.e. all languages).
    specials, n_timestamps = ctc_special_tokens(int(conf.get("num_languages", 8749)))
    total = n_ranks + len(specials) + n_timestamps
    if total != mods.ctc_vocab_size:
        raise ExportError(
            f"CTC vocabulary has {n_ranks} ranks + {len(specials) + n_timestamps} specials = {total} ids, "
            f"but the CTC head has {mods.ctc_vocab_size} classes")
    return {
        "present": True, "vocab_size": mods.ctc_vocab_size, "blank_id": mods.blank_id, "n_ranks": n_ranks,
        "special_tokens": specials, "timestamp_begin": n_ranks + len(specials), "frame_shift_ms": _lfr_ms(config),
    }


def _lfr_ms(config: dict[str, Any]) -> int:
    front = {**FRONTEND_DEFAULTS, **(config.get("frontend_conf") or {})}
    return int(front["frame_shift"]) * int(front["lfr_n"])


def frontend_settings(config: dict[str, Any]) -> dict[str, Any]:
    """frontend_conf with funasr's defaults filled in and dither forced to 0 (deterministic inference)."""
    conf = dict(config.get("frontend_conf") or {})
    out = {k: conf.get(k, v) for k, v in FRONTEND_DEFAULTS.items()}
    out.update({k: conf[k] for k in FRONTEND_OPTIONAL if k in conf})
    if conf.get("cmvn_file"):
        raise ExportError("config.yaml: frontend_conf.cmvn_file is set; CMVN is not supported by this runtime")
    out["dither"] = 0.0
    return out


def settings_dict(model_dir: Path, config: dict[str, Any], mods: NanoModules, files: dict[str, str]) -> dict:
    """The content of funasr_nano.json (read back by funasr_nano.models.settings.ModelSettings)."""
    dataset_conf = config.get("dataset_conf") or {}
    return {
        "format_version": FORMAT_VERSION,
        "frontend": frontend_settings(config),
        # Exactly FunASRNano.data_load_speech: both default to True when dataset_conf omits them.
        "prompt": {"sys_prompt": bool(dataset_conf.get("sys_prompt", True)),
                   "do_think": bool(dataset_conf.get("do_think", True))},
        "use_low_frame_rate": bool((config.get("audio_adaptor_conf") or {}).get("use_low_frame_rate", False)),
        "encoder": {"input_size": mods.input_size, "output_size": mods.encoder_dim},
        "adaptor": {"output_size": mods.adaptor_dim},
        "llm": {"hidden_size": mods.adaptor_dim},
        "ctc": _ctc_settings(model_dir, config, mods),
        "files": files,
    }


def copy_tokenizer(model_dir: Path, config: dict[str, Any], out_dir: Path) -> Path:
    src = llm_dir(model_dir, config)
    dst = out_dir / TOKENIZER_DIR
    dst.mkdir(parents=True, exist_ok=True)
    for name in TOKENIZER_FILES:
        if not (src / name).is_file():
            raise ReleaseError(f"{src / name}: tokenizer file not found")
        shutil.copyfile(src / name, dst / name)
    return dst


# --------------------------------------------------------------------------- driver


def stderr_log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def export_onnx(model_dir: Path | str, out_dir: Path | str, *, int8: bool = True,
                log: Log | None = None, checkpoint: str | None = None) -> list[Path]:
    """Write the encoder (+ CTC) graphs, their int8 variants and the side files; return the graph paths."""
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    say = log or (lambda _msg: None)
    config = read_config(model_dir)
    say(f"loading {model_dir / 'model.pt'} ...")
    state = load_state_dict(model_dir)
    mods = build_modules(model_dir, config, state)
    del state
    checkpoint, evidence = detect_checkpoint(model_dir, explicit=checkpoint)
    say(f"checkpoint: {checkpoint} ({evidence})")
    if mods.ctc_note:
        say(f"note: {mods.ctc_note}")
    out_dir.mkdir(parents=True, exist_ok=True)
    files = {"encoder": ENCODER_FILE, "tokenizer_dir": TOKENIZER_DIR}
    written = [_timed(say, "exporting encoder+adaptor", export_encoder_graph, mods, out_dir / ENCODER_FILE)]
    if int8:
        written.append(_timed(say, "quantizing encoder to int8", quantize_int8, out_dir / ENCODER_FILE,
                              out_dir / ENCODER_INT8_FILE))
        files["encoder_int8"] = ENCODER_INT8_FILE
    if mods.ctc is not None:
        written.append(_timed(say, "exporting CTC head", export_ctc_graph, mods, out_dir / CTC_FILE))
        files["ctc"] = CTC_FILE
        if int8:
            written.append(_timed(say, "quantizing CTC head to int8", quantize_int8, out_dir / CTC_FILE,
                                  out_dir / CTC_INT8_FILE))
            files["ctc_int8"] = CTC_INT8_FILE
        shutil.copyfile(ctc_vocab_source(model_dir, config), out_dir / CTC_VOCAB_FILE)
        files["ctc_vocab"] = CTC_VOCAB_FILE
    copy_tokenizer(model_dir, config, out_dir)
    vad = copy_vad_model(out_dir)  # Silero VAD for long audio, when the silero-vad package is installed
    if vad is not None:
        files["vad"] = vad.name
        say(f"copied the Silero VAD model to {vad}")
    with open(out_dir / SETTINGS_FILE, "w", encoding="utf-8") as f:
        json.dump({**settings_dict(model_dir, config, mods, files), "checkpoint": checkpoint}, f, indent=2,
                  ensure_ascii=False)
    say(f"wrote {out_dir / SETTINGS_FILE}")
    _timed(say, "optimizing the graphs for this CPU (ONNX Runtime session cache)", warm_session_cache,
           [out_dir / files[k] for k in ("encoder", "encoder_int8", "ctc", "vad") if k in files], out_dir)
    write_export_record(out_dir, "onnx", model_dir)
    return written


def warm_session_cache(graphs: list[Path], out_dir: Path) -> Path:
    """Open each graph inference opens once, so ONNX Runtime's optimized copy is in the session cache
    (funasr_nano/models/session_cache.py) and the first transcription starts without optimizing them."""
    from funasr_nano.models.encoder import load_session
    from funasr_nano.models.session_cache import CACHE_FOLDER

    for graph in graphs:
        load_session(graph, threads=1)
    return out_dir / CACHE_FOLDER


def _timed(say: Log, what: str, fn: Callable[..., Path], *args: Any, **kwargs: Any) -> Path:
    say(f"{what} ...")
    t0 = time.perf_counter()
    path = fn(*args, **kwargs)
    say(f"{what}: {path} ({time.perf_counter() - t0:.1f} s)")
    return path
