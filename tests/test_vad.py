"""Silero VAD on onnxruntime: finds speech where it was put, equals the silero-vad package, streams.

The espeak-ng layout (sentences separated by silences of known length) is the `layout` fixture in
conftest.py."""

from __future__ import annotations

import time

import numpy as np
import pytest

from funasr_nano.audio.vad import (
    VAD_FILE,
    SileroVad,
    SpeechSegmenter,
    VadOptions,
    copy_vad_model,
    find_vad_model,
    speech_spans,
)

SR = 16000


@pytest.fixture(scope="module")
def vad() -> SileroVad:
    path = find_vad_model()
    if path is None:
        pytest.fail("silero-vad is not installed: its silero_vad.onnx is needed")
    return SileroVad(path)


# --------------------------------------------------------------------------- VAD


def test_vad_model_is_copied_and_found_first(tmp_path):
    copied = copy_vad_model(tmp_path)
    assert copied == tmp_path / VAD_FILE and copied.stat().st_size > 100_000
    assert find_vad_model(tmp_path) == copied
    assert find_vad_model(tmp_path / "elsewhere") is not None  # falls back to the installed package


def test_vad_probabilities_equal_the_silero_package(vad, clip):
    """Same ONNX file, same 64-sample context and state handling: the same probabilities."""
    silero_vad = pytest.importorskip("silero_vad", reason="pip install torch==2.13.0 && pip install -r requirements.txt")
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


def test_streams_of_one_model_keep_their_own_state(vad, clip, layout):
    """Two inputs fed in turn, block by block, through streams of one model (concurrent transcriptions):
    each gets the probabilities it gets alone; through the one shared state they would not."""
    other = layout[0][: len(clip)]
    alone = [vad.probabilities(clip), vad.probabilities(other)]
    streams = [vad.stream(), vad.stream()]
    got: list[list[np.ndarray]] = [[], []]
    blocks = [np.array_split(clip, 5), np.array_split(other, 5)]
    for i in range(5):
        for k in (0, 1):
            got[k].append(streams[k].feed(blocks[k][i], last=i == 4))
    shared = vad.stream()
    mixed = [shared.feed(blocks[k][i], last=i == 4) for i in range(5) for k in (0, 1)]
    assert np.array_equal(np.concatenate(got[0]), alone[0]) and np.array_equal(np.concatenate(got[1]), alone[1])
    assert not np.array_equal(np.concatenate(mixed[0::2]), alone[0])
