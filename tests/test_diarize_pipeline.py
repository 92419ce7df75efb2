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
- The server: `response_format=diarized_json` parsed by the official `openai` client (plain and
  streamed), verbose_json and SRT with `diarize=true`; speakers and times equal the library's.
- Live streams: a session with `diarize` puts the online speaker (funasr_nano.speakers.online) of each
  turn on its completed event.

The dialogue and the model folder with FSMN-VAD and CAM++ are tests/conftest.py's fixtures.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testing.oracle import quiet_funasr
from tests.conftest import DIALOGUE_LINES as LINES

ROOT = Path(__file__).resolve().parent.parent
STEPS = 4


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


def test_server_diarized_json_and_verbose_json_speakers(dialogue: Path, diarize_models: Path) -> None:
    """A live server with CAM++ beside the model: the official client parses diarized_json (OpenAI's
    `TranscriptionDiarized`), plain and streamed, and verbose_json with diarize=true has a speaker per
    segment; the speakers and times are the library's on the same file (the text may differ: the server
    runs the cpu preset's int8 encoder)."""
    import httpx
    import openai
    import srt
    from openai.types.audio import TranscriptionDiarized

    from funasr_nano.engine import Engine, TranscribeOptions
    from funasr_nano.server.responses import speaker_label
    from funasr_nano.speakers.clustering import SpeakerCount
    from tests.server_process import KEY, Server

    gguf = diarize_models / "qwen3-0.6b-asr.f32.gguf"
    with Engine(diarize_models, gguf_path=gguf) as engine:
        ours = engine.transcribe(dialogue, TranscribeOptions(vad="fsmn", diarize=True, speakers=SpeakerCount(count=2),
                                                             max_new_tokens=STEPS))
    expected = [(round(s.start, 2), round(s.end, 2), s.speaker) for s in ours.segments]
    assert len(expected) == len(LINES)

    srv = Server(diarize_models, "--gguf", str(gguf), "--vad", "fsmn", "--max-new-tokens", str(STEPS),
                 "--api-key", KEY)
    try:
        assert httpx.get(f"{srv.url}/health", timeout=10).json()["diarization"] is True
        client = srv.client()
        with open(dialogue, "rb") as f:
            result = client.audio.transcriptions.create(model="fun-asr-nano", file=f, response_format="diarized_json",
                                                        extra_body={"speakers": 2})
        assert isinstance(result, TranscriptionDiarized)
        assert result.task == "transcribe" and result.duration > 20 and result.usage.type == "duration"
        assert [s.type for s in result.segments] == ["transcript.text.segment"] * len(LINES)
        assert len({s.id for s in result.segments}) == len(LINES)
        assert [(round(s.start, 2), round(s.end, 2), s.speaker) for s in result.segments] == \
            [(a, b, speaker_label(k)) for a, b, k in expected]
        assert result.segments[0].speaker == "A"

        # streamed: deltas, then OpenAI's segment events with the speakers, then done
        with open(dialogue, "rb") as f:
            events = list(client.audio.transcriptions.create(model="fun-asr-nano", file=f, stream=True,
                                                             response_format="diarized_json",
                                                             extra_body={"speakers": 2}))
        segment_events = [e for e in events if e.type == "transcript.text.segment"]
        assert [(e.id, e.speaker) for e in segment_events] == [(s.id, s.speaker) for s in result.segments]
        assert events[-1].type == "transcript.text.done" and events[-1].text == result.text

        # verbose_json with diarize=true: each segment's speaker (0-based, as the CLI's JSON) and the count
        with open(dialogue, "rb") as f:
            verbose = client.audio.transcriptions.create(model="fun-asr-nano", file=f, response_format="verbose_json",
                                                         extra_body={"diarize": True, "speakers": 2})
        body = verbose.model_dump()
        assert [(round(s["start"], 2), round(s["end"], 2), s["speaker"]) for s in body["segments"]] == expected
        assert body["speakers"] == ours.speakers == 2
        # without diarize: no speaker anywhere
        with open(dialogue, "rb") as f:
            plain = client.audio.transcriptions.create(model="fun-asr-nano", file=f, response_format="verbose_json")
        assert all("speaker" not in s for s in plain.model_dump()["segments"]) and "speakers" not in plain.model_dump()
        # SRT asked with diarize=true names the speakers, as the CLI's
        with open(dialogue, "rb") as f:
            subtitles = client.audio.transcriptions.create(model="fun-asr-nano", file=f, response_format="srt",
                                                           extra_body={"diarize": True, "speakers": 2})
        cues = list(srt.parse(subtitles))
        assert cues and all(c.content.startswith(("Speaker 1: ", "Speaker 2: ")) for c in cues)
        with open(dialogue, "rb") as f, pytest.raises(openai.BadRequestError) as caught:
            client.audio.transcriptions.create(model="fun-asr-nano", file=f, response_format="diarized_json",
                                               extra_body={"known_speaker_names": ["agent"]})
        assert "known_speaker_names" in str(caught.value)
    finally:
        assert srv.stop() in (0, -15), srv.output()
    assert "Traceback" not in srv.output()


