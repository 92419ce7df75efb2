"""Long audio: repetition guard, batched decoding, Silero VAD segmentation, subtitles.

Batched decoding must give the tokens of decoding each segment alone; the VAD must find
speech where we put it (espeak-ng sentences separated by silences of known length) and
match the silero-vad package's own (torch) probabilities; subtitles must parse with the
`srt` and `webvtt-py` packages.
"""

from __future__ import annotations

import dataclasses
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from common.audio.load import load_audio
from common.audio.vad import (
    VAD_FILE,
    SileroVad,
    SpeechSegmenter,
    VadOptions,
    copy_vad_model,
    find_vad_model,
    speech_spans,
)
from common.decoding import Job, StopRule
from common.decoding.repetition import NO_GUARD, RepetitionGuard
from common.engine import BenchmarkHooks, Engine, TranscribeOptions
from common.models.llm import DecoderOptions
from common.models.prompt import PromptOptions
from common.output.subtitles import render_srt, render_vtt, split_sentences, transcript_cues
from testing import reference
from testing.drafts import make_draft
from tests.audio_fixtures import espeak_wav, have_espeak

ROOT = Path(__file__).resolve().parent.parent
SR = 16000
CUTS = [(0.0, 3.0), (2.0, 7.5), (4.0, 10.0), (1.0, 2.5), (5.0, 9.0)]


@pytest.fixture(scope="module")
def clip(zh_mp3: Path) -> np.ndarray:
    return load_audio(zh_mp3)


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    path = find_vad_model()
    if path is None:
        pytest.fail("silero-vad is not installed: its silero_vad.onnx is needed")
    return SileroVad(path)


# --------------------------------------------------------------------------- repetition guard


def test_guard_needs_a_full_window_and_finds_loops():
    guard = RepetitionGuard()
    assert not guard.looping([7] * 31)  # the parity tests decode 16 tokens: never touched
    assert guard.looping([7] * 32)
    varied = list(range(100, 160))
    assert not guard.looping(varied)
    looped = varied[:10] + [1, 2, 3, 4, 5, 6, 7] * 6
    assert guard.period(looped) == 7
    assert guard.trim(looped) == varied[:10] + [1, 2, 3, 4, 5, 6, 7]
    few = varied[:5] + [int(x) for x in np.random.default_rng(0).integers(1, 4, 40)]  # 3 ids, no period
    assert guard.period(few) == 0 and guard.trim(few) == few
    assert not NO_GUARD.looping([7] * 100)
    assert StopRule(64, 0, guard).finish([7] * 40) == ([7], True)
    assert StopRule(64, 40, guard).finish([7] * 40)[0] == [7] * 40  # benchmarks force a length


# --------------------------------------------------------------------------- batched decoding

ENGINES = {
    "f32-split": dict(gguf="qwen3-0.6b-asr.f32.gguf", kv_f32=True, flash_attn=False, kv_unified=False),
    "f16-split": dict(gguf="qwen3-0.6b-asr.gguf", kv_f32=False, flash_attn=None, kv_unified=False),
}


def _engine(models: Path, cfg: dict, n_seq: int, **kwargs) -> Engine:
    options = DecoderOptions(threads=2, n_ctx=512, n_seq_max=n_seq, kv_f32=cfg["kv_f32"],
                             flash_attn=cfg["flash_attn"], kv_unified=cfg["kv_unified"])
    return Engine(models, gguf_path=models / cfg["gguf"], decoder_options=options, **kwargs)


def _one_by_one(engine: Engine, pieces, rule: StopRule) -> list[list[int]]:
    """Each piece decoded alone by the independent reference, the guard's trim applied."""
    prepared = [engine.prepare(piece, PromptOptions()) for piece in pieces]
    return engine.scheduler.call(lambda d, _: [rule.finish(reference.decode_alone(
        d, p, rule.max_new_tokens, rule.min_new_tokens, rule.guard))[0] for p in prepared])


