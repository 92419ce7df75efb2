"""Real-time transcription (funasr_nano/realtime, 06_microphone.py) on the tiny exported model.

The oracle for a final is offline transcription of the same samples: the VAD's segments of the
whole waveform (`speech_spans`, the offline segmenter), each transcribed alone by
`Engine.transcribe(slice, vad="none")`. Audio goes in as PCM16, so the reference waveform is the
PCM16 samples too. Session level first, then the protocol, the WebSocket endpoint and the script.
"""

from __future__ import annotations

import base64
import dataclasses
import json
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from funasr_nano.audio.load import load_audio
from funasr_nano.audio.vad import SileroVad, VadOptions, find_vad_model, speech_spans
from funasr_nano.config import TranscribeOptions
from funasr_nano.engine import Engine
from funasr_nano.models.llm import DecoderOptions
from funasr_nano.presets import GGUF_Q8_0, context_per_sequence
from funasr_nano.realtime import RealtimeConfig, RealtimeSession, SessionSettings
from funasr_nano.realtime.events import (
    Committed,
    Error,
    SpeechStarted,
    SpeechStopped,
    TranscriptionCompleted,
    TranscriptionDelta,
)
from funasr_nano.realtime.protocol import encode_audio, handle, parse, render
from tests.audio_fixtures import espeak_wav, have_espeak

ROOT = Path(__file__).resolve().parent.parent
SR = 16000
MAX_TOKENS = 16  # random weights rarely stop: keep every final short
CONFIG = RealtimeConfig(options=TranscribeOptions(max_new_tokens=MAX_TOKENS))
FLOOD = dataclasses.replace(CONFIG, max_lag_seconds=1e9)  # audio sent as fast as it goes: never dropped
OFFLINE = TranscribeOptions(max_new_tokens=MAX_TOKENS, vad="none")


def pcm16(wave: np.ndarray) -> np.ndarray:
    return np.clip(np.round(wave * 32768), -32768, 32767).astype(np.int16)


@pytest.fixture(scope="module")
def speech(zh_mp3: Path, tmp_path_factory) -> np.ndarray:
    """PCM16 samples: silence, two espeak sentences and a piece of the news clip, with pauses between."""
    if not have_espeak():
        pytest.skip("espeak-ng is not installed")
    folder = tmp_path_factory.mktemp("rt")
    silence = np.zeros(SR, np.float32)
    parts = [silence]
    for i, text in enumerate(["The weather is nice today.", "Please send me the report by Friday."]):
        parts += [load_audio(espeak_wav(folder / f"s{i}.wav", text, speed=160)), silence]
    parts += [load_audio(zh_mp3)[: 5 * SR], silence]
    return pcm16(np.concatenate(parts))


@pytest.fixture(scope="module")
def engine(tiny_models: Path):
    with Engine.from_preset("cpu-int8", tiny_models, batch_size=4, max_new_tokens=MAX_TOKENS,
                            batch_invariant=True) as eng:
        yield eng


@pytest.fixture(scope="module")
def expected(engine: Engine, tiny_models: Path, speech: np.ndarray) -> list[tuple[int, int, str]]:
    """(start ms, end ms, text) of each offline segment of `speech`."""
    wave = speech.astype(np.float32) / 32768
    spans = speech_spans(wave, SileroVad(find_vad_model(tiny_models)), VadOptions(max_segment_seconds=30.0))
    assert len(spans) >= 3, spans
    return [(round(s.start / 16), round(s.end / 16), engine.transcribe(wave[s.start: s.end], OFFLINE).segments[0].text)
            for s in spans]


class Recorder:
    """The events a session hands out, in order."""

    def __init__(self) -> None:
        self.events: list = []

    def __call__(self, event) -> None:
        self.events.append(event)

    def of(self, kind) -> list:
        return [e for e in self.events if isinstance(e, kind)]


def stream(session: RealtimeSession, samples: np.ndarray, pace: float | None, chunk_seconds: float = 0.1) -> list:
    """Append `samples` in chunks, `pace` times faster than real time (None: as fast as possible); then finish."""
    replies = []
    chunk = int(chunk_seconds * session.settings.sample_rate)
    t0 = time.monotonic()
    for start in range(0, len(samples), chunk):
        replies += session.append(samples[start: start + chunk].tobytes())
        if pace:
            time.sleep(max(0.0, t0 + (start + chunk) / session.settings.sample_rate / pace - time.monotonic()))
    assert session.finish(timeout=120)
    return replies


