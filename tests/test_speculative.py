"""Speculative decoding from the CTC draft gives exactly greedy's tokens, whatever the draft.

Two levels:
- a fake decoder (logits a pure function of the sequence's history, a KV cache that insists on
  contiguous positions) checks the bookkeeping fast and exhaustively: stop tokens, forced lengths,
  the loop guard, rejected rows removed from the cache, several sequences in one batch;
- the tiny exported models check the real llama.cpp path (f32 parity set-up, f16 and q8_0
  defaults): multi-row verification batches must give the same argmax as one-row greedy steps.

The reference is `testing.reference.greedy`, written independently of `funasr_nano.decoding`.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from funasr_nano.audio.load import load_audio
from funasr_nano.decoding import Job, RepetitionGuard, SpeculativeConfig, StopRule
from funasr_nano.decoding.rounds import decode_to_end
from funasr_nano.decoding.sequence import SequenceState
from funasr_nano.decoding.speculation import CPU_ROW_COSTS, AcceptanceRecord, Draft, choose_k
from funasr_nano.engine import Engine, TranscribeOptions
from funasr_nano.models.llm import DecoderOptions
from funasr_nano.models.prompt import PromptOptions
from testing import reference
from testing.drafts import make_draft

ROOT = Path(__file__).resolve().parent.parent
N_TOKENS = 40
KINDS = ("own", "third", "random", "empty")


def _state(seq: int, pos: int, logits: np.ndarray, draft: list[int], max_new: int, min_new: int = 0,
           guard: RepetitionGuard | None = None) -> SequenceState:
    rule = StopRule(max_new, min_new, guard or RepetitionGuard(window=0))
    return SequenceState(seq=seq, pos=pos, logits=logits, rule=rule, draft=Draft(list(draft)) if draft else None)


def _counts(state: SequenceState) -> tuple[int, int]:
    return (state.draft.proposed, state.draft.accepted) if state.draft else (0, 0)


# ---------------------------------------------------------------------------- fake decoder


class FakeDecoder:
    """Logits depend only on the last three tokens of the sequence; the KV cache is checked strictly."""

    def __init__(self, vocab: int = 40, seed: int = 0, n_batch: int = 64, stop_bias: float = 0.0) -> None:
        self.n_vocab = vocab
        self.n_batch = n_batch
        self.n_ctx = 4096
        self.stop_ids = frozenset({0, 1})
        self.seed = seed
        self.stop_bias = stop_bias
        self.kv: dict[int, list[int]] = {}
        self.calls = 0
        self._rows = np.zeros((0, vocab), np.float32)

    def prompt(self, seq: int, tokens: list[int]) -> np.ndarray:
        self.kv[seq] = list(tokens)
        return self._logits(self.kv[seq])

    def _logits(self, history: list[int]) -> np.ndarray:
        key = hash((self.seed, *history[-3:])) % (2**32)
        row = np.random.default_rng(key).standard_normal(self.n_vocab).astype(np.float32)
        row[list(self.stop_ids)] += self.stop_bias
        return row

    def decode_many(self, tokens, positions, seqs, outputs) -> None:
        assert 0 < len(tokens) <= self.n_batch
        assert all(outputs)
        self.calls += 1
        rows = []
        for token, pos, seq in zip(tokens, positions, seqs):
            assert pos == len(self.kv[seq]), f"seq {seq}: position {pos}, cache holds {len(self.kv[seq])}"
            self.kv[seq].append(int(token))
            rows.append(self._logits(self.kv[seq]))
        self._rows = np.stack(rows)

    def logits_rows(self, count: int) -> np.ndarray:
        return self._rows[:count]

    def clear(self, seq: int = -1, start: int = 0) -> None:
        assert start <= len(self.kv[seq])
        del self.kv[seq][start:]

    def step(self, token: int, pos: int, seq: int = 0) -> np.ndarray:
        self.decode_many([token], [pos], [seq], [True])
        return self._rows[0]


def _fake_greedy(seed: int, prompt: list[int], max_new: int, min_new: int, guard=None, **kw) -> list[int]:
    return _fake_greedy_cache(seed, prompt, max_new, min_new, guard, **kw)[0]


def _fake_greedy_cache(seed: int, prompt: list[int], max_new: int, min_new: int, guard=None, **kw):
    """Greedy's tokens and the cache it leaves behind."""
    fake = FakeDecoder(seed=seed, **kw)
    return reference.greedy(fake, fake.prompt(0, prompt), len(prompt), max_new, 0, min_new, guard), fake.kv[0]


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("kind", KINDS)
def test_fake_single_sequence_equals_greedy(seed: int, kind: str) -> None:
    prompt = [5, 6, 7 + seed]
    for max_new, min_new, bias in ((N_TOKENS, N_TOKENS, 0.0), (N_TOKENS, 0, 2.0), (N_TOKENS, 10, 2.5), (1, 0, 0.0),
                                   (0, 0, 0.0)):
        want, cache = _fake_greedy_cache(seed, prompt, max_new, min_new, stop_bias=bias)
        own = _fake_greedy(seed, prompt, N_TOKENS, N_TOKENS, stop_bias=bias)  # a long draft
        fake = FakeDecoder(seed=seed, stop_bias=bias)
        state = _state(0, len(prompt), fake.prompt(0, prompt),
                       make_draft(own, kind, np.random.default_rng(seed), fake.n_vocab), max_new, min_new)
        decode_to_end(fake, [state])
        assert state.tokens == want, (max_new, min_new, bias)
        # the cache holds what greedy's holds (prompt and fed tokens), no rejected draft rows
        assert fake.kv[0] == cache
        proposed, accepted = _counts(state)
        assert 0 <= accepted <= proposed
        if kind == "own" and max_new == min_new == N_TOKENS:
            assert accepted == proposed and state.rounds < N_TOKENS // 3


