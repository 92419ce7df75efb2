"""The decoding planner and its owner loop, without any model file.

`RoundPlanner` alone (admission order, fairness between owners, sequence ids, moves, cancellation
in every state, capacity), a randomized walk through hundreds of operation sequences checking its
invariants, then the `Scheduler` owner loop on `testing.fake_decoder.FakeDecoder`, whose tokens
depend on each sequence's own cells: batched = alone, speculative rows = greedy, cancellation at
each state, a refused job leaving the others' tokens unchanged, and a slow producer that does not
delay the rounds of sequences already decoding.
"""

from __future__ import annotations

import random
import threading
import time
from concurrent.futures import CancelledError

import numpy as np
import pytest

from funasr_nano.decoding import CapacityError, Job, Prompt, RoundPlanner, Scheduler, StopRule
from funasr_nano.decoding.planner import Request
from funasr_nano.decoding.prefixes import PrefixCache
from funasr_nano.decoding.sequence import SequenceState
from funasr_nano.prepare import Feed
from testing.fake_decoder import N_EMBD, FakeDecoder, decode_alone, prompt_keys

# ---------------------------------------------------------------------- the planner alone


def _job(length: int = 10, new: int = 5) -> Job:
    return Job(Prompt("p", np.zeros((0, N_EMBD), np.float32), []), StopRule(max_new_tokens=new), length=length)


def _request(rid: int, owner: object, length: int = 10, new: int = 5) -> Request:
    return Request(rid, _job(length, new), owner)


def _state(seq: int, done: bool = False) -> SequenceState:
    return SequenceState(seq=seq, pos=0, logits=None, done=done)


def _start_all(planner: RoundPlanner, admitted) -> None:
    for seq, _ in admitted:
        planner.started(seq, _state(seq))


def test_one_owners_requests_go_in_order_and_owners_take_turns():
    planner = RoundPlanner(width=2, capacity=100)
    for rid in range(4):
        planner.add(_request(rid, "file"))
    planner.add(_request(10, "live"))
    first = planner.admit()
    assert [(seq, r.id) for seq, r in first] == [(0, 0), (1, 10)]  # the lone live segment does not wait for the file
    _start_all(planner, first)
    planner.live[0].state.done = True
    assert [(seq, r.id) for seq, r in planner.ended()] == [(0, 0)]
    assert [(seq, r.id) for seq, r in planner.admit()] == [(0, 1)]  # the freed id, the file's next in order
    assert planner.admit() == []  # no free sequence


def test_lowest_free_ids_first_and_moves_close_the_gaps_only_when_nothing_waits():
    planner = RoundPlanner(width=4, capacity=100)
    for rid in range(4):
        planner.add(_request(rid, rid))
    _start_all(planner, planner.admit())
    for seq in (0, 2):
        planner.live[seq].state.done = True
    planner.ended()
    planner.add(_request(9, "late"))
    assert planner.moves() == []  # a waiting request fills a gap instead
    _start_all(planner, planner.admit())
    assert sorted(planner.live) == [0, 1, 3] and planner.free == [2]
    assert planner.moves() == [(3, 2)]
    assert sorted(planner.live) == [0, 1, 2] and planner.live[2].state.seq == 2 and planner.free == [3]
    assert [s.seq for s in planner.round()] == [0, 1, 2]


def test_cancellation_in_every_state():
    planner = RoundPlanner(width=1, capacity=100)
    for rid in range(3):
        planner.add(_request(rid, "a"))
    [(seq, admitted)] = planner.admit()
    assert planner.cancel(1) is None  # waiting: leaves the line, never admitted
    assert planner.cancel(admitted.id) == seq  # admitted, prompt not placed yet: its sequence is freed
    assert planner.free == [0] and not planner.live
    [(seq, admitted)] = planner.admit()
    assert admitted.id == 2  # request 1 was dropped
    planner.started(seq, _state(seq))
    assert planner.cancel(2) == seq  # live: freed before the next round
    assert planner.round() == [] and planner.idle
    assert planner.cancel(2) is None and planner.cancel(12345) is None  # finished or unknown: nothing to do
    planner.add(_request(3, "a"))
    [(seq, request)] = planner.admit()
    assert planner.started(seq, _state(seq, done=True))  # ended by its first token: the sequence is free again
    assert planner.cancel(3) is None and planner.free == [0]


def test_a_job_that_cannot_fit_is_refused_and_nothing_is_queued():
    planner = RoundPlanner(width=2, capacity=100)
    planner.add(_request(0, "a", length=90, new=11))  # 90 + 11 - 1 = 100 positions: fits exactly
    with pytest.raises(CapacityError, match=r"needs 101 positions \(90 for the prompt, up to 12 new tokens\).* 100"):
        planner.add(_request(1, "b", length=90, new=12))
    assert [r.id for _, r in planner.admit()] == [0] and not planner.waiting


