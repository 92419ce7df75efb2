"""Long-audio cases: the clip repeated to minutes and hours, a mixed-length file, and their runs."""

from __future__ import annotations

import argparse
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]

from benchmarks.report import MIXED_RATE  # noqa: E402
from benchmarks.workers import _duration_seconds, run_child  # noqa: E402
from funasr_nano.presets import PRESETS  # noqa: E402


def long_audio_file(clip: Path, minutes: float, folder: Path) -> Path:
    """`clip` + 1 s of silence, repeated to last `minutes`, as an mp3 (built once, cached by name)."""
    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{clip.stem}-{minutes:g}min.mp3"
    if out.is_file():
        return out
    unit = folder / f"{clip.stem}-unit.wav"
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-i", str(clip), "-af", "apad=pad_dur=1", "-ar", "16000",
                    "-ac", "1", str(unit)], check=True)
    repeats = max(1, round(minutes * 60 / _duration_seconds(str(unit))))
    part = out.with_name(out.name + ".part.mp3")
    subprocess.run(["ffmpeg", "-v", "error", "-y", "-stream_loop", str(repeats - 1), "-i", str(unit),
                    "-c:a", "libmp3lame", "-b:a", "48k", str(part)], check=True)
    part.rename(out)
    return out


def mixed_audio_file(clip: Path, minutes: float, folder: Path, seed: int = 0) -> Path:
    """Slices of `clip` 1 to 10 s long (seeded), each followed by 1 s of silence, for `minutes` (a wav)."""
    import numpy as np
    import soundfile as sf

    folder.mkdir(parents=True, exist_ok=True)
    out = folder / f"{clip.stem}-mixed-{minutes:g}min.wav"
    if out.is_file():
        return out
    raw = subprocess.run(["ffmpeg", "-v", "error", "-i", str(clip), "-f", "f32le", "-ac", "1", "-ar", "16000", "-"],
                         check=True, capture_output=True).stdout
    wave = np.frombuffer(raw, dtype=np.float32)
    sr, rng = 16000, np.random.default_rng(seed)
    gap = np.zeros(sr, dtype=np.float32)
    parts, total = [], 0
    while total < minutes * 60 * sr:
        length = int(rng.uniform(1.0, min(10.0, len(wave) / sr)) * sr)
        start = int(rng.integers(0, len(wave) - length + 1))
        parts += [wave[start:start + length], gap]
        total += length + len(gap)
    part = out.with_name(out.name + ".part.wav")
    sf.write(part, np.concatenate(parts), sr, subtype="PCM_16")
    part.rename(out)
    return out


def run_long_cases(args: argparse.Namespace, models: Path, common: dict[str, Any],
                   results: dict[str, dict[str, Any]], say: Callable[[str], None]) -> None:
    """Issue 7's cases on the cpu-int8 preset through the VAD path (speculation off: random weights)."""
    preset = PRESETS["cpu-int8"]
    base = {"kind": "long", "model_dir": str(models), "encoder": str(models / preset.encoder_file),
            "gguf": str(models / preset.gguf_file), **common}
    folder = args.cache / "audio"
    throughput = long_audio_file(args.audio, args.long_minutes, folder)
    for label, width in (("sequential", 1), (f"batched x{args.long_batch}", args.long_batch)):
        say(f"long audio {args.long_minutes:g} min, {label}, {args.tokens} tokens per segment ...")
        results[f"long {label}"] = run_child({**base, "audio": str(throughput), "n_seq_max": width},
                                             args.threads, args.child_timeout)
    mixed = mixed_audio_file(args.audio, args.mixed_minutes, folder)
    b = args.long_batch
    for label, width, refill in (("sequential", 1, True), (f"batched x{b}, fixed groups", b, False),
                                 (f"batched x{b}", b, True)):
        say(f"mixed-length audio {args.mixed_minutes:g} min, {label}, {MIXED_RATE:g} tokens/s ...")
        results[f"mixed {label}"] = run_child({**base, "audio": str(mixed), "n_seq_max": width, "rate": MIXED_RATE,
                                               "refill": refill}, args.threads, args.child_timeout)
    memory = long_audio_file(args.audio, args.rss_minutes, folder)
    for minutes, path in ((args.long_minutes, throughput), (args.rss_minutes, memory)):
        say(f"long audio peak RSS, {minutes:g} min file, 1 token per segment, batch 4 ...")
        results[f"rss {minutes:g} min"] = run_child({**base, "audio": str(path), "n_seq_max": 4, "tokens": 1},
                                                    args.threads, args.child_timeout)
