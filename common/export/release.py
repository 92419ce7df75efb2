"""The official release folder `FunAudioLLM/Fun-ASR-Nano-2512`: find it, fetch it, read it.

Export (01, 02) is the only place that touches the release; inference only sees
`model-gguf/`. torch is imported lazily so that importing this module for its
constants or errors stays cheap.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import torch

MODEL_ID = "FunAudioLLM/Fun-ASR-Nano-2512"
DEFAULT_RELEASE_DIR = Path("Fun-ASR-Nano-2512")
LLM_SUBDIR = "Qwen3-0.6B"
# Keys of a wrapped checkpoint that hold the real state dict (funasr unwraps the same ones).
_WRAPPER_KEYS = ("state_dict", "model_state_dict", "model")


class ReleaseError(RuntimeError):
    """A problem with the release folder, phrased as one line for the user."""


def ensure_release(model_dir: Path | str | None = None, *, download: bool = True) -> Path:
    """Return a release folder that has config.yaml and model.pt, downloading it if allowed.

    Downloading is done with `modelscope` because the ModelScope copy is the one
    with the CTC head; the Hugging Face copy lacks it.
    """
    path = Path(model_dir) if model_dir is not None else DEFAULT_RELEASE_DIR
    if (path / "config.yaml").is_file() and (path / "model.pt").is_file():
        return path
    if path.exists() and not path.is_dir():
        raise ReleaseError(f"{path}: not a folder")
    if path.exists() and any(path.iterdir()):
        missing = [n for n in ("config.yaml", "model.pt") if not (path / n).is_file()]
        raise ReleaseError(f"{path}: not a Fun-ASR-Nano release folder (missing {', '.join(missing)})")
    if not download:
        raise ReleaseError(f"{path}: release folder not found; {_download_hint(path)}")
    _download(path)
    return path


def _download_hint(path: Path) -> str:
    return (f"get it with `modelscope download --model {MODEL_ID} --local_dir {path}` "
            f"on a machine with network access, then pass --release-dir {path}")


def _download(path: Path) -> None:
    hint = _download_hint(path)
    if not _modelscope_reachable():
        raise ReleaseError(f"{path}: release folder not found and modelscope.cn is unreachable; {hint}")
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise ReleaseError(f"{path}: release folder not found and modelscope is not installed; {hint}") from exc
    print(f"Downloading {MODEL_ID} from ModelScope into {path} ...", file=sys.stderr, flush=True)
    try:
        snapshot_download(MODEL_ID, local_dir=str(path))
    except Exception as exc:  # modelscope raises many kinds of network errors
        raise ReleaseError(f"{path}: could not download {MODEL_ID} ({type(exc).__name__}); {hint}") from exc
    if not (path / "model.pt").is_file():
        raise ReleaseError(f"{path}: download of {MODEL_ID} is incomplete (no model.pt); {hint}")


def _modelscope_reachable(timeout: float = 3.0) -> bool:
    """A quick TCP check, so an offline machine gets its one-line error in seconds, not after retries."""
    import socket

    try:
        with socket.create_connection(("www.modelscope.cn", 443), timeout=timeout):
            return True
    except OSError:
        return False


def read_config(model_dir: Path | str) -> dict[str, Any]:
    """Parse config.yaml with a plain YAML loader (no OmegaConf interpolation is used by the release)."""
    import yaml

    path = Path(model_dir) / "config.yaml"
    try:
        with open(path, encoding="utf-8") as f:
            config = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as exc:
        raise ReleaseError(f"{path}: cannot read config ({exc.__class__.__name__}: {exc})") from exc
    if not isinstance(config, dict):
        raise ReleaseError(f"{path}: config is not a mapping")
    return config


def llm_dir(model_dir: Path | str, config: dict[str, Any] | None = None) -> Path:
    """The Qwen3 folder (config.json + tokenizer), named by llm_conf.init_param_path relative to the release."""
    config = config if config is not None else read_config(model_dir)
    name = (config.get("llm_conf") or {}).get("init_param_path") or LLM_SUBDIR
    path = Path(name)
    if not path.is_absolute():
        path = Path(model_dir) / path
    if not (path / "config.json").is_file():
        raise ReleaseError(f"{path}: Qwen3 folder with config.json not found")
    return path


def load_state_dict(model_dir: Path | str, *, mmap: bool = True) -> dict[str, torch.Tensor]:
    """Load model.pt as a flat name -> tensor dict, refusing anything but plain tensors.

    `weights_only=True` means a pickle that would run code is rejected, never executed.
    `mmap=True` keeps the 2 GB file on disk until a tensor is touched, so exporters can
    stream one tensor at a time.
    """
    import pickle
    import warnings

    import torch

    path = Path(model_dir) / "model.pt"
    if not path.is_file():
        raise ReleaseError(f"{path}: file not found")
    try:
        with warnings.catch_warnings():
            # A foreign pickle (protocol > 2) makes torch warn before refusing it: keep the error one line.
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
            except RuntimeError as exc:
                # Old-style (non-zip) checkpoints cannot be memory-mapped; retry without mmap.
                if mmap and "mmap" in str(exc):
                    state = torch.load(path, map_location="cpu", weights_only=True)
                else:
                    raise
    except pickle.UnpicklingError as exc:
        raise ReleaseError(f"{path}: refused, not a weights-only checkpoint ({_unpickling_reason(exc)})") from exc
    except Exception as exc:
        raise ReleaseError(f"{path}: cannot load checkpoint ({type(exc).__name__}: {str(exc)[:160]})") from exc
    return normalize_state_dict(state, path)


def _unpickling_reason(exc: Exception) -> str:
    """The one informative sentence of torch's weights-only refusal (the rest is boilerplate)."""
    text = str(exc).split("WeightsUnpickler error:", 1)[-1]
    for paragraph in text.split("\n\n"):
        line = " ".join(paragraph.split())
        if line and not line.startswith(("Weights only load failed", "Check the documentation", "Please file")):
            return line[:160]
    return "unsafe pickle"


def normalize_state_dict(state: Any, path: Path | str = "model.pt") -> dict[str, torch.Tensor]:
    """Unwrap `state_dict`/`model` containers and strip one DDP `module.` prefix."""
    import torch

    while isinstance(state, dict):
        inner = next((state[k] for k in _WRAPPER_KEYS if isinstance(state.get(k), dict)), None)
        if inner is None:
            break
        state = inner
    if not isinstance(state, dict):
        raise ReleaseError(f"{path}: checkpoint is not a dict of tensors")
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        if not isinstance(value, torch.Tensor):
            continue
        name = key[len("module.") :] if key.startswith("module.") else key
        out[name] = value
    if not out:
        raise ReleaseError(f"{path}: checkpoint holds no tensors")
    return out


def sub_state_dict(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """Tensors under `prefix.` with the prefix removed (e.g. `llm.` -> a Qwen3ForCausalLM dict)."""
    dotted = prefix.rstrip(".") + "."
    return {k[len(dotted) :]: v for k, v in state.items() if k.startswith(dotted)}