def test_a_failed_round_takes_out_only_its_requests():
    planner = RoundPlanner(width=3, capacity=100)
    for rid in range(3):
        planner.add(_request(rid, rid))
    admitted = planner.admit()
    _start_all(planner, admitted[:2])  # the third is admitted, its prompt not placed: not in the round
    failed = planner.fail_round(planner.round())
    assert [seq for seq, _ in failed] == [0, 1] and sorted(planner.live) == [2] and planner.free == [0, 1]


@pytest.mark.parametrize("seed", range(300))
def test_random_walks_keep_the_planners_invariants(seed):
    """Hundreds of random sequences of add / cancel / admit / start / round / moves: sequence ids are
    never shared or lost, each request is admitted at most once and never after its cancellation,
    one owner's requests are admitted in the order they came, and with nothing waiting the live ids
    end up contiguous from 0."""
    rng = random.Random(seed)
    width = rng.randint(1, 5)
    planner = RoundPlanner(width=width, capacity=100)
    owners = ["a", "b", "c"]
    next_id = 0
    cancelled: set[int] = set()
    admitted_ids: list[int] = []
    added: dict[str, list[int]] = {o: [] for o in owners}
    for _ in range(rng.randint(5, 60)):
        action = rng.random()
        if action < 0.35:
            owner = rng.choice(owners)
            planner.add(_request(next_id, owner))
            added[owner].append(next_id)
            next_id += 1
        elif action < 0.5 and next_id:
            rid = rng.randrange(next_id)
            planner.cancel(rid)
            cancelled.add(rid)
        elif action < 0.7:
            for seq, request in planner.admit():
                assert request.id not in cancelled and request.id not in admitted_ids
                admitted_ids.append(request.id)
                planner.started(seq, _state(seq, done=rng.random() < 0.1))
        elif action < 0.9:
            for state in planner.round():
                state.done = state.done or rng.random() < 0.4
            planner.ended()
        else:
            planner.moves()
        live, free = set(planner.live), set(planner.free)
        assert not live & free and live | free == set(range(width)) and len(planner.free) == len(free)
        assert all(r.state is None or r.state.seq == seq for seq, r in planner.live.items())
    for ids in added.values():
        order = [rid for rid in admitted_ids if rid in ids]
        assert order == sorted(order)
    if not planner.waiting:
        planner.moves()
        assert sorted(planner.live) == list(range(len(planner.live)))


# ---------------------------------------------------------------------- the owner loop on a fake decoder


def _prompts(n: int, rng: np.random.Generator) -> list[Prompt]:
    prefixes = ["system: zh", "system: en", "system: zh"]
    return [Prompt(prefixes[i % 3], rng.standard_normal((int(rng.integers(3, 9)), N_EMBD)).astype(np.float32),
                   [5, 6, 7]) for i in range(n)]


def _scheduler(fake: FakeDecoder, **kwargs) -> Scheduler:
    return Scheduler(fake, PrefixCache(fake), **kwargs)


def _want(prompts: list[Prompt], lengths: list[int], fake: FakeDecoder) -> list[list[int]]:
    return [decode_alone(prompt_keys(p, fake), n) for p, n in zip(prompts, lengths)]


def test_batched_tokens_equal_alone_and_drafts_change_nothing():
    rng = np.random.default_rng(0)
    fake = FakeDecoder(n_seq_max=3)
    prompts = _prompts(8, rng)
    lengths = [int(n) for n in rng.integers(3, 30, size=8)]
    want = _want(prompts, lengths, fake)
    # drafts: none, right, wrong in the middle, wrong, thinned out, right again
    drafts = [None, want[1], want[2][:3] + [1, 2, 3] + want[2][6:], None, [9] * 5, want[5][::2], want[6], None]
    scheduler = _scheduler(fake)
    try:
        futures = [scheduler.submit(Job(p, StopRule(max_new_tokens=n), d), owner=i % 2)
                   for i, (p, n, d) in enumerate(zip(prompts, lengths, drafts))]
        got = [f.result(timeout=30).tokens for f in futures]
    finally:
        scheduler.close()
    assert got == want
    assert scheduler.stats.max_rows == 3 and scheduler.stats.shared_rounds > 0
    assert len(fake.thread_ids) == 1  # only the owner's thread touched the decoder


def _held_scheduler(fake: FakeDecoder):
    """A scheduler whose observer can hold a chosen round until released (a cancel at a chosen state)."""
    events: list[tuple[str, object]] = []
    hold = {"at": None}
    reached, release = threading.Event(), threading.Event()

    def observe(event: str, detail: object) -> None:
        events.append((event, detail))
        if event == "round" and hold["at"] is not None and len([e for e in events if e[0] == "round"]) == hold["at"]:
            reached.set()
            assert release.wait(timeout=30)

    return _scheduler(fake, observer=observe), events, hold, reached, release


