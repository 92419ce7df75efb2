"""Seconds per audio hour of each VAD (Silero, FSMN-VAD) on this machine, in one run, for docs/performance.md.

Both stream the same audio (espeak-ng sentences with pauses, repeated) in the engine's 60 s blocks
through their segmenters (`SpeechSegmenter`, `FsmnSegmenter`), one thread each. FSMN-VAD runs a
release-shaped checkpoint with random weights (`testing/fsmn_checkpoint.py`): the real release has
the same shape, so the cost is the same; the segments are not meaningful.

Usage: python -m benchmarks.vad_speed [--minutes 5]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np

SR = 16000
BLOCK = 60 * SR


def speech(minutes: float, folder: Path) -> np.ndarray:
    from funasr_nano.audio.load import load_audio
    from tests.audio_fixtures import espeak_wav

    clips = [load_audio(espeak_wav(folder / f"s{i}.wav", text, speed=160)) for i, text in enumerate(
        ["Hello there, this is the first sentence.", "Speech recognition works on small computers.",
         "Pauses of many lengths separate the sentences here."])]
    parts, n, i = [], 0, 0
    while n < minutes * 60 * SR:
        pause = np.zeros(int((0.3 + 0.7 * (i % 4)) * SR), np.float32)
        parts += [clips[i % len(clips)], pause]
        n += len(parts[-2]) + len(pause)
        i += 1
    return np.concatenate(parts)[: int(minutes * 60 * SR)]


def per_hour(segmenter, wave: np.ndarray) -> tuple[float, int]:
    t0 = time.perf_counter()
    n = sum(1 for _ in segmenter.segments(wave[i:i + BLOCK] for i in range(0, len(wave), BLOCK)))
    return (time.perf_counter() - t0) * 3600 * SR / len(wave), n


def main(argv: list[str] | None = None) -> int:
    from funasr_nano.audio.fsmn_vad import FsmnSegmenter, FsmnVad
    from funasr_nano.audio.vad import SileroVad, SpeechSegmenter, find_vad_model
    from funasr_nano.export.export_fsmn_vad import export_fsmn_vad
    from testing.fsmn_checkpoint import build_fsmn_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=5.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        wave = speech(args.minutes, folder)
        export_fsmn_vad(build_fsmn_checkpoint(folder / "fsmn", "energy"), folder / "out")
        silero_path = find_vad_model(None)
        if silero_path is None:
            raise SystemExit("silero-vad is not installed")
        results = {
            "silero": per_hour(SpeechSegmenter(SileroVad(silero_path)), wave),
            "fsmn": per_hour(FsmnSegmenter(FsmnVad(folder / "out" / "fsmn_vad.onnx")), wave),
        }
    for name, (seconds, n) in results.items():
        print(f"{name}: {seconds:.1f} s per audio hour ({n} segments in {args.minutes:g} min)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
