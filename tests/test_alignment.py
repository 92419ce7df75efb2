"""CTC forced alignment (funasr_nano/alignment.py): BPE encoding, Viterbi, character and sentence times.

The BPE encoder is checked against tiktoken itself (same pattern, same rank files: one trained
here so that it has real merges, and the tiny checkpoint's CTC vocabulary); the Viterbi against
brute-force enumeration of every frame labelling on small cases, and against layouts whose answer
is known; the whole chain on the exported tiny model's CTC graph, where the forced path of the
greedy CTC output must be the greedy path itself.
"""

from __future__ import annotations

import itertools
import random
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from funasr_nano.engine import Engine, TranscribeOptions
from funasr_nano.models.ctc import CTCVocabulary, greedy_ctc, read_tiktoken
from funasr_nano.models.prompt import PromptOptions
from funasr_nano.output.alignment import (
    GPT2_PATTERN,
    BPEEncoder,
    char_times,
    forced_align,
    make_targets,
    min_frames,
    proportional_char_times,
    sentence_times,
    split_pieces,
    target_text,
)
from funasr_nano.output.subtitles import segment_cues
from tests.llama_helpers import ENGINES
from tests.llama_helpers import small_engine as _engine

CORPUS = [
    "今天天气很好，我们去公园散步吧！你觉得怎么样？",
    "我们今天的会议讨论了新的计划。",
    "The quick brown fox jumps over the lazy dog.",
    "It's the speech of the people, and they're saying that we'll win.",
    "语音识别的准确率提高了百分之十。",
    "Speech recognition in the meeting room works well today.",
]
SAMPLES = [
    *CORPUS,
    "我们的天气",
    "the people's speech",
    "  multiple   spaces and 123 numbers 4567\n\nnew line",
    "今天we speak中文和English混合。",
    "未见过的字：龘靐齉",
    "Ünïcödé naïve café — “quotes” ¿qué? 😀",
]
BLANK = 0


