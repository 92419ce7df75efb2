"""CAM++ speaker embeddings on ONNX Runtime: funasr's windows of a speech segment, its fbank, its network.

What funasr does for `spk_model="cam++"` (`funasr/models/campplus/utils.py`, `sv_chunk` and
`extract_feature`; `funasr/auto/auto_model.py`, `inference_with_vad`), reproduced here:

- each VAD segment is cut into windows of 1.5 s every 0.75 s; the last window ends at the segment's
  end (it starts earlier rather than running past it), and only a segment shorter than 1.5 s is
  zero-padded to a whole window. A window's times are those of its samples in the input;
- each window's features are an 80-bin Kaldi fbank of the samples as they are, in [-1, 1] (not
  scaled by 32768 as the ASR front end does), povey window, 25/10 ms, dither 0, then the window's
  mean over time subtracted from every frame;
- CAM++ turns the (148, 80) features of a window into one 192-dim embedding.

The fbank is `funasr_nano.audio.features.fbank` with these settings: kaldi-native-fbank, which is
what funasr runs without torchaudio, so the features are bit-identical to the oracle's.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from funasr_nano.audio.features import FrontendConfig, fbank

log = logging.getLogger(__name__)

SPK_RELEASE_ID = "iic/speech_campplus_sv_zh-cn_16k-common"
SPK_MODEL_FILE = "campplus.onnx"
SPK_SETTINGS_FILE = "campplus.json"
WINDOW_SECONDS = 1.5  # funasr sv_chunk's seg_dur
SHIFT_SECONDS = 0.75  # and seg_shift
# windows per onnxruntime call: a batch of 32 x 148 x 80 floats is 1.5 MB in, a few tens of MB of
# activations; larger batches gain nothing measurable on a CPU
BATCH = 32


@dataclass(frozen=True)
class FbankSettings:
    """The CAM++ front end: funasr's `Kaldi.fbank(wave, num_mel_bins=80)` defaults, then mean removal."""

    sample_rate: int = 16000
    n_mels: int = 80
    frame_length_ms: float = 25
    frame_shift_ms: float = 10
    window: str = "povey"
    upscale_samples: bool = False
    subtract_mean: bool = True

    def to_dict(self) -> dict[str, object]:
        return asdict(self)

    def frontend(self) -> FrontendConfig:
        return FrontendConfig(sample_rate=self.sample_rate, n_mels=self.n_mels,
                              frame_length_ms=self.frame_length_ms, frame_shift_ms=self.frame_shift_ms,
                              window=self.window, lfr_m=1, lfr_n=1, upscale_samples=self.upscale_samples)


@dataclass(frozen=True)
class Window:
    """One CAM++ window: where it lies in the input (seconds) and its samples (zero-padded to 1.5 s)."""

    start: float
    end: float
    samples: np.ndarray


def segment_windows(segment_start: float, wave: np.ndarray, sample_rate: int = 16000) -> list[Window]:
    """funasr's `sv_chunk` for one segment that starts at `segment_start` seconds.

    Times are computed as funasr computes them (sample index / rate + the segment's start), so the
    speaker turns built from them round the same way."""
    length = int(WINDOW_SECONDS * sample_rate)
    shift = int(SHIFT_SECONDS * sample_rate)
    n = int(wave.shape[0])
    out: list[Window] = []
    last_end = 0
    for first in range(0, n, shift):
        end = min(first + length, n)
        if end <= last_end:
            break
        last_end = end
        start = max(0, end - length)
        samples = np.asarray(wave[start:end], dtype=np.float32)
        if samples.shape[0] < length:
            samples = np.pad(samples, (0, length - samples.shape[0]))
        out.append(Window(start / sample_rate + segment_start, end / sample_rate + segment_start, samples))
    return out


def window_features(samples: np.ndarray, settings: FbankSettings = FbankSettings()) -> np.ndarray:
    """(frames, n_mels) float32: the fbank of one window minus its mean over time."""
    feats = fbank(samples, settings.frontend())
    if settings.subtract_mean and feats.shape[0]:
        feats = feats - feats.mean(axis=0, keepdims=True)
    return np.ascontiguousarray(feats, dtype=np.float32)


def find_speaker_model(model_dir: Path | str) -> Path | None:
    path = Path(model_dir) / SPK_MODEL_FILE
    return path if path.is_file() else None


class SpeakerEmbedder:
    """The exported CAM++ (campplus.onnx + campplus.json) on one onnxruntime session."""

    def __init__(self, model_path: Path | str, *, threads: int = 2, providers: list[str] | None = None) -> None:
        from funasr_nano.models.encoder import load_session

        self.path = Path(model_path)
        settings_path = self.path.with_name(SPK_SETTINGS_FILE)
        conf = json.loads(settings_path.read_text(encoding="utf-8")) if settings_path.is_file() else {}
        self.settings = FbankSettings(**(conf.get("fbank") or {}))
        self.embedding_size = int(conf.get("embedding_size", 192))
        self.session = load_session(self.path, threads=threads, providers=providers).session

    def features(self, windows: list[Window]) -> np.ndarray:
        """(n, frames, n_mels): windows all have the same length, so their features stack."""
        return np.stack([window_features(w.samples, self.settings) for w in windows])

    def embed_features(self, feats: np.ndarray) -> np.ndarray:
        """(n, frames, n_mels) -> (n, embedding_size) float32, in batches of `BATCH`."""
        if feats.shape[0] == 0:
            return np.zeros((0, self.embedding_size), np.float32)
        parts = [self.session.run(["embedding"], {"feats": feats[i:i + BATCH]})[0]
                 for i in range(0, feats.shape[0], BATCH)]
        return np.concatenate(parts).astype(np.float32, copy=False)

    def embed(self, windows: list[Window]) -> np.ndarray:
        """One embedding per window (n, embedding_size)."""
        out = [self.embed_features(self.features(windows[i:i + BATCH])) for i in range(0, len(windows), BATCH)]
        return np.concatenate(out) if out else np.zeros((0, self.embedding_size), np.float32)

    def segment(self, segment_start: float, wave: np.ndarray, sample_rate: int = 16000
                ) -> tuple[list[tuple[float, float]], np.ndarray]:
        """A speech segment's windows (start, end seconds) and their embeddings; the samples are not kept."""
        windows = segment_windows(segment_start, wave, sample_rate)
        return [(w.start, w.end) for w in windows], self.embed(windows)