def finals(recorder: Recorder) -> list[tuple[int, int, str]]:
    return [(e.audio_start_ms, e.audio_end_ms, e.transcript) for e in recorder.of(TranscriptionCompleted)]


def check_item_order(recorder: Recorder) -> None:
    """Per item: started, deltas, stopped, committed, completed, in that order."""
    order = {SpeechStarted: 0, TranscriptionDelta: 1, SpeechStopped: 2, Committed: 3, TranscriptionCompleted: 4}
    by_item: dict[str, list[int]] = {}
    for event in recorder.events:
        if type(event) in order:
            by_item.setdefault(event.item_id, []).append(order[type(event)])
    for item, seen in by_item.items():
        assert seen == sorted(seen) and seen[0] == 0 and seen[-1] == 4 and seen.count(4) == 1, (item, seen)


# --------------------------------------------------------------------------- session level


@pytest.mark.parametrize("pace", [1.0, 4.0])
def test_streamed_finals_equal_offline_segments_with_partials_during_speech(engine, speech, expected, pace):
    recorder = Recorder()
    with RealtimeSession(engine, SessionSettings(), CONFIG, recorder) as session:
        replies = stream(session, speech, pace)
    assert replies == [] and session.dropped_seconds == 0
    assert finals(recorder) == expected
    check_item_order(recorder)
    stopped = {e.item_id for e in recorder.of(SpeechStopped)}
    with_partials = {e.item_id for e in recorder.of(TranscriptionDelta)}
    assert with_partials and with_partials <= stopped  # deltas only for open items, before they stop
    for item in with_partials:  # concatenated deltas: the partial text whenever they extend it
        sent = ""
        for d in (e for e in recorder.of(TranscriptionDelta) if e.item_id == item):
            sent += d.delta
            assert d.partial and (not d.delta or sent == d.partial)


def test_two_sessions_and_file_requests_at_once_stay_correct(engine, speech, expected, zh_mp3):
    alone = engine.transcribe(zh_mp3, TranscribeOptions(max_new_tokens=MAX_TOKENS))
    recorders = [Recorder(), Recorder()]
    sessions = [RealtimeSession(engine, SessionSettings(), CONFIG, r) for r in recorders]
    # one ONNX Runtime session for every stream (the engine's), each stream its own recurrent state
    vads = [s._segmenter.vad for s in sessions]
    assert vads[0] is not vads[1] and vads[0].session is vads[1].session is engine.silero_vad().session
    threads = [threading.Thread(target=stream, args=(s, speech, 4.0)) for s in sessions]
    for t in threads:
        t.start()
    files = [engine.transcribe(zh_mp3, TranscribeOptions(max_new_tokens=MAX_TOKENS)) for _ in range(2)]
    for t in threads:
        t.join()
    for s in sessions:
        s.close()
    assert [finals(r) for r in recorders] == [expected, expected]
    assert [[s.token_ids for s in f.segments] for f in files] == [[s.token_ids for s in alone.segments]] * 2


def test_streams_take_turns_encoding_partials(engine, speech):
    """One partial is encoded at a time per engine: while one stream's runs, another's try gives None at once."""
    from types import SimpleNamespace

    from funasr_nano.realtime.partials import PartialBudget, PartialTranscriber

    inside, release = threading.Event(), threading.Event()

    def blocking_run(feats):
        inside.set()
        release.wait(30)
        return engine.encoder.run(feats)

    class SharedEngine:  # what a partial uses of an Engine, its encoder blocking until released
        frontend, ctc, encoder = engine.frontend, engine.ctc, SimpleNamespace(run=blocking_run)
        partial_budget = PartialBudget()  # an engine's own: its streams' partials take turns on it

    shared = SharedEngine()
    first, second = PartialTranscriber(shared), PartialTranscriber(shared)
    audio = speech[: 2 * SR].astype(np.float32) / 32768.0
    got: list[str | None] = []
    worker = threading.Thread(target=lambda: got.append(first.try_update(audio)))
    worker.start()
    assert inside.wait(30)
    assert second.try_update(audio) is None  # the turn is taken: no waiting, no encoding
    release.set()
    worker.join(30)
    assert got and got[0] is not None
    assert second.try_update(audio) == got[0]  # its turn now
    assert PartialTranscriber(engine).try_update(audio) is not None  # another engine has its own turn


