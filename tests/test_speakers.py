"""Diarization (`funasr_nano/speakers/`) against funasr's own CAM++, ClusterBackend and postprocessing.

- CAM++: `testing/campplus_checkpoint.py` builds the release's layout at full shape with random
  weights; our export (funasr_nano/export/export_campplus.py) on onnxruntime must give funasr's
  embeddings (`AutoModel(model=DIR)`, what `spk_model="cam++"` loads) within EMBEDDING_TOLERANCE
  (absolute; the embeddings' std is about 0.7, measured differences below 1e-6), on noise, speech,
  a short padded window and windows cut from a long segment. The fbank equals funasr's bit for bit;
  the window's mean over time differs by float32 rounding (below 1e-5).
- Clustering: noisy copies of k random unit vectors (k = 1..6; cosine about 0.8 within a speaker,
  about 0 between), in shuffled order, short (under 20 windows, one speaker by rule), spectral
  (60-1500 windows) and long (2,100-2,400 windows: k-means with a count, UMAP + HDBSCAN without);
  our labels must be funasr's ClusterBackend's up to renumbering, with and without the count (on
  the UMAP branch, on the windows funasr's HDBSCAN does not call noise: see that test).
- Turns and sentence speakers: funasr's postprocess + distribute_spk on the same windows and labels
  give the same turns and the same speaker per sentence.
- Live streams' online speakers (ours, no funasr counterpart): assignment by cosine to running means,
  a new speaker below the threshold, the bound.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from funasr_nano.speakers.clustering import SpeakerCount, cluster_speakers
from funasr_nano.speakers.diarize import first_appearance, speaker_of, speaker_turns
from funasr_nano.speakers.embeddings import SpeakerEmbedder, segment_windows, window_features
from testing.campplus_checkpoint import build_campplus_checkpoint
from testing.oracle import quiet_funasr

SR = 16000
EMBEDDING_TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def campplus(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(release-shaped checkpoint, exported model folder)."""
    from funasr_nano.export.export_campplus import export_campplus

    ckpt = build_campplus_checkpoint(tmp_path_factory.mktemp("campplus") / "release", seed=3)
    out = tmp_path_factory.mktemp("campplus_out")
    export_campplus(ckpt, out)
    return ckpt, out


@pytest.fixture(scope="module")
def funasr_campplus(campplus: tuple[Path, Path]):
    with quiet_funasr():
        from funasr import AutoModel

        return AutoModel(model=str(campplus[0]), disable_update=True, device="cpu", ncpu=2, disable_pbar=True,
                         disable_log=True)


def _funasr_embeddings(model, windows: list[np.ndarray]) -> np.ndarray:
    with quiet_funasr():
        res = model.generate(input=windows)
    return np.concatenate([r["spk_embedding"].numpy() for r in res])


def _speech(tmp_path: Path) -> np.ndarray:
    from funasr_nano.audio.load import load_audio
    from tests.audio_fixtures import espeak_wav

    return load_audio(espeak_wav(tmp_path / "speech.wav", "Who spoke when, and for how long did they speak?"))


def test_features_equal_funasr(tmp_path: Path) -> None:
    import torch
    from funasr.models.campplus.utils import extract_feature
    from funasr.utils import fbank as kaldi

    from funasr_nano.audio.features import fbank
    from funasr_nano.speakers.embeddings import FbankSettings

    wave = _speech(tmp_path)[: int(1.5 * SR)]
    # the fbank itself bit for bit (the same kaldi-native-fbank call)
    np.testing.assert_array_equal(fbank(wave, FbankSettings().frontend()),
                                  kaldi.fbank(torch.from_numpy(wave).unsqueeze(0), num_mel_bins=80).numpy())
    # the mean over time is summed in another order by torch: float32 rounding, about 3e-6
    ours = window_features(wave)
    theirs, _, _ = extract_feature([torch.from_numpy(wave)])
    assert ours.shape == tuple(theirs.shape[1:]) == (148, 80)
    np.testing.assert_allclose(ours, theirs[0].numpy(), rtol=0, atol=1e-5)


def test_windows_follow_sv_chunk() -> None:
    from funasr.models.campplus.utils import sv_chunk

    rng = np.random.default_rng(0)
    for seconds in (0.4, 1.5, 1.6, 2.25, 3.0, 7.33):
        wave = rng.standard_normal(int(seconds * SR)).astype(np.float32)
        ours = segment_windows(2.5, wave)
        theirs = sv_chunk([[2.5, 2.5 + seconds, wave]])
        assert [(w.start, w.end) for w in ours] == [(s, e) for s, e, _ in theirs]
        for w, (_, _, samples) in zip(ours, theirs):
            np.testing.assert_array_equal(w.samples, samples)


