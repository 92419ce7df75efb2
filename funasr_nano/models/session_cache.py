"""ONNX Runtime sessions that optimize a graph once, not at every start.

Creating a session runs ONNX Runtime's graph optimizations (fusions, constant folding, layout
changes) over the whole graph: for the 70-layer int8 encoder that is most of its load time
(0.7 s of a 0.72 s session start on a 2-core EPYC, 1.3-1.7 s on a 2-core Xeon). ORT can write the
optimized graph out (`SessionOptions.optimized_model_filepath`); loading that file with
optimizations off gives the same graph, so the same outputs bit for bit, in a third of the time.

The optimized graph is written on first use, with its weights in a side file (`.onnx.data`):
ORT maps such external initializers instead of copying them out of the protobuf, which is
another 0.1 s saved on the int8 encoder (0.24 s against 0.34 s with the weights inline; the ORT
flatbuffer format loaded slower than either, 0.43 s).

Where: `.ort-cache/` beside the exported model; where that folder cannot be written (a
read-only install), the user's cache folder (`$XDG_CACHE_HOME/funasr-nano/ort`, by default
`~/.cache/funasr-nano/ort`); where neither can, no cache (optimized at every start, as before).
What: one file per graph, named by a key over everything that changes the optimized graph: the
onnxruntime version, the CPU (ORT's layout optimizations depend on its vector width), the
providers and optimization level, and the source file's size and modification time (a re-export
replaces the cache). A cache file that fails to load (truncated, corrupt, from another ORT that
accepted the name) is deleted and rebuilt. Set FUNASR_ORT_CACHE=0 to switch the cache off.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import re
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import onnxruntime as ort

log = logging.getLogger(__name__)

CACHE_FOLDER = ".ort-cache"
CACHE_ENV = "FUNASR_ORT_CACHE"
CPU_PROVIDERS = ("CPUExecutionProvider",)
DATA_SUFFIX = ".data"  # the weights of `<name>.onnx` live in `<name>.onnx.data`
_KEY_LEN = 16

# How a session was made: from a cache file (no graph optimization), optimized and written to the
# cache, or optimized without a cache (none wanted, none writable, or a non-CPU provider).
FROM_CACHE, CACHE_WRITTEN, UNCACHED = "cache", "written", "uncached"


@dataclass(frozen=True)
class OpenedSession:
    """A session and where it came from (`origin`: FROM_CACHE, CACHE_WRITTEN or UNCACHED)."""

    session: ort.InferenceSession
    origin: str
    cache_file: Path | None = None


def user_cache_folder(kind: str = "ort") -> Path:
    """Where optimized graphs (or another `kind` of start-up cache) go when the model folder is read-only."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "funasr-nano" / kind


def shared_cache_folder(model_file: Path, kind: str = "ort") -> Path:
    """The user cache's sub-folder for the model folder holding `model_file`: one per model folder,
    so that two model folders never evict each other's files."""
    digest = hashlib.sha256(str(model_file.resolve().parent).encode()).hexdigest()[:_KEY_LEN]
    return user_cache_folder(kind) / digest


def cache_enabled() -> bool:
    return os.environ.get(CACHE_ENV, "1").strip().lower() not in ("0", "off", "false", "no")


@lru_cache(maxsize=1)
def cpu_signature() -> str:
    """The CPU model and instruction-set flags (Linux), else what `platform` knows: the cache is per CPU kind."""
    parts = [platform.system(), platform.machine(), platform.processor()]
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            text = f.read(1 << 16)
        for field in ("model name", "flags", "Features", "CPU part"):
            m = re.search(rf"^{field}\s*:\s*(.*)$", text, re.MULTILINE)
            if m:
                parts.append(" ".join(sorted(m.group(1).split())) if field in ("flags", "Features") else m.group(1))
    except OSError:
        pass
    return "|".join(parts)


def cache_key(source: Path, providers: list[str], level: ort.GraphOptimizationLevel, *,
              with_path: bool = False) -> str:
    """Hex digest over everything that changes the optimized graph of `source` (see the module doc)."""
    st = source.stat()
    items = [ort.__version__, cpu_signature(), ",".join(providers), str(int(level)), str(st.st_size),
             str(st.st_mtime_ns)]
    if with_path:  # a shared folder holds the caches of many model folders
        items.append(str(source.resolve()))
    return hashlib.sha256("\n".join(items).encode()).hexdigest()[:_KEY_LEN]


def cache_files(source: Path, providers: list[str], level: ort.GraphOptimizationLevel,
                folders: list[Path] | None = None) -> list[Path]:
    """Candidate cache files for `source`, in order of preference (beside the model, then the user cache)."""
    if folders is None:
        folders = [source.parent / CACHE_FOLDER, user_cache_folder()]
    out = []
    for i, folder in enumerate(folders):
        key = cache_key(source, providers, level, with_path=i > 0)
        if i > 0:  # a shared folder: one sub-folder per model folder, so they never evict each other's files
            folder = folder / shared_cache_folder(source).name
        out.append(folder / f"{source.stem}.{key}.onnx")
    return out


