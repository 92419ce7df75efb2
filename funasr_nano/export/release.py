"""The official release folder `FunAudioLLM/Fun-ASR-Nano-2512`: find it, fetch it, read it.

Export (01, 02) is the only place that touches the release; inference only sees
`model-gguf/`. torch is imported lazily so that importing this module for its
constants or errors stays cheap.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass
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


# --------------------------------------------------------------------------- which release an export came from

# In the model folder: which release each exporter read (`onnx`: 01, `gguf`: 02), by path and fingerprint.
# Without it a model folder exported once would be used whatever --release-dir says, and a user who tried a
# test checkpoint and then downloaded the real release would keep getting the old model's output.
RECORD_FILE = "release.json"
EXPORT_PARTS = ("onnx", "gguf")
_FINGERPRINT_BYTES = 1 << 20


def is_release(path: Path) -> bool:
    """Whether `path` holds the two files every export reads (config.yaml, model.pt)."""
    return (path / "config.yaml").is_file() and (path / "model.pt").is_file()


def not_a_release(path: Path) -> str | None:
    """Why a folder given as a release cannot be one (one line), or None when it is one or is empty (a download
    target)."""
    if not path.exists() or is_release(path):
        return None
    if not path.is_dir():
        return f"{path}: not a folder"
    if not any(path.iterdir()):
        return None
    missing = [n for n in ("config.yaml", "model.pt") if not (path / n).is_file()]
    return f"{path}: not a Fun-ASR-Nano release folder (missing {', '.join(missing)})"


def release_fingerprint(release_dir: Path) -> str:
    """A cheap identity of a release: SHA-256 over config.yaml and model.pt's size, first and last MiB.

    Not a full hash (model.pt is 2 GB and this runs at every start): it tells the real release from a test
    checkpoint, one release from another and a re-download that changed the weights, not a file edited
    in its middle with its size kept.
    """
    digest = hashlib.sha256()
    digest.update((release_dir / "config.yaml").read_bytes())
    weights = release_dir / "model.pt"
    size = weights.stat().st_size
    digest.update(str(size).encode())
    with open(weights, "rb") as f:
        digest.update(f.read(_FINGERPRINT_BYTES))
        f.seek(max(0, size - _FINGERPRINT_BYTES))
        digest.update(f.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()


def read_export_record(model_dir: Path) -> dict[str, dict[str, str]]:
    """The model folder's record, part -> {"release": absolute path, "fingerprint"}; {} when absent or unreadable."""
    try:
        record = json.loads((model_dir / RECORD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(record, dict):
        return {}
    return {part: entry for part, entry in record.items()
            if part in EXPORT_PARTS and isinstance(entry, dict) and isinstance(entry.get("release"), str)}


def write_export_record(model_dir: Path, part: str, release_dir: Path) -> None:
    """Note (atomically) that `part` of the model folder was just exported from `release_dir`."""
    record = read_export_record(model_dir)
    record[part] = {"release": os.path.abspath(release_dir), "fingerprint": release_fingerprint(release_dir)}
    tmp = model_dir / f".{RECORD_FILE}.tmp"
    tmp.write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, model_dir / RECORD_FILE)


def export_mismatch(model_dir: Path, release_dir: Path | None) -> str | None:
    """Why the export in `model_dir` is not (or no longer) that of `release_dir`, or None when it is.

    `release_dir` None (not named on the command line): the release the record names, when it is still
    there; an export whose release changed since (a re-download) is stale, one whose release is gone or
    that has no record (made before records existed) is used as it is. A named release must be the one
    both parts were exported from, path and fingerprint.
    """
    record = read_export_record(model_dir)
    if release_dir is None:
        paths = {entry["release"] for entry in record.values()}
        if len(paths) != 1 or len(record) != len(EXPORT_PARTS):
            return None if not record else f"{model_dir} was exported from more than one release"
        release_dir = Path(paths.pop())
        if not is_release(release_dir):
            return None
        if all(entry.get("fingerprint") == release_fingerprint(release_dir) for entry in record.values()):
            return None
        return f"{release_dir} has changed since {model_dir} was exported from it"
    if not record:
        return f"{model_dir} has no record of the release it was exported from"
    wanted = os.path.abspath(release_dir)
    fingerprint = release_fingerprint(release_dir) if is_release(release_dir) else None
    for part in EXPORT_PARTS:
        entry = record.get(part)
        if entry is None:
            return f"{model_dir} has no record of the release its {part} part was exported from"
        if os.path.realpath(entry["release"]) != os.path.realpath(wanted):
            return f"{model_dir} was exported from {entry['release']}, not {release_dir}"
        if entry.get("fingerprint") != fingerprint:
            return f"{release_dir} has changed since {model_dir} was exported from it"
    return None


# --------------------------------------------------------------------------- which checkpoint of the family

# Fun-ASR-Nano-2512 and Fun-ASR-MLT-Nano-2512 share config.yaml's layout, the model code and the tensor shapes;
# what differs is the languages the prompt may name (and MLT ships no CTC weights, like the Hugging Face copy of
# Nano, so that cannot tell them apart). What names the checkpoint is outside the weights: the hub's
# configuration.json when it carries the model's name, else the folder the hubs download into.
CHECKPOINT_CHOICES = {"nano": "Fun-ASR-Nano-2512", "mlt": "Fun-ASR-MLT-Nano-2512"}


def _named_checkpoint(text: str) -> str | None:
    text = text.lower()
    if "fun-asr-mlt-nano" in text or "fun_asr_mlt_nano" in text:
        return CHECKPOINT_CHOICES["mlt"]
    if "fun-asr-nano" in text or "fun_asr_nano" in text:
        return CHECKPOINT_CHOICES["nano"]
    return None


def _strings(value: Any) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for v in value.values() for s in _strings(v)]
    if isinstance(value, list):
        return [s for v in value for s in _strings(v)]
    return []