def test_embeddings_equal_funasr(campplus: tuple[Path, Path], funasr_campplus, tmp_path: Path) -> None:
    embedder = SpeakerEmbedder(campplus[1] / "campplus.onnx")
    rng = np.random.default_rng(1)
    speech = _speech(tmp_path)
    inputs = {
        "noise": (0.1 * rng.standard_normal(int(3.1 * SR))).astype(np.float32),
        "speech": speech,
        "short": speech[: int(0.6 * SR)],  # one window, zero-padded
        "loud": np.clip(3.0 * speech, -1, 1),
    }
    for name, wave in inputs.items():
        windows = segment_windows(0.0, wave)
        ours = embedder.embed(windows)
        theirs = _funasr_embeddings(funasr_campplus, [w.samples for w in windows])
        assert ours.shape == theirs.shape == (len(windows), 192), name
        diff = float(np.abs(ours - theirs).max())
        assert diff < EMBEDDING_TOLERANCE, f"{name}: max |diff| {diff:.2e} (embedding std {theirs.std():.2f})"
    # the input matters: different audio, different embeddings
    a = embedder.embed(segment_windows(0.0, inputs["noise"]))[0]
    b = embedder.embed(segment_windows(0.0, speech))[0]
    assert np.abs(a - b).max() > 0.1


# --------------------------------------------------------------------------- clustering