def open_cached(source: Path, make_options: Callable[[], ort.SessionOptions], providers: list[str] | None = None,
                *, cache: bool = True, folders: list[Path] | None = None) -> OpenedSession:
    """An InferenceSession of `source`, through the optimized-graph cache when it applies.

    `make_options()` gives fresh options each time (ORT options are consumed by one session);
    their optimization level is what the cache file is optimized to. Errors creating the
    session from `source` itself propagate (the caller phrases them); cache problems never do.
    """
    providers = list(providers or CPU_PROVIDERS)
    if not cache or not cache_enabled() or tuple(providers) != CPU_PROVIDERS:
        return OpenedSession(_create(source, make_options(), providers), UNCACHED)
    level = make_options().graph_optimization_level
    candidates = cache_files(source, providers, level, folders)
    for path in candidates:
        if path.is_file():
            session = _load_cache_file(path, make_options, providers)
            if session is not None:
                log.debug("%s: optimized graph loaded from %s", source, path)
                return OpenedSession(session, FROM_CACHE, path)
    for path in candidates:
        opened = _optimize_into(source, path, make_options, providers)
        if opened is not None:
            return opened
    log.debug("%s: no writable cache folder; graph optimized without a cache", source)
    return OpenedSession(_create(source, make_options(), providers), UNCACHED)


def _create(path: Path, options: ort.SessionOptions, providers: list[str]) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), sess_options=options, providers=providers)


def _load_cache_file(path: Path, make_options: Callable[[], ort.SessionOptions],
                     providers: list[str]) -> ort.InferenceSession | None:
    """The cached graph, loaded as is (optimizations off: they are applied already); None if unusable."""
    data = path.with_name(path.name + DATA_SUFFIX)
    if not data.is_file():  # the weights were deleted: the graph alone cannot load
        _remove(path)
        return None
    options = make_options()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    try:
        return _create(path, options, providers)
    except Exception as exc:  # truncated or corrupt: rebuild it
        log.debug("%s: unusable cache file, rebuilding it (%s)", path, " ".join(str(exc).split())[:200])
        _remove(path, data)
        return None


def _optimize_into(source: Path, target: Path, make_options: Callable[[], ort.SessionOptions],
                   providers: list[str]) -> OpenedSession | None:
    """Optimize `source` and write the result as `target` (+ its weights); None if that folder is not writable.

    ORT writes the two files into a private temporary folder; the weights are moved into place
    first and the graph last, so a reader never sees a graph without its weights, and two
    processes writing the same cache at once each move complete files.
    """
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    except OSError as exc:
        log.debug("%s: cache folder not writable (%s)", target.parent, exc)
        return None
    try:
        options = make_options()
        options.optimized_model_filepath = str(tmp / target.name)
        options.add_session_config_entry("session.optimized_model_external_initializers_file_name",
                                         target.name + DATA_SUFFIX)
        options.add_session_config_entry("session.optimized_model_external_initializers_min_size_in_bytes", "1024")
        try:
            session = _create(source, options, providers)
        except Exception as exc:  # could ORT not write (disk full)? A broken source fails again, and says so
            log.debug("%s: optimizing into the cache failed (%s)", source, " ".join(str(exc).split())[:200])
            return OpenedSession(_create(source, make_options(), providers), UNCACHED)
        written = tmp / target.name
        if not written.is_file():
            return OpenedSession(session, UNCACHED)
        data = tmp / (target.name + DATA_SUFFIX)
        if data.is_file():
            os.replace(data, target.with_name(target.name + DATA_SUFFIX))
        else:  # a graph without weights big enough to move out: an empty side file keeps the layout uniform
            target.with_name(target.name + DATA_SUFFIX).touch()
        os.replace(written, target)
        _remove_stale(target)
        log.debug("%s: optimized graph written to %s", source, target)
        return OpenedSession(session, CACHE_WRITTEN, target)
    except OSError as exc:
        log.debug("%s: cannot write the optimized graph (%s)", target, exc)
        return None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _remove_stale(current: Path) -> None:
    """Delete the cache files of the same graph under other keys (an older ORT, a re-export)."""
    stem = current.name[: -len(".onnx") - _KEY_LEN - 1]
    pattern = re.compile(rf"{re.escape(stem)}\.[0-9a-f]{{{_KEY_LEN}}}\.onnx(\{DATA_SUFFIX})?")
    for path in current.parent.iterdir():
        if pattern.fullmatch(path.name) and not path.name.startswith(current.name):
            _remove(path)


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except OSError:
            pass
