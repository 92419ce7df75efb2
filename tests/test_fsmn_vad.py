"""`--vad fsmn`: FunASR's FSMN-VAD exported to ONNX and its end-point detection in numpy, against funasr itself.

Checkpoints: `testing/fsmn_checkpoint.py` in the release's layout at its full (small) shape, one
with random weights and one whose silence score follows the frame's loudness (so speech and
pauses really open and close segments). Inputs: espeak-ng sentences with pauses of 0.15 to 4 s,
noise with speech in it, a 152 s file that crosses funasr's 60 s chunks and our reading blocks,
75 s of speech with short pauses (segments cut at 30 s), and exact 60 / 120 s files.

Tolerance: frame scores (posteriors) within 1e-5 of funasr's torch model (measured: 5e-7 for
the loudness checkpoint, 6e-6 for the random one); segment starts and ends exactly equal, in ms.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testing.fsmn_checkpoint import build_fsmn_checkpoint
from testing.oracle import quiet_funasr
from tests.audio_fixtures import espeak_wav, speech_layout

ROOT = Path(__file__).resolve().parent.parent
SR = 16000
SCORE_TOLERANCE = 1e-5
STEPS = 16
KINDS = {"energy": 0, "random": 1}  # kind -> seed
SENTENCES = ["Hello there, this is the first sentence.", "Speech recognition works on small computers.",
             "The last words of the test.", "A long file crosses the block boundaries of the reader.",
             "Pauses of many lengths separate the sentences here."]
PAUSES = [0.3, 0.6, 1.0, 1.6, 2.2, 3.0, 0.15, 4.0]


def _write(path: Path, wave: np.ndarray) -> Path:
    import soundfile

    soundfile.write(str(path), wave, SR, subtype="PCM_16")
    return path


@pytest.fixture(scope="module")
def inputs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """16 kHz PCM WAV files, read alike by funasr and by us."""
    from funasr_nano.audio.load import load_audio

    folder = tmp_path_factory.mktemp("fsmn_audio")
    layout, _ = speech_layout(folder)
    clips = [load_audio(espeak_wav(folder / f"t{i}.wav", text, speed=160)) for i, text in enumerate(SENTENCES)]
    parts, n, i = [], 0, 0
    while n < 150 * SR:
        pause = np.zeros(int(PAUSES[i % len(PAUSES)] * SR), np.float32)
        parts += [clips[i % len(clips)], pause]
        n += len(parts[-2]) + len(pause)
        i += 1
    long = np.concatenate(parts)
    rng = np.random.default_rng(0)
    noise = (0.03 * rng.standard_normal(20 * SR)).astype(np.float32)
    noise[5 * SR: 5 * SR + len(clips[0])] += clips[0]
    speech = np.concatenate([c for _ in range(6) for c in clips])[: 75 * SR]
    return {
        "layout": _write(folder / "layout.wav", layout),
        "long": _write(folder / "long.wav", long),
        "noise": _write(folder / "noise.wav", noise),
        "speech75": _write(folder / "speech75.wav", speech),
        "exact60": _write(folder / "exact60.wav", long[: 60 * SR]),
        "short_of_120": _write(folder / "short_of_120.wav", long[: 120 * SR - 100]),
    }


@pytest.fixture(scope="module")
def fsmn(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, Path]]:
    """kind -> (release-shaped folder, exported folder with fsmn_vad.onnx + fsmn_vad.json)."""
    from funasr_nano.export.export_fsmn_vad import export_fsmn_vad

    made = {}
    for kind, seed in KINDS.items():
        release = build_fsmn_checkpoint(tmp_path_factory.mktemp("fsmn_release") / kind, kind, seed)
        out = tmp_path_factory.mktemp("fsmn_export") / kind
        export_fsmn_vad(release, out)
        made[kind] = (release, out)
    return made


@pytest.fixture(scope="module")
def funasr_vad(fsmn):
    """funasr's AutoModel on each FSMN folder, as the official pipeline builds its vad_model."""
    from funasr import AutoModel

    models = {}
    for kind, (release, _) in fsmn.items():
        with quiet_funasr():
            models[kind] = AutoModel(model=str(release), disable_update=True, device="cpu", ncpu=2,
                                     disable_pbar=True, max_single_segment_time=30000)
    return models


