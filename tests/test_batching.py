"""Batched decoding through the scheduler gives the tokens of decoding each segment alone.

Freed sequences take the next segment, forced token rates give each segment its own length, the
repetition guard stops both paths alike, and the engine decodes Silero's segments of a long file
batched with the tokens of each decoded alone."""

from __future__ import annotations

import numpy as np
import pytest

from funasr_nano.audio.load import load_audio
from funasr_nano.decoding import Job, Scheduler, StopRule
from funasr_nano.decoding.prefixes import PrefixCache
from funasr_nano.decoding.repetition import NO_GUARD, RepetitionGuard
from funasr_nano.engine import Engine, TranscribeOptions
from funasr_nano.models.prompt import PromptOptions
from testing import reference
from testing.bench_engine import BenchmarkEngine
from testing.drafts import make_draft
from tests.llama_helpers import ENGINES
from tests.llama_helpers import small_engine as _engine

SR = 16000
CUTS = [(0.0, 3.0), (2.0, 7.5), (4.0, 10.0), (1.0, 2.5), (5.0, 9.0)]


def _one_by_one(engine: Engine, pieces, rule: StopRule) -> list[list[int]]:
    """Each piece decoded alone by the independent reference, the guard's trim applied."""
    prepared = [engine.prepare(piece, PromptOptions()) for piece in pieces]
    return engine.scheduler.call(lambda d, _: [rule.finish(reference.decode_alone(
        d, p, rule.max_new_tokens, rule.min_new_tokens, rule.guard))[0] for p in prepared])


def _decode_all(engine: Engine, pieces, rule: StopRule, drafts=None):
    """Every piece through the scheduler at once (one stream), results in input order."""
    jobs = [Job(engine.prepare(p, PromptOptions()).prompt, rule, None if drafts is None else drafts[i])
            for i, p in enumerate(pieces)]
    owner = object()  # one caller, as a file's segments are
    futures = [engine.scheduler.submit(job, owner) for job in jobs]
    return [future.result(timeout=600) for future in futures]


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
        with caplog.at_level("WARNING", logger="funasr_nano"), ThreadPoolExecutor(3) as pool:
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
    single = _engine(tiny_models, cfg, 1, engine=BenchmarkEngine, tokens_per_second=4.0)
    batched = _engine(tiny_models, cfg, 3, engine=BenchmarkEngine, tokens_per_second=4.0)
    fixed = _engine(tiny_models, cfg, 3, engine=BenchmarkEngine, tokens_per_second=4.0, refill=False)
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


