"""Sentence-level SRT / VTT cues: ordered, short, parsed by the `srt` and `webvtt-py` packages."""

from __future__ import annotations

import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from funasr_nano.output.subtitles import render_srt, render_vtt, split_sentences, transcript_cues

ROOT = Path(__file__).resolve().parent.parent
SR = 16000


# --------------------------------------------------------------------------- subtitles


@dataclass
class _Seg:
    start: float
    end: float
    text: str


SEGS = [
    _Seg(1.0, 9.0, "今天天气很好。我们去公园散步吧！你觉得怎么样？"),
    _Seg(9.5, 30.0, "This is a long sentence, with several clauses, that goes on and on without ending soon, "
                    "because subtitles must stay short. Next one."),
    _Seg(31.0, 31.4, "好。"),
    _Seg(40.0, 41.0, ""),
]


def _check_cues(cues, max_cue):
    assert cues
    for a, b in zip(cues, cues[1:]):
        assert a.end <= b.start
    for c in cues:
        assert c.end > c.start and c.end - c.start <= max_cue + 0.01 and c.text.strip()


def test_sentences_split_at_end_marks():
    assert split_sentences("今天天气很好。我们去公园散步吧！你觉得怎么样？") == ["今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？"]
    assert split_sentences("It costs 3.5 dollars. Then he left!") == ["It costs 3.5 dollars.", "Then he left!"]


@pytest.mark.parametrize("max_cue", [6.0, 2.5])
def test_srt_and_vtt_parse_and_cues_are_ordered(max_cue, tmp_path):
    import srt
    import webvtt

    cues = transcript_cues(SEGS, max_cue)
    _check_cues(cues, max_cue)
    parsed = list(srt.parse(render_srt(cues)))
    assert [p.content for p in parsed] == [c.text for c in cues]
    assert [p.start.total_seconds() for p in parsed] == pytest.approx([c.start for c in cues])
    vtt_path = tmp_path / "x.vtt"
    vtt_path.write_text(render_vtt(cues), encoding="utf-8")
    captions = webvtt.read(str(vtt_path))
    assert [c.text for c in captions] == [c.text for c in cues]
    def seconds(stamp: str) -> float:
        h, m, s = stamp.split(":")
        return int(h) * 3600 + int(m) * 60 + float(s)

    assert [seconds(c.end) for c in captions] == pytest.approx([round(c.end, 3) for c in cues], abs=1e-6)
    joined = "".join(c.text for c in cues if not c.text.isascii())
    assert joined == SEGS[0].text + SEGS[2].text  # nothing lost


def test_cli_writes_subtitles(tiny_models, clip, tmp_path):
    import soundfile
    import srt
    import webvtt

    wave = np.concatenate([np.zeros(SR, np.float32), clip, np.zeros(2 * SR, np.float32), clip[: 5 * SR]])
    path = tmp_path / "talk.wav"
    soundfile.write(str(path), wave, SR)
    cmd = [sys.executable, str(ROOT / "03_inference_cpu.py"), str(path), "--model-dir", str(tiny_models),
           "--max-new-tokens", "6", "--threads", "2", "--max-cue-seconds", "3"]
    proc = subprocess.run([*cmd, "--format", "srt"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    subs = list(srt.parse(proc.stdout))
    assert subs and subs[0].start.total_seconds() >= 0.8
    proc = subprocess.run([*cmd, "--format", "vtt", "--output-dir", str(tmp_path / "out")], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    captions = webvtt.read(str(tmp_path / "out" / "talk.vtt"))
    assert len(captions) == len(subs)