def _decode_all(engine: Engine, pieces, rule: StopRule, drafts=None):
    """Every piece through the scheduler at once (one stream), results in input order."""
    jobs = [Job(engine.prepare(p, PromptOptions()).prompt, rule, None if drafts is None else drafts[i])
            for i, p in enumerate(pieces)]
    out = [None] * len(jobs)
    for index, decoded in engine.scheduler.stream(jobs):
        out[index] = decoded
    return out


@pytest.mark.parametrize("name", sorted(ENGINES))
def test_batched_tokens_equal_one_by_one(name, tiny_models, clip):
    cfg = ENGINES[name]
    pieces = [clip[int(a * SR): int(b * SR)] for a, b in CUTS]
    single = _engine(tiny_models, cfg, 1)
    batched = _engine(tiny_models, cfg, 4)  # 5 segments: a group of 4, then 1 (prefix reused)
    try:
        want = _one_by_one(single, pieces, StopRule(20, 0, NO_GUARD))
        got = [d.tokens for d in _decode_all(batched, pieces, StopRule(20, 0, NO_GUARD))]
    finally:
        single.close()
        batched.close()
    assert len({tuple(t) for t in want}) > 1, "segments should decode differently"
    assert got == want


def test_repetition_guard_stops_both_paths_alike(tiny_models, clip, caplog):
    """Random weights loop on one token: both paths stop early, at the same token, and say so once."""
    from concurrent.futures import ThreadPoolExecutor

    cfg = ENGINES["f16-split"]
    pieces = [clip[int(a * SR): int(b * SR)] for a, b in CUTS[:3]]
    single = _engine(tiny_models, cfg, 1)
    batched = _engine(tiny_models, cfg, 3)
    rule = StopRule(64, 0, RepetitionGuard())
    try:
        want = _one_by_one(single, pieces, rule)
        decoded = _decode_all(batched, pieces, rule)
        # the engine on the same pieces, three callers at once sharing the batch: same tokens, one warning each
        options = TranscribeOptions(max_new_tokens=64, vad="none")
        with caplog.at_level("WARNING", logger="common"), ThreadPoolExecutor(3) as pool:
            segments = [t.segments[0] for t in pool.map(lambda p: batched.transcribe(p, options), pieces)]
    finally:
        single.close()
        batched.close()
    assert [d.tokens for d in decoded] == want
    assert any(d.looped for d in decoded) and all(len(d.tokens) < 64 for d in decoded if d.looped)
    assert [s.token_ids for s in segments] == want
    assert sum("decoding loop detected" in r.getMessage() for r in caplog.records) == sum(d.looped for d in decoded)


