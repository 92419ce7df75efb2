"""The one owner of a llama.cpp context's sequences: jobs from any number of callers, decoded together.

A `Scheduler` lives as long as its `LlamaDecoder`. Callers hand it ready jobs (a prompt, a stop
rule, optionally a draft) from any thread; its thread admits each into a free sequence (reusing
the cached prompt prefix, `funasr_nano.decoding.prefixes`), advances every live sequence by one
`llama_decode` per round (plain greedy and speculative rows alike, `funasr_nano.decoding.rounds`),
hands each job its result as soon as it ends, and gives the freed sequence to the next job at once
(continuous batching: a long segment does not keep the others' slots idle). Which job gets which
sequence, what a round holds and what a cancellation frees is decided by a `RoundPlanner`
(`funasr_nano.decoding.planner`, no threads, no llama.cpp); this module only carries it out, and
its thread runs nothing else: audio, VAD and encoders run in the engine's prepare stage
(`funasr_nano.prepare`), so a slow producer never delays a round.

Everything reaches the owner as a message on its queue, as in llama.cpp's server queue: a job, a
cancellation (a caller's `future.cancel()` posts one; the sequence is freed before the next
round), a direct call on the decoder, closing. Nothing else is shared with callers.

Why a thread and a queue rather than asyncio: llama.cpp's calls block for tens of milliseconds
and are not thread-safe, so they must all run on one thread, and every caller must wait for them
without blocking the others. A dedicated thread that owns the context, fed by a thread-safe
queue, serves plain threads (a CLI, a corpus worker pool) and asyncio alike: `submit` returns a
`concurrent.futures.Future`, which an asyncio server awaits with `asyncio.wrap_future`. An asyncio
loop as the owner would stall every other coroutine during each `llama_decode`, or push it to an
executor thread anyway. llama.cpp and onnxruntime release the GIL, so callers keep working while
the context decodes.

`submit(job, owner)`: one ready job, its result (`Decoded`) in a future; `future.cancel()` stops
it. Jobs of one owner (a file, a request, a live stream) are admitted in order, owners in turn.

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

import contextlib
import itertools
import logging
import queue
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable, Hashable
from concurrent.futures import CancelledError, Future, InvalidStateError
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from funasr_nano.decoding.planner import CapacityError, Job, Request, RoundPlanner
from funasr_nano.decoding.prefixes import PrefixCache
from funasr_nano.decoding.rounds import RoundCosts, decode_round
from funasr_nano.decoding.sequence import SequenceState
from funasr_nano.decoding.speculation import DEFAULT_CONFIG, Draft, SpeculativeConfig
from funasr_nano.output.results import StageClock

log = logging.getLogger(__name__)
T = TypeVar("T")
Observer = Callable[[str, Any], None]


class Turns(Protocol):
    def decoding(self) -> contextlib.AbstractContextManager: ...


@dataclass
class SchedulerStats:
    """Counters of the scheduler's work, written on its thread, read from any (metrics, tests).

    `shared_rounds`: rounds whose rows belong to more than one owner (file, request, stream),
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
class _Cancel:
    request_id: int


@dataclass
class _Call:
    fn: Callable[[Any, PrefixCache], Any]
    future: Future


_CLOSE = object()


