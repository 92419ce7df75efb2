"""CAM++ (`iic/speech_campplus_sv_zh-cn_16k-common`, funasr's `spk_model="cam++"`) to ONNX for `--diarize`.

The release folder holds `config.yaml` (`model: CAMPPlus` and its `model_conf`), `configuration.json`
(whose `file_path_metas.init_param` names the weights) and `campplus_cn_common.bin` (the state dict,
float32). The export builds funasr's own `CAMPPlus` class with the release's weights, checks every
tensor was there, and writes into the model folder:

- `campplus.onnx`: fbank features (batch, frames, 80) -> embeddings (batch, 192), both axes dynamic;
- `campplus.json`: the release's `model_conf` and the front end the runtime must compute
  (`funasr_nano.speakers.embeddings`: no yaml, no torch there).

Like the FSMN-VAD, the release is found in `--spk-release-dir` (downloaded from ModelScope when that
folder is named and absent) or in its default folder beside the main release, where the export uses
it only when it is already there: diarization is optional.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from funasr_nano.speakers.embeddings import (
    SPK_MODEL_FILE,
    SPK_RELEASE_ID,
    SPK_SETTINGS_FILE,
    FbankSettings,
)

log = logging.getLogger(__name__)

SPK_RELEASE_DIR_NAME = "speech_campplus_sv_zh-cn_16k-common"
DEFAULT_WEIGHTS = "campplus_cn_common.bin"
OPSET = 17
# CAMPPlus's constructor defaults: what funasr builds when config.yaml leaves a key out
DEFAULT_MODEL_CONF: dict[str, Any] = {"feat_dim": 80, "embedding_size": 192, "growth_rate": 32, "bn_size": 4,
                                      "init_channels": 128, "config_str": "batchnorm-relu",
                                      "memory_efficient": True, "output_level": "segment"}


class SpkReleaseError(RuntimeError):
    """The CAM++ release is missing or unusable (one line for the user)."""


def default_spk_release_dir() -> Path:
    """Beside the main release's default folder (the checkout, or the data folder when installed)."""
    from funasr_nano.options import DEFAULT_RELEASE_DIR

    return DEFAULT_RELEASE_DIR.parent / SPK_RELEASE_DIR_NAME


def weights_file(path: Path | str) -> Path:
    """The weights the folder's configuration.json names (funasr's `file_path_metas.init_param`), else
    the release's own name."""
    path = Path(path)
    conf = path / "configuration.json"
    if conf.is_file():
        try:
            metas = json.loads(conf.read_text(encoding="utf-8")).get("file_path_metas") or {}
        except (OSError, ValueError):
            metas = {}
        name = metas.get("init_param") if isinstance(metas, dict) else None
        if isinstance(name, str) and (path / name).is_file():
            return path / name
    return path / DEFAULT_WEIGHTS


def is_spk_release(path: Path | str) -> bool:
    return weights_file(path).is_file()


def ensure_spk_release(path: Path | str, *, download: bool = True) -> Path:
    """The release folder, downloaded from ModelScope into `path` when absent and `download` is allowed."""
    from funasr_nano.export.release import ensure_modelscope_release

    return ensure_modelscope_release(path, SPK_RELEASE_ID, label="CAM++", option="--spk-release-dir",
                                     complete=is_spk_release, missing=DEFAULT_WEIGHTS, error=SpkReleaseError,
                                     download=download)


def read_model_conf(release_dir: Path | str) -> dict[str, Any]:
    """config.yaml's `model_conf` over CAMPPlus's defaults (a folder without config.yaml gets the defaults)."""
    import yaml

    path = Path(release_dir) / "config.yaml"
    conf = dict(DEFAULT_MODEL_CONF)
    if path.is_file():
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f) or {}
        if not isinstance(config, dict) or config.get("model", "CAMPPlus") != "CAMPPlus":
            raise SpkReleaseError(f"{path}: not a CAM++ config (model: CAMPPlus)")
        conf.update(config.get("model_conf") or {})
    if conf.get("output_level") != "segment":
        raise SpkReleaseError(f"{release_dir}: output_level {conf.get('output_level')!r}: diarization needs "
                              "one embedding per window (segment)")
    return conf


def build_campplus(release_dir: Path | str) -> Any:
    """funasr's CAMPPlus with the release's weights, every tensor checked against the weights file.

    funasr itself logs and keeps random weights where a key is missing or misshaped; an export must not."""
    import torch
    from funasr.models.campplus.model import CAMPPlus

    conf = read_model_conf(release_dir)
    model = CAMPPlus(**conf)
    path = weights_file(release_dir)
    state = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
    state = {k.removeprefix("module."): v for k, v in state.items()}
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    wrong = sorted(k for k in own if k in state and tuple(state[k].shape) != tuple(own[k].shape))
    if missing or wrong:
        raise SpkReleaseError(f"{path}: CAM++ weights missing {missing[:3]} or misshaped {wrong[:3]}")
    model.load_state_dict({k: state[k].to(own[k].dtype) for k in own})
    return model.eval()


def export_campplus(release_dir: Path | str, out_dir: Path | str) -> list[Path]:
    """Write campplus.onnx and campplus.json into `out_dir`; returns their paths."""
    import warnings

    import torch

    release_dir, out_dir = Path(release_dir), Path(out_dir)
    conf = read_model_conf(release_dir)
    model = build_campplus(release_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    onnx_path = out_dir / SPK_MODEL_FILE
    # 148 frames: one 1.5 s window, the only length diarization feeds; both axes stay dynamic
    feats = torch.zeros(2, 148, int(conf["feat_dim"]))
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the TorchScript exporter's deprecation and tracer notes
        torch.onnx.export(model, (feats,), str(onnx_path), input_names=["feats"], output_names=["embedding"],
                          dynamic_axes={"feats": {0: "batch", 1: "frames"}, "embedding": {0: "batch"}},
                          opset_version=OPSET, do_constant_folding=True, dynamo=False)
    settings = {
        "source": SPK_RELEASE_ID,
        "model_conf": conf,
        "fbank": FbankSettings(n_mels=int(conf["feat_dim"])).to_dict(),
        "embedding_size": int(conf["embedding_size"]),
    }
    settings_path = out_dir / SPK_SETTINGS_FILE
    tmp = settings_path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(settings, indent=1), encoding="utf-8")
    tmp.replace(settings_path)
    log.info("exported CAM++ from %s to %s", release_dir, onnx_path)
    return [onnx_path, settings_path]


def export_spk_step(spk_release_dir: Path | str | None, out_dir: Path | str) -> list[Path]:
    """The export's CAM++ step: a named folder is required (downloaded when absent); the default one is
    exported when it is there, and otherwise skipped with a note (--diarize then says how to get it)."""
    if spk_release_dir is not None:
        return export_campplus(ensure_spk_release(spk_release_dir, download=True), out_dir)
    default = default_spk_release_dir()
    if is_spk_release(default):
        return export_campplus(default, out_dir)
    log.info("no CAM++ release in %s: --diarize needs `--spk-release-dir DIR` (downloaded into DIR)", default)
    return []
