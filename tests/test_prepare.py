"""The prepare stage's parts without a model: `Feed` (order, look-ahead, errors, cancellation, laziness)
and `CpuTurns` (encoder runs and decoding rounds taking turns where no core is spare)."""

from __future__ import annotations

import threading
import time
from concurrent.futures import CancelledError, ThreadPoolExecutor

import pytest

from funasr_nano.prepare import CpuTurns, Feed, encoder_runs_for


class Item:
    def __init__(self, value: int) -> None:
        self.value = value
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


@pytest.fixture
def pool():
    with ThreadPoolExecutor(max_workers=3) as executor:
        yield executor


def test_items_come_back_in_order_and_at_most_ahead_are_made_before_they_are_read(pool):
    made: list[int] = []

    def step(i: int) -> Item:
        made.append(i)
        time.sleep(0.002 * (i % 3))
        return Item(i)

    feed = Feed(iter(range(20)), step, pool, ahead=3)
    time.sleep(0.05)
    assert made == []  # nothing is prepared until the feed is read
    out = []
    for item in feed:
        time.sleep(0.01)
        assert len(made) - len(out) <= 3 + 1  # the look-ahead, plus the one being read
        out.append(item.value)
    assert out == list(range(20))


def test_an_error_reaches_the_reader_after_the_items_before_it(pool):
    def pieces():
        yield from range(3)
        raise OSError("damaged at 3")

    feed = Feed(pieces(), Item, pool, ahead=2)
    got = []
    with pytest.raises(OSError, match="damaged at 3"):
        for item in feed:
            got.append(item.value)
    assert got == [0, 1, 2]


def test_cancel_from_another_thread_stops_the_steps_and_cancels_what_was_made(pool):
    gate = threading.Event()
    made: list[Item] = []

    def step(i: int) -> Item:
        if i == 1:
            gate.wait(timeout=10)
        item = Item(i)
        made.append(item)
        return item

    feed = Feed(iter(range(100)), step, pool, ahead=4)
    reader = iter(feed)
    first = next(reader)
    threading.Timer(0.05, feed.cancel).start()
    threading.Timer(0.1, gate.set).start()
    with pytest.raises(CancelledError):
        next(reader)  # the step running when cancelled ends, its item is cancelled, the reader is told
    time.sleep(0.1)
    assert first.cancelled  # the one the reader held (its decoding stops too)
    assert [item.value for item in made] == [0, 1] and all(item.cancelled for item in made)  # no step after
    assert feed.cancelled


def test_an_encoder_run_waits_for_the_round_and_the_next_round_for_waiting_runs():
    turns = CpuTurns(shared=True)
    events: list[str] = []
    round_started = threading.Event()

    def rounds() -> None:
        for i in range(2):
            with turns.decoding():
                events.append(f"round {i} start")
                round_started.set()
                time.sleep(0.1)
                events.append(f"round {i} end")

    def encoder() -> None:
        round_started.wait(timeout=5)
        with turns.encoder():
            events.append("encoder start")
            time.sleep(0.05)
            events.append("encoder end")

    threads = [threading.Thread(target=rounds), threading.Thread(target=encoder)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=10)
    assert events == ["round 0 start", "round 0 end", "encoder start", "encoder end", "round 1 start", "round 1 end"]


def test_with_cores_to_spare_encoder_runs_and_rounds_overlap():
    turns = CpuTurns(shared=False)
    with turns.decoding():
        done = threading.Event()

        def encoder() -> None:
            with turns.encoder():
                done.set()

        threading.Thread(target=encoder).start()
        assert done.wait(timeout=5)


def test_the_encoder_budget_covers_every_sequence_and_grows_with_spare_cores():
    assert encoder_runs_for(4, threads=2, cores=2) == 4
    assert encoder_runs_for(1, threads=2, cores=2) == 1
    assert encoder_runs_for(4, threads=2, cores=32) == 16
