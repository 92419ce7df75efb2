"""`--diarize` end to end: the official composition's speakers, and what the outputs show.

- Whole pipeline: funasr's `AutoModel(model=<nano>, vad_model=<fsmn-vad>, spk_model=<cam++>)` on a
  two-voice espeak-ng dialogue (release-shaped random-weight checkpoints of all three: tiny Nano,
  the FSMN-VAD whose score follows loudness, full-shape CAM++) gives `sentence_info`, one entry per
  VAD segment with its `spk`; ours (`Engine`, `--vad fsmn`, `diarize=True`) must give the same
  segments (ms) with the same speakers, with the count found and with `preset_spk_num=2`. The
  segments are exact because both run the same FSMN-VAD (tests/test_fsmn_vad.py).
- Outputs: 03 --diarize writes `speaker` in JSON (segments and sentences, `speakers` at the top),
  SRT cues with `Speaker N: ` that the `srt` package parses, WebVTT cues whose voice the `webvtt`
  package reads, txt paragraphs per turn; set-up errors are one line, exit 2.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testing.campplus_checkpoint import build_campplus_checkpoint
from testing.fsmn_checkpoint import build_fsmn_checkpoint
from testing.oracle import quiet_funasr
from tests.audio_fixtures import espeak_wav

ROOT = Path(__file__).resolve().parent.parent
SR = 16000
STEPS = 4
LINES = [("en", "Good morning, did you read the report I sent yesterday afternoon?"),
         ("en+f3", "Yes, I read all of it last night, and I have a few questions about the numbers."),
         ("en", "Of course, the numbers in the second table come from the spring survey."),
         ("en+f3", "Then the totals should match the first table, but they do not match at all."),
         ("en", "You are right, I will check them again and send you a corrected version."),
         ("en+f3", "Thank you, please send it before the meeting on Thursday morning.")]


@pytest.fixture(scope="module")
def dialogue(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two espeak-ng voices taking turns, 2 s of silence between turns (the loudness FSMN-VAD cuts at 2 s, not at 1.2 s)."""
    import soundfile

    from funasr_nano.audio.load import load_audio

    folder = tmp_path_factory.mktemp("dialogue")
    parts = []
    for i, (voice, text) in enumerate(LINES):
        parts += [load_audio(espeak_wav(folder / f"{i}.wav", text, voice=voice, speed=150)),
                  np.zeros(int(2.0 * SR), np.float32)]
    path = folder / "dialogue.wav"
    soundfile.write(str(path), np.concatenate(parts), SR, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def releases(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    base = tmp_path_factory.mktemp("releases")
    return {"fsmn": build_fsmn_checkpoint(base / "fsmn", "energy", 0),
            "campplus": build_campplus_checkpoint(base / "campplus", seed=11)}


@pytest.fixture(scope="module")
def diarize_models(tiny2_models: Path, releases: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny2 export (no CTC head: funasr's timestamps need torchaudio) with FSMN-VAD and CAM++ beside it."""
    from funasr_nano.export.export_campplus import export_campplus
    from funasr_nano.export.export_fsmn_vad import export_fsmn_vad

    extra = tmp_path_factory.mktemp("diarize_export")
    export_fsmn_vad(releases["fsmn"], extra)
    export_campplus(releases["campplus"], extra)
    folder = tmp_path_factory.mktemp("diarize_models") / "tiny2"
    folder.mkdir()
    for item in [*tiny2_models.iterdir(), *extra.iterdir()]:
        if not item.name.startswith("."):  # not the session caches: each folder makes its own
            (folder / item.name).symlink_to(item)
    return folder


def _funasr_pipeline(nano: Path, releases: dict[str, Path]):
    """AutoModel(model=<nano>, vad_model=<fsmn>, spk_model=<cam++>), set up like testing/oracle.py's."""
    import funasr.models.fun_asr_nano.model as nano_module
    import torch
    from funasr import AutoModel

    nano_module.forced_align = lambda *args, **kwargs: []  # needs torchaudio; as testing/oracle.py does
    torch.manual_seed(0)
    with quiet_funasr():
        return AutoModel(model=str(nano), vad_model=str(releases["fsmn"]),
                         vad_kwargs={"max_single_segment_time": 30000}, spk_model=str(releases["campplus"]),
                         disable_update=True, device="cpu", ncpu=2, hub="ms", frontend_conf={"dither": 0.0},
                         disable_pbar=True, log_level="ERROR")


def test_speakers_equal_funasr_pipeline(dialogue: Path, diarize_models: Path, tiny2_ckpt: Path,
                                        releases: dict[str, Path]) -> None:
    import torch

    from funasr_nano.engine import Engine, TranscribeOptions
    from funasr_nano.speakers.clustering import SpeakerCount

    auto = _funasr_pipeline(tiny2_ckpt, releases)
    with Engine(diarize_models, gguf_path=diarize_models / "qwen3-0.6b-asr.f32.gguf") as engine:
        for count in (None, 2):
            options = TranscribeOptions(vad="fsmn", diarize=True, speakers=SpeakerCount(count=count),
                                        max_new_tokens=STEPS)
            ours = engine.transcribe(dialogue, options)
            kwargs = {} if count is None else {"preset_spk_num": count}
            with torch.no_grad(), quiet_funasr():
                res = auto.generate(input=str(dialogue), cache={}, batch_size=1, max_length=STEPS, **kwargs)
            theirs = [(int(s["start"]), int(s["end"]), s["spk"]) for s in res[0]["sentence_info"]]
            mine = [(round(s.start * 1000), round(s.end * 1000), s.speaker) for s in ours.segments]
            assert len(mine) == len(LINES)
            assert mine == theirs, count
            assert ours.speakers >= len({spk for _, _, spk in theirs})  # turns' speakers; a segment takes one
            assert ours.timings.diarize is not None and ours.timings.diarize > 0
            if count == 2:
                assert ours.speakers == 2
            print(f"speakers (count {count}): {[s for _, _, s in mine]}")


def _run(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "03_inference_cpu.py"), *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=300, env=dict(os.environ))


def test_cli_outputs_show_speakers(dialogue: Path, diarize_models: Path, tmp_path: Path) -> None:
    import srt
    import webvtt

    common = ["--model-dir", str(diarize_models), "--gguf", str(diarize_models / "qwen3-0.6b-asr.f32.gguf"),
              "--vad", "fsmn", "--max-new-tokens", str(STEPS), "--threads", "2", "--speakers", "2"]
    proc = _run(str(dialogue), *common, "--format", "json,srt,vtt,txt", "--output-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stderr
    data = json.loads((tmp_path / "dialogue.json").read_text(encoding="utf-8"))
    assert data["speakers"] == 2
    assert all(seg["speaker"] in (0, 1) for seg in data["segments"])
    assert all("speaker" in s for seg in data["segments"] for s in seg["sentences"])
    # random CAM++ weights do not tell these voices apart segment by segment: which speakers, see
    # test_outputs_name_each_speaker; here every cue and paragraph carries one
    subs = list(srt.parse((tmp_path / "dialogue.srt").read_text(encoding="utf-8")))
    assert subs and all(s.content.startswith(("Speaker 1: ", "Speaker 2: ")) for s in subs)
    captions = webvtt.read(str(tmp_path / "dialogue.vtt")).captions
    assert captions and {c.voice for c in captions} <= {"Speaker 1", "Speaker 2"} and None not in {c.voice for c in captions}
    txt = (tmp_path / "dialogue.txt").read_text(encoding="utf-8")
    paragraphs = [p for p in txt.strip().split("\n\n") if p]
    assert paragraphs[0].startswith("Speaker 1: ")
    assert all(p.startswith(("Speaker 1: ", "Speaker 2: ")) for p in paragraphs)
    # txt on stdout: the same turns, printed once the input is read
    proc = _run(str(dialogue), *common)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == txt.strip()


def test_cli_diarize_errors(dialogue: Path, tiny2_models: Path, diarize_models: Path) -> None:
    proc = _run(str(dialogue), "--model-dir", str(tiny2_models), "--diarize", "--vad", "none")
    assert proc.returncode == 2
    assert proc.stderr.strip().count("\n") == 0 and "campplus.onnx" in proc.stderr and "--spk-release-dir" in proc.stderr
    proc = _run(str(dialogue), "--model-dir", str(diarize_models), "--min-speakers", "3", "--max-speakers", "2")
    assert proc.returncode == 2 and proc.stderr.startswith("error: --min-speakers 3 --max-speakers 2")


def test_outputs_name_each_speaker(tmp_path: Path) -> None:
    """Two speakers, the second one's turn split across segments: SRT prefixes, WebVTT voices, txt turns."""
    import srt
    import webvtt

    from funasr_nano.output.results import Segment, Sentence, Timings, Transcript
    from funasr_nano.output.writers import render

    segments = [
        Segment(0.0, 3.0, "Hello there. How are you?", [], 0, speaker=0,
                sentences=[Sentence(0.0, 1.2, "Hello there.", 0), Sentence(1.2, 3.0, "How are you?", 1)]),
        Segment(3.5, 6.0, "Fine, thanks. And you?", [], 0, speaker=1,
                sentences=[Sentence(3.5, 5.0, "Fine, thanks.", 1), Sentence(5.0, 6.0, "And you?", 0)]),
    ]
    transcript = Transcript(source="x.wav", text="Hello there. How are you? Fine, thanks. And you?", duration=6.0,
                            segments=segments, timings=Timings(), n_tokens=0, language="en", speakers=2)
    data = json.loads(render(transcript, "json"))
    assert data["speakers"] == 2 and [s["speaker"] for s in data["segments"]] == [0, 1]
    assert [s["speaker"] for seg in data["segments"] for s in seg["sentences"]] == [0, 1, 1, 0]
    subs = list(srt.parse(render(transcript, "srt")))
    assert [s.content for s in subs] == ["Speaker 1: Hello there.", "Speaker 2: How are you?",
                                         "Speaker 2: Fine, thanks.", "Speaker 1: And you?"]
    (tmp_path / "x.vtt").write_text(render(transcript, "vtt"), encoding="utf-8")
    captions = webvtt.read(str(tmp_path / "x.vtt")).captions
    assert [c.voice for c in captions] == ["Speaker 1", "Speaker 2", "Speaker 2", "Speaker 1"]
    assert render(transcript, "txt") == ("Speaker 1: Hello there.\n\nSpeaker 2: How are you? Fine, thanks.\n\n"
                                         "Speaker 1: And you?\n")
    plain = Transcript(source="x.wav", text="Hi.", duration=1.0, segments=[Segment(0.0, 1.0, "Hi.", [], 0)],
                       timings=Timings(), n_tokens=0, language="en")
    assert "speaker" not in render(plain, "json") and render(plain, "srt").splitlines()[2] == "Hi."