def test_fake_own_draft_takes_few_rounds_and_empty_draft_is_plain_greedy() -> None:
    prompt = [3, 4, 5]
    own = _fake_greedy(0, prompt, N_TOKENS, N_TOKENS)
    for draft in (own, []):
        fake = FakeDecoder()
        state = _state(0, 3, fake.prompt(0, prompt), list(draft), N_TOKENS, N_TOKENS)
        decode_to_end(fake, [state])
        assert state.tokens == own
        assert fake.calls == state.rounds
        proposed, accepted = _counts(state)
        if draft:  # proposals grow 3, 7, 15 tokens: 40 tokens in a handful of decodes, all kept
            assert state.rounds <= 6 and accepted == proposed == N_TOKENS - 1 - state.rounds
        else:
            assert state.rounds == N_TOKENS - 1 and proposed == 0


def test_fake_loop_guard_stops_where_greedy_stops() -> None:
    guard = RepetitionGuard(window=8, max_distinct=2, max_period=4, min_repeats=2)
    for seed in range(20):
        want = _fake_greedy(seed, [9, 9], 60, 0, guard, vocab=6)
        fake = FakeDecoder(seed=seed, vocab=6)
        own = _fake_greedy(seed, [9, 9], 60, 60, vocab=6)
        state = _state(0, 2, fake.prompt(0, [9, 9]), own, 60, 0, guard)
        decode_to_end(fake, [state])
        assert state.tokens == want


def test_fake_batched_sequences_each_with_its_draft() -> None:
    fake = FakeDecoder(seed=3, n_batch=20)  # small n_batch: proposals are cut to fit
    prompts = {seq: [2, 3, 10 + seq] for seq in range(6)}
    states, wants = [], []
    kinds = ("own", "third", "random", "empty", "own", "half")
    for seq, kind in enumerate(kinds):
        own = _fake_greedy(3, prompts[seq], N_TOKENS, N_TOKENS)
        wants.append(_fake_greedy(3, prompts[seq], N_TOKENS, N_TOKENS))
        states.append(_state(seq, 3, fake.prompt(seq, prompts[seq]),
                             make_draft(own, kind, np.random.default_rng(seq), fake.n_vocab), N_TOKENS, N_TOKENS))
    decode_to_end(fake, states)
    for state, want in zip(states, wants):
        assert state.tokens == want


def test_choose_k_weighs_expected_tokens_against_row_costs() -> None:
    config = SpeculativeConfig()
    assert [rows for rows, _ in CPU_ROW_COSTS][:3] == [1, 2, 4]
    assert choose_k([1.0] * 15, 15, config) == 15  # a draft that is always right: the longest proposal
    assert choose_k([1.0] * 15, 9, config) == 7  # ... within the room left (only 4/8/12/16 rows pay off)
    assert choose_k([0.0] * 15, 15, config) == 0  # never right: plain greedy rows
    assert choose_k([0.95] + [0.05] * 14, 15, config) == 1  # right only at the first offset: 2 rows
    assert choose_k([0.3] * 15, 15, config) == 0
    flat = SpeculativeConfig(row_costs=((1, 1.0), (2, 1.01), (4, 1.03), (8, 1.07)))  # GPU-like costs
    assert choose_k([0.3] * 15, 15, flat) == 3  # cheap rows: worth proposing even a poor draft