@pytest.mark.parametrize("name", ["f32-split", "f16-split"])
def test_freed_sequences_take_the_next_segment_with_the_same_tokens(name, tiny_models, clip):
    """Continuous batching: 8 segments through 3 sequences, finishing at different rounds.

    Drafts make some sequences finish in a few rounds while others take one token per round, so
    a freed sequence takes the next segment (keeping its copy of the prompt prefix) while the
    others go on, sequence 0 among them; at the end, sequences move down into freed ids. Every
    segment must still get the tokens of decoding it alone. The scheduler's observer shows it.
    """
    cfg = ENGINES[name]
    cuts = CUTS + [(0.5, 4.0), (3.0, 8.0), (6.0, 10.0)]
    pieces = [clip[int(a * SR): int(b * SR)] for a, b in cuts]
    n_tokens = 24
    events: list[tuple[str, object]] = []
    single = _engine(tiny_models, cfg, 1)
    batched = _engine(tiny_models, cfg, 3, observer=lambda event, detail: events.append((event, detail)))
    try:
        want = _one_by_one(single, pieces, StopRule.forced(n_tokens))
        rng = np.random.default_rng(0)
        kinds = ["own", None, "half", "own", None, "own", "random", None]
        drafts = [None if k is None else make_draft(w, k, rng, batched.decoder.n_vocab) for w, k in zip(want, kinds)]
        events.clear()
        got = _decode_all(batched, pieces, StopRule.forced(n_tokens), drafts)
    finally:
        single.close()
        batched.close()
    assert [d.tokens for d in got] == want
    # admissions while other sequences were decoding (in the rounds before and after it): into
    # sequence 0, and into another one while sequence 0 was decoding
    rounds = [(i, set(what)) for i, (kind, what) in enumerate(events) if kind == "round"]
    into_zero = beside_live_zero = 0
    for i, (kind, seq) in enumerate(events):
        before = [r for j, r in rounds if j < i]
        after = [r for j, r in rounds if j > i]
        if kind != "admit" or not before or not after:
            continue
        going_on = (before[-1] & after[0]) - {seq}
        into_zero += seq == 0 and bool(going_on)
        beside_live_zero += seq != 0 and 0 in going_on
    assert into_zero >= 1 and beside_live_zero >= 1, events
    # at the end, with no segment left, live sequences moved down to close the gaps
    assert any(kind == "move" for kind, _ in events), events
    # rows always in increasing sequence order
    assert all(list(what) == sorted(what) for kind, what in events if kind == "round")


def test_forced_token_rate_gives_each_segment_its_own_length(tiny_models, clip):
    """The benchmark's forcing by duration: segment lengths follow the audio, batched output = one by one."""
    cfg = ENGINES["f16-split"]
    options = TranscribeOptions(vad="none", max_segment_seconds=2.0, speculative=False)
    rate = BenchmarkHooks(tokens_per_second=4.0)
    single = _engine(tiny_models, cfg, 1, hooks=rate)
    batched = _engine(tiny_models, cfg, 3, hooks=rate)
    fixed = _engine(tiny_models, cfg, 3, hooks=dataclasses.replace(rate, refill=False))
    try:
        alone = single.transcribe(clip, options)
        together = batched.transcribe(clip, options)
        grouped = fixed.transcribe(clip, options)
    finally:
        single.close()
        batched.close()
        fixed.close()
    counts = [len(s.token_ids) for s in together.segments]
    assert len(counts) >= 5 and len(set(counts)) > 1
    assert all(abs(n - 4.0 * (s.end - s.start)) <= 1 for n, s in zip(counts, together.segments))
    assert [s.token_ids for s in together.segments] == [s.token_ids for s in alone.segments]
    assert [s.token_ids for s in grouped.segments] == [s.token_ids for s in alone.segments]


# --------------------------------------------------------------------------- VAD


def test_vad_model_is_copied_and_found_first(tmp_path):
    copied = copy_vad_model(tmp_path)
    assert copied == tmp_path / VAD_FILE and copied.stat().st_size > 100_000
    assert find_vad_model(tmp_path) == copied
    assert find_vad_model(tmp_path / "elsewhere") is not None  # falls back to the installed package


def test_vad_probabilities_equal_the_silero_package(vad, clip):
    """Same ONNX file, same 64-sample context and state handling: the same probabilities."""
    silero_vad = pytest.importorskip("silero_vad")
    import torch

    rng = np.random.default_rng(0)
    noise = (0.003 * rng.standard_normal(2 * SR)).astype(np.float32)  # not digital silence: the model runs
    wave = np.concatenate([noise, clip[: 6 * SR], noise, clip[6 * SR:], noise[:12345]])
    ours = vad.probabilities(wave)
    model = silero_vad.load_silero_vad(onnx=True)
    model.reset_states()
    ref = []
    for i in range(0, len(wave), 512):
        chunk = torch.from_numpy(np.pad(wave[i: i + 512], (0, max(0, i + 512 - len(wave)))))
        ref.append(float(model(chunk, SR)))
    assert len(ours) == len(ref)
    assert np.abs(ours - np.array(ref)).max() < 1e-4

    opts = VadOptions(min_silence_seconds=0.3, min_speech_seconds=0.25, pad_seconds=0.0, max_segment_seconds=60)
    mine = [(s.start / SR, s.end / SR) for s in speech_spans(wave, vad, opts)]
    theirs = silero_vad.get_speech_timestamps(torch.from_numpy(wave), model, threshold=0.5, sampling_rate=SR,
                                              min_speech_duration_ms=250, min_silence_duration_ms=300,
                                              speech_pad_ms=0, return_seconds=False)
    theirs = [(t["start"] / SR, t["end"] / SR) for t in theirs]
    assert len(mine) == len(theirs)
    for (a0, a1), (b0, b1) in zip(mine, theirs):
        assert abs(a0 - b0) < 0.1 and abs(a1 - b1) < 0.1