class Scheduler:
    """Owns a decoder's sequences on one thread; see the module docstring.

    `planner`: the decisions (default: continuous batching over the decoder's `n_seq_max` sequences
    of `n_ctx` cells). `batch_invariant=True` makes every job's tokens independent of the other jobs
    decoded with it: a sequence that llama.cpp would compute as a micro-batch of one row gets a
    padding row (`funasr_nano.decoding.rounds`), and small rounds are never split into one-row steps.
    `observer(event, detail)` sees "admit" (sequence id), "round" (the sequence ids fed), "move"
    ((from, to)), "cancel" (sequence id), on the owner's thread: for tests and tracing. `turns`: each
    step's llama.cpp work is done inside `turns.decoding()` (where encoder runs and rounds take turns).
    """

    def __init__(self, decoder: Any, prefixes: PrefixCache, *, planner: RoundPlanner | None = None,
                 config: SpeculativeConfig = DEFAULT_CONFIG, observer: Observer | None = None,
                 batch_invariant: bool = False, turns: Turns | None = None) -> None:
        self.decoder = decoder
        self.prefixes = prefixes
        self.config = config
        self.pad_lone_rows = batch_invariant
        # a unified cache takes rows of any sequences in one pass: new prompts join the next round
        # (not with batch_invariant: a unified cache's results depend on where cells were free)
        self.unified = bool(getattr(decoder, "kv_unified", False))
        self.fold_prompts = self.unified and not batch_invariant
        self.costs = None if batch_invariant else RoundCosts()  # small rounds split where that is cheaper
        self.observer = observer
        self.turns = turns  # taken around each step's llama.cpp work (funasr_nano.prepare.CpuTurns)
        self.planner = planner or RoundPlanner(int(decoder.n_seq_max), int(decoder.n_ctx))
        self.width = self.planner.width
        self.stats = SchedulerStats()
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ids = itertools.count()
        self._calls: deque[_Call] = deque()
        self._closing = False
        self._closed = False
        self._thread = threading.Thread(target=self._run, name="llama-scheduler", daemon=True)
        self._thread.start()
        # at exit (Ctrl-C included) the thread stops between two rounds, before the context is freed
        self._finalizer = weakref.finalize(self, _stop, self._queue, self._thread)

    # ------------------------------------------------------------------ callers' side (any thread)

    def submit(self, job: Job, owner: Hashable | None = None) -> Future:
        """Queue one job; its `Decoded` arrives in the returned future (cancel it to stop the job).

        `owner`: who asks (jobs of one owner go in order, owners take turns; default: the job
        alone). CapacityError at once when the job cannot fit one sequence.
        """
        self.planner.check(job)
        future: Future = Future()
        request_id = next(self._ids)
        request = Request(request_id, job, owner if owner is not None else ("job", request_id), future)
        future.add_done_callback(lambda f: f.cancelled() and self._queue.put(_Cancel(request_id)))
        self._put(request)
        return future

    @property
    def live(self) -> int:
        """Sequences decoding now."""
        return len(self.planner.live)

    @property
    def waiting(self) -> int:
        """Jobs and calls waiting for a sequence (those still on the queue included)."""
        return sum(len(line) for line in list(self.planner.waiting.values())) + len(self._calls) + self._queue.qsize()

    def call(self, fn: Callable[[Any, PrefixCache], T]) -> T:
        """Run `fn(decoder, prefixes)` on the scheduler's thread once no job is live; its result.

        For direct use of the decoder (parity tests, benchmarks): afterwards nothing is assumed
        about the sequences' contents. Jobs submitted after it wait for it.
        """
        call = _Call(fn, Future())
        self._put(call)
        return call.future.result()

    def close(self) -> None:
        """Cancel what is queued or running and stop the thread (the decoder itself stays open)."""
        if not self._closed:
            self._closed = True
            self._finalizer()

    def _put(self, item: object) -> None:
        if self._closed or not self._thread.is_alive():
            raise RuntimeError("the decoding scheduler is closed")
        self._queue.put(item)

    # ------------------------------------------------------------------ the owner's thread

    def _run(self) -> None:
        try:
            while self._take_messages(block=self.planner.idle and not self._calls):
                if self._calls and not self.planner.live:
                    self._run_call(self._calls.popleft())
                    continue
                with self.turns.decoding() if self.turns is not None else contextlib.nullcontext():
                    if not self._calls:
                        for seq, request in self.planner.admit():
                            self._start(seq, request)
                    if self.planner.live:
                        self._round()
        except BaseException as exc:  # noqa: BLE001 - a broken context fails every job instead of hanging them
            log.error("decoding scheduler stopped: %s", exc)
            self._fail_all(exc)
            return
        self._fail_all(CancelledError())

    def _take_messages(self, block: bool) -> bool:
        """Act on every message queued (blocking for the first when idle); False once closing."""
        while True:
            try:
                item = self._queue.get() if block else self._queue.get_nowait()
            except queue.Empty:
                return not self._closing
            block = False
            if item is _CLOSE:
                self._closing = True
            elif isinstance(item, _Cancel):
                self._cancel(item.request_id)
            elif isinstance(item, _Call):
                self._calls.append(item)
            elif not item.handle.cancelled():
                try:
                    self.planner.add(item)
                except CapacityError as exc:  # a planner with a smaller capacity than the submit check
                    _fail(item.handle, exc)

    def _cancel(self, request_id: int) -> None:
        seq = self.planner.cancel(request_id)
        if seq is not None:
            self._release(seq)
            self.stats.cancelled += 1
            self._notify("cancel", seq)

    def _start(self, seq: int, request: Request) -> None:
        job = request.job
        t0 = time.perf_counter()
        draft = Draft(list(job.draft)) if job.draft else None
        try:
            rows, start = self.prefixes.place_prefix(job.prompt, seq)
            if self.fold_prompts and len(rows) <= self.decoder.n_batch // 2:
                state = SequenceState(seq=seq, pos=start, logits=None, rule=job.rule, draft=draft, prompt_rows=rows)
            else:
                logits = self.prefixes.feed(rows, start, seq)
                state = SequenceState(seq=seq, pos=start + len(rows), logits=logits, rule=job.rule, draft=draft)
                state.start(self.decoder.stop_ids)
        except Exception as exc:
            self.planner.failed(seq)
            self._release(seq, forget=True)
            _fail(request.handle, exc)
            return
        seconds = time.perf_counter() - t0
        _add(job.clock, "prefill", seconds)
        self.stats.prefill_seconds += seconds
        self.stats.admitted += 1
        self._notify("admit", seq)
        if self.planner.started(seq, state):  # its first token ended it
            self._release(seq)
            _complete(request.handle, state.result())

    def _round(self) -> None:
        states = self.planner.round()
        if not states:
            return
        t0 = time.perf_counter()
        self._count_round(states)
        self._notify("round", tuple(s.seq for s in states))
        try:
            decode_round(self.decoder, states, self.config, self.pad_lone_rows, self.costs)
        except Exception as exc:  # a llama_decode failure: every job of the round fails with it
            for seq, request in self.planner.fail_round(states):
                self._release(seq, forget=True)
                _fail(request.handle, exc)
            return
        seconds = time.perf_counter() - t0
        self.stats.round_seconds += seconds
        clocks = {id(r.job.clock): r.job.clock for r in self.planner.live.values() if r.job.clock is not None}
        for clock in clocks.values():
            _add(clock, "decode", seconds)
        for seq, request in self.planner.ended():
            self._release(seq)
            _complete(request.handle, request.state.result())
        if self._queue.empty() and not self.unified:
            self._compact()

    def _count_round(self, states: list[SequenceState]) -> None:
        stats = self.stats
        stats.rounds += 1
        stats.rows += len(states)
        stats.max_rows = max(stats.max_rows, len(states))
        if self.planner.owners(states) > 1:
            stats.shared_rounds += 1

    def _compact(self) -> None:
        """Carry out the planner's moves of the highest live sequences into the lowest free ids.

        With no job left to fill a gap, every gap would cost a pass over the weights per round until
        the end. A move copies the whole stream (cells keep their places: the same attention, the
        same tokens) and costs about one decode step; it saves one pass per remaining round.
        """
        d = self.decoder
        for src, dst in self.planner.moves():
            d.clear(dst, 0)
            d.copy_sequence(src, dst)
            d.clear(src, 0)
            self.prefixes.moved(src, dst)
            self._notify("move", (src, dst))

    def _release(self, seq: int, forget: bool = False) -> None:
        """The KV side of a freed sequence: its cache cut back to the prefix (or emptied)."""
        if forget:
            self.prefixes.held.pop(seq, None)
            self.decoder.clear(seq, 0)
        else:
            self.prefixes.release(seq)

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
        requests = self.planner.drain()
        while True:
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
            if isinstance(item, Request):
                requests.append(item)
            elif isinstance(item, _Call):
                self._calls.append(item)
        for request in requests:
            if isinstance(exc, CancelledError):
                request.handle.cancel()
            else:
                _fail(request.handle, exc)
        for call in self._calls:
            if not call.future.cancel() and not call.future.done():
                call.future.set_exception(exc)
        self._calls.clear()

    def _notify(self, event: str, detail: Any) -> None:
        if self.observer is not None:
            self.observer(event, detail)


def _stop(messages: queue.SimpleQueue, thread: threading.Thread) -> None:
    """Stop the owner's thread between two rounds (close(), or the interpreter exiting)."""
    messages.put(_CLOSE)
    if thread.is_alive() and thread is not threading.current_thread():
        thread.join()


def _complete(future: Future, value: Any) -> None:
    try:
        future.set_result(value)
    except InvalidStateError:  # cancelled meanwhile
        pass


def _fail(future: Future, exc: BaseException) -> None:
    try:
        future.set_exception(exc)
    except InvalidStateError:
        pass


def _add(clock: StageClock | None, key: str, seconds: float) -> None:
    if clock is not None:
        clock.add(key, seconds)


__all__ = ["CapacityError", "Job", "Scheduler", "SchedulerStats"]
