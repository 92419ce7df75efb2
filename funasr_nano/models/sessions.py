"""The ONNX sessions an engine opens on first use (or in the background while it loads): the CTC head,
Silero VAD, FSMN-VAD and CAM++.

Each is opened once and shared by every input and live stream (each keeps its own state: a VAD
`stream()`, a segmenter); a model folder without one gets None and one warning, except CAM++,
which a caller asked for by name. Threads of the prepare stage, request workers and live sessions
ask at once, so opening is under one lock.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import Future
from typing import TypeVar

from funasr_nano.audio.fsmn_vad import FsmnVad, find_fsmn_vad_model
from funasr_nano.audio.vad import SileroVad, find_vad_model
from funasr_nano.models.ctc import CTCModel
from funasr_nano.models.encoder import OnnxModelError
from funasr_nano.models.loading import in_background
from funasr_nano.models.settings import ModelSettings
from funasr_nano.speakers.embeddings import SpeakerEmbedder, find_speaker_model

log = logging.getLogger("funasr_nano.engine")
T = TypeVar("T")
_MISSING = object()  # opened and not found (said once)


class OnDemandSessions:
    """The optional sessions of one model folder; `load_times` gets the seconds each took to open."""

    def __init__(self, settings: ModelSettings, threads: int, providers: list[str] | None,
                 load_times: dict[str, float]) -> None:
        self.settings = settings
        self._threads, self._providers = threads, providers
        self.load_times = load_times
        self._opened: dict[str, object] = {}
        self._loading: dict[str, Future] = {}
        self._lock = threading.RLock()
        self._openers: dict[str, Callable[[], object | None]] = {
            "ctc": lambda: CTCModel.load(settings, threads=threads, providers=providers),
            "vad": lambda: _maybe(find_vad_model(settings.model_dir), SileroVad),
            "fsmn": lambda: _maybe(find_fsmn_vad_model(settings.model_dir), FsmnVad),
        }

    def preload(self, names: Iterable[str]) -> None:
        """Start opening these sessions ("ctc", "vad", "fsmn") in background threads."""
        with self._lock:
            for name in names:
                if name not in self._loading and name not in self._opened:
                    self._loading[name] = in_background(self._openers[name], name, self.load_times)

    def ctc(self) -> CTCModel | None:
        """The CTC head (drafts and alignment); None without CTC weights."""
        return self._get("ctc", None)

    def silero_vad(self) -> SileroVad | None:
        return self._get("vad", "silero_vad.onnx not found in the model folder (re-run `funasr-nano export` or "
                                "01_export_onnx.py with silero-vad installed): cutting at quiet points instead (--vad none)")

    def fsmn_vad(self) -> FsmnVad | None:
        return self._get("fsmn", "fsmn_vad.onnx not found in the model folder (get it with `funasr-nano export "
                                 "--vad-release-dir DIR`, which downloads iic/speech_fsmn_vad_zh-cn-16k-common-pytorch "
                                 "into DIR): cutting at quiet points instead (--vad none)")

    def speaker_embedder(self) -> SpeakerEmbedder:
        """CAM++ for diarization; a model folder without campplus.onnx is an error (it was asked for)."""
        with self._lock:
            embedder = self._opened.get("speakers")
            if embedder is None:
                path = find_speaker_model(self.settings.model_dir)
                if path is None:
                    raise OnnxModelError(f"{self.settings.model_dir}/campplus.onnx: not found: diarization needs CAM++ "
                                         "(get it with `funasr-nano export --spk-release-dir DIR`, which downloads "
                                         "iic/speech_campplus_sv_zh-cn_16k-common into DIR)")
                t0 = time.perf_counter()
                embedder = self._opened["speakers"] = SpeakerEmbedder(path, threads=self._threads)
                self.load_times["speakers"] = time.perf_counter() - t0
            return embedder  # type: ignore[return-value]

    def close(self) -> None:
        """Let background loads finish (their threads hold sessions) before the engine goes away."""
        with self._lock:
            loading, self._loading = self._loading, {}
        for future in loading.values():
            with contextlib.suppress(Exception):
                future.result()

    def _get(self, name: str, missing_warning: str | None):
        opened = self._opened.get(name)  # the common case, without the lock
        if opened is None:
            with self._lock:
                opened = self._opened.get(name)
                if opened is None:
                    future = self._loading.pop(name, None)
                    if future is not None:
                        value = future.result()
                    else:
                        t0 = time.perf_counter()
                        value = self._openers[name]()
                        self.load_times[name] = time.perf_counter() - t0
                    if value is None and missing_warning is not None:
                        log.warning(missing_warning)
                    opened = self._opened[name] = _MISSING if value is None else value
        return None if opened is _MISSING else opened


def _maybe(path, opener: Callable[[object], T]) -> T | None:  # noqa: ANN001 - a Path or None
    return opener(path) if path is not None else None


__all__ = ["OnDemandSessions"]