def detect_checkpoint(release_dir: Path, *, explicit: str | None = None) -> tuple[str, str]:
    """(checkpoint name, how it was decided) for a release folder, in this order:

    1. `explicit` (`--checkpoint nano|mlt`);
    2. a model name in configuration.json's values (ModelScope's `model_name_in_hub` and the like);
    3. the folder's path: the hubs download into a folder named after the model (`Fun-ASR-MLT-Nano-2512`,
       ModelScope's `FunAudioLLM/Fun-ASR-MLT-Nano-2512`, Hugging Face's cache
       `models--FunAudioLLM--Fun-ASR-MLT-Nano-2512`);
    4. Fun-ASR-Nano-2512, said as an assumption (an MLT-Nano release in a folder of another name needs 1).
    """
    if explicit:
        return CHECKPOINT_CHOICES[explicit], "--checkpoint"
    try:
        configuration = json.loads((release_dir / "configuration.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        configuration = None
    for text in _strings(configuration):
        if (name := _named_checkpoint(text)) is not None:
            return name, "named in configuration.json"
    for part in reversed(Path(os.path.abspath(release_dir)).parts):
        if (name := _named_checkpoint(part)) is not None:
            return name, f"the folder's name {part!r}"
    return CHECKPOINT_CHOICES["nano"], ("assumed: no model name in configuration.json or the folder's path; "
                                        "for an MLT-Nano release export with --checkpoint mlt")


@dataclass(frozen=True)
class Source:
    """A place the release can be downloaded from."""

    name: str  # what --source takes
    label: str
    url: str  # probed before a download (through the proxy the environment names)
    command: str  # the download command for a hint, with {path}
    note: str = ""  # what this copy lacks, said before downloading it and in hints


SOURCES: dict[str, Source] = {
    "modelscope": Source("modelscope", "ModelScope", "https://www.modelscope.cn/",
                         f"modelscope download --model {MODEL_ID} --local_dir {{path}}"),
    "huggingface": Source("huggingface", "Hugging Face", "https://huggingface.co/",
                          f"huggingface-cli download {MODEL_ID} --local-dir {{path}}",
                          "the Hugging Face copy lacks the CTC head's weights (FunASR issue #3496): no timestamps "
                          "aligned to the audio, no live partial text, no speculative decoding"),
}
DEFAULT_SOURCE = "modelscope"  # the copy with the CTC head


def ensure_release(model_dir: Path | str | None = None, *, download: bool = True,
                   source: str = DEFAULT_SOURCE) -> Path:
    """Return a release folder that has config.yaml and model.pt, downloading it from `source` if allowed.

    ModelScope is the default because its copy is the one with the CTC head; the Hugging Face copy
    (`source="huggingface"`) lacks it.
    """
    path = Path(model_dir) if model_dir is not None else DEFAULT_RELEASE_DIR
    if is_release(path):
        return path
    problem = not_a_release(path)
    if problem is not None:
        raise ReleaseError(problem)  # no download hint: this folder is not where a release should go
    if not download:
        raise ReleaseError(f"{path}: release folder not found; {download_hint(path, source)}")
    _download(path, SOURCES[source])
    return path


def download_hint(path: Path, source: str = DEFAULT_SOURCE) -> str:
    """How to get the release into `path` by hand (and the other source, with what it lacks)."""
    chosen = SOURCES[source]
    other = next(s for s in SOURCES.values() if s is not chosen)
    lacks = f" ({chosen.note})" if chosen.note else ""
    alternative = f"; or --source {other.name}" + (f" ({other.note})" if other.note else "")
    return (f"get it with `{chosen.command.format(path=path)}`{lacks} on a machine with network access, "
            f"then pass --release-dir {path}{alternative}")


def _download(path: Path, source: Source) -> None:
    hint = download_hint(path, source.name)
    if not reachable(source.url):
        raise ReleaseError(f"{path}: release folder not found and {source.label} ({source.url}) is unreachable "
                           f"from here{_proxy_note(source.url)}; {hint}")
    if source.note:
        print(f"note: {source.note}", file=sys.stderr, flush=True)
    print(f"Downloading {MODEL_ID} from {source.label} into {path} ...", file=sys.stderr, flush=True)
    try:
        if source.name == "huggingface":
            from huggingface_hub import snapshot_download
        else:
            from modelscope import snapshot_download
    except ImportError as exc:
        raise ReleaseError(f"{path}: release folder not found and {exc.name or source.name} is not installed; "
                           f"{hint}") from exc
    try:
        snapshot_download(MODEL_ID, local_dir=str(path))
    except Exception as exc:  # the hubs' clients raise many kinds of network errors
        raise ReleaseError(f"{path}: could not download {MODEL_ID} ({type(exc).__name__}); {hint}") from exc
    if not (path / "model.pt").is_file():
        raise ReleaseError(f"{path}: download of {MODEL_ID} is incomplete (no model.pt); {hint}")


def ensure_modelscope_release(path: Path | str, model_id: str, *, label: str, option: str,
                              complete: Callable[[Path], bool], missing: str, error: type[Exception] = ReleaseError,
                              download: bool = True) -> Path:
    """A release the export reads beside the main one (FSMN-VAD, CAM++), downloaded from ModelScope into `path`
    when it is not there and `download` allows; `error` (one line, with the download command) otherwise.

    `complete` says whether a folder holds it; `missing` names what it should hold, for the message; `option`
    is the command-line option that names the folder.
    """
    path = Path(path)
    if complete(path):
        return path
    if path.exists() and not path.is_dir():
        raise error(f"{path}: not a folder ({option})")
    command = f"modelscope download --model {model_id} --local_dir {path}"
    hint = f"get it with `{command}` on a machine with network access"
    if not download:
        raise error(f"{path}: {label} release not found ({missing}); {hint}")
    source = SOURCES["modelscope"]
    if not reachable(source.url):
        raise error(f"{path}: {label} release not found and ModelScope ({source.url}) is unreachable from "
                    f"here{_proxy_note(source.url)}; {hint}")
    try:
        from modelscope import snapshot_download
    except ImportError as exc:
        raise error(f"{path}: {label} release not found and modelscope is not installed; {hint}") from exc
    print(f"Downloading {model_id} from ModelScope into {path} ...", file=sys.stderr, flush=True)
    try:
        snapshot_download(model_id, local_dir=str(path))
    except Exception as exc:  # the hub client raises many kinds of network errors
        raise error(f"{path}: could not download {model_id} ({type(exc).__name__}); {hint}") from exc
    if not complete(path):
        raise error(f"{path}: download of {model_id} is incomplete; {hint}")
    return path


def reachable(url: str, timeout: float = 5.0) -> bool:
    """Whether `url`'s server answers, through the proxy HTTPS_PROXY / HTTP_PROXY name unless NO_PROXY
    exempts the host (urllib's own rules, as the hubs' clients follow them).

    Quick, so an offline machine gets its one-line error in seconds rather than after the download
    client's retries; any HTTP answer, an error status included, counts as reachable.
    """
    import urllib.error
    import urllib.request

    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": "funasr-nano-export"})
    try:
        # a fresh opener reads the proxy variables now (urlopen's shared one keeps those of its first use)
        with urllib.request.build_opener().open(request, timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True
    except (urllib.error.URLError, OSError, ValueError):
        return False


def _proxy_note(url: str) -> str:
    """`(through the proxy at ...)` when one applies to `url`, so a user sees which way was tried."""
    import urllib.parse
    import urllib.request

    parts = urllib.parse.urlsplit(url)
    proxy = urllib.request.getproxies().get(parts.scheme)
    if proxy is None or urllib.request.proxy_bypass(parts.hostname or ""):
        return " (no proxy set: HTTPS_PROXY)"
    return f" (through the proxy {proxy})"


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
