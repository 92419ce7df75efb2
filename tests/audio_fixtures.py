"""Test audio generators shared by the test modules: synthetic tones, espeak-ng speech, AAC.

Everything is generated in-process (numpy + soundfile, PyAV) or with espeak-ng, so no test
depends on audio files beyond the shared 10 s news clip.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import numpy as np

SHARED_MP3 = Path(__file__).resolve().parents[1].parent / "shared" / "audio" / "zh_news_10s.mp3"


def tone_signal(sr: int, channels: int = 1, seconds: float = 1.0, seed: int = 0) -> np.ndarray:
    """(n, channels) float32: a chirp per channel (different sweep each) plus a little noise.

    Broadband on purpose: a pure tone leaves most mel bands nearly empty, which would only test
    the log floor; a chirp + noise exercises every band and the channel mix.
    """
    rng = np.random.default_rng(seed)
    t = np.arange(int(round(sr * seconds))) / sr
    cols = [
        0.3 * np.sin(2 * np.pi * (150 + (600 + 250 * c) * t) * t) + 0.02 * rng.standard_normal(len(t))
        for c in range(channels)
    ]
    return np.stack(cols, axis=1).astype(np.float32)


def make_tone_wav(
    path: str | Path,
    sr: int = 16000,
    channels: int = 1,
    seconds: float = 1.0,
    subtype: str = "PCM_16",
    seed: int = 0,
) -> Path:
    """Write ``tone_signal`` to ``path``; the format follows the suffix (.wav, .flac, .ogg)."""
    import soundfile

    path = Path(path)
    soundfile.write(str(path), tone_signal(sr, channels, seconds, seed), sr, subtype=subtype)
    return path


def have_espeak() -> bool:
    """Whether espeak-ng is on PATH (tests that need speech skip without it)."""
    return shutil.which("espeak-ng") is not None


def espeak_wav(path: str | Path, text: str, voice: str = "en", speed: int | None = None) -> Path:
    """Synthesize ``text`` with espeak-ng into a WAV (22050 Hz mono 16-bit, espeak's native)."""
    path = Path(path)
    cmd = ["espeak-ng", "-v", voice, "-w", str(path)]
    if speed is not None:
        cmd += ["-s", str(speed)]
    subprocess.run([*cmd, text], check=True, capture_output=True)
    return path


def make_aac_m4a(path: str | Path, sr: int = 44100, channels: int = 2, seconds: float = 2.0) -> Path:
    """Encode ``tone_signal`` as AAC in an .m4a with PyAV's bundled FFmpeg (a format that
    libsndfile cannot read, so it exercises the FFmpeg fallback)."""
    import av

    path = Path(path)
    data = tone_signal(sr, channels, seconds)
    layout = {1: "mono", 2: "stereo"}[channels]
    with av.open(str(path), "w") as out:
        stream = out.add_stream("aac", rate=sr, layout=layout)
        step = 1024
        for start in range(0, len(data), step):
            chunk = np.ascontiguousarray(data[start : start + step].T)  # planar (channels, n)
            frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout=layout)
            frame.sample_rate = sr
            for packet in stream.encode(frame):
                out.mux(packet)
        for packet in stream.encode(None):
            out.mux(packet)
    return path


SENTENCES = ["Hello there, this is the first sentence.", "Speech recognition works on small computers.",
             "The last words of the test."]
SILENCES = [1.5, 1.0, 2.5, 1.2]  # before, between, between, after

def speech_layout(folder: Path) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """espeak-ng sentences separated by exact silences; truth = first/last audible sample of each."""
    from funasr_nano.audio.load import load_audio

    if not have_espeak():
        raise RuntimeError("espeak-ng is not installed (.ci/run installs it)")
    SR = 16000
    parts, truth, t = [], [], 0.0
    for i, text in enumerate(SENTENCES):
        parts.append(np.zeros(int(SILENCES[i] * SR), np.float32))
        t += SILENCES[i]
        speech = load_audio(espeak_wav(folder / f"s{i}.wav", text, speed=160))
        loud = np.flatnonzero(np.abs(speech) > 0.01)
        speech = speech[loud[0]: loud[-1] + 1]
        parts.append(speech)
        truth.append((t, t + len(speech) / SR))
        t += len(speech) / SR
    parts.append(np.zeros(int(SILENCES[-1] * SR), np.float32))
    return np.concatenate(parts), truth