def test_acceptance_record_learns_where_the_draft_goes_wrong() -> None:
    config = SpeculativeConfig()
    record = AcceptanceRecord()
    prior = record.rates(False, 3, config)
    assert prior == [config.prior_accept] * 3
    for _ in range(6):  # after a guessed alignment: first token right, the second wrong ("half" drafts)
        record.update(True, 3, 1, config.decay)
    guess = record.rates(True, 3, config)
    assert guess[0] > 0.9 and guess[1] < 0.3
    assert record.rates(False, 1, config) == [config.prior_accept]  # matched alignments: nothing learnt yet
    assert choose_k(record.rates(True, 15, config), 15, config) == 1


def test_realign_guesses_substitutions_then_recovers() -> None:
    draft = Draft([10, 11, 12, 13, 14, 15])
    out = [10, 11, 99]  # the decoder writes 99 where the draft has 12
    draft.pos = 2
    draft.realign(out)
    assert draft.aligned and draft.pos == 3  # taken for a substitution: go on after 12
    draft.guess_failed = True  # the guessed proposal (13, ...) was rejected: the decoder wrote 12
    out.append(12)  # so 99 was an insertion (punctuation): back to the draft's 12
    draft.realign(out)
    assert draft.aligned and draft.pos == 3
    out += [13, 14]  # the 2-gram (13, 14) is found even when the expected place is wrong
    draft.pos = 0
    draft.realign(out)
    assert draft.aligned and draft.pos == 5
    out.append(77)
    draft.misses = 2  # guesses failed twice in a row: propose nothing until the draft matches again
    draft.realign(out)
    assert not draft.aligned


# ---------------------------------------------------------------------------- real llama.cpp, tiny models


def _engine(models: Path, gguf: str, n_seq_max: int = 1) -> Engine:
    f32 = gguf.endswith(".f32.gguf")
    return Engine(models, gguf_path=models / gguf,
                  decoder_options=DecoderOptions(kv_f32=f32, flash_attn=False if f32 else None, n_seq_max=n_seq_max))


def _prompt_state(engine: Engine, prepared, seq: int, draft: list[int], max_new: int, min_new: int) -> SequenceState:
    """(Inside scheduler.call) the prompt decoded whole into `seq`, as a state ready for rounds."""
    logits = reference.prompt_logits(engine.decoder, prepared.prefix_ids, prepared.audio_rows, prepared.suffix_ids,
                                      seq)
    return _state(seq, prepared.length, logits, draft, max_new, min_new)


@pytest.fixture(scope="module")
def wave(zh_mp3: Path) -> np.ndarray:
    return load_audio(zh_mp3)


@pytest.mark.parametrize("gguf", ["qwen3-0.6b-asr.f32.gguf", "qwen3-0.6b-asr.gguf", "qwen3-0.6b-asr.q8_0.gguf"])
def test_tokens_identical_to_greedy_single_sequence(tiny_models: Path, wave: np.ndarray, gguf: str) -> None:
    engine = _engine(tiny_models, gguf)

    def check(d, _prefixes) -> None:
        own = reference.decode_alone(d, prepared, N_TOKENS, N_TOKENS)
        assert len(set(own)) > 3, "the tiny model should not just repeat one token"
        rng = np.random.default_rng(0)
        for kind in KINDS:
            for k_max in (1, 4, 12):
                state = _prompt_state(engine, prepared, 0, make_draft(own, kind, rng, d.n_vocab), N_TOKENS, N_TOKENS)
                decode_to_end(d, [state], SpeculativeConfig(k_max=k_max))
                assert state.tokens == own, (kind, k_max)
                if kind == "own":
                    assert _counts(state) == (N_TOKENS - 1 - state.rounds,) * 2
            # greedy again after speculation: the cache left behind is clean
            assert reference.decode_alone(d, prepared, N_TOKENS, N_TOKENS) == own

    try:
        prepared = engine.prepare(wave, PromptOptions())
        engine.scheduler.call(check)
    finally:
        engine.close()


