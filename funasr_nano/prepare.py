"""The prepare stage: audio pieces -> decoding jobs, on a bounded pool of worker threads.

Every front end turns audio into jobs here: a file's pieces (`Engine.segments`), one live segment
(`Engine.submit_segment`), a corpus worker's files. Features, the ONNX encoder, the prompt's token
ids and the CTC draft are computed on the pool's threads, never on the thread that owns llama.cpp
(`funasr_nano.decoding.scheduler`), so a slow read or encode delays only its own input, not the
decoding rounds of the sequences already admitted.

Two bounds keep the stage from crowding out decoding:
- the encoder budget: how many encoder runs may go at once (`encoder_runs_for`: the decoder's
  sequences, or more where the cores allow); a run waits for a slot, the reading and VAD of other
  inputs go on, and memory holds at most that many encoders' activations;
- look-ahead: an input has at most `ahead` pieces prepared and not yet taken by its reader
  (`Feed`), so memory holds a few prepared segments per input however long the file.

An input is prepared one piece at a time, each step a task on the pool: many inputs share a few
threads in turn, and an input whose reader is slow holds no thread while it waits.
"""

from __future__ import annotations

import contextlib
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import CancelledError, ThreadPoolExecutor
from dataclasses import dataclass
from queue import SimpleQueue
from typing import Generic, Protocol, TypeVar

import numpy as np

from funasr_nano.audio.features import FrontendConfig, audio_token_count, compute_features
from funasr_nano.decoding import Prompt
from funasr_nano.models.ctc import CTCModel
from funasr_nano.models.encoder import AudioEncoder
from funasr_nano.models.prompt import PromptOptions, build_prompt
from funasr_nano.models.settings import ModelSettings
from funasr_nano.models.tokenizer import Tokenizer
from funasr_nano.output.results import StageClock

# Segments quieter than this RMS (about -80 dBFS: digital silence, at most 16-bit dither) are not
# decoded: given nothing to hear, the real model hallucinates text or loops until max_new_tokens.
SILENCE_RMS = 1e-4
P = TypeVar("P")
R = TypeVar("R")


def is_digital_silence(wave: np.ndarray) -> bool:
    """Whether a segment holds nothing to transcribe (RMS below SILENCE_RMS); it gets empty text."""
    return wave.size == 0 or float(np.sqrt(np.mean(np.square(wave, dtype=np.float64)))) < SILENCE_RMS


def encoder_runs_for(sequences: int, threads: int, cores: int | None = None) -> int:
    """Encoder runs at once: enough to prepare a segment for every sequence the decoder holds, more where
    the cores allow more runs of `threads` threads beside it.

    Fewer is slower even on 2 cores: spread out one at a time, encoder runs overlap more decoding rounds,
    and each round they overlap waits on llama.cpp's thread barrier for the core the encoder took;
    run together they overlap fewer (measured: benchmarks/RESULTS.md).
    """
    cores = cores or os.cpu_count() or 1
    return max(1, sequences, cores // max(1, threads))


@dataclass
class PreparedPrompt:
    """One segment's prompt: the shared text before the audio, the audio rows, the text after them."""

    prefix: str
    prefix_ids: list[int]
    audio_rows: np.ndarray  # (n, hidden): adaptor output cut to the official count
    suffix_ids: list[int]
    encoder_out: np.ndarray | None = None  # (T, enc_dim): full encoder output, the CTC head's input

    @property
    def length(self) -> int:
        return len(self.prefix_ids) + self.audio_rows.shape[0] + len(self.suffix_ids)

    @property
    def prompt(self) -> Prompt:
        return Prompt(self.prefix, self.audio_rows, self.suffix_ids)


class CpuTurns:
    """Encoder runs and decoding rounds taking turns where llama.cpp's threads take every core.

    There, an encoder run beside a round preempts one of llama.cpp's threads, and the others spin at
    its barrier until that thread gets a core back: both go slower together than one after the other.
    So, when `shared` (no core to spare), an encoder run waits for the round in progress to end, and
    the next round waits until the encoder runs waiting then are done (runs start only between
    rounds, at most the encoder budget at once). Reading and VAD never wait: only the encoder's
    compute does. With cores to spare (`shared=False`) both go at once.
    """

    def __init__(self, shared: bool) -> None:
        self.shared = shared
        self._cond = threading.Condition()
        self._waiting = 0  # encoder runs waiting for the round to end
        self._running = 0  # encoder runs going
        self._decoding = False

    @contextlib.contextmanager
    def encoder(self) -> Iterator[None]:
        if not self.shared:
            yield
            return
        with self._cond:
            self._waiting += 1
            self._cond.wait_for(lambda: not self._decoding)
            self._waiting -= 1
            self._running += 1
        try:
            yield
        finally:
            with self._cond:
                self._running -= 1
                self._cond.notify_all()

    @contextlib.contextmanager
    def decoding(self) -> Iterator[None]:
        if not self.shared:
            yield
            return
        with self._cond:
            self._cond.wait_for(lambda: not self._running and not self._waiting)
            self._decoding = True
        try:
            yield
        finally:
            with self._cond:
                self._decoding = False
                self._cond.notify_all()


class Preparer:
    """Features, encoder, prompt ids and draft of segments, on `workers` threads with an encoder budget."""

    def __init__(self, settings: ModelSettings, frontend: FrontendConfig, encoder: AudioEncoder, tokenizer: Tokenizer,
                 ctc: Callable[[], CTCModel | None], *, workers: int, encoder_runs: int,
                 turns: CpuTurns | None = None) -> None:
        self.settings = settings
        self.frontend = frontend
        self.encoder = encoder
        self.tokenizer = tokenizer
        self._ctc = ctc
        self.turns = turns or CpuTurns(shared=False)
        self.encoder_runs = max(1, encoder_runs)
        self._encoder_slots = threading.BoundedSemaphore(self.encoder_runs)
        self.pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="prepare")

    def close(self) -> None:
        self.pool.shutdown(wait=True, cancel_futures=True)

    def prepare(self, wave: np.ndarray, prompt: PromptOptions, clock: StageClock | None = None) -> PreparedPrompt | None:
        """Features, encoder and prompt for one segment; None when it is shorter than one frame."""
        clock = clock if clock is not None else StageClock()
        t0 = time.perf_counter()
        feats = compute_features(wave, self.frontend)
        clock.add("features", time.perf_counter() - t0)
        if feats.shape[0] == 0:
            return None
        with self._encoder_slots, self.turns.encoder():
            t1 = time.perf_counter()
            encoder_out, adaptor_out = self.encoder.run(feats)
            clock.add("encoder", time.perf_counter() - t1)
        n_rows = audio_token_count(feats.shape[0]) if self.settings.use_low_frame_rate else feats.shape[0]
        parts = build_prompt(prompt, sys_prompt=self.settings.sys_prompt, do_think=self.settings.do_think)
        return PreparedPrompt(
            prefix=parts.before,
            prefix_ids=self.tokenizer.tokenize(parts.before),
            audio_rows=adaptor_out[:n_rows],
            suffix_ids=self.tokenizer.tokenize(parts.after),
            encoder_out=encoder_out,
        )

    def draft(self, prepared: PreparedPrompt, speculative: bool, clock: StageClock) -> list[int] | None:
        """The CTC head's transcript of a segment as Qwen3 tokens; None without speculation or CTC."""
        ctc = self._ctc() if speculative else None
        if ctc is None or prepared.encoder_out is None:
            return None
        t0 = time.perf_counter()
        text = ctc.text(prepared.encoder_out).strip()
        draft = self.tokenizer.tokenize(text) if text else []
        clock.add("draft", time.perf_counter() - t0)
        return draft

    def feed(self, pieces: Iterator[P], step: Callable[[P], R], ahead: int) -> Feed[R]:
        """`step(piece)` for each of `pieces` on the pool, in order, at most `ahead` results untaken."""
        return Feed(pieces, step, self.pool, ahead)


