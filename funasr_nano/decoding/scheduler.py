"""The one owner of a llama.cpp context's sequences: jobs from any number of callers, decoded together.

A `Scheduler` lives as long as its `LlamaDecoder`. Callers hand it jobs (a prompt, a stop rule,
optionally a draft) from any thread; it admits each into a free sequence (reusing the cached
prompt prefix, `funasr_nano.decoding.prefixes`), advances every live sequence by one `llama_decode`
per round (plain greedy and speculative rows alike, `funasr_nano.decoding.rounds`), hands each job its
result as soon as it ends, and gives the freed sequence to the next job at once (continuous
batching: a long segment does not keep the others' slots idle).

Why a thread and a queue rather than asyncio: llama.cpp's calls block for tens of milliseconds
and are not thread-safe, so they must all run on one thread, and every caller must wait for them
without blocking the others. A dedicated thread that owns the context, fed by a thread-safe
queue, serves plain threads (a CLI, a corpus worker pool) and asyncio alike: `submit` returns a
`concurrent.futures.Future`, which an asyncio server awaits with `asyncio.wrap_future`. An asyncio
loop as the owner would stall every other coroutine during each `llama_decode`, or push it to an
executor thread anyway. llama.cpp and onnxruntime release the GIL, so callers keep working while
the context decodes.

Two ways to submit:
- `submit(job)`: one ready job, its result (`Decoded`) in a future; `future.cancel()` stops it,
  and its sequence is freed before the next round.
- `stream(jobs)`: a lazy iterable of jobs, pulled on the scheduler's thread only when a sequence
  is free for the next one. This is how a long file is transcribed: a segment is encoded only
  when it can be decoded, so memory holds a handful of prepared segments, and the encoder never
  competes with decoding for the cores. Results come back in finishing order.

Behaviours the tokens depend on (all tested against decoding each job alone):
- rows of a round go in increasing sequence order, and when no job is waiting, live sequences
  move down into freed ids (`compact`): llama.cpp's split KV cache batches only consecutive
  sequence ids in one pass, so a gap costs one more pass over the weights every round;
- use the split cache (`DecoderOptions.kv_unified=False`, the default): each sequence's cache is
  then laid out exactly as when it is decoded alone, and a row's logits depend on the other rows
  of its round only through how llama.cpp divides the round into micro-batches: a sequence left
  with one row in a micro-batch of its own is computed with other kernels
  (`funasr_nano.decoding.rounds`). With f16 weights, or any weights past 256 cache cells, a job whose
  company comes and goes (a server under load) can then meet a near-tie that flips a token (on
  random weights, about one token in a few hundred; trained weights rarely have such ties).
  `batch_invariant=True` pads such sequences so that every job gets exactly the tokens it gets in
  any company. A unified cache (`kv_unified=True`, the server's default) takes rows of any
  sequences in one pass, so an admitted job's prompt rows join the next round instead of a pass of
  their own (a prompt of 15 rows costs about 20 ms less on 2 cores), and stores a shared prefix
  once; but with flash attention (llama.cpp's CPU default) its results depend on where earlier
  calls left free cells, so `batch_invariant` keeps the split cache;
- a prompt's prefix goes into the cache in a pass of its own (`funasr_nano.decoding.prefixes`), so its
  rows are computed alike whether the prefix was cached or not.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, TypeVar

from funasr_nano.decoding.prefix_store import PrefixStore
from funasr_nano.decoding.prefixes import PrefixCache, Prompt
from funasr_nano.decoding.rounds import RoundCosts, decode_round
from funasr_nano.decoding.sequence import Decoded, SequenceState, StopRule
from funasr_nano.decoding.speculation import DEFAULT_CONFIG, Draft, SpeculativeConfig

log = logging.getLogger(__name__)
T = TypeVar("T")
Observer = Callable[[str, Any], None]


@dataclass
class Job:
    """One segment to decode: its prompt, when to stop, and its draft (None: plain greedy rows).

    `clock`, when given, gets "prefill" and "decode" seconds added (a round's time counts for
    every clock among the jobs it advanced); it is written on the scheduler's thread.
    """

    prompt: Prompt
    rule: StopRule = StopRule()
    draft: Sequence[int] | None = None
    clock: dict[str, float] | None = None


class _Entry:
    """A job on its way through the scheduler."""

    __slots__ = ("job", "future", "stream", "index")

    def __init__(self, job: Job, stream: _Stream | None = None, index: int = 0) -> None:
        self.job, self.future, self.stream, self.index = job, Future(), stream, index

    def cancelled(self) -> bool:
        return self.future.cancelled() or (self.stream is not None and self.stream.cancelled)

    def complete(self, decoded: Decoded) -> None:
        try:
            self.future.set_result(decoded)
        except InvalidStateError:  # cancelled meanwhile
            return
        if self.stream is not None:
            self.stream.delivered((self.index, decoded))

    def fail(self, exc: BaseException) -> None:
        try:
            self.future.set_exception(exc)
        except InvalidStateError:
            return
        if self.stream is not None:
            self.stream.failed(exc)


class _Stream:
    """A producer's lazy iterable of jobs; results go back through `results` in finishing order."""

    _END = object()

    def __init__(self, jobs: Iterable[Job]) -> None:
        self.jobs = iter(jobs)
        self.results: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.cancelled = False
        self.lookahead: _Entry | None = None
        self.started = self.exhausted = False
        self.next_index = self.outstanding = 0

    def _pull(self) -> _Entry | None:
        job = next(self.jobs, None)  # producer code (the encoder) runs here, on the scheduler's thread
        if job is None:
            self.exhausted = True
            return None
        entry = _Entry(job, self, self.next_index)
        self.next_index += 1
        return entry

    def take(self) -> _Entry | None:
        """The next job, keeping one pulled ahead so that the end of the stream is known early."""
        if not self.started:
            self.started = True
            self.lookahead = self._pull()
        entry = self.lookahead
        if entry is not None:
            self.outstanding += 1
            self.lookahead = None if self.exhausted else self._pull()
        return entry

    def delivered(self, item: tuple[int, Decoded]) -> None:
        self.results.put(item)
        self.outstanding -= 1
        if self.exhausted and self.outstanding == 0 and self.lookahead is None:
            self.results.put(self._END)

    def failed(self, exc: BaseException) -> None:
        if not self.cancelled:
            self.cancelled = True
            self.results.put(exc)

    def cancel(self) -> None:
        """From any thread: the jobs not yet ended are dropped, the consumer wakes with CancelledError."""
        self.failed(CancelledError())

    def consume(self) -> Iterator[tuple[int, Decoded]]:
        try:
            while True:
                try:
                    item = self.results.get(timeout=1.0)  # a timeout keeps Ctrl-C responsive
                except queue.Empty:
                    continue
                if item is self._END:
                    return
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            self.cancelled = True  # a consumer that stops early cancels the rest