class _RecordingDecoder:
    """A `RoundDecoder` over the real one that keeps a copy of the latest logits of each (sequence,
    position, token fed): a padding row (a token repeated one position on) is overwritten by the
    row that later feeds that token there, and told apart from one feeding another token."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.n_batch, self.n_ctx, self.stop_ids = decoder.n_batch, decoder.n_ctx, decoder.stop_ids
        self.rows: dict[tuple[int, int, int], np.ndarray] = {}
        self._fed: list[tuple[int, int, int]] = []

    def decode_many(self, tokens, positions, seqs, outputs) -> None:
        self.decoder.decode_many(tokens, positions, seqs, outputs)
        self._fed = [(s, p, t) for t, p, s, out in zip(tokens, positions, seqs, outputs) if out]

    def logits_rows(self, count: int) -> np.ndarray:
        logits = self.decoder.logits_rows(count)
        for key, row in zip(self._fed, logits):
            self.rows[key] = row.copy()
        return logits

    def step(self, token: int, pos: int, seq: int = 0) -> np.ndarray:
        logits = self.decoder.step(token, pos, seq)
        self.rows[(seq, pos, token)] = logits.copy()
        return logits

    def clear(self, seq: int = -1, start: int = 0) -> None:
        self.decoder.clear(seq, start)


class _OneWrongRow:
    """A draft that proposes one token no greedy step picks every round: sequence 0 then feeds two
    rows a round, one more than a plain neighbour, so llama.cpp leaves its second row alone in a
    micro-batch of its own."""

    proposed = accepted = 0

    def propose(self, room: int, config) -> list[int]:
        return [5][:room]

    def checked(self, k: int, accepted: int, config) -> None:
        pass

    def realign(self, tokens) -> None:
        pass


def _rows_of_sequence_zero(decoder, pad: bool, company: bool,
                           speculative: bool) -> tuple[list[int], dict[tuple[int, int], np.ndarray]]:
    """Sequence 0's tokens and the logits of the rows it fed, by (position, token): 40 forced
    tokens, alone or beside a plain 10-token job."""
    from funasr_nano.decoding.rounds import decode_to_end
    from funasr_nano.decoding.sequence import SequenceState

    prompts = [list(range(2000, 2012)), list(range(3000, 3020))]
    states = []
    decoder.clear()
    for seq, (prompt, n) in enumerate(zip(prompts, (40, 10))):
        if seq and not company:
            break
        decoder.decode_tokens(prompt, 0, seq)
        states.append(SequenceState(seq=seq, pos=len(prompt), logits=decoder.logits().copy(), rule=StopRule.forced(n),
                                    draft=_OneWrongRow() if speculative and seq == 0 else None))
    recorder = _RecordingDecoder(decoder)
    decode_to_end(recorder, states, pad_lone_rows=pad)
    rows = {(pos, token): row for (seq, pos, token), row in recorder.rows.items() if seq == 0}
    return states[0].tokens, rows


@pytest.mark.parametrize("speculative", [False, True], ids=["plain", "uneven-draft-rows"])
def test_padded_lone_rows_give_a_sequence_the_logits_it_gets_in_company(tiny_models, speculative):
    """batch_invariant's padding: a sequence's logits, bit for bit, whether it shares its rounds or not.

    Plain: beside a 10-token job, sequence 0 decodes its first 10 tokens in 2-row rounds, the rest
    alone; alone, every round is a lone row. With a draft row each round, sequence 0 is never alone
    by itself, but beside the plain job llama.cpp leaves its second row in a micro-batch of its own.
    Where llama.cpp computes a lone row apart (f16 on x86), the unpadded logits differ, which shows
    the comparison can see what the padding removes.
    """
    from funasr_nano.models.llm import DecoderOptions, LlamaDecoder

    decoder = LlamaDecoder(tiny_models / "qwen3-0.6b-asr.gguf", DecoderOptions(threads=2, n_ctx=128, n_seq_max=2))
    try:
        tokens_alone, alone = _rows_of_sequence_zero(decoder, True, False, speculative)
        tokens_beside, beside = _rows_of_sequence_zero(decoder, True, True, speculative)
        lone_rows_apart = not decoder.lone_row_matches_batched()
        if lone_rows_apart:  # the run that has lone rows, unpadded
            _, unpadded = _rows_of_sequence_zero(decoder, False, speculative, speculative)
    finally:
        decoder.close()
    assert tokens_alone == tokens_beside
    fed = {(12 + i, token) for i, token in enumerate(tokens_alone[:-1])}  # the first comes from the prompt
    drafted = {(pos + 1, 5) for pos, _ in fed if pos < 50} if speculative else set()  # none in the last round
    assert fed | drafted <= alone.keys() & beside.keys()
    assert all(np.array_equal(alone[key], beside[key]) for key in fed | drafted)
    if lone_rows_apart:
        padded = beside if speculative else alone
        assert not all(np.array_equal(unpadded[key], padded[key]) for key in fed | drafted)


def test_micro_batches_follow_llama_cpp_split_of_a_round():
    """llama.cpp's split_equal(sequential): runs of consecutive ids, equal rows from each."""
    from funasr_nano.decoding.rounds import lone_row_sequences, micro_batches

    assert micro_batches([(0, 1)], 512) == [[(0, 1)]]
    assert micro_batches([(0, 1), (1, 1), (2, 1)], 512) == [[(0, 1), (1, 1), (2, 1)]]
    assert micro_batches([(0, 3), (1, 1)], 512) == [[(0, 1), (1, 1)], [(0, 2)]]
    assert micro_batches([(0, 2), (1, 1)], 512) == [[(0, 1), (1, 1)], [(0, 1)]]
    assert micro_batches([(0, 1), (2, 1)], 512) == [[(0, 1)], [(2, 1)]]  # a gap: two passes
    assert micro_batches([(0, 2), (1, 1), (2, 3)], 512) == [[(0, 1), (1, 1), (2, 1)], [(0, 1)], [(2, 2)]]
    assert micro_batches([(0, 5)], 2) == [[(0, 2)], [(0, 2)], [(0, 1)]]  # n_ubatch caps a micro-batch
    assert lone_row_sequences([(0, 2), (1, 1), (2, 3)], 512) == [0]
    assert lone_row_sequences([(0, 1), (2, 1)], 512) == [0, 2]
    assert lone_row_sequences([(0, 2), (1, 2)], 512) == []