class Cancellable(Protocol):
    def cancel(self) -> object: ...


_END = object()


class Feed(Generic[R]):
    """One input's pieces, each turned into an item by a pool task, read back in input order.

    The pieces iterator (reading, VAD) and `step` run on the pool, one step at a time per input,
    from the moment the feed is first iterated; iterating the feed blocks until the next item is ready (no polling). An exception of the
    iterator or of a step reaches the reader after the items before it. `cancel()` (any thread)
    stops the steps and cancels every item made and not yet read, and the one the reader holds
    (items have a `cancel()`: the decoding they started stops).
    """

    def __init__(self, pieces: Iterator, step: Callable[[object], R], pool: ThreadPoolExecutor, ahead: int) -> None:
        self._pieces = pieces
        self._step = step
        self._pool = pool
        self._ahead = max(1, ahead)
        self._ready: SimpleQueue = SimpleQueue()
        self._lock = threading.Lock()
        self._untaken: list[R] = []  # made, not read yet
        self._current: R | None = None  # the item the reader holds (its decoding may still run)
        self._running = self._finished = self._cancelled = False

    def __iter__(self) -> Iterator[R]:
        with self._lock:  # nothing is prepared until the input is read: a stream nobody reads costs nothing
            self._schedule()
        try:
            while True:
                item = self._ready.get()
                if item is _END:
                    self._current = None  # the reader is done with every item: nothing to cancel
                    return
                if isinstance(item, BaseException):
                    raise item
                with self._lock:
                    if self._cancelled:
                        raise CancelledError()
                    self._untaken.remove(item)
                    self._current = item
                    self._schedule()
                yield item
        finally:
            self.cancel()  # stopped early or failed: nothing more is made, what was made is cancelled

    @property
    def cancelled(self) -> bool:
        """Whether `cancel()` was called: a step reading a long stretch without speech checks it between blocks."""
        return self._cancelled

    def cancel(self) -> None:
        with self._lock:
            if self._cancelled:
                return
            self._cancelled = True
            untaken, self._untaken = self._untaken, []
            if self._current is not None:
                untaken.append(self._current)
            if not self._running and not self._finished:
                self._finished = True
                self._ready.put(CancelledError())
        for item in untaken:
            item.cancel()

    def _schedule(self) -> None:
        """Start the next step if none runs, the input goes on and fewer than `ahead` items wait (lock held)."""
        if self._running or self._finished or self._cancelled or len(self._untaken) >= self._ahead:
            return
        self._running = True
        try:
            self._pool.submit(self._run_step)
        except RuntimeError as exc:  # the engine is closing
            self._running, self._finished = False, True
            self._ready.put(exc)

    def _run_step(self) -> None:
        try:
            piece = next(self._pieces, _END)
            item = _END if piece is _END else self._step(piece)
        except BaseException as exc:  # noqa: BLE001 - handed to the reader in its place
            item = exc
        with self._lock:
            self._running = False
            if self._cancelled:
                if item is not _END and not isinstance(item, BaseException):
                    item.cancel()
                if not self._finished:
                    self._finished = True
                    self._ready.put(CancelledError())
                return
            if item is _END or isinstance(item, BaseException):
                self._finished = True
            else:
                self._untaken.append(item)
            self._ready.put(item)
            self._schedule()


__all__ = ["CpuTurns", "Feed", "PreparedPrompt", "Preparer", "encoder_runs_for", "is_digital_silence"]