def train_bpe(corpus: list[str], n_merges: int) -> list[bytes]:
    """A rank table with real merges (most frequent adjacent pair first), like the release's file."""
    vocab = [bytes([b]) for b in range(256)]
    words = Counter(p.encode() for line in corpus for p in split_pieces(line))
    seqs = {w: [bytes([b]) for b in w] for w in words}
    for _ in range(n_merges):
        pairs: Counter = Counter()
        for w, seq in seqs.items():
            for a, b in zip(seq, seq[1:]):
                pairs[(a, b)] += words[w]
        if not pairs:
            break
        (a, b), _ = pairs.most_common(1)[0]
        vocab.append(a + b)
        for w, seq in seqs.items():
            out, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and seq[i] == a and seq[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(seq[i])
                    i += 1
            seqs[w] = out
    return vocab


@pytest.fixture(scope="module")
def trained() -> list[bytes]:
    return train_bpe(CORPUS * 3, 400)


def tiktoken_encoding(pieces: list[bytes]):
    tiktoken = pytest.importorskip("tiktoken", reason="pip install -r requirements.txt (funasr brings it)")
    return tiktoken.Encoding("test", pat_str=GPT2_PATTERN, mergeable_ranks={b: i for i, b in enumerate(pieces)},
                             special_tokens={})


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def peaked_log_probs(layout: list[int], vocab_size: int, seed: int = 0) -> np.ndarray:
    """(T, V) log-probs where frame t clearly prefers the label layout[t] (blank = 0), with small noise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 0.3, size=(len(layout), vocab_size))
    x[np.arange(len(layout)), layout] += 8.0
    return log_softmax(x)


# --------------------------------------------------------------------------- pre-tokenization


def test_split_pieces_known_answer() -> None:
    assert split_pieces("Hello world, it's 2024!  Ok") == ["Hello", " world", ",", " it", "'s", " 2024", "!", " ", " Ok"]
    assert split_pieces("今天天气很好。我们去") == ["今天天气很好", "。", "我们去"]
    assert split_pieces("a \n\n b") == ["a", " \n\n", " b"]
    assert "".join(split_pieces(SAMPLES[-1])) == SAMPLES[-1]


def test_split_pieces_matches_regex() -> None:
    """Same pieces as the `regex` module on the pattern, on samples and random strings of tricky characters."""
    regex = pytest.importorskip("regex", reason="pip install -r requirements.txt (funasr brings it)")
    pattern = regex.compile(GPT2_PATTERN)
    for text in SAMPLES:
        assert split_pieces(text) == pattern.findall(text), text
    pool = list(" \n\t\x1c'sStrevmld") + list("abcXYZ0129,.!?-") + list("你好世界。，") + \
        ["😀", "\u00a0", "\u3000", "é", "\u0301", "²", "Ⅻ"]
    rng = random.Random(0)
    for _ in range(3000):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 20)))
        assert split_pieces(text) == pattern.findall(text), repr(text)


# --------------------------------------------------------------------------- BPE


def test_bpe_merge_order_known_answer() -> None:
    """The lowest-ranked adjacent pair merges first; the leftmost of equal pairs."""
    base = [bytes([b]) for b in range(256)]
    assert BPEEncoder([*base, b"bc", b"ab"]).encode("abc") == [ord("a"), 256]
    assert BPEEncoder([*base, b"ab", b"bc"]).encode("abc") == [256, ord("c")]
    assert BPEEncoder([*base, b"aa"]).encode("aaa") == [256, ord("a")]
    assert BPEEncoder([*base, b"aa", b"aaaa"]).encode("aaaaa") == [257, ord("a")]
    # a whole piece found in the table is one token even when no merge path leads to it (tiktoken does this)
    assert BPEEncoder([*base, b" the"]).encode("in the") == [ord("i"), ord("n"), 256]


def test_bpe_needs_every_byte() -> None:
    with pytest.raises(ValueError, match="single bytes"):
        BPEEncoder([bytes([b]) for b in range(255)])


def test_bpe_round_trip(trained: list[bytes]) -> None:
    encoder = BPEEncoder(trained)
    for text in SAMPLES:
        ids = encoder.encode(text)
        assert encoder.decode(ids) == text
        spans = encoder.encode_spans(text)
        data = text.encode("utf-8")
        assert b"".join(data[a:b] for _, a, b in spans) == data
    assert len(encoder.encode(CORPUS[0])) < len(CORPUS[0])  # the merges were used


def test_bpe_matches_tiktoken_trained(trained: list[bytes]) -> None:
    enc = tiktoken_encoding(trained)
    ours = BPEEncoder(trained)
    for text in SAMPLES:
        assert ours.encode(text) == enc.encode_ordinary(text), text
    chars = sorted(set("".join(SAMPLES))) + [" ", " ", "'"]
    rng = random.Random(1)
    for _ in range(1000):
        text = "".join(rng.choice(chars) for _ in range(rng.randint(0, 30)))
        assert ours.encode(text) == enc.encode_ordinary(text), repr(text)


def test_bpe_matches_tiktoken_on_checkpoint_vocab(tiny_ckpt: Path) -> None:
    """The tiny checkpoint's multilingual.tiktoken: CJK characters built from 2-byte prefixes, whole words."""
    ranks = read_tiktoken(tiny_ckpt / "multilingual.tiktoken")
    enc = tiktoken_encoding(ranks)
    ours = BPEEncoder(ranks)
    for text in [*SAMPLES, "the speech of the people is in the room"]:
        assert ours.encode(text) == enc.encode_ordinary(text), text
        assert ours.decode(ours.encode(text)) == text


# --------------------------------------------------------------------------- forced alignment


def test_forced_align_recovers_known_layout() -> None:
    # frames:  0  1  2  3  4  5  6  7  8  9 10 11 12 13
    layout = [0, 3, 3, 0, 1, 0, 0, 4, 0, 1, 1, 1, 0, 5]
    lp = peaked_log_probs(layout, 6)
    result = forced_align(lp, [3, 1, 4, 1, 5], BLANK)
    assert result is not None
    assert [(s.token_id, s.first_frame, s.last_frame) for s in result.spans] == \
        [(3, 1, 2), (1, 4, 4), (4, 7, 7), (1, 9, 11), (5, 13, 13)]
    assert result.score == pytest.approx(float(lp[np.arange(len(layout)), layout].sum()))


def test_forced_align_repeated_tokens_need_a_blank() -> None:
    layout = [0, 2, 0, 2, 2, 0, 3]
    lp = peaked_log_probs(layout, 4)
    result = forced_align(lp, [2, 2, 3], BLANK)
    assert result is not None
    assert [(s.first_frame, s.last_frame) for s in result.spans] == [(1, 1), (3, 4), (6, 6)]
    # without a frame to spare for the blank, two equal tokens cannot be spelled
    assert min_frames([7, 7]) == 3
    lp2 = peaked_log_probs([7, 7], 8)
    assert forced_align(lp2, [7, 7], BLANK) is None
    tight = forced_align(peaked_log_probs([7, 0, 7], 8), [7, 7], BLANK)
    assert tight is not None and [(s.first_frame, s.last_frame) for s in tight.spans] == [(0, 0), (2, 2)]


def test_forced_align_forces_unlikely_tokens() -> None:
    """A token the frames do not favour still gets a frame, between its neighbours."""
    layout = [0, 1, 0, 0, 0, 0, 3, 0]
    lp = peaked_log_probs(layout, 5)
    result = forced_align(lp, [1, 4, 3], BLANK)
    assert result is not None
    first, middle, last = result.spans
    assert (first.first_frame, last.first_frame) == (1, 6)
    assert first.last_frame < middle.first_frame <= middle.last_frame < last.first_frame


def test_forced_align_edge_cases() -> None:
    lp = peaked_log_probs([0, 1, 0], 3)
    empty = forced_align(lp, [], BLANK)
    assert empty is not None and empty.spans == []
    assert empty.score == pytest.approx(float(lp[:, BLANK].sum()))
    assert forced_align(lp, [1, 2, 1, 2], BLANK) is None  # more targets than frames
    assert forced_align(np.zeros((0, 3)), [1], BLANK) is None
    assert forced_align(np.zeros((0, 3)), [], BLANK) == empty.__class__([], 0.0)
    with pytest.raises(ValueError):
        forced_align(lp, [0], BLANK)  # the blank is not a target
    with pytest.raises(ValueError):
        forced_align(lp, [3], BLANK)  # outside the vocabulary
    one = forced_align(lp[1:2], [1], BLANK)
    assert one is not None and one.spans[0].first_frame == one.spans[0].last_frame == 0


def _collapse(labels: tuple[int, ...]) -> tuple[int, ...]:
    return tuple(k for k, _ in itertools.groupby(labels) if k != BLANK)


def test_forced_align_equals_brute_force() -> None:
    """Best score over every frame labelling that collapses to the targets, on random small cases."""
    rng = np.random.default_rng(7)
    vocab = 4
    labellings = {t: np.array(list(itertools.product(range(vocab), repeat=t))) for t in range(1, 8)}
    collapsed = {t: [_collapse(tuple(row)) for row in rows] for t, rows in labellings.items()}
    checked = 0
    for case in range(150):
        n_frames = int(rng.integers(1, 8))
        targets = [int(x) for x in rng.integers(1, vocab, size=int(rng.integers(1, 4)))]
        if case % 5 == 0 and len(targets) > 1:
            targets[1] = targets[0]  # make sure repeats are well covered
        lp = log_softmax(rng.normal(0.0, 2.0, size=(n_frames, vocab)))
        rows = labellings[n_frames]
        valid = np.array([c == tuple(targets) for c in collapsed[n_frames]])
        result = forced_align(lp, targets, BLANK)
        if not valid.any():
            assert result is None, (n_frames, targets)
            continue
        scores = lp[np.arange(n_frames), rows[valid]].sum(axis=1)
        assert result is not None, (n_frames, targets)
        assert result.score == pytest.approx(float(scores.max()), abs=1e-9)
        # the spans describe a valid path with that score: tokens on their frames, blanks elsewhere
        path = np.full(n_frames, BLANK)
        prev_last = -1
        for span, tok in zip(result.spans, targets):
            assert span.token_id == tok and prev_last < span.first_frame <= span.last_frame
            path[span.first_frame : span.last_frame + 1] = tok
            prev_last = span.last_frame
        assert _collapse(tuple(path)) == tuple(targets)
        assert float(lp[np.arange(n_frames), path].sum()) == pytest.approx(result.score, abs=1e-9)
        checked += 1
    assert checked > 50


def test_forced_align_speed_30s() -> None:
    """500 frames (30 s), 150 targets, the release's vocabulary width: well under 50 ms on one core."""
    rng = np.random.default_rng(0)
    n_frames, vocab = 500, 60515
    lp = log_softmax(rng.normal(0.0, 3.0, size=(n_frames, vocab)).astype(np.float32))
    targets = rng.integers(1, vocab, size=150).tolist()
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        result = forced_align(lp, targets, BLANK)
        best = min(best, time.perf_counter() - t0)
    assert result is not None and len(result.spans) == 150
    print(f"\nforced_align: 500 frames x 150 targets (V={vocab}): {best * 1e3:.1f} ms")
    assert best < 0.5  # generous: shared CI machines; measured about 15 ms


# --------------------------------------------------------------------------- text -> times


def test_target_text() -> None:
    assert target_text("Hello, world! It's 3.5 km.")[0] == "Hello world It's 3 5 km"
    assert target_text("你好，世界。")[0] == "你好世界"
    assert target_text("我用 Python 写代码")[0] == "我用 Python 写代码"
    assert target_text("“引号”里的话")[0] == "引号里的话"
    text = " Hi,  there. "
    aligned, source = target_text(text)
    assert aligned == "Hi there"
    assert [text[i] if i >= 0 else " " for i in source] == list(aligned)
    assert target_text("Hi,  there.", keep_punctuation=True)[0] == "Hi, there."


class FakeVocab:
    """What char_times reads of a CTCVocabulary: the pieces and the blank id (blank = one past the ranks)."""

    def __init__(self, pieces: list[bytes]) -> None:
        self.pieces = pieces
        self.blank_id = len(pieces)


def fake_vocab(pieces: list[bytes]) -> FakeVocab:
    return FakeVocab(pieces)


def layout_for(ids: list[int], blank: int, gap: int = 2, run: int = 1) -> tuple[list[int], list[int]]:
    """Frames where each token sits `run` frames, `gap` blanks apart (and before the first); first frames."""
    layout, firsts = [blank] * gap, []
    for tok in ids:
        firsts.append(len(layout))
        layout += [tok] * run + [blank] * gap
    return layout, firsts


def test_char_times_on_known_layout(trained: list[bytes]) -> None:
    text = "今天天气很好。我们去公园散步吧！"
    vocab = fake_vocab(trained)
    encoder = BPEEncoder(trained)
    targets = make_targets(text, encoder)
    assert targets.text == "今天天气很好我们去公园散步吧"
    layout, firsts = layout_for(targets.ids, vocab.blank_id)
    lp = peaked_log_probs(layout, len(trained) + 1)
    start, shift_ms = 12.0, 60
    times = char_times(text, lp, vocab, shift_ms, start, start + len(layout) * 0.06)
    assert times is not None and len(times) == len(text)
    expected: list[float] = []
    for k in range(len(targets.text)):  # first frame of its token, shared evenly within a multi-character token
        j = targets.char_token[k]
        frame = firsts[j] + targets.char_rank[k] / targets.token_chars[j]
        expected.append(round(start + frame * 0.06, 3))
    spoken = [times[i] for i, ch in enumerate(text) if ch not in "。！"]
    assert spoken == pytest.approx(expected, abs=1.1e-3)  # times are rounded to ms
    assert times[text.index("。")] == times[text.index("。") + 1]  # punctuation: the next character's time
    assert times[-1] == times[-2]  # trailing punctuation: the previous one's
    assert any(n > 1 for n in targets.token_chars)  # the case of a multi-character token was exercised


def test_char_times_english_words(trained: list[bytes]) -> None:
    text = "The quick brown fox, it's the speech."
    vocab = fake_vocab(trained)
    targets = make_targets(text, BPEEncoder(trained))
    layout, firsts = layout_for(targets.ids, vocab.blank_id, gap=3, run=2)
    lp = peaked_log_probs(layout, len(trained) + 1)
    times = char_times(text, lp, vocab, 60, 0.0, len(layout) * 0.06)
    assert times is not None
    for word in ("quick", "brown", "fox", "speech"):
        i = text.index(word)
        j = targets.char_token[targets.source.index(i)]
        assert times[i] == pytest.approx(firsts[j] * 0.06)
        assert times[i - 1] == times[i]  # the space before a word takes the word's time
    assert times == sorted(times)


def test_char_times_unalignable(trained: list[bytes]) -> None:
    vocab = fake_vocab(trained)
    lp = peaked_log_probs([vocab.blank_id] * 5, len(trained) + 1)
    assert char_times("", lp, vocab, 60, 0.0, 1.0) == []
    assert char_times("。！？", lp, vocab, 60, 0.0, 1.0) is None  # nothing spoken to align
    assert char_times("龘靐齉龘靐齉", lp, vocab, 60, 0.0, 1.0) is None  # more tokens than frames


def test_char_times_monotonic_within_bounds(trained: list[bytes]) -> None:
    """Random posteriors and texts: times never decrease and stay in [start, end], even past the frames."""
    vocab = fake_vocab(trained)
    encoder = BPEEncoder(trained)
    rng = np.random.default_rng(3)
    pool = "".join(sorted(set("".join(SAMPLES))))
    for case in range(40):
        text = "".join(pool[int(i)] for i in rng.integers(0, len(pool), size=int(rng.integers(1, 40))))
        n_frames = int(rng.integers(1, 120))
        lp = log_softmax(rng.normal(0.0, 3.0, size=(n_frames, len(trained) + 1)))
        start = float(rng.uniform(0, 100))
        end = start + (n_frames * 0.06 if case % 2 else n_frames * 0.03)  # the segment may end before the frames
        times = char_times(text, lp, vocab, 60, start, end, encoder=encoder)
        if times is None:
            continue
        assert len(times) == len(text)
        assert all(start <= t <= end for t in times)
        assert all(a <= b for a, b in zip(times, times[1:]))


def test_sentence_times_and_subtitles_agree(trained: list[bytes]) -> None:
    text = " 今天天气很好。我们去公园散步吧！  你觉得怎么样？"  # leading and double spaces: indices must hold
    vocab = fake_vocab(trained)
    targets = make_targets(text, BPEEncoder(trained))
    layout, _ = layout_for(targets.ids, vocab.blank_id, gap=4)
    lp = peaked_log_probs(layout, len(trained) + 1)
    start, end = 5.0, 5.0 + len(layout) * 0.06 + 0.5
    times = char_times(text, lp, vocab, 60, start, end)
    assert times is not None
    sentences = sentence_times(text, start, end, times)
    assert [s.text for s in sentences] == ["今天天气很好。", "我们去公园散步吧！", "你觉得怎么样？"]
    assert sentences[0].start == times[1]
    assert sentences[1].start == times[text.index("我")] and sentences[2].start == times[text.index("你")]
    assert [s.end for s in sentences] == [sentences[1].start, sentences[2].start, end]
    cues = segment_cues(start, end, text, max_cue_seconds=60.0, char_times=times)
    assert [c.text for c in cues] == [s.text for s in sentences]
    assert [c.start for c in cues[1:]] == [s.start for s in sentences[1:]]
    # a char_times list of the wrong length is ignored: proportional cues, same as none
    assert segment_cues(start, end, text, 60.0, char_times=times[1:]) == segment_cues(start, end, text, 60.0)


def test_subtitles_read_char_times_by_character_index() -> None:
    """char_times[i] is the time of text[i] (spaces included), not of the i-th non-space character."""
    text = "  One two three. Four  five six. Seven."
    times = [10.0 + 0.1 * i for i in range(len(text))]
    cues = segment_cues(10.0, 20.0, text, max_cue_seconds=60.0, char_times=times)
    assert [c.text for c in cues] == ["One two three.", "Four five six.", "Seven."]
    assert [c.start for c in cues] == pytest.approx([10.0, times[text.index("Four")], times[text.index("Seven")]])
    sentences = sentence_times(text, 10.0, 20.0, times)
    assert [s.start for s in sentences] == pytest.approx([times[2], times[text.index("Four")], times[text.index("Seven")]])


def test_sentence_times_fallback_is_proportional() -> None:
    """Without CTC: the segment (VAD) times shared out by characters, the same boundaries as the subtitles."""
    text = "It costs 3.5 dollars. Then he left! 好的。"
    sentences = sentence_times(text, 10.0, 20.0)
    cues = segment_cues(10.0, 20.0, text, max_cue_seconds=60.0)
    assert [s.text for s in sentences] == [c.text for c in cues]
    assert [s.start for s in sentences] == pytest.approx([c.start for c in cues], abs=1e-3)
    assert [s.end for s in sentences] == pytest.approx([c.end for c in cues], abs=1e-3)
    times = proportional_char_times(text, 10.0, 20.0)
    assert times[0] == 10.0 and times == sorted(times) and times[-1] < 20.0
    assert sentence_times("", 0.0, 1.0) == []


# --------------------------------------------------------------------------- on the exported CTC graph


@pytest.fixture(scope="module")
def tiny_ctc(tiny_models: Path, zh_mp3: Path):
    """The tiny model's CTC log-probs for the shared news clip, and its vocabulary."""
    from funasr_nano.audio.features import FrontendConfig, compute_features
    from funasr_nano.audio.load import load_audio
    from funasr_nano.models.encoder import AudioEncoder, CTCHead
    from funasr_nano.models.settings import ModelSettings

    s = ModelSettings.load(tiny_models)
    assert s.ctc is not None
    frontend = FrontendConfig.from_dict(s.frontend)
    feats = compute_features(load_audio(zh_mp3, frontend.sample_rate), frontend)
    enc, _ = AudioEncoder(s.path("encoder")).run(feats)
    log_probs = CTCHead(s.path("ctc")).run(enc, log_probs=True)
    return log_probs, CTCVocabulary(s.path("ctc_vocab"), s.ctc), s.ctc


def test_forced_path_of_greedy_ctc_is_the_greedy_path(tiny_ctc) -> None:
    """The greedy path is the best of all paths, so forcing its own tokens must give back its frames.

    Random weights never pick the blank; raising the blank's column makes blanks win about half
    the frames, so runs are split and equal tokens repeat with blanks between them, as in speech.
    """
    log_probs, vocab, _ = tiny_ctc
    margin = log_probs.max(axis=1) - log_probs[:, vocab.blank_id]
    boosted = log_probs.copy()
    boosted[:, vocab.blank_id] += float(np.median(margin))
    for lp in (log_probs, boosted):
        greedy = greedy_ctc(lp, vocab.blank_id)
        assert len(greedy) > 5
        result = forced_align(lp, [t.token_id for t in greedy], vocab.blank_id)
        assert result is not None
        assert [(s.token_id, s.first_frame, s.last_frame) for s in result.spans] == \
            [(t.token_id, t.first_frame, t.last_frame) for t in greedy]
        assert result.score == pytest.approx(float(lp.max(axis=1).astype(np.float64).sum()), rel=1e-6)
    assert (boosted.argmax(axis=1) == vocab.blank_id).mean() > 0.3


def test_char_times_of_greedy_ctc_text(tiny_ctc) -> None:
    """Greedy text of the CTC graph (restricted to whole CJK characters so that it is canonical BPE),
    aligned from its text: every character starts on its greedy run's first frame."""
    log_probs, vocab, ctc = tiny_ctc
    encoder = BPEEncoder.for_vocabulary(vocab)
    assert BPEEncoder.for_vocabulary(vocab) is encoder  # built once per vocabulary
    cjk = [i for i, p in enumerate(vocab.pieces[: ctc.n_ranks])
           if len(p) == 3 and p.decode("utf-8", errors="ignore") and "\u4e00" <= p.decode("utf-8") <= "\u9fff"]
    keep = np.array([*cjk, vocab.blank_id])
    masked = np.full_like(log_probs, -np.inf)
    masked[:, keep] = log_probs[:, keep]
    greedy = greedy_ctc(masked, vocab.blank_id)
    text = vocab.decode([t.token_id for t in greedy])
    assert len(greedy) > 5 and len(text) == len(greedy)
    assert encoder.encode(text) == [t.token_id for t in greedy]
    n_frames = log_probs.shape[0]
    start = 3.0
    times = char_times(text, masked, vocab, ctc.frame_shift_ms, start, start + n_frames * 0.06)
    assert times is not None
    assert times == pytest.approx([round(start + t.first_frame * 0.06, 3) for t in greedy], abs=1e-9)
    # the same text with punctuation added aligns to the same times (punctuation is not a target)
    punctuated = "，".join(text[i : i + 4] for i in range(0, len(text), 4)) + "。"
    times_p = char_times(punctuated, masked, vocab, ctc.frame_shift_ms, start, start + n_frames * 0.06)
    assert times_p is not None
    assert [t for t, ch in zip(times_p, punctuated) if ch not in "，。"] == times


def test_char_times_of_full_ctc_output(tiny_ctc) -> None:
    """Whatever the unrestricted greedy text holds (special names, replaced bytes), times stay well formed."""
    log_probs, vocab, ctc = tiny_ctc
    text = vocab.ctc_text(log_probs)
    n_frames = log_probs.shape[0]
    times = char_times(text, log_probs, vocab, ctc.frame_shift_ms, 0.0, n_frames * 0.06)
    if times is not None:
        assert len(times) == len(text) and times == sorted(times)
        assert 0.0 <= times[0] and times[-1] <= n_frames * 0.06


# --------------------------------------------------------------------------- timestamps


SR = 16000


def test_engine_aligns_sentences_on_the_ctc_posteriors(tiny_models, clip):
    """With the CTC head: each segment's text is forced-aligned on the head's log-probs (its own run)."""
    from funasr_nano.output.alignment import char_times, sentence_times

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
        with caplog.at_level("INFO", logger="funasr_nano"):
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