def test_round_costs_split_only_sizes_measured_slower_than_their_steps():
    from funasr_nano.decoding.rounds import RoundCosts

    costs = RoundCosts()
    assert not costs.split(2)  # nothing measured: batched
    costs.record(2, 0.056)
    assert costs.split(2)  # one-row steps never timed: this round times them
    costs.record(1, 0.020)
    costs.record(3, 0.050)
    costs.record(4, 0.200)
    assert costs.split(2)  # 56 ms > 1.1 x 40 ms
    assert not costs.split(3)  # 50 ms < 60 ms
    assert not costs.split(4)  # beyond MAX_SPLIT_ROWS: always one decode
    costs.record(1, 0.030)  # moving average: 0.8 x 20 + 0.2 x 30 = 22 ms
    assert costs.seconds[1] == pytest.approx(0.022)


def test_split_rounds_give_the_tokens_of_batched_rounds(tiny_models, clip):
    """A scheduler that found 2- and 3-row rounds slower than single steps decodes them as steps: same tokens (q8_0)."""
    cfg = dict(gguf="qwen3-0.6b-asr.q8_0.gguf", kv_f32=False, flash_attn=None, kv_unified=False)
    pieces = [clip[int(a * SR): int(b * SR)] for a, b in CUTS[:3]]
    rule = StopRule.forced(24)
    batched = _engine(tiny_models, cfg, 3)
    split = _engine(tiny_models, cfg, 3)
    try:
        assert batched.decoder.lone_row_matches_batched()  # what makes splitting safe for q8_0
        want = [d.tokens for d in _decode_all(batched, pieces, rule)]
        split.scheduler.costs.seconds.update({1: 1e-6, 2: 1.0, 3: 1.0})  # as if measured: steps far cheaper
        got = [d.tokens for d in _decode_all(split, pieces, rule)]
        split_rounds = split.scheduler.costs.split_rounds
        assert batched.scheduler.costs.split_rounds <= 1  # at most the round that timed one-row steps
    finally:
        batched.close()
        split.close()
    assert split_rounds >= 20 and got == want


class _CountingDecoder:
    """The real decoder, counting prompt passes of their own and rounds that hold a prompt's rows."""

    def __init__(self, decoder) -> None:
        self.decoder = decoder
        self.prompt_passes = 0
        self.rounds_with_prompts: list[tuple[set[int], set[int]]] = []  # (prompts' sequences, all sequences)

    def __getattr__(self, name: str):
        return getattr(self.decoder, name)

    def decode_embeddings(self, rows, start, seq=0, **kwargs) -> None:
        self.prompt_passes += 1
        self.decoder.decode_embeddings(rows, start, seq, **kwargs)

    def decode_rows(self, rows, positions, seqs, outputs) -> None:
        prompts = {seq for seq, out in zip(seqs, outputs) if not out}  # only a prompt skips rows' logits
        self.rounds_with_prompts.append((prompts, set(seqs)))
        self.decoder.decode_rows(rows, positions, seqs, outputs)