@pytest.mark.parametrize("gguf", ["qwen3-0.6b-asr.f32.gguf", "qwen3-0.6b-asr.q8_0.gguf"])
def test_tokens_identical_to_greedy_batched(tiny_models: Path, wave: np.ndarray, gguf: str) -> None:
    """Four segments (different audio) in one verification batch, each with another kind of draft."""
    engine = _engine(tiny_models, gguf, n_seq_max=4)
    sr = 16000

    def check(d, _prefixes) -> None:
        wants = [reference.decode_alone(d, p, N_TOKENS, N_TOKENS, seq=seq) for seq, p in enumerate(prepared)]
        assert len({tuple(w) for w in wants}) > 1, "different audio should give different tokens"
        rng = np.random.default_rng(1)
        for shift in range(len(KINDS)):
            states = [_prompt_state(engine, p, seq, make_draft(wants[seq], KINDS[(seq + shift) % len(KINDS)], rng,
                                                               d.n_vocab), N_TOKENS, N_TOKENS)
                      for seq, p in enumerate(prepared)]
            decode_to_end(d, states)
            assert [s.tokens for s in states] == wants

    try:
        pieces = [wave[: 4 * sr], wave[2 * sr: 7 * sr], wave[5 * sr:], wave]
        prepared = [engine.prepare(p, PromptOptions()) for p in pieces]
        engine.scheduler.call(check)
    finally:
        engine.close()


def test_engine_speculative_matches_plain_greedy(tiny_models: Path, wave: np.ndarray) -> None:

    engine = Engine(tiny_models, gguf_path=tiny_models / "qwen3-0.6b-asr.q8_0.gguf",
                    decoder_options=DecoderOptions(n_seq_max=1), min_new_tokens=N_TOKENS)
    try:
        assert engine.ctc is not None
        base = dict(max_new_tokens=N_TOKENS, vad="none")
        plain = engine.transcribe(wave, TranscribeOptions(speculative=False, **base))
        spec = engine.transcribe(wave, TranscribeOptions(speculative=True, **base))
        assert [s.token_ids for s in spec.segments] == [s.token_ids for s in plain.segments]
        assert spec.text == plain.text
        assert all(s.draft_proposed == s.draft_accepted == 0 for s in plain.segments)
        seg = spec.to_dict()["segments"][0]
        assert 0 <= seg["draft_accepted"] <= seg["draft_proposed"]
    finally:
        engine.close()


def test_batched_engine_speculates_per_segment(tiny_models: Path, wave: np.ndarray) -> None:
    """Several segments in one context (n_seq_max 4): CTC drafts in the shared batch, greedy's tokens."""

    engine = Engine(tiny_models, gguf_path=tiny_models / "qwen3-0.6b-asr.q8_0.gguf",
                    decoder_options=DecoderOptions(n_seq_max=4), min_new_tokens=N_TOKENS)
    try:
        base = dict(max_new_tokens=N_TOKENS, vad="none", max_segment_seconds=2.0)
        plain = engine.transcribe(wave, TranscribeOptions(speculative=False, **base))
        spec = engine.transcribe(wave, TranscribeOptions(speculative=True, **base))
        assert len(plain.segments) >= 4
        assert [s.token_ids for s in spec.segments] == [s.token_ids for s in plain.segments]
        assert sum(s.draft_proposed for s in spec.segments) > 0
        # the decoder's own output as each segment's draft: every proposal kept, far fewer decodes
        sr = 16000
        prompts = [engine.prepare(wave[i * sr: (i + 2) * sr], PromptOptions()).prompt for i in range(5)]
        rule = StopRule.forced(N_TOKENS)
        wants = [f.result().tokens for f in [engine.scheduler.submit(Job(p, rule)) for p in prompts]]
        got = [f.result() for f in [engine.scheduler.submit(Job(p, rule, w)) for p, w in zip(prompts, wants)]]
        assert [d.tokens for d in got] == wants
        assert all(d.accepted == d.proposed > 0 for d in got)
    finally:
        engine.close()


def test_without_ctc_the_engine_decodes_plain_greedy(tiny2_models: Path, wave: np.ndarray) -> None:

    engine = Engine(tiny2_models, min_new_tokens=8)
    try:
        assert not engine.settings.has_ctc and engine.ctc is None
        out = engine.transcribe(wave, TranscribeOptions(max_new_tokens=8, vad="none"))
        assert len(out.segments[0].token_ids) == 8 and out.segments[0].draft_proposed == 0
    finally:
        engine.close()


def test_cli_no_speculative(tiny_models: Path, zh_mp3: Path) -> None:
    def run(*extra: str) -> dict:
        cmd = [sys.executable, str(ROOT / "03_inference_cpu.py"), str(zh_mp3), "--model-dir", str(tiny_models),
               "--format", "json", "--force-tokens", "24", "--threads", "2", "--quiet", *extra]
        res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=300)
        assert res.returncode == 0, res.stderr
        return json.loads(res.stdout)

    plain, spec = run("--no-speculative"), run()
    assert [s["token_ids"] for s in plain["segments"]] == [s["token_ids"] for s in spec["segments"]]
    assert all(s["draft_proposed"] == 0 for s in plain["segments"])