SENTENCES = ["Hello there, this is the first sentence.", "Speech recognition works on small computers.",
             "The last words of the test."]
SILENCES = [1.5, 1.0, 2.5, 1.2]  # before, between, between, after


@pytest.fixture(scope="module")
def layout(tmp_path_factory) -> tuple[np.ndarray, list[tuple[float, float]]]:
    """espeak-ng sentences separated by exact silences; truth = first/last audible sample of each."""
    if not have_espeak():
        pytest.skip("espeak-ng is not installed")
    folder = tmp_path_factory.mktemp("espeak")
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


def test_vad_finds_speech_where_it_was_put(vad, layout):
    wave, truth = layout
    spans = speech_spans(wave, vad)
    got = [s.seconds(SR) for s in spans]
    assert len(got) == len(truth), got
    for (g0, g1), (t0, t1) in zip(got, truth):
        assert abs(g0 - t0) <= 0.2 and abs(g1 - t1) <= 0.2, (got, truth)


def test_ten_minutes_of_silence_has_no_speech_and_is_fast(vad):
    wave = np.zeros(600 * SR, np.float32)
    t0 = time.perf_counter()
    assert speech_spans(wave, vad) == []
    assert time.perf_counter() - t0 < 10
    rng = np.random.default_rng(1)
    hiss = (0.001 * rng.standard_normal(30 * SR)).astype(np.float32)  # quiet noise: the model runs
    assert speech_spans(hiss, vad) == []


def test_streaming_gives_the_segments_of_the_whole_and_respects_the_limit(vad, clip, layout):
    wave = np.concatenate([layout[0], clip, clip, np.zeros(SR, np.float32), clip])
    opts = VadOptions(max_segment_seconds=8.0, min_silence_seconds=1.5)  # the clips' own pauses are shorter
    whole = list(SpeechSegmenter(vad, opts).segments([wave]))
    blocks = [wave[i: i + 7 * SR + 123] for i in range(0, len(wave), 7 * SR + 123)]
    streamed = list(SpeechSegmenter(vad, opts).segments(iter(blocks)))
    assert [s for s, _ in streamed] == [s for s, _ in whole]
    for span, audio in streamed:
        assert np.array_equal(audio, wave[span.start: span.end])
        assert span.end - span.start <= 8 * SR
    ends = [s.end for s, _ in whole]
    starts = [s.start for s, _ in whole]
    assert all(a <= b for a, b in zip(ends, starts[1:]))
    uncut = list(SpeechSegmenter(vad, VadOptions(max_segment_seconds=60.0, min_silence_seconds=1.5)).segments([wave]))
    assert max(s.end - s.start for s, _ in uncut) > 8 * SR and len(whole) > len(uncut)


