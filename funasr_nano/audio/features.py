"""Acoustic features for Fun-ASR-Nano without torch: Kaldi fbank + LFR stacking.

The official pipeline (funasr ``WavFrontend``) scales the 16 kHz waveform by 32768, computes an
80-bin Kaldi log-mel filterbank (25 ms hamming window, 10 ms shift, ``snip_edges=True``, no
energy, dither 0 for deterministic inference) and then stacks ``lfr_m=7`` consecutive frames
with stride ``lfr_n=6`` ("low frame rate"), giving 560-dim rows at 60 ms.

Without torchaudio, funasr computes the fbank with kaldi-native-fbank (``funasr.utils.fbank``);
``fbank(backend="knf")`` calls the same library with the same options, so our features are
bit-identical to funasr's. ``backend="numpy"`` is a vectorized float32 reimplementation for speed
and for installs without kaldi-native-fbank; it agrees with the oracle to float32 rounding (see
``fbank``). LFR, the token count and CMVN are plain numpy.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

# Kaldi floors mel energies at float32 epsilon before the log (``use_log_floor``).
_LOG_FLOOR = float(np.finfo(np.float32).eps)
_PREEMPH = 0.97
_LOW_FREQ = 20.0
# Frames processed per numpy batch: bounds the scratch memory (~4096 x 512 x 8 bytes per array)
# so hours of audio do not need gigabytes at once.
_FRAMES_PER_BATCH = 4096
# Samples handed to kaldi-native-fbank per call (10 s at 16 kHz).
_KNF_FEED_SAMPLES = 160000


@dataclass(frozen=True)
class FrontendConfig:
    """The frontend settings of a Fun-ASR-Nano release (funasr ``frontend_conf``).

    ``dither`` is kept for information only: inference is always deterministic (dither 0),
    which is also what the parity tests use.
    """

    sample_rate: int = 16000
    n_mels: int = 80
    frame_length_ms: float = 25
    frame_shift_ms: float = 10
    window: str = "hamming"
    lfr_m: int = 7
    lfr_n: int = 6
    dither: float = 0.0
    snip_edges: bool = True
    upscale_samples: bool = True  # funasr's ``upsacle_samples`` (sic): multiply by 32768
    cmvn_file: str | None = None

    @classmethod
    def from_dict(
        cls, frontend_conf: Mapping[str, Any] | None, *, keep_dither: bool = False
    ) -> FrontendConfig:
        """Build from funasr's ``frontend_conf`` mapping (config.yaml), using funasr's defaults.

        ``cmvn_file`` is kept as written; resolve a relative path against the model folder first.

        The release config sets ``dither: 1.0`` (a training-time augmentation); we drop it to 0
        unless ``keep_dither`` so that transcription is reproducible, as funasr does when given
        ``frontend_conf={"dither": 0.0}``.
        """
        conf = dict(frontend_conf or {})
        # Where funasr's WavFrontend defaults differ from this model's values (lfr 1/1, dither 1),
        # funasr's defaults win for missing keys: the config is what the model was run with.
        cfg = cls(
            sample_rate=int(conf.get("fs", 16000)),
            n_mels=int(conf.get("n_mels", 80)),
            frame_length_ms=float(conf.get("frame_length", 25)),
            frame_shift_ms=float(conf.get("frame_shift", 10)),
            window=str(conf.get("window", "hamming")),
            lfr_m=int(conf.get("lfr_m", 1)),
            lfr_n=int(conf.get("lfr_n", 1)),
            dither=float(conf.get("dither", 1.0)) if keep_dither else 0.0,
            snip_edges=bool(conf.get("snip_edges", True)),
            upscale_samples=bool(conf.get("upsacle_samples", conf.get("upscale_samples", True))),
            cmvn_file=None if conf.get("cmvn_file") in (None, "", "null", "None") else str(conf["cmvn_file"]),
        )
        if cfg.window not in _WINDOWS:
            raise ValueError(
                f"frontend_conf window={cfg.window!r} is not supported (use one of {list(_WINDOWS)})"
            )
        return cfg

    @property
    def frame_length(self) -> int:
        """Window length in samples (Kaldi truncates ms * rate / 1000 to an integer)."""
        return int(self.sample_rate * 0.001 * self.frame_length_ms)

    @property
    def frame_shift(self) -> int:
        """Window shift in samples."""
        return int(self.sample_rate * 0.001 * self.frame_shift_ms)

    @property
    def feature_dim(self) -> int:
        """Width of one LFR row (560 for this model)."""
        return self.n_mels * self.lfr_m


def _window(kind: str, n: int) -> np.ndarray:
    """Kaldi's (symmetric) window functions."""
    a = 2 * math.pi / (n - 1)
    i = np.arange(n, dtype=np.float64)
    if kind == "hamming":
        return 0.54 - 0.46 * np.cos(a * i)
    if kind == "hanning":
        return 0.5 - 0.5 * np.cos(a * i)
    if kind == "povey":
        return (0.5 - 0.5 * np.cos(a * i)) ** 0.85
    if kind == "rectangular":
        return np.ones(n)
    if kind == "blackman":
        return 0.42 - 0.5 * np.cos(a * i) + 0.08 * np.cos(2 * a * i)
    raise ValueError(f"unsupported window type {kind!r} (use one of {list(_WINDOWS)})")