def test_cancellation_at_each_state_leaves_the_others_tokens_unchanged():
    rng = np.random.default_rng(1)
    fake = FakeDecoder(n_seq_max=2)
    prompts = _prompts(4, rng)
    lengths = [20, 20, 20, 6]
    want = _want(prompts, lengths, fake)
    scheduler, events, hold, reached, release = _held_scheduler(fake)
    hold["at"] = 3
    try:
        live_a = scheduler.submit(Job(prompts[0], StopRule(max_new_tokens=20)), owner="a")
        live_b = scheduler.submit(Job(prompts[1], StopRule(max_new_tokens=20)), owner="b")
        assert reached.wait(timeout=30)  # round 3 holds: a and b live, nothing free
        waiting = scheduler.submit(Job(prompts[2], StopRule(max_new_tokens=20)), owner="c")
        later = scheduler.submit(Job(prompts[3], StopRule(max_new_tokens=6)), owner="d")
        assert waiting.cancel()  # waiting: never admitted
        assert live_b.cancel()  # live: freed before the next round
        release.set()
        got_a = live_a.result(timeout=30).tokens
        got_later = later.result(timeout=30).tokens
        assert not live_a.cancel()  # finished: nothing to cancel
        with pytest.raises(CancelledError):
            live_b.result()
    finally:
        release.set()
        scheduler.close()
    assert got_a == want[0] and got_later == want[3]
    cancels = [d for e, d in events if e == "cancel"]
    assert cancels == [1]  # b's sequence only; the waiting job had none
    assert sum(1 for e, _ in events if e == "admit") == 3  # a, b, later: the cancelled waiting job never started
    assert scheduler.stats.cancelled == 1 and scheduler.live == 0


def test_a_refused_job_leaves_the_others_tokens_unchanged():
    rng = np.random.default_rng(2)
    fake = FakeDecoder(n_seq_max=2, n_ctx=64)
    prompts = _prompts(3, rng)
    want = _want(prompts[:2], [15, 15], fake)
    scheduler = _scheduler(fake)
    try:
        first = scheduler.submit(Job(prompts[0], StopRule(max_new_tokens=15), length=20), owner="a")
        with pytest.raises(CapacityError):
            scheduler.submit(Job(prompts[2], StopRule(max_new_tokens=60), length=20), owner="b")
        second = scheduler.submit(Job(prompts[1], StopRule(max_new_tokens=15), length=20), owner="c")
        got = [first.result(timeout=30).tokens, second.result(timeout=30).tokens]
    finally:
        scheduler.close()
    assert got == want
    assert scheduler.stats.admitted == 2 and scheduler.stats.shared_rounds > 0


def test_a_decode_failure_fails_only_the_jobs_of_that_round_and_the_owner_goes_on():
    rng = np.random.default_rng(3)
    fake = FakeDecoder(n_seq_max=2, n_ctx=40)
    prompts = _prompts(2, rng)
    scheduler = _scheduler(fake)
    try:
        # a job whose length was not declared (0) slips past the capacity check and hits the context's end
        doomed = scheduler.submit(Job(prompts[0], StopRule(max_new_tokens=35)))
        with pytest.raises(RuntimeError, match="beyond the context"):
            doomed.result(timeout=30)
        after = scheduler.submit(Job(prompts[1], StopRule(max_new_tokens=5)))
        assert after.result(timeout=30).tokens == _want(prompts[1:], [5], fake)[0]
    finally:
        scheduler.close()


def test_a_slow_producer_does_not_delay_the_rounds_of_admitted_sequences():
    """One input's pieces come from a producer that blocks (a stalled reader or a slow encoder) on the
    prepare stage's pool while another input's segment decodes: the decoding rounds go on at their
    own pace, as their timestamps show, and the blocked input's segment decodes once it arrives."""
    from concurrent.futures import ThreadPoolExecutor

    rng = np.random.default_rng(4)
    fake = FakeDecoder(n_seq_max=2, n_ctx=256, seconds_per_round=0.01)
    prompts = _prompts(2, rng)
    scheduler = _scheduler(fake)
    pool = ThreadPoolExecutor(max_workers=2)
    gate = threading.Event()
    stall = 1.0

    class Item:
        def __init__(self, future):
            self.future = future

        def cancel(self):
            self.future.cancel()

    def slow_pieces():
        gate.wait(timeout=10)
        time.sleep(stall)  # the stalled reader / encoder, on the pool
        yield prompts[1]

    try:
        running = scheduler.submit(Job(prompts[0], StopRule(max_new_tokens=200)), owner="fast")
        while not fake.round_times:
            time.sleep(0.001)
        feed = Feed(slow_pieces(), lambda p: Item(scheduler.submit(Job(p, StopRule(max_new_tokens=5)), owner="slow")),
                    pool, ahead=1)
        t0 = time.perf_counter()
        gate.set()
        [item] = list(feed)
        t1 = time.perf_counter()
        late = item.future.result(timeout=30).tokens
        running.result(timeout=30)
    finally:
        scheduler.close()
        pool.shutdown()
    during = [t for t in fake.round_times if t0 <= t <= t1]
    gaps = np.diff(during)
    assert t1 - t0 >= stall
    assert len(during) >= 0.5 * stall / 0.01  # rounds went on while the producer was stuck
    assert gaps.max() < 0.25, gaps.max()
    assert late == _want(prompts[1:], [5], fake)[0]