def test_engine_decodes_the_vad_segments_batched(tiny_models, layout, tmp_path):
    import soundfile

    wave, truth = layout
    path = tmp_path / "three.wav"
    soundfile.write(str(path), wave, SR)
    wave = load_audio(path)  # as the engine reads it (16-bit)
    cfg = ENGINES["f16-split"]
    batched = _engine(tiny_models, cfg, 4)
    single = _engine(tiny_models, cfg, 1)
    try:
        got = batched.transcribe(path, TranscribeOptions(max_new_tokens=10, vad="silero"))
        silent = batched.transcribe(np.zeros(20 * SR, np.float32), TranscribeOptions(vad="silero"))
        alone = [single.transcribe(wave[int(round(s.start * SR)): int(round(s.end * SR))],
                                   TranscribeOptions(max_new_tokens=10, vad="none")).segments[0].token_ids
                 for s in got.segments]
    finally:
        batched.close()
        single.close()
    assert len(got.segments) == len(truth)
    for seg, (t0, t1) in zip(got.segments, truth):
        assert abs(seg.start - t0) <= 0.2 and abs(seg.end - t1) <= 0.2
    assert [s.token_ids for s in got.segments] == alone
    assert got.duration == pytest.approx(len(wave) / SR) and got.timings["vad"] >= 0
    assert silent.text == "" and silent.segments == [] and silent.n_tokens == 0


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


# --------------------------------------------------------------------------- timestamps


def test_engine_aligns_sentences_on_the_ctc_posteriors(tiny_models, clip):
    """With the CTC head: each segment's text is forced-aligned on the head's log-probs (its own run)."""
    from common.output.alignment import char_times, sentence_times

    engine = _engine(tiny_models, ENGINES["f16-split"], 2)
    try:
        wave = np.concatenate([clip, np.zeros(SR, np.float32), clip[: 6 * SR]])
        got = engine.transcribe(wave, TranscribeOptions(max_new_tokens=6, vad="silero", timestamps=True))
        plain = engine.transcribe(wave, TranscribeOptions(max_new_tokens=6, vad="silero"))
        ctc = engine.ctc
        assert got.timestamps == "ctc" and plain.timestamps is None
        assert [s.token_ids for s in got.segments] == [s.token_ids for s in plain.segments]
        assert len(got.segments) >= 2 and all(not s.sentences and s.char_times is None for s in plain.segments)
        aligned = 0
        for seg in got.segments:
            piece = wave[int(round(seg.start * SR)): int(round(seg.end * SR))]
            log_probs = ctc.log_probs(engine.prepare(piece, PromptOptions()).encoder_out)
            want = char_times(seg.text, log_probs, ctc.vocab, engine.settings.ctc.frame_shift_ms, seg.start, seg.end)
            assert seg.char_times == want
            aligned += want is not None
            sentences = [(s.start, s.end, s.text) for s in sentence_times(seg.text, seg.start, seg.end, want)]
            assert [(x.start, x.end, x.text) for x in seg.sentences] == \
                [(round(a, 3), round(b, 3), t) for a, b, t in sentences]
            for x in seg.sentences:
                assert seg.start <= x.start <= x.end <= seg.end
        assert aligned >= 1
        dumped = got.to_dict()
        assert dumped["timestamps"] == "ctc" and "char_times" not in dumped["segments"][0]
        assert dumped["segments"][0]["sentences"] == [s.to_dict() for s in got.segments[0].sentences]
    finally:
        engine.close()


def test_without_ctc_sentence_times_come_from_the_segments_and_it_says_so(tiny2_models, clip, caplog):
    engine = Engine(tiny2_models)
    try:
        options = TranscribeOptions(max_new_tokens=6, vad="silero", timestamps=True)
        with caplog.at_level("INFO", logger="common"):
            first = engine.transcribe(clip, options)
            engine.transcribe(clip, options)
    finally:
        engine.close()
    assert first.timestamps == "segments"
    seg = first.segments[0]
    assert seg.char_times is None and seg.sentences
    assert seg.sentences[0].start == seg.start and seg.sentences[-1].end == seg.end
    said = [r for r in caplog.records if "has no CTC head" in r.getMessage()]
    assert len(said) == 1  # said once per engine, not once per file