_WINDOWS = ("hamming", "povey", "hanning", "rectangular", "blackman")


def _mel32(freq: np.ndarray) -> np.ndarray:
    """Kaldi's mel scale, 1127 ln(1 + f / 700), step by step in float32 like kaldi-native-fbank.

    The log is taken in float64 and rounded: that is what C's correctly rounded ``logf`` gives,
    while numpy's own float32 log can be an ulp off.
    """
    f32 = np.float32
    inner = f32(1.0) + np.asarray(freq, dtype=f32) / f32(700.0)
    return f32(1127.0) * np.log(inner.astype(np.float64)).astype(f32)


@functools.lru_cache(maxsize=8)
def _mel_matrix(sample_rate: int, n_fft: int, n_mels: int) -> np.ndarray:
    """Kaldi's triangular mel filters, (n_fft // 2, n_mels) float32: triangles on the mel axis.

    Computed in float32 in the same order as kaldi-native-fbank, so the weights equal the
    oracle's to ~1e-6: weights computed in float64 differ by ~1e-5, moving strong bands by ~1e-4.
    Kaldi ignores the Nyquist bin, hence n_fft // 2 rows, not n_fft // 2 + 1.
    """
    f32 = np.float32
    mel_low, mel_high = _mel32(f32(_LOW_FREQ)), _mel32(f32(0.5) * f32(sample_rate))
    delta = (mel_high - mel_low) / f32(n_mels + 1)
    bins = np.arange(n_mels, dtype=f32)[None, :]
    left = mel_low + bins * delta
    center = mel_low + (bins + f32(1.0)) * delta
    right = mel_low + (bins + f32(2.0)) * delta
    mels = _mel32((f32(sample_rate) / f32(n_fft)) * np.arange(n_fft // 2, dtype=f32))[:, None]
    weights = np.where(mels <= center, (mels - left) / (center - left), (right - mels) / (right - center))
    return np.where((mels > left) & (mels < right), weights, f32(0.0)).astype(np.float32)


def num_fbank_frames(num_samples: int, cfg: FrontendConfig = FrontendConfig()) -> int:
    """Number of Kaldi frames for ``num_samples`` samples (0 when shorter than one window)."""
    length, shift = cfg.frame_length, cfg.frame_shift
    if cfg.snip_edges:
        return 0 if num_samples < length else 1 + (num_samples - length) // shift
    return (num_samples + shift // 2) // shift


def _frames(x: np.ndarray, first: int, count: int, cfg: FrontendConfig) -> np.ndarray:
    """A float32 copy of frames first..first+count-1, (count, frame_length), Kaldi style."""
    length, shift = cfg.frame_length, cfg.frame_shift
    if cfg.snip_edges:
        view = np.lib.stride_tricks.sliding_window_view(x, length)
        return view[first * shift : (first + count - 1) * shift + 1 : shift].copy()
    # Frames centred on i * shift + shift / 2; the signal is reflected at both ends.
    starts = (first + np.arange(count)) * shift + shift // 2 - length // 2
    idx = starts[:, None] + np.arange(length)[None, :]
    n = len(x)
    while (idx < 0).any() or (idx >= n).any():  # repeated reflection only for tiny inputs
        idx = np.where(idx < 0, -idx - 1, idx)
        idx = np.where(idx >= n, 2 * n - 1 - idx, idx)
    return x[idx]


def _knf_available() -> bool:
    try:
        import kaldi_native_fbank  # noqa: F401
    except ImportError:
        return False
    return True


def _fbank_knf(x: np.ndarray, cfg: FrontendConfig) -> np.ndarray:
    """The oracle's own computation: kaldi-native-fbank, configured as funasr configures it."""
    import kaldi_native_fbank as knf

    opts = knf.FbankOptions()
    opts.frame_opts.samp_freq = float(cfg.sample_rate)
    opts.frame_opts.frame_length_ms = float(cfg.frame_length_ms)
    opts.frame_opts.frame_shift_ms = float(cfg.frame_shift_ms)
    opts.frame_opts.dither = 0.0
    opts.frame_opts.snip_edges = bool(cfg.snip_edges)
    opts.frame_opts.window_type = cfg.window
    opts.frame_opts.preemph_coeff = _PREEMPH
    opts.frame_opts.remove_dc_offset = True
    opts.frame_opts.round_to_power_of_two = True
    opts.mel_opts.num_bins = int(cfg.n_mels)
    opts.mel_opts.low_freq = _LOW_FREQ
    opts.mel_opts.high_freq = 0.0
    opts.energy_floor = 0.0
    opts.use_energy = False
    opts.use_log_fbank = True
    opts.use_power = True
    computer = knf.OnlineFbank(opts)
    # The binding takes a Python sequence; a list converts faster than a numpy array. Feeding it
    # piecewise keeps the temporary lists small; the online computer gives the same frames.
    step = _KNF_FEED_SAMPLES
    for start in range(0, len(x), step):
        computer.accept_waveform(float(cfg.sample_rate), x[start : start + step].tolist())
    computer.input_finished()
    n = computer.num_frames_ready
    out = np.empty((n, cfg.n_mels), np.float32)
    for i in range(n):
        out[i] = computer.get_frame(i)
    return out


def _fbank_numpy(x: np.ndarray, cfg: FrontendConfig, n_frames: int) -> np.ndarray:
    """Vectorized Kaldi fbank in float32: the same steps as kaldi-native-fbank, batched."""
    out = np.empty((n_frames, cfg.n_mels), np.float32)
    length = cfg.frame_length
    n_fft = 1 << (length - 1).bit_length()
    f32 = np.float32
    window = _window(cfg.window, length).astype(f32)
    mel = _mel_matrix(cfg.sample_rate, n_fft, cfg.n_mels).astype(f32)
    for first in range(0, n_frames, _FRAMES_PER_BATCH):
        count = min(_FRAMES_PER_BATCH, n_frames - first)
        frames = _frames(x, first, count, cfg)
        frames -= frames.mean(axis=1, keepdims=True)
        frames[:, 1:] -= f32(_PREEMPH) * frames[:, :-1]
        frames[:, 0] -= f32(_PREEMPH) * frames[:, 0]
        frames *= window
        spec = np.fft.rfft(frames, n=n_fft, axis=1)[:, : n_fft // 2]  # complex64 with numpy >= 2
        power = spec.real**2 + spec.imag**2
        out[first : first + count] = np.log(np.maximum(power @ mel, f32(_LOG_FLOOR)))
    return out


def fbank(wave: np.ndarray, cfg: FrontendConfig = FrontendConfig(), *, backend: str = "auto") -> np.ndarray:
    """Kaldi log-mel filterbank of a mono waveform in [-1, 1], (T, n_mels) float32.

    Same options as funasr's ``WavFrontend`` (remove DC, pre-emphasis 0.97, window, FFT padded to
    a power of two, power spectrum, mel energies floored at float32 eps). Dither is never applied.
    Returns (0, n_mels) when the audio is shorter than one window.

    ``backend``: "knf" runs kaldi-native-fbank, which is what funasr itself runs without
    torchaudio, so the result is bit-identical to the oracle (~0.1-0.2 s per minute of audio on
    a small CPU); "numpy" is a vectorized float32 reimplementation (about 2x faster: no per-sample
    binding conversion, batched FFTs) that differs only by float32 rounding in a different order:
    below 1e-4 (log units) in bands within 50 dB of the frame's loudest band, up to ~5e-4 in
    bands 65+ dB below it, mean ~1e-6. torchaudio's fbank (funasr's other backend) differs from
    kaldi-native-fbank by the same kind of noise.
    "auto" picks "knf" when it is installed.
    """
    x = np.asarray(wave)
    if x.ndim != 1:
        raise ValueError(f"fbank expects a 1-D mono waveform, got shape {x.shape}")
    x = x.astype(np.float32, copy=False)  # funasr feeds float32 samples
    if cfg.upscale_samples:
        x = x * np.float32(32768.0)
    n_frames = num_fbank_frames(len(x), cfg)
    if n_frames == 0:
        return np.zeros((0, cfg.n_mels), np.float32)
    if cfg.window not in _WINDOWS:
        raise ValueError(f"unsupported window type {cfg.window!r} (use one of {list(_WINDOWS)})")
    if backend == "auto":
        backend = "knf" if _knf_available() else "numpy"
    if backend == "knf":
        return _fbank_knf(x, cfg)
    if backend == "numpy":
        return _fbank_numpy(x, cfg, n_frames)
    raise ValueError(f"unknown fbank backend {backend!r} (use 'auto', 'knf' or 'numpy')")


def apply_lfr(feats: np.ndarray, m: int = 7, n: int = 6) -> np.ndarray:
    """Low-frame-rate stacking exactly as funasr's ``apply_lfr``: (ceil(T / n), D * m).

    Row i concatenates frames i*n - (m-1)//2 .. i*n - (m-1)//2 + m - 1; indices before the start
    repeat frame 0 and past the end repeat the last frame (funasr pads with copies of the last
    frame, enough for every row).
    """
    feats = np.asarray(feats)
    t, d = feats.shape
    if m == 1 and n == 1:
        return feats.astype(np.float32, copy=False)
    t_lfr = -(-t // n)
    if t == 0:
        return np.zeros((0, d * m), np.float32)
    idx = np.arange(t_lfr)[:, None] * n + np.arange(m)[None, :] - (m - 1) // 2
    np.clip(idx, 0, t - 1, out=idx)
    return feats[idx].reshape(t_lfr, d * m).astype(np.float32, copy=False)


def lfr_frame_count(num_samples: int, cfg: FrontendConfig = FrontendConfig()) -> int:
    """Number of LFR rows ``compute_features`` returns for ``num_samples`` samples."""
    t = num_fbank_frames(num_samples, cfg)
    return -(-t // cfg.lfr_n)


def audio_token_count(t_lfr: int) -> int:
    """Number of adaptor rows the official model feeds to the LLM for ``t_lfr`` LFR rows.

    ``FunASRNano.data_load_speech`` (use_low_frame_rate): two conv-style halvings
    ``1 + (L - 3 + 2) // 2`` then ``(L - 1) // 2 + 1``; about 2 rows per second of audio.
    """
    olens = 1 + (t_lfr - 3 + 2) // 2
    olens = 1 + (olens - 3 + 2) // 2
    return (olens - 1) // 2 + 1


@functools.lru_cache(maxsize=4)
def load_cmvn(cmvn_file: str) -> np.ndarray:
    """Read a Kaldi nnet-style ``am.mvn`` (``<AddShift>`` means, ``<Rescale>`` scales): (2, D).

    Same parsing as funasr's ``load_cmvn``. Fun-ASR-Nano has no CMVN, other funasr models do.
    """
    lines = Path(cmvn_file).read_text(encoding="utf-8").splitlines()
    shifts: list[str] = []
    scales: list[str] = []
    for i, line in enumerate(lines):
        items = line.split()
        if not items or i + 1 >= len(lines):
            continue
        nxt = lines[i + 1].split()
        if items[0] in ("<AddShift>", "<Rescale>") and nxt and nxt[0] == "<LearnRateCoef>":
            (shifts if items[0] == "<AddShift>" else scales).extend(nxt[3:-1])
    if not shifts or len(shifts) != len(scales):
        raise ValueError(f"{cmvn_file}: not a Kaldi <AddShift>/<Rescale> CMVN file")
    return np.array([shifts, scales], dtype=np.float32)


def compute_features(
    wave: np.ndarray, cfg: FrontendConfig = FrontendConfig(), *, backend: str = "auto"
) -> np.ndarray:
    """The encoder input for a 16 kHz mono waveform: fbank -> LFR (-> CMVN), (T_lfr, 560) float32.

    Audio shorter than one 25 ms window (400 samples) gives shape (0, 560). funasr instead shrinks
    the window to the clip: 257-399 samples give it one row, shorter clips make kaldi-native-fbank
    raise ("num_mel_bins too large"). Such clips hold no speech, so we do not copy that.
    """
    feats = apply_lfr(fbank(wave, cfg, backend=backend), cfg.lfr_m, cfg.lfr_n)
    if cfg.cmvn_file is not None:
        cmvn = load_cmvn(cfg.cmvn_file)
        dim = feats.shape[1]
        if cmvn.shape[1] < dim:
            raise ValueError(f"{cfg.cmvn_file}: CMVN has {cmvn.shape[1]} dims, features have {dim}")
        feats = (feats + cmvn[0, :dim]) * cmvn[1, :dim]
    return np.ascontiguousarray(feats, dtype=np.float32)