def _funasr_run(model, path: Path) -> tuple[list[list[int]], np.ndarray]:
    """funasr's segments for a file and the FSMN's frame scores (every chunk's, in order)."""
    scores: list[np.ndarray] = []
    hook = model.model.encoder.register_forward_hook(lambda _m, _i, out: scores.append(out.detach().numpy()[0]))
    try:
        with quiet_funasr():
            result = model.generate(input=str(path))
    finally:
        hook.remove()
    return [list(map(int, s)) for s in result[0]["value"]], np.concatenate(scores)


def _ours(vad, wave: np.ndarray, block: int | None) -> tuple[list[list[int]], int]:
    """Our segments (ms) with the audio fed in blocks of `block` samples, and the most audio the segmenter held."""
    from funasr_nano.audio.fsmn_vad import FsmnSegmenter

    segmenter = FsmnSegmenter(vad)
    step = block or len(wave)
    held = 0
    out = []
    segmenter.reset()
    for i in range(0, len(wave), step):
        for event in segmenter.push(wave[i:i + step]):
            if hasattr(event, "span"):
                out.append(event)
        held = max(held, len(segmenter._buf))
    out += [e for e in segmenter.finish() if hasattr(e, "span")]
    for event in out:  # each segment's audio is that span of the input
        np.testing.assert_array_equal(event.audio, wave[event.span.start:event.span.end])
    return [[e.span.start // 16, (e.span.end + 15) // 16] for e in out], held


@pytest.mark.parametrize("kind", list(KINDS))
def test_frame_scores_equal_funasr(kind, fsmn, funasr_vad, inputs):
    """Our frontend + the ONNX FSMN, streamed in uneven blocks with its caches, give funasr's posteriors."""
    from funasr_nano.audio.fsmn_vad import FsmnFrontend, FsmnVad
    from funasr_nano.audio.load import load_audio

    vad = FsmnVad(fsmn[kind][1] / "fsmn_vad.onnx")
    for name in ("layout", "long", "noise"):
        _, want = _funasr_run(funasr_vad[kind], inputs[name])
        wave = load_audio(inputs[name])
        frontend = FsmnFrontend(vad.settings.frontend, vad.settings.cmvn)
        caches = vad.new_caches()
        got = []
        for i in range(0, len(wave), 12345):
            feats, _ = frontend.push(wave[i:i + 12345])
            if len(feats):
                scores, caches = vad.scores(feats, caches)
                got.append(scores)
        feats, _ = frontend.finish()
        got.append(vad.scores(feats, caches)[0])
        got_all = np.concatenate(got)
        assert got_all.shape == want.shape, name
        err = float(np.abs(got_all - want).max())
        print(f"{kind} {name}: {want.shape[0]} frames, max |score - funasr| {err:.1e}")
        assert err < SCORE_TOLERANCE
    if kind == "energy":  # the loudness checkpoint tells pauses from speech
        _, scores = _funasr_run(funasr_vad[kind], inputs["layout"])
        assert scores[:100, 0].min() > 0.9 and np.median(scores[200:300, 0]) < 0.1


@pytest.mark.parametrize("kind", list(KINDS))
def test_segments_equal_funasr_exactly(kind, fsmn, funasr_vad, inputs):
    """Start and end of every segment, in ms, equal funasr's AutoModel(model=<fsmn dir>) with
    max_single_segment_time 30000, whatever blocks the audio comes in; memory stays bounded."""
    from funasr_nano.audio.fsmn_vad import FsmnVad
    from funasr_nano.audio.load import load_audio

    vad = FsmnVad(fsmn[kind][1] / "fsmn_vad.onnx")
    counts = {}
    for name, path in inputs.items():
        want, _ = _funasr_run(funasr_vad[kind], path)
        wave = load_audio(path)
        for block in (60 * SR, 7777, None):
            got, held = _ours(vad, wave, block)
            assert got == want, (kind, name, block)
            if block == 7777:
                assert held <= 31 * SR, (name, held)  # at most a 30 s segment and a few frames
        counts[name] = len(want)
        print(f"{kind} {name}: {want}")
    assert counts["long"] >= 10
    if kind == "energy":
        assert counts["layout"] >= 2  # pauses end segments
        lengths = [e - s for s, e in _funasr_run(funasr_vad[kind], inputs["speech75"])[0]]
        assert max(lengths) == 30010  # cut at max_single_segment_time


def _pipeline_oracle(nano: Path, fsmn_release: Path):
    """The official composition: AutoModel(model=<nano>, vad_model=<fsmn>, vad_kwargs={"max_single_segment_time":
    30000}), set up like testing/oracle.py's (dither 0, fp32 LLM, exact RoPE frequencies)."""
    import funasr.models.fun_asr_nano.model as nano_module
    import torch
    from funasr import AutoModel

    from testing.oracle import _exact_rope

    nano_module.forced_align = lambda *args, **kwargs: []  # needs torchaudio; as testing/oracle.py does
    torch.manual_seed(0)
    with quiet_funasr():
        auto = AutoModel(model=str(nano), vad_model=str(fsmn_release), vad_kwargs={"max_single_segment_time": 30000},
                         disable_update=True, device="cpu", ncpu=2, hub="ms", frontend_conf={"dither": 0.0},
                         disable_pbar=True, log_level="ERROR")
    auto.model.llm.to(torch.float32)
    _exact_rope(auto.model.llm)
    return auto


@pytest.fixture(scope="module")
def fsmn_models(tiny_models: Path, fsmn, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny exported model folder with the (loudness) FSMN-VAD export beside it."""
    folder = tmp_path_factory.mktemp("models_fsmn") / "tiny"
    folder.mkdir()
    for item in [*tiny_models.iterdir(), *fsmn["energy"][1].iterdir()]:
        if not item.name.startswith("."):  # not the session caches: each folder makes its own
            (folder / item.name).symlink_to(item)
    return folder


# f16: ggml's CPU f16 matmul rounds the activations to f16 too, so on random weights a near-tie between two
# tokens can flip against funasr's fp32 (measured: the 152 s file's 21 segments x 16 tokens differ in one
# segment, also with funasr's LLM weights rounded to f16); the segments are still funasr's exactly there.
TEXT_INPUTS = {"qwen3-0.6b-asr.f32.gguf": ("layout", "noise", "long"), "qwen3-0.6b-asr.gguf": ("layout", "noise")}


@pytest.mark.parametrize("gguf", list(TEXT_INPUTS))
def test_cli_vad_fsmn_text_equals_funasr_pipeline(gguf, fsmn_models, tiny_ckpt, fsmn, inputs):
    """03_inference_cpu.py --vad fsmn (f32 and f16 GGUF) against funasr's AutoModel with vad_model=<fsmn>:
    the same segments (ms), each with funasr's text; the texts joined as funasr joins them give its text."""
    import torch

    auto = _pipeline_oracle(tiny_ckpt, fsmn["energy"][0])
    for name in ("layout", "noise", "long"):
        path = inputs[name]
        proc = subprocess.run([sys.executable, str(ROOT / "03_inference_cpu.py"), str(path), "--model-dir",
                               str(fsmn_models), "--vad", "fsmn", "--max-new-tokens", str(STEPS), "--threads", "2",
                               "--format", "json", "--gguf", str(fsmn_models / gguf)],
                              cwd=ROOT, capture_output=True, text=True, timeout=300, env=dict(os.environ))
        assert proc.returncode == 0, proc.stderr
        data = json.loads(proc.stdout)
        assert data["vad"] == "fsmn"
        with torch.no_grad(), quiet_funasr():
            vad_res = auto.inference(str(path), model=auto.vad_model, kwargs=auto.vad_kwargs)
            res = auto.generate(input=str(path), cache={}, batch_size=1, max_length=STEPS)
        spans = [[round(s["start"] * 1000), round(s["end"] * 1000)] for s in data["segments"]]
        assert spans == [list(map(int, v)) for v in vad_res[0]["value"]], name
        texts = [s["text"] for s in data["segments"]]
        # funasr's pipeline joins segment texts with one space each (auto_model.py: `result["text"] += " " + text`);
        # ours joins by script (engine.join_texts): the segments' texts are compared through funasr's join
        if name in TEXT_INPUTS[gguf]:
            assert res[0]["text"] == " ".join(texts), name
            print(f"{gguf} {name}: {len(texts)} segments, text equal to funasr's")


def test_live_turns_with_fsmn_end_where_the_offline_segments_do(fsmn_models, inputs):
    """A server's live session with `--vad fsmn` turn detection (RealtimeConfig.options.vad): audio in 0.1 s chunks
    gives the completed events of the offline `--vad fsmn` transcription of the same file: same spans (ms),
    same texts. FSMN's end-point rules look at the stream's sample count, not at how it arrives."""
    from funasr_nano.audio.load import load_audio
    from funasr_nano.config import TranscribeOptions
    from funasr_nano.engine import Engine
    from funasr_nano.realtime import RealtimeConfig, RealtimeSession, SessionSettings
    from funasr_nano.realtime.events import TranscriptionCompleted

    wave = load_audio(inputs["layout"])
    with Engine.from_preset("cpu", fsmn_models, threads=2) as engine:
        options = TranscribeOptions(vad="fsmn", max_new_tokens=STEPS)
        offline = engine.transcribe(wave, options)
        events: list[object] = []
        config = RealtimeConfig(options=options, max_lag_seconds=3600.0, partials=False)
        with RealtimeSession(engine, SessionSettings(), config, events.append) as session:
            for start in range(0, len(wave), SR // 10):
                assert session.append(wave[start:start + SR // 10]) == []
            assert session.finish(timeout=300)
    finals = [e for e in events if isinstance(e, TranscriptionCompleted)]
    assert len(offline.segments) >= 2
    assert [(f.audio_start_ms, f.audio_end_ms) for f in finals] == [
        (round(s.start * 1000), round(s.end * 1000)) for s in offline.segments]
    assert [f.transcript for f in finals] == [s.text for s in offline.segments]


def test_a_commit_closes_the_fsmn_turn_in_progress_and_detection_goes_on(fsmn_models, inputs):
    """A client's commit in the middle of speech (server VAD on, FSMN) closes that turn at the commit point;
    the detector starts afresh and the rest of the stream gets its own turns."""
    from funasr_nano.audio.load import load_audio
    from funasr_nano.config import TranscribeOptions
    from funasr_nano.engine import Engine
    from funasr_nano.realtime import RealtimeConfig, RealtimeSession, SessionSettings
    from funasr_nano.realtime.events import Error, TranscriptionCompleted

    wave = load_audio(inputs["layout"])
    chunk = SR // 10
    with Engine.from_preset("cpu", fsmn_models, threads=2) as engine:
        options = TranscribeOptions(vad="fsmn", max_new_tokens=STEPS)
        first = engine.transcribe(wave, options).segments[0]
        middle = int((first.start + first.end) / 2 * SR) // chunk * chunk  # inside the first turn
        events: list[object] = []
        config = RealtimeConfig(options=options, max_lag_seconds=3600.0, partials=False)
        with RealtimeSession(engine, SessionSettings(), config, events.append) as session:
            for start in range(0, len(wave), chunk):
                if start == middle:
                    session.commit()
                session.append(wave[start:start + chunk])
            assert session.finish(timeout=300)
    assert not [e for e in events if isinstance(e, Error)]
    finals = [e for e in events if isinstance(e, TranscriptionCompleted)]
    assert (finals[0].audio_start_ms, finals[0].audio_end_ms) == (round(first.start * 1000), middle * 1000 // SR)
    assert len(finals) >= 2 and all(f.audio_start_ms >= middle * 1000 // SR for f in finals[1:])