class StreamResults(Iterator[tuple[int, Decoded]]):
    """What `Scheduler.stream` returns: (index, result) pairs in finishing order.

    `close()` is for the consuming thread (it stops iterating); `cancel()` may be called from any
    other thread while the consumer waits (a server whose client went away, a timeout): the
    stream's live sequences are freed before the next round and the consumer gets CancelledError.
    """

    def __init__(self, stream: _Stream) -> None:
        self._stream = stream
        self._items = stream.consume()

    def __next__(self) -> tuple[int, Decoded]:
        return next(self._items)

    def close(self) -> None:
        self._stream.cancelled = True
        self._items.close()

    def cancel(self) -> None:
        self._stream.cancel()


@dataclass
class SchedulerStats:
    """Counters of the scheduler's work, written on its thread, read from any (metrics, tests).

    `shared_rounds`: rounds whose rows belong to more than one caller (stream or submitted job),
    the proof that concurrent callers are batched together; `max_rows`: most sequences in one round.
    """

    rounds: int = 0
    rows: int = 0
    shared_rounds: int = 0
    max_rows: int = 0
    admitted: int = 0
    cancelled: int = 0
    prefill_seconds: float = 0.0  # placing prompts (kept, copied or decoded prefixes and their audio rows)
    round_seconds: float = 0.0  # decode rounds (with the unified cache, the prompt rows folded into them too)