def test_manual_turns_end_at_commits(engine, speech):
    recorder = Recorder()
    wave = speech.astype(np.float32) / 32768
    cuts = [(0, 3 * SR), (3 * SR, 7 * SR)]
    with RealtimeSession(engine, SessionSettings(vad=None), FLOOD, recorder) as session:
        assert session.commit() == []  # nothing yet: an error event, the session goes on
        for a, b in cuts:
            session.append(speech[a:b])
            session.commit()
        assert session.finish(timeout=60)
    want = [(a // 16, b // 16, engine.transcribe(wave[a:b], OFFLINE).segments[0].text) for a, b in cuts]
    assert finals(recorder) == want
    assert [e.code for e in recorder.of(Error)] == ["input_audio_buffer_commit_empty"]
    assert not recorder.of(SpeechStarted) and len(recorder.of(Committed)) == 2


def test_other_rates_are_resampled(engine, speech, expected):
    import soxr

    wave = speech.astype(np.float32) / 32768
    at_24k = pcm16(soxr.resample(wave, SR, 24000))
    recorder = Recorder()
    with RealtimeSession(engine, SessionSettings(sample_rate=24000), FLOOD, recorder) as session:
        stream(session, at_24k, None)
    got = finals(recorder)  # soxr's stream and the offline resampler differ in the last bits: times, not texts
    assert len(got) == len(expected)
    for (start, end, text), (want_start, want_end, _) in zip(got, expected):
        assert abs(start - want_start) <= 64 and abs(end - want_end) <= 64 and text
    with pytest.raises(ValueError, match="not accepted"):
        SessionSettings(sample_rate=96000)


def test_falling_behind_is_reported_not_buffered(engine, speech):
    recorder = Recorder()
    config = dataclasses.replace(CONFIG, max_lag_seconds=4.0)
    with RealtimeSession(engine, SessionSettings(), config, recorder) as session:
        replies = session.append(speech[: 3 * SR])  # within the limit: queued
        replies += session.append(speech[3 * SR: 6 * SR])  # 3 s still waiting + 3 s: dropped
        replies += session.append(speech[6 * SR: 9 * SR])  # still behind: dropped, said once
        assert [e.code for e in replies] == ["falling_behind"] and replies[0].kind == "server_error"
        assert session.dropped_seconds == pytest.approx(6.0)
        assert session.finish(timeout=60)
        assert session.lag_seconds() == 0.0
        assert session.append(speech[: SR]) == []  # caught up: audio taken again


def _observed_engine(models: Path, events: list) -> Engine:
    """Two sequences, every final forced long (random weights): a final is still decoding when we close."""
    n_ctx = context_per_sequence(3000)
    return Engine(models, gguf_path=models / GGUF_Q8_0, decoder_options=DecoderOptions(n_seq_max=2, n_ctx=n_ctx),
                  batch_invariant=True,
                  min_new_tokens=3000, observer=lambda kind, detail: events.append((kind, detail)))


def _wait_for(condition, timeout: float = 30.0) -> bool:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if condition():
            return True
        time.sleep(0.01)
    return False


def test_a_session_closed_mid_segment_frees_its_sequence(tiny_models, speech):
    seen: list = []
    eng = _observed_engine(tiny_models, seen)
    try:
        recorder = Recorder()
        session = RealtimeSession(eng, SessionSettings(), CONFIG, recorder)
        session.append(speech[: int(2.5 * SR)])  # inside the first sentence
        assert _wait_for(lambda: recorder.of(SpeechStarted))
        session.close()  # speech open, nothing submitted yet
        assert not [e for e in seen if e[0] == "admit"]

        session = RealtimeSession(eng, SessionSettings(), CONFIG, recorder)
        session.append(speech[: int(2.5 * SR)])
        session.commit()
        assert _wait_for(lambda: [e for e in seen if e[0] == "admit"])
        seq = next(d for k, d in seen if k == "admit")
        session.close()  # the final is decoding its 3000 tokens
        assert _wait_for(lambda: ("cancel", seq) in seen)
        assert session.lag_seconds() == 0.0
    finally:
        eng.close()


# --------------------------------------------------------------------------- protocol level

UPDATE = json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {"input": {
    "format": {"type": "audio/pcm", "rate": 16000}, "transcription": {"language": "en"},
    "turn_detection": {"type": "server_vad", "threshold": 0.5, "silence_duration_ms": 300, "prefix_padding_ms": 100}}}}})


