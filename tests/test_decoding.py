"""The decoding scheduler shared by many callers: each job gets the tokens of decoding it alone.

Jobs with different prompts (language, ITN, hotwords: different cached prefixes) come from
several threads at once, and from asyncio; a cancelled job frees its sequence for the next one
and leaves the others untouched. The reference is `testing.reference`, independent of
`funasr_nano.decoding`.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import CancelledError
from pathlib import Path

import numpy as np
import pytest

from funasr_nano.audio.load import load_audio
from funasr_nano.decoding import Job, StopRule
from funasr_nano.engine import Engine
from funasr_nano.models.llm import DecoderOptions
from funasr_nano.models.prompt import PromptOptions
from testing import reference

SR = 16000
PROMPTS = [PromptOptions(), PromptOptions(language="中文"), PromptOptions(itn=False),
           PromptOptions(hotwords=("通义", "魔搭")), PromptOptions(language="英文", itn=False), PromptOptions()]
CUTS = [(0.0, 3.0), (2.0, 7.5), (4.0, 10.0), (1.0, 2.5), (5.0, 9.0), (0.5, 6.0)]


@pytest.fixture(scope="module")
def clip(zh_mp3: Path) -> np.ndarray:
    return load_audio(zh_mp3)


def _engine(models: Path, n_seq: int, n_ctx: int = 512, **kwargs) -> Engine:
    return Engine(models, gguf_path=models / "qwen3-0.6b-asr.gguf",
                  decoder_options=DecoderOptions(threads=2, n_ctx=n_ctx, n_seq_max=n_seq), **kwargs)


def _prepared(engine: Engine, clip: np.ndarray):
    return [engine.prepare(clip[int(a * SR): int(b * SR)], options) for (a, b), options in zip(CUTS, PROMPTS)]


def _alone(engine: Engine, prepared, rules: list[StopRule]) -> list[list[int]]:
    return engine.scheduler.call(lambda d, _: [reference.decode_alone(d, p, r.max_new_tokens, r.min_new_tokens)
                                               for p, r in zip(prepared, rules)])


def test_threads_with_different_prompts_get_the_tokens_of_decoding_alone(tiny_models, clip):
    rules = [StopRule.forced(n) for n in (12, 30, 20, 8, 25, 16)]
    events: list[tuple[str, object]] = []
    engine = _engine(tiny_models, 3, observer=lambda event, detail: events.append((event, detail)))
    try:
        prepared = _prepared(engine, clip)
        assert len({p.prefix for p in prepared}) == 5  # five different cached prefixes
        want = _alone(engine, prepared, rules)
        assert len({tuple(w) for w in want}) > 3
        events.clear()
        got: list[list[int] | None] = [None] * len(prepared)
        start = threading.Barrier(len(prepared))

        def caller(i: int) -> None:
            start.wait()
            got[i] = engine.scheduler.submit(Job(prepared[i].prompt, rules[i])).result(timeout=300).tokens

        threads = [threading.Thread(target=caller, args=(i,)) for i in range(len(prepared))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        engine.close()
    assert got == want
    rounds = [seqs for event, seqs in events if event == "round"]
    assert max(len(seqs) for seqs in rounds) == 3  # jobs of different prompts shared rounds
    assert all(list(seqs) == sorted(seqs) for seqs in rounds)


def test_asyncio_callers_await_the_same_scheduler(tiny_models, clip):
    rules = [StopRule.forced(10)] * 4
    engine = _engine(tiny_models, 2)
    try:
        prepared = _prepared(engine, clip)[:4]
        want = _alone(engine, prepared, rules)

        async def main() -> list[list[int]]:
            futures = [asyncio.wrap_future(engine.scheduler.submit(Job(p.prompt, r))) for p, r in zip(prepared, rules)]
            return [d.tokens for d in await asyncio.gather(*futures)]

        got = asyncio.run(main())
    finally:
        engine.close()
    assert got == want


def test_a_cancelled_job_frees_its_sequence_and_the_others_are_unaffected(tiny_models, clip):
    rules = [StopRule.forced(n) for n in (150, 150, 150, 10)]
    events: list[tuple[str, object]] = []
    all_live = threading.Event()

    def observe(event: str, detail: object) -> None:
        events.append((event, detail))
        if event == "round" and len(detail) == 3:
            all_live.set()

    engine = _engine(tiny_models, 3, observer=observe)
    try:
        prepared = _prepared(engine, clip)[:4]
        want = _alone(engine, prepared, rules)
        events.clear()
        long_a, long_b, long_c = (engine.scheduler.submit(Job(p.prompt, r)) for p, r in zip(prepared[:3], rules))
        assert all_live.wait(timeout=120)
        waiting = engine.scheduler.submit(Job(prepared[3].prompt, rules[3]))  # no free sequence yet
        assert long_b.cancel()
        with pytest.raises(CancelledError):
            long_b.result()
        got_waiting = waiting.result(timeout=300).tokens
        a_still_running = not long_a.done()  # the waiting job did not wait for a long one to end
        got_a, got_c = long_a.result(timeout=300).tokens, long_c.result(timeout=300).tokens
        # a job cancelled before it starts never takes a sequence
        queued = engine.scheduler.submit(Job(prepared[0].prompt, StopRule.forced(150)))
        queued.cancel()
        after = engine.scheduler.submit(Job(prepared[3].prompt, rules[3])).result(timeout=300).tokens
    finally:
        engine.close()
    assert got_a == want[0] and got_c == want[2] and got_waiting == want[3] and after == want[3]
    assert a_still_running
    cancelled = [seq for event, seq in events if event == "cancel"]
    assert len(cancelled) == 1
    admitted_after = [seq for event, seq in events[[e for e, _ in events].index("cancel"):] if event == "admit"]
    assert admitted_after[0] == cancelled[0]  # the waiting job took the cancelled job's sequence


def test_concurrent_segment_streams_share_rounds_and_one_can_be_cancelled_from_another_thread(tiny_models, clip):
    """Engine.segments() from several threads (a server's requests): their segments decode in the same
    rounds, each stream's text equals its text alone, and `SegmentStream.cancel()` from another thread
    frees the cancelled stream's sequences while the others finish unchanged.

    The cancel comes at a chosen state, not after a race: the scheduler's observer holds a round in
    which the victim's second or later segment decodes while another of its segments has not started,
    until the main thread has cancelled. So its live sequences must be freed (exactly those) and the
    rest never admitted, however the threads are scheduled on a loaded machine."""
    from funasr_nano.engine import TranscribeOptions

    waves = [clip[: 7 * SR], clip[2 * SR:], clip[SR: 9 * SR]]
    options = [TranscribeOptions(prompt=p, vad="none", max_segment_seconds=3.0) for p in PROMPTS[:3]]
    # the hotwords prompt: a prefix no other stream has, so the scheduler's rows tell which are the victim's
    victim_options = TranscribeOptions(prompt=PROMPTS[3], vad="none", max_segment_seconds=2.0)
    watching = threading.Event()
    cancel_point = threading.Event()  # a round holds: a victim segment live, one admitted before, one not yet
    cancel_sent = threading.Event()
    freed = threading.Event()
    victim_seen: list = []  # the victim's admitted segments (scheduler entries), as rounds show them
    at_cancel: dict[str, int] = {}
    cancels: list[int] = []

    def observe(event: str, detail: object) -> None:  # on the scheduler's thread
        if not watching.is_set():
            return
        if event == "cancel":
            cancels.append(detail)
            if len(cancels) == at_cancel.get("live"):
                freed.set()
        if event != "round" or cancel_point.is_set():
            return
        # the scheduler's own table of live sequences: safe to read on its thread, between admissions and decoding
        live = [entry for entry in engine.scheduler.planner.live.values() if entry.job.prompt.prefix == victim_prefix]
        victim_seen.extend(e for e in live if all(e is not seen for seen in victim_seen))
        if live and 2 <= len(victim_seen) < victim_segments:
            at_cancel.update(live=len(live), admitted=len(victim_seen))
            cancel_point.set()
            assert cancel_sent.wait(timeout=120), "the main thread never cancelled"

    # room for the default 512 new tokens after a prompt: the engine refuses a segment that cannot fit (CapacityError)
    engine = _engine(tiny_models, 4, n_ctx=768, min_new_tokens=40, batch_invariant=True, observer=observe)
    try:
        alone = [engine.transcribe(w, o) for w, o in zip(waves, options)]
        want = [t.text for t in alone]
        stream_segments = sum(len(t.segments) for t in alone)
        victim_segments = len(engine.transcribe(clip, victim_options).segments)
        assert victim_segments >= 4
        victim_prefix = engine.prepare(clip[:SR], PROMPTS[3]).prefix
        assert victim_prefix not in {engine.prepare(clip[:SR], o.prompt).prefix for o in options}
        before, admitted_before = engine.scheduler.stats.shared_rounds, engine.scheduler.stats.admitted
        streams = [engine.segments(w, o) for w, o in zip(waves, options)]
        victim = engine.segments(clip, victim_options)
        got: list[str | None] = [None] * 3
        outcome: list[BaseException] = []

        def consume(i: int) -> None:
            for _ in streams[i]:
                pass
            got[i] = streams[i].transcript.text

        def consume_victim() -> None:
            try:
                for _ in victim:
                    pass
            except CancelledError as exc:
                outcome.append(exc)

        threads = [threading.Thread(target=consume, args=(i,)) for i in range(3)]
        threads.append(threading.Thread(target=consume_victim))
        watching.set()
        for t in threads:
            t.start()
        try:
            assert cancel_point.wait(timeout=300), "the victim never had a segment live with more to come"
            victim.cancel()
        finally:
            cancel_sent.set()  # the held round goes on
        assert freed.wait(timeout=300)  # the scheduler dropped the victim's live sequences
        for t in threads:
            t.join(timeout=300)
        assert not any(t.is_alive() for t in threads)
        stats = engine.scheduler.stats
        assert engine.scheduler.live == 0
    finally:
        cancel_sent.set()
        engine.close()
    assert got == want
    assert len(outcome) == 1 and victim.transcript is None  # the cancelled stream stopped, with CancelledError
    assert stats.shared_rounds > before and stats.max_rows == 4  # rows of different callers in one round
    assert stats.cancelled == at_cancel["live"] == len(cancels)  # the victim's live sequences, and only them, freed
    # the victim's rest never started: only what it had admitted when cancelled
    assert stats.admitted - admitted_before <= stream_segments + at_cancel["admitted"] < stream_segments + victim_segments


def test_a_files_segments_are_prepared_ahead_to_fill_every_sequence(tiny_models, clip):
    """A lone file's segments are prepared on the engine's pool ahead of their decoding, enough to fill
    every sequence (the rounds reach the batch width), and their tokens are those of the same file
    decoded one segment at a time."""
    from funasr_nano.engine import TranscribeOptions

    rounds: list[tuple[int, ...]] = []
    options = TranscribeOptions(vad="none", max_segment_seconds=1.5, max_new_tokens=12)
    with _engine(tiny_models, 1, min_new_tokens=12, batch_invariant=True) as alone:
        want = alone.transcribe(clip, options)
    with _engine(tiny_models, 4, min_new_tokens=12, batch_invariant=True,
                 observer=lambda event, detail: rounds.append(detail) if event == "round" else None) as engine:
        got = engine.transcribe(clip, options)
    assert len(got.segments) >= 5
    assert [s.token_ids for s in got.segments] == [s.token_ids for s in want.segments]
    assert [(s.start, s.end) for s in got.segments] == [(s.start, s.end) for s in want.segments]
    assert max(len(r) for r in rounds) == 4
    assert got.timings["encoder"] > 0


def test_a_prompt_gets_the_same_logits_with_its_prefix_new_copied_or_kept(tiny_models):
    """The prefix cache's three ways in (`funasr_nano.decoding.prefixes`): bit-identical logits.

    50 audio rows and 3 text tokens after a 20-odd-token prefix: fewer than 64 query rows after the
    prefix, 64 or more with it, where llama.cpp's CPU flash attention changes kernel. Decoded in one
    pass with the prefix, the rows get the other kernel (shown below), which is why a new prefix
    takes a pass of its own."""
    from funasr_nano.decoding.prefixes import PrefixCache, Prompt
    from funasr_nano.models.llm import LlamaDecoder

    decoder = LlamaDecoder(tiny_models / "qwen3-0.6b-asr.gguf", DecoderOptions(threads=2, n_ctx=256, n_seq_max=2))
    try:
        prefix = "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n语音转写成英文："
        rows = np.random.default_rng(0).standard_normal((50, decoder.n_embd)).astype(np.float32) * 0.5
        prompt = Prompt(prefix, rows, [1, 2, 3])
        cache = PrefixCache(decoder)
        n = len(cache.ids(prefix))
        assert 50 + 3 < 64 <= n + 50 + 3
        new = cache.admit(prompt, 0)
        copied = cache.admit(prompt, 1)  # sequence 0 holds the prefix
        kept = cache.admit(prompt, 0)  # its own prefix stays
        decoder.clear()
        decoder.decode_embeddings(np.concatenate([decoder.token_embeddings(cache.ids(prefix)), rows,
                                                  decoder.token_embeddings([1, 2, 3])]), 0, 0)
        one_pass = np.array(decoder.logits(-1), copy=True)
    finally:
        decoder.close()
    assert np.array_equal(new, copied) and np.array_equal(new, kept)
    assert not np.array_equal(new, one_pass)


def test_a_slow_input_does_not_delay_the_rounds_of_another(tiny_models, clip):
    """One input's segment is prepared slowly (its encoder stuck for a second) while another input's
    segment decodes: the preparing happens on the engine's pool, so the decoding rounds go on at their
    own pace (their timestamps show no pause), and both inputs get the text they get alone."""
    import time

    from funasr_nano.engine import TranscribeOptions

    stall = 1.0
    slow_started = threading.Event()

    class SlowEngine(Engine):
        def prepare(self, wave, prompt, clock=None):
            if prompt.language == "英文":
                slow_started.set()
                time.sleep(stall)
            return super().prepare(wave, prompt, clock)

    round_times: list[float] = []
    engine = SlowEngine(tiny_models, gguf_path=tiny_models / "qwen3-0.6b-asr.gguf",
                        decoder_options=DecoderOptions(threads=2, n_ctx=1024, n_seq_max=2), min_new_tokens=600,
                        batch_invariant=True,
                        observer=lambda event, _: round_times.append(time.perf_counter()) if event == "round" else None)
    fast = TranscribeOptions(vad="none", max_new_tokens=600, speculative=False)
    slow = TranscribeOptions(prompt=PromptOptions(language="英文"), vad="none", max_new_tokens=20, speculative=False)
    try:
        want_fast = engine.transcribe(clip[: 3 * SR], fast).segments[0].token_ids
        want_slow = engine.transcribe(clip[3 * SR: 5 * SR], slow).segments[0].token_ids
        round_times.clear()
        got: dict[str, list[int]] = {}
        fast_thread = threading.Thread(
            target=lambda: got.update(fast=engine.transcribe(clip[: 3 * SR], fast).segments[0].token_ids))
        fast_thread.start()
        while len(round_times) < 5:
            time.sleep(0.005)
        slow_started.clear()
        t0 = time.perf_counter()
        got["slow"] = engine.transcribe(clip[3 * SR: 5 * SR], slow).segments[0].token_ids
        fast_thread.join(timeout=300)
    finally:
        engine.close()
    assert slow_started.is_set() and got == {"fast": want_fast, "slow": want_slow}
    during = [t for t in round_times if t0 <= t <= t0 + stall]
    assert during and during[-1] - t0 > 0.8 * stall, "the fast input ended before the stall was over: make it longer"
    gaps = np.diff([t0, *during])
    assert gaps.max() < 0.3 * stall, f"a {gaps.max():.2f} s pause in the rounds while another input was prepared"