def speaker_embeddings(k: int, n: int, seed: int, dim: int = 192, noise: float = 0.05) -> tuple[np.ndarray, np.ndarray]:
    """n noisy copies of k random unit vectors (uneven shares, shuffled), and which vector each copies."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((k, dim))
    centers /= np.linalg.norm(centers, axis=1, keepdims=True)
    shares = rng.dirichlet(np.full(k, 3.0))
    truth = rng.choice(k, size=n, p=shares)
    truth[:k] = np.arange(k)  # every speaker present
    rng.shuffle(truth)
    x = centers[truth] + noise * rng.standard_normal((n, dim))
    return (3.0 * x).astype(np.float32), truth


def same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return np.array_equal(first_appearance(a), first_appearance(b))


def _funasr_labels(x: np.ndarray, k: int | None) -> np.ndarray:
    import torch
    from funasr.models.campplus.cluster_backend import ClusterBackend

    return np.asarray(ClusterBackend()(torch.from_numpy(x), oracle_num=k))


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
@pytest.mark.parametrize("n", [12, 60, 400, 1500])
def test_clustering_equals_funasr(k: int, n: int) -> None:
    x, truth = speaker_embeddings(k, n, seed=10 * k + n)
    for oracle in (None, k):
        ours = cluster_speakers(x, SpeakerCount(count=oracle))
        theirs = _funasr_labels(x, oracle)
        assert same_partition(ours, theirs), (k, n, oracle)
        if n >= 20:
            assert same_partition(ours, truth), (k, n, oracle)


@pytest.mark.parametrize("k", [1, 2, 4, 6])
def test_long_clustering_with_count_equals_funasr(k: int) -> None:
    """Past 2,048 windows (about 25 minutes of speech) with a count: k-means on normalised embeddings."""
    x, truth = speaker_embeddings(k, 2100 + 50 * k, seed=k)
    ours = cluster_speakers(x, SpeakerCount(count=k))
    assert same_partition(ours, _funasr_labels(x, k)), k
    assert same_partition(ours, truth), k


@pytest.mark.slow
@pytest.mark.parametrize("k", [1, 3, 6])
def test_long_clustering_equals_funasr(k: int) -> None:
    """Past 2,048 windows without a count: UMAP + HDBSCAN (about 20 s each on 2 cores, funasr's 12 s).

    funasr's HDBSCAN leaves windows as noise (-1) on one voice (about a fifth, a different fifth each
    run: its UMAP is unseeded), which its postprocessing makes one more speaker; ours joins them to the
    nearest cluster (funasr_nano/speakers/clustering.py). So: equal on every window funasr does not call
    noise, and ours has exactly the true speakers."""
    x, truth = speaker_embeddings(k, 2100 + 50 * k, seed=k)
    ours = cluster_speakers(x)
    theirs = _funasr_labels(x, None)
    kept = theirs >= 0
    assert kept.mean() > 0.5, k
    assert same_partition(ours[kept], theirs[kept]), k
    assert same_partition(ours, truth), k


def test_speaker_bounds() -> None:
    x, _ = speaker_embeddings(4, 300, seed=7)
    assert len(set(cluster_speakers(x, SpeakerCount(maximum=2)).tolist())) <= 2
    assert len(set(cluster_speakers(x, SpeakerCount(minimum=4, maximum=6)).tolist())) == 4
    one, _ = speaker_embeddings(1, 300, seed=8)
    assert len(set(cluster_speakers(one, SpeakerCount(count=3)).tolist())) == 3
    with pytest.raises(ValueError):
        SpeakerCount(minimum=3, maximum=2)


# --------------------------------------------------------------------------- turns and sentences


def test_turns_and_sentence_speakers_equal_funasr() -> None:
    from funasr.models.campplus.utils import distribute_spk, postprocess, sv_chunk

    rng = np.random.default_rng(5)
    for trial in range(30):
        # VAD segments with gaps, windows as funasr cuts them, labels with short flips
        segments, t = [], 0.0
        for _ in range(rng.integers(1, 8)):
            t += float(rng.choice([0.0, 0.3, 1.2]))
            length = float(rng.choice([0.5, 1.1, 2.0, 3.7, 6.4]))
            segments.append([round(t, 3), round(t + length, 3), np.zeros(int(round(length * SR)), np.float32)])
            t += length
        windows = sv_chunk(segments)
        labels = rng.integers(0, 3, size=len(windows))
        labels[rng.random(len(windows)) < 0.6] = 1
        theirs = postprocess([list(w) for w in windows], None, labels.copy(), np.zeros((len(windows), 4)))
        ours = speaker_turns([(w[0], w[1]) for w in windows], labels)
        assert [(tn.start, tn.end, tn.speaker) for tn in ours] == [(s, e, int(k)) for s, e, k in theirs], trial
        sentences = []
        for _ in range(6):
            start = float(rng.uniform(0, t))
            sentences.append({"start": start * 1000, "end": (start + float(rng.uniform(0.1, 3))) * 1000})
        distribute_spk(sentences, theirs)
        assert [speaker_of(s["start"] / 1000, s["end"] / 1000, ours) for s in sentences] == \
            [s["spk"] for s in sentences], trial


def test_online_speakers_follow_the_running_means_up_to_the_bound() -> None:
    """Live streams' speakers (funasr_nano.speakers.online): noisy copies of random unit vectors (cosine about
    0.8 within a speaker, about 0 between) go to the speaker whose running mean they are close to, a far one
    opens a new speaker until `max_speakers`, then joins the closest; a segment without samples keeps the last."""
    from funasr_nano.speakers.online import OnlineSpeakers, segment_embedding

    rng = np.random.default_rng(5)
    voices = rng.standard_normal((3, 192))
    voices /= np.linalg.norm(voices, axis=1, keepdims=True)

    def segment(k: int) -> np.ndarray:
        return voices[k] + 0.75 * rng.standard_normal(192) / np.sqrt(192)

    order = [0, 0, 1, 0, 1, 1, 2, 0]
    online = OnlineSpeakers(threshold=0.5, max_speakers=3)
    assert [online.assign(segment(k)) for k in order] == order and online.speakers == 3
    assert online.assign(None) == 0  # the last segment's speaker
    bounded = OnlineSpeakers(threshold=0.5, max_speakers=2)
    got = [bounded.assign(segment(k)) for k in order]
    assert got[:6] == order[:6] and got[6] in (0, 1) and bounded.speakers == 2
    strict = OnlineSpeakers(threshold=0.99, max_speakers=15)  # no noisy copy reaches it: a new speaker each time
    assert [strict.assign(segment(0)) for _ in range(4)] == [0, 1, 2, 3]
    for bad in ({"threshold": 1.5}, {"max_speakers": 0}):
        with pytest.raises(ValueError):
            OnlineSpeakers(**bad)

    class TwoWindows:  # the embedder's interface: (windows, embeddings)
        def segment(self, start: float, wave: np.ndarray, sample_rate: int):
            return [(0.0, 1.5), (0.75, 2.25)], np.array([[3.0, 0.0], [0.0, 3.0]], np.float32)

    assert np.allclose(segment_embedding(TwoWindows(), np.ones(SR, np.float32)), [2 ** -0.5, 2 ** -0.5])
    assert segment_embedding(TwoWindows(), np.zeros(0, np.float32)) is None