def test_new_prompts_join_the_running_round_with_a_unified_cache(tiny_models, clip):
    """With one KV cache for all sequences, an admitted segment's prompt rows go into the next round
    beside the other sequences' token rows (no pass of its own), and every segment still gets the
    tokens of decoding it alone; the split cache keeps a pass per prompt."""
    cuts = CUTS + [(0.5, 4.0), (3.0, 8.0)]
    lengths = [5, 12, 8, 15, 6, 9, 11]  # segments end at different rounds: freed sequences refill mid-way
    pieces = [clip[int(a * SR): int(b * SR)] for a, b in cuts]
    single = _engine(tiny_models, ENGINES["f32-split"], 1)
    unified = _engine(tiny_models, ENGINES["f32-unified"], 3)
    split = _engine(tiny_models, ENGINES["f32-split"], 3)
    try:
        want = [_one_by_one(single, [piece], StopRule.forced(n))[0] for piece, n in zip(pieces, lengths)]
        counting = {}
        for name, engine in (("unified", unified), ("split", split)):
            counting[name] = decoder = _CountingDecoder(engine.decoder)
            # a scheduler of its own around the counting decoder (the engine's stays idle meanwhile)
            scheduler = Scheduler(decoder, PrefixCache(decoder), batch_invariant=False)
            rng = np.random.default_rng(0)  # drafts too: verified rows of several tokens beside prompts
            drafts = [None if k is None else make_draft(w, k, rng, engine.decoder.n_vocab)
                      for w, k in zip(want, ["own", None, "half", None, "random", "own", None])]
            jobs = [Job(engine.prepare(p, PromptOptions()).prompt, StopRule.forced(n), d)
                    for p, n, d in zip(pieces, lengths, drafts)]
            try:
                owner = object()
                futures = [scheduler.submit(job, owner) for job in jobs]
                got = [future.result(timeout=600) for future in futures]
            finally:
                scheduler.close()
            assert [g.tokens for g in got] == want, name
    finally:
        for engine in (single, unified, split):
            engine.close()
    folded = counting["unified"]
    assert folded.prompt_passes == 0
    assert sum(len(prompts) for prompts, _ in folded.rounds_with_prompts) == len(pieces)  # each in one round
    assert any(everyone - prompts for prompts, everyone in folded.rounds_with_prompts)  # beside token rows
    assert counting["split"].prompt_passes == len(pieces) and not counting["split"].rounds_with_prompts


def test_a_job_that_cannot_fit_the_context_is_refused_alone(tiny_models, clip):
    """Per-call options may ask for more new tokens than the engine's context was sized for: such a job is
    refused when it is made (CapacityError, one line), before any round, and the jobs beside it decode the
    tokens they decode alone; the engine goes on serving."""
    from funasr_nano.engine import CapacityError, Engine, TranscribeOptions

    segment = clip[: 4 * 16000]
    fits = TranscribeOptions(vad="none", max_new_tokens=16, speculative=False)
    too_many = TranscribeOptions(vad="none", max_new_tokens=100_000, speculative=False)
    with Engine.from_preset("cpu", tiny_models, threads=2, batch_size=2, max_new_tokens=16, max_segment_seconds=5,
                            batch_invariant=True) as engine:
        alone = engine.transcribe(segment, fits).segments[0].token_ids
        beside = engine.submit_segment(segment, fits)
        with pytest.raises(CapacityError, match=r"needs \d+ positions .* holds \d+ per sequence"):
            engine.submit_segment(segment, too_many)
        assert beside.result(timeout=120).token_ids == alone
        with pytest.raises(CapacityError) as refused:  # the file path: its stream fails, with the same line
            engine.transcribe(segment, too_many)
        assert "\n" not in str(refused.value)
        assert engine.scheduler.live == 0 and engine.scheduler.stats.cancelled == 0
        assert engine.transcribe(segment, fits).segments[0].token_ids == alone