def _append(samples: np.ndarray) -> str:
    return json.dumps({"type": "input_audio_buffer.append", "audio": encode_audio(samples.tobytes())})


def test_bad_frames_get_an_error_and_the_session_goes_on(engine, speech, expected):
    recorder = Recorder()
    with RealtimeSession(engine, None, FLOOD, recorder) as session:
        before = handle(session, _append(speech[:SR]))
        assert [e.code for e in before] == ["session_not_configured"]
        assert [e.type for e in handle(session, UPDATE)] == ["session.updated"]
        assert session.settings.prompt.language == "英文"
        bad = {
            "invalid_base64": json.dumps({"type": "input_audio_buffer.append", "audio": "@@not base64@@",
                                          "event_id": "ev1"}),
            "invalid_audio": json.dumps({"type": "input_audio_buffer.append",
                                         "audio": base64.b64encode(b"\x01\x02\x03").decode()}),
            "unknown_event": json.dumps({"type": "response.create"}),
            "invalid_json": "{not json",
            "invalid_event": json.dumps(["input_audio_buffer.append"]),
            "invalid_value": json.dumps({"type": "session.update", "session": {"audio": {"input": {
                "format": {"type": "audio/pcm", "rate": 4000}}}}}),
        }
        for code, message in bad.items():
            replies = handle(session, message)
            assert [e.code for e in replies] == [code], (code, replies)
            shape = render(replies[0])
            assert shape["type"] == "error" and shape["error"]["code"] == code and shape["error"]["message"]
        assert handle(session, bad["invalid_base64"])[0].event_id == "ev1"
        assert session.settings.sample_rate == 16000  # the refused update changed nothing
        handle(session, json.dumps({"type": "session.update", "session": {"audio": {"input": {
            "transcription": {"language": ""}}}}}))  # back to auto, as the offline reference
        for start in range(0, len(speech), 1600):
            assert handle(session, _append(speech[start: start + 1600])) == []
        assert session.finish(timeout=120)
    assert finals(recorder) == expected


def test_settings_in_both_shapes_and_rendered_events():
    beta = parse(json.dumps({"type": "transcription_session.update", "session": {
        "input_audio_format": "pcm16", "input_audio_transcription": {"model": "gpt-4o-transcribe", "prompt": "通义, 魔搭"},
        "turn_detection": None}}))
    assert beta.reply_type == "transcription_session.updated"
    assert beta.settings.sample_rate == 24000 and beta.settings.vad is None
    assert beta.settings.prompt.hotwords == ("通义", "魔搭") and beta.settings.model == "gpt-4o-transcribe"
    ga = parse(UPDATE, beta.settings)
    assert ga.settings.sample_rate == 16000 and ga.settings.vad == VadOptions()
    assert ga.settings.prompt.hotwords == ("通义", "魔搭")  # not given: kept
    for bad in [{"turn_detection": {"type": "semantic_vad"}}, {"input_audio_format": "g711_ulaw"},
                {"input_audio_transcription": {"language": "xx"}}]:
        with pytest.raises(ValueError):
            parse(json.dumps({"type": "transcription_session.update", "session": bad}))
    delta = render(TranscriptionDelta("item_1", "wor", "hello wor"))
    assert delta["type"] == "conversation.item.input_audio_transcription.delta"
    assert {k: delta[k] for k in ("item_id", "content_index", "delta")} == {"item_id": "item_1", "content_index": 0,
                                                                           "delta": "wor"}
    done = render(TranscriptionCompleted("item_1", "hello world", 100, 900))
    assert done["type"] == "conversation.item.input_audio_transcription.completed" and done["transcript"] == "hello world"
    assert render(SpeechStarted("item_1", 100))["audio_start_ms"] == 100
    assert render(Committed("item_2", "item_1"))["previous_item_id"] == "item_1"