def test_live_stream_finals_carry_online_speakers(dialogue: Path, diarize_models: Path, tmp_path: Path) -> None:
    """A real-time session with `diarize` (manual turns on the dialogue): each completed event has the speaker
    that funasr_nano.speakers.online gives the turn's CAM++ mean embedding, computed here directly; the event's
    JSON carries it as an extra field, session.update takes `diarize` (a boolean), and a server without
    campplus.onnx refuses it with one error event."""
    import types

    from funasr_nano.audio.load import load_audio
    from funasr_nano.config import TranscribeOptions
    from funasr_nano.engine import Engine
    from funasr_nano.realtime import RealtimeConfig, RealtimeSession, SessionSettings
    from funasr_nano.realtime.events import Error, SessionUpdated, TranscriptionCompleted
    from funasr_nano.realtime.protocol import handle, parse, render
    from funasr_nano.speakers.online import OnlineSpeakers, segment_embedding

    wave = load_audio(dialogue)
    pcm = (np.clip(np.round(wave * 32768), -32768, 32767)).astype(np.int16)
    cuts = np.linspace(0, len(pcm), 7).astype(int)  # six turns of equal length
    config = RealtimeConfig(options=TranscribeOptions(max_new_tokens=STEPS), max_lag_seconds=1e9, partials=False,
                            speaker_threshold=0.5, max_speakers=4)
    events: list = []
    with Engine(diarize_models, gguf_path=diarize_models / "qwen3-0.6b-asr.f32.gguf") as engine:
        with RealtimeSession(engine, SessionSettings(vad=None, diarize=True), config, events.append) as session:
            for a, b in zip(cuts, cuts[1:]):
                session.append(pcm[a:b])
                session.commit()
            assert session.finish(timeout=120)
        online = OnlineSpeakers(0.5, 4)
        want = [online.assign(segment_embedding(engine.speaker_embedder(), pcm[a:b].astype(np.float32) / 32768))
                for a, b in zip(cuts, cuts[1:])]
    finals = [e for e in events if isinstance(e, TranscriptionCompleted)]
    assert [e.speaker for e in finals] == want and want[0] == 0
    print(f"online speakers: {want}")
    assert render(finals[0])["speaker"] == 0
    assert "speaker" not in render(TranscriptionCompleted("item_1", "hi", 0, 100))
    update = {"type": "session.update", "session": {"audio": {"input": {"transcription": {"diarize": True}}}}}
    assert parse(json.dumps(update)).settings.diarize is True
    echoed = render(SessionUpdated("sess_1", parse(json.dumps(update)).settings))["session"]
    assert echoed["audio"]["input"]["transcription"]["diarize"] is True
    assert "diarize" not in render(SessionUpdated("sess_1", SessionSettings()))["session"]["audio"]["input"]["transcription"]
    update["session"]["audio"]["input"]["transcription"]["diarize"] = "yes"
    with pytest.raises(ValueError, match="diarize"):
        parse(json.dumps(update))
    # a server whose model folder has no CAM++: one error event, the settings unchanged
    update["session"]["audio"]["input"]["transcription"]["diarize"] = True
    bare = types.SimpleNamespace(model_dir=tmp_path, languages={"en": "英文"}, checkpoint="nano")
    fake = types.SimpleNamespace(engine=types.SimpleNamespace(settings=bare), settings=SessionSettings(),
                                 config=RealtimeConfig())
    (error,) = handle(fake, json.dumps(update))
    assert isinstance(error, Error) and error.code == "invalid_value" and "campplus.onnx" in error.message