@dataclass
class _Call:
    fn: Callable[[Any, PrefixCache], Any]
    future: Future


_CLOSE = object()


class Scheduler:
    """Owns a decoder's sequences on one thread; see the module docstring.

    `refill=False` admits jobs only when every sequence has ended (fixed groups: a benchmark
    comparison). `batch_invariant=True` makes every job's tokens independent of the other jobs
    decoded with it: a sequence that llama.cpp would compute as a micro-batch of one row gets a
    padding row (`funasr_nano.decoding.rounds`), and small rounds are never split into one-row steps.
    `observer(event, detail)` sees "admit" (sequence id), "round" (the sequence ids
    fed), "move" ((from, to)), "cancel" (sequence id): for tests and tracing.
    """

    def __init__(self, decoder: Any, *, config: SpeculativeConfig = DEFAULT_CONFIG, refill: bool = True,
                 observer: Observer | None = None, batch_invariant: bool = False,
                 prefix_store: PrefixStore | None = None) -> None:
        self.decoder = decoder
        self.config = config
        self.refill = refill
        self.pad_lone_rows = batch_invariant
        # a unified cache takes rows of any sequences in one pass: new prompts join the next round
        # (not with batch_invariant: a unified cache's results depend on where cells were free)
        self.unified = bool(getattr(decoder, "kv_unified", False))
        self.fold_prompts = self.unified and not batch_invariant
        self.costs = None if batch_invariant else RoundCosts()  # small rounds split where that is cheaper
        self.observer = observer
        self.width = max(1, int(decoder.n_seq_max))
        self.prefixes = PrefixCache(decoder, store=prefix_store)
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._waiting: deque[_Entry | _Stream | _Call] = deque()
        self._live: dict[int, tuple[_Entry, SequenceState]] = {}
        self._free = list(range(self.width))
        self.stats = SchedulerStats()
        self._closing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llama-scheduler", daemon=True)
        self._thread.start()
        _OPEN.add(self)

    # ------------------------------------------------------------------ callers' side (any thread)

    def submit(self, job: Job) -> Future:
        """Queue one job; its `Decoded` arrives in the returned future (cancel it to stop the job)."""
        entry = _Entry(job)
        self._put(entry)
        return entry.future

    def stream(self, jobs: Iterable[Job]) -> StreamResults:
        """(index in `jobs`, result) for each job as it ends; `jobs` is pulled lazily on the scheduler's thread.

        Closing the returned iterator early, cancelling it from another thread, or an exception in
        `jobs` cancels the remaining jobs. Several callers' streams are served round robin: each
        free sequence goes to the next stream in line, so their jobs share rounds.
        """
        stream = _Stream(jobs)
        self._put(stream)
        return StreamResults(stream)

    @property
    def live(self) -> int:
        """Sequences decoding now."""
        return len(self._live)

    @property
    def waiting(self) -> int:
        """Callers (streams, jobs, calls) waiting for a sequence."""
        return len(self._waiting) + self._queue.qsize()

    def call(self, fn: Callable[[Any, PrefixCache], T]) -> T:
        """Run `fn(decoder, prefixes)` on the scheduler's thread once no job is live; its result.

        For direct use of the decoder (parity tests, benchmarks): afterwards nothing is assumed
        about the sequences' contents.
        """
        call = _Call(fn, Future())
        self._put(call)
        return call.future.result()

    def close(self) -> None:
        """Cancel what is queued or running and stop the thread (the decoder itself stays open)."""
        if not self._closed:
            self._closed = True
            self._queue.put(_CLOSE)
            self._thread.join()

    def _put(self, item: object) -> None:
        if self._closed or not self._thread.is_alive():
            raise RuntimeError("the decoding scheduler is closed")
        self._queue.put(item)

    # ------------------------------------------------------------------ the scheduler's thread

    def _run(self) -> None:
        try:
            while self._take_requests(block=not self._live and not self._waiting):
                self._drop_cancelled()
                self._admit()
                if self._live:
                    self._round()
        except BaseException as exc:  # noqa: BLE001 - a broken context fails every job instead of hanging them
            log.error("decoding scheduler stopped: %s", exc)
            self._fail_all(exc)
            return
        self._fail_all(CancelledError())

    def _take_requests(self, block: bool) -> bool:
        """Move new requests into the waiting line; False once closing."""
        while True:
            try:
                item = self._queue.get() if block else self._queue.get_nowait()
            except queue.Empty:
                return not self._closing
            block = False
            if item is _CLOSE:
                self._closing = True
            else:
                self._waiting.append(item)

    def _drop_cancelled(self) -> None:
        for seq in [s for s, (entry, _) in self._live.items() if entry.cancelled()]:
            del self._live[seq]
            self._release(seq)
            self.stats.cancelled += 1
            self._notify("cancel", seq)

    def _admit(self) -> None:
        if not self.refill and self._live:
            return  # fixed groups: a new group only once all have ended
        while self._free and self._waiting:
            head = self._waiting[0]
            if isinstance(head, _Call):
                if self._live:
                    return  # a call waits for the live jobs; later jobs wait behind it
                self._waiting.popleft()
                self._run_call(head)
                continue
            if isinstance(head, _Stream):
                entry = self._take_from(head)
                if entry is None:
                    continue
            else:
                self._waiting.popleft()
                entry = head
                if entry.cancelled():
                    continue
            self._start(entry)

    def _take_from(self, stream: _Stream) -> _Entry | None:
        """The stream's next job; the stream goes to the back of the line (round robin) or leaves it."""
        self._waiting.popleft()
        if stream.cancelled:
            return None
        try:
            entry = stream.take()
        except Exception as exc:  # the producer failed (an unreadable file...): the stream ends with it
            stream.failed(exc)
            return None
        if not stream.exhausted:
            self._waiting.append(stream)
        elif stream.outstanding == 0:
            stream.results.put(stream._END)
        return entry

    def _start(self, entry: _Entry) -> None:
        seq = self._free.pop(0)
        job = entry.job
        t0 = time.perf_counter()
        draft = Draft(list(job.draft)) if job.draft else None
        try:
            rows, start = self.prefixes.place_prefix(job.prompt, seq)
            if self.fold_prompts and len(rows) <= self.decoder.n_batch // 2:
                state = SequenceState(seq=seq, pos=start, logits=None, rule=job.rule, draft=draft, prompt_rows=rows)
            else:
                logits = self.prefixes.feed(rows, start, seq)
                state = SequenceState(seq=seq, pos=start + len(rows), logits=logits, rule=job.rule, draft=draft)
        except Exception as exc:
            self._release(seq, forget=True)
            entry.fail(exc)
            return
        seconds = time.perf_counter() - t0
        _add(job.clock, "prefill", seconds)
        self.stats.prefill_seconds += seconds
        self.stats.admitted += 1
        self._notify("admit", seq)
        if state.prompt_rows is not None:
            self._live[seq] = (entry, state)  # its first token comes with the next round's logits
            return
        state.start(self.decoder.stop_ids)
        if state.done:
            self._release(seq)
            entry.complete(state.result())
            return
        self._live[seq] = (entry, state)

    def _round(self) -> None:
        t0 = time.perf_counter()
        order = sorted(self._live)
        self._count_round(order)
        self._notify("round", tuple(order))
        try:
            decode_round(self.decoder, [self._live[seq][1] for seq in order], self.config, self.pad_lone_rows,
                         self.costs)
        except Exception as exc:  # a llama_decode failure: every job of the round fails with it
            for seq in order:
                entry, _ = self._live.pop(seq)
                self._release(seq, forget=True)
                entry.fail(exc)
            return
        seconds = time.perf_counter() - t0
        self.stats.round_seconds += seconds
        clocks = {id(e.job.clock): e.job.clock for e, _ in self._live.values() if e.job.clock is not None}
        for clock in clocks.values():
            _add(clock, "decode", seconds)
        for seq in [s for s in order if self._live[s][1].done]:
            entry, state = self._live.pop(seq)
            self._release(seq)
            entry.complete(state.result())
        if not self._waiting and self._queue.empty() and not self.unified:
            self._compact()

    def _count_round(self, order: list[int]) -> None:
        stats = self.stats
        stats.rounds += 1
        stats.rows += len(order)
        stats.max_rows = max(stats.max_rows, len(order))
        callers = {id(entry.stream or entry) for entry, _ in (self._live[seq] for seq in order)}
        if len(callers) > 1:
            stats.shared_rounds += 1

    def _compact(self) -> None:
        """Move the highest live sequences into the lowest free ids until the live ids are 0..n-1.

        With no job left to fill a gap, every gap would cost a pass over the weights per round until
        the end. A move copies the whole stream (cells keep their places: the same attention, the
        same tokens) and costs about one decode step; it saves one pass per remaining round.
        """
        d = self.decoder
        while self._live and self._free and self._free[0] < max(self._live):
            src, dst = max(self._live), self._free.pop(0)
            d.clear(dst, 0)
            d.copy_sequence(src, dst)
            d.clear(src, 0)
            self.prefixes.moved(src, dst)
            entry, state = self._live.pop(src)
            state.seq = dst
            self._live[dst] = (entry, state)
            bisect.insort(self._free, src)
            self._notify("move", (src, dst))

    def _release(self, seq: int, forget: bool = False) -> None:
        """Give `seq` back to the free ids, its cache cut back to the prefix (or emptied)."""
        try:
            if forget:
                self.prefixes.held.pop(seq, None)
                self.decoder.clear(seq, 0)
            else:
                self.prefixes.release(seq)
        finally:
            bisect.insort(self._free, seq)

    def _run_call(self, call: _Call) -> None:
        try:
            result = call.fn(self.decoder, self.prefixes)
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            self.prefixes.forget()
            call.future.set_exception(exc)
            return
        self.prefixes.forget()
        call.future.set_result(result)

    def _fail_all(self, exc: BaseException) -> None:
        self._closing = True
        for entry, _ in self._live.values():
            entry.future.cancel() if isinstance(exc, CancelledError) else entry.fail(exc)
            if isinstance(exc, CancelledError) and entry.stream is not None:
                entry.stream.failed(exc)
        self._live.clear()
        while True:
            try:
                self._waiting.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for item in self._waiting:
            if isinstance(item, _Stream):
                item.failed(exc)
            elif item is not _CLOSE:
                if not item.future.cancel() and not item.future.done():
                    item.future.set_exception(exc)
        self._waiting.clear()

    def _notify(self, event: str, detail: Any) -> None:
        if self.observer is not None:
            self.observer(event, detail)


_OPEN: weakref.WeakSet[Scheduler] = weakref.WeakSet()


@atexit.register
def _close_open_schedulers() -> None:
    """At exit (Ctrl-C included), stop each thread between two rounds, before the contexts are freed."""
    for scheduler in list(_OPEN):
        scheduler.close()


def _add(clock: dict[str, float] | None, key: str, seconds: float) -> None:
    if clock is not None:
        clock[key] = clock.get(key, 0.0) + seconds