# --------------------------------------------------------------------------- WebSocket level


def test_websocket_endpoint_streams_finals_and_survives_bad_frames(engine, speech, expected):
    import fastapi
    from fastapi.testclient import TestClient

    from funasr_nano.realtime.websocket import add_realtime_route

    app = fastapi.FastAPI()
    add_realtime_route(app, engine, config=FLOOD, max_sessions=1)
    with TestClient(app) as client:
        with client.websocket_connect("/v1/realtime?intent=transcription") as ws:
            assert ws.receive_json()["type"] == "session.created"
            ws.send_text(_append(speech[:1600]))
            assert ws.receive_json()["error"]["code"] == "session_not_configured"
            ws.send_text(UPDATE.replace('"en"', '""'))
            assert ws.receive_json()["type"] == "session.updated"
            ws.send_text('{"type": "input_audio_buffer.append", "audio": "%%%"}')
            assert ws.receive_json()["error"]["code"] == "invalid_base64"
            with client.websocket_connect("/v1/realtime?intent=transcription") as second:
                assert second.receive_json()["error"]["code"] == "too_many_sessions"
            for start in range(0, len(speech), 3200):
                ws.send_text(_append(speech[start: start + 3200]))
            ws.send_text(_append(np.zeros(2 * SR, np.int16)))  # trailing silence ends the last segment
            got = []
            while len(got) < len(expected):
                event = ws.receive_json()
                assert event["type"] != "error", event
                if event["type"].endswith("transcription.completed"):
                    got.append((event["audio_start_ms"], event["audio_end_ms"], event["transcript"]))
            assert got == expected
        # a client that leaves mid-segment: its session is closed, the server takes the next one
        with client.websocket_connect("/v1/realtime") as ws:
            assert ws.receive_json()["type"] == "session.created"
            ws.send_text(UPDATE)
            ws.send_text(_append(speech[: int(2.5 * SR)]))
        with client.websocket_connect("/v1/realtime") as ws:
            assert ws.receive_json()["type"] == "session.created"


# --------------------------------------------------------------------------- the microphone script


def test_microphone_script_on_a_file_prints_the_offline_cli_segments(tiny_models, zh_mp3, tmp_path):
    common = ["--model-dir", str(tiny_models), "--max-new-tokens", str(MAX_TOKENS), "--threads", "2",
              "--batch-invariant"]
    offline = subprocess.run([sys.executable, str(ROOT / "03_inference_cpu_int8.py"), str(zh_mp3), "--format", "json",
                              "--quiet", *common], capture_output=True, text=True, timeout=300)
    assert offline.returncode == 0, offline.stderr
    want = [s["text"] for s in json.loads(offline.stdout)["segments"]]
    out = tmp_path / "live.txt"
    live = subprocess.run([sys.executable, str(ROOT / "06_microphone.py"), "--file", str(zh_mp3), "--speed", "8",
                           "--output-file", str(out), *common], capture_output=True, text=True, timeout=300)
    assert live.returncode == 0, live.stderr
    assert live.stdout.splitlines() == want
    assert out.read_text(encoding="utf-8").splitlines() == want


def test_microphone_script_keeps_mpg123s_notes_off_the_terminal(tiny_models, zh_mp3, tmp_path):
    """A damaged MP3 through 06: mpg123 writes its notes ("Illegal Audio-MPEG-Header", "Giving up resync")
    to file descriptor 2 itself; 06 mutes them while it reads the file, as the 03 scripts do, and our
    own warning about the damage still shows."""
    data = zh_mp3.read_bytes()
    start, size = len(data) // 3, len(data) // 6
    noise = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    damaged = tmp_path / "damaged.mp3"
    damaged.write_bytes(data[:start] + noise + data[start + size:])
    live = subprocess.run([sys.executable, str(ROOT / "06_microphone.py"), "--file", str(damaged), "--speed", "8",
                           "--model-dir", str(tiny_models), "--max-new-tokens", str(MAX_TOKENS), "--threads", "2"],
                          capture_output=True, text=True, timeout=300)
    assert live.returncode == 0, live.stderr
    assert "Illegal Audio-MPEG-Header" not in live.stderr and "resync" not in live.stderr, live.stderr
    assert "damaged audio" in live.stderr, live.stderr
