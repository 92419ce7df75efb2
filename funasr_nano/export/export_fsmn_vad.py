"""FunASR's FSMN-VAD release (`iic/speech_fsmn_vad_zh-cn-16k-common-pytorch`) to ONNX for `--vad fsmn`.

The release folder holds `config.yaml` (frontend, end-point and FSMN settings), `model.pt` (the
FSMN's weights, `encoder.*`) and `am.mvn` (the CMVN). The export writes into the model folder:

- `fsmn_vad.onnx`: the FSMN scorer built by funasr's own `FSMN` class with the release's weights,
  its four left-memory caches as explicit inputs and outputs (`cache0..3` -> `cache_out0..3`), so
  onnxruntime streams it block by block exactly as funasr streams it chunk by chunk;
- `fsmn_vad.json`: the release's `frontend_conf` and `model_conf` and the CMVN, read by
  `funasr_nano.audio.fsmn_vad` at run time (no yaml, no torch there).

The release is found in `--vad-release-dir` (downloaded from ModelScope when that folder is named
and absent, like the main release) or in its default folder beside the main release, where the
export uses it only when it is already there: the FSMN-VAD is optional (Silero is the default).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from funasr_nano.audio.features import load_cmvn
from funasr_nano.audio.fsmn_vad import FSMN_RELEASE_ID, FSMN_SETTINGS_FILE, FSMN_VAD_FILE

log = logging.getLogger(__name__)

VAD_RELEASE_DIR_NAME = "speech_fsmn_vad_zh-cn-16k-common-pytorch"
VAD_RELEASE_FILES = ("config.yaml", "model.pt", "am.mvn")
OPSET = 17


class VadReleaseError(RuntimeError):
    """The FSMN-VAD release is missing or unusable (one line for the user)."""


def default_vad_release_dir() -> Path:
    """Beside the main release's default folder (the checkout, or the data folder when installed)."""
    from funasr_nano.options import DEFAULT_RELEASE_DIR

    return DEFAULT_RELEASE_DIR.parent / VAD_RELEASE_DIR_NAME


def is_vad_release(path: Path | str) -> bool:
    return all((Path(path) / name).is_file() for name in VAD_RELEASE_FILES)


def ensure_vad_release(path: Path | str, *, download: bool = True) -> Path:
    """The release folder, downloaded from ModelScope into `path` when absent and `download` is allowed."""
    from funasr_nano.export.release import ensure_modelscope_release

    return ensure_modelscope_release(path, FSMN_RELEASE_ID, label="FSMN-VAD", option="--vad-release-dir",
                                     complete=is_vad_release, missing=", ".join(VAD_RELEASE_FILES),
                                     error=VadReleaseError, download=download)


def read_vad_config(release_dir: Path | str) -> dict[str, Any]:
    import yaml

    with open(Path(release_dir) / "config.yaml", encoding="utf-8") as f:
        config = yaml.safe_load(f)
    if not isinstance(config, dict) or config.get("encoder") != "FSMN" or "encoder_conf" not in config:
        raise VadReleaseError(f"{release_dir}/config.yaml: not an FSMN-VAD config (encoder: FSMN)")
    return config


def build_fsmn(release_dir: Path | str) -> Any:
    """funasr's FSMN scorer with the release's weights, every tensor checked against model.pt."""
    import torch
    from funasr.models.fsmn_vad_streaming.encoder import FSMN

    config = read_vad_config(release_dir)
    model = FSMN(**config["encoder_conf"])
    state = torch.load(Path(release_dir) / "model.pt", map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    weights = {k.removeprefix("module.").removeprefix("encoder."): v for k, v in state.items()
               if k.removeprefix("module.").startswith("encoder.")}
    own = model.state_dict()
    missing = sorted(set(own) - set(weights))
    wrong = sorted(k for k in own if k in weights and tuple(weights[k].shape) != tuple(own[k].shape))
    if missing or wrong:
        raise VadReleaseError(f"{release_dir}/model.pt: FSMN weights missing {missing[:3]} or misshaped {wrong[:3]}")
    model.load_state_dict({k: weights[k].float() for k in own})
    return model.eval()


class _StreamingFsmn:
    """The FSMN with its per-layer caches as tensors in and out (funasr keeps them in a dict)."""

    def __new__(cls, fsmn: Any) -> Any:
        import torch

        class Streaming(torch.nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.fsmn = fsmn

            def forward(self, feats: torch.Tensor, *caches: torch.Tensor) -> tuple[torch.Tensor, ...]:
                cache = {f"cache_layer_{i}": c for i, c in enumerate(caches)}
                scores = self.fsmn(feats, cache)
                return (scores, *(cache[f"cache_layer_{i}"] for i in range(len(caches))))

        return Streaming()


def export_fsmn_vad(release_dir: Path | str, out_dir: Path | str) -> list[Path]:
    """Write fsmn_vad.onnx and fsmn_vad.json into `out_dir`; returns their paths."""
    import torch

    release_dir, out_dir = Path(release_dir), Path(out_dir)
    config = read_vad_config(release_dir)
    enc = config["encoder_conf"]
    fsmn = build_fsmn(release_dir)
    layers, proj, lorder, lstride = (int(enc["fsmn_layers"]), int(enc["proj_dim"]), int(enc["lorder"]),
                                     int(enc.get("lstride", 1)))
    if int(enc.get("rorder", 0)) != 0:
        raise VadReleaseError(f"{release_dir}: rorder {enc['rorder']}: a streaming FSMN needs rorder 0")
    caches = tuple(torch.zeros(1, proj, (lorder - 1) * lstride, 1) for _ in range(layers))
    feats = torch.zeros(1, 7, int(enc["input_dim"]))
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / FSMN_VAD_FILE
    cache_in = [f"cache{i}" for i in range(layers)]
    cache_out = [f"cache_out{i}" for i in range(layers)]
    with torch.no_grad():
        torch.onnx.export(_StreamingFsmn(fsmn), (feats, *caches), str(onnx_path),
                          input_names=["feats", *cache_in], output_names=["scores", *cache_out],
                          dynamic_axes={"feats": {1: "T"}, "scores": {1: "T"}}, opset_version=OPSET,
                          do_constant_folding=True, dynamo=False)
    cmvn = load_cmvn(str(release_dir / "am.mvn"))
    settings = {
        "source": FSMN_RELEASE_ID,
        "frontend_conf": dict(config.get("frontend_conf") or {}),
        "model_conf": dict(config.get("model_conf") or {}),
        "encoder_conf": dict(enc),
        "cmvn": cmvn.tolist(),
    }
    settings_path = out_dir / FSMN_SETTINGS_FILE
    tmp = settings_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings), encoding="utf-8")
    tmp.replace(settings_path)
    log.info("exported FSMN-VAD from %s to %s", release_dir, onnx_path)
    return [onnx_path, settings_path]


def export_vad_step(vad_release_dir: Path | str | None, out_dir: Path | str) -> list[Path]:
    """The export's FSMN-VAD step: a named folder is required (downloaded when absent); the default one is
    exported when it is there, and otherwise skipped with a note (Silero stays the default VAD)."""
    if vad_release_dir is not None:
        return export_fsmn_vad(ensure_vad_release(vad_release_dir, download=True), out_dir)
    default = default_vad_release_dir()
    if is_vad_release(default):
        return export_fsmn_vad(default, out_dir)
    log.info("no FSMN-VAD release in %s: --vad fsmn needs `--vad-release-dir DIR` (downloaded into DIR)", default)
    return []
