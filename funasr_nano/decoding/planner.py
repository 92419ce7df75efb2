"""The decisions of decoding, apart from llama.cpp and threads: who gets a sequence, what a round holds.

`RoundPlanner` is plain data and functions: it admits waiting requests into free sequence ids,
lists the states a round advances, takes them out once they end, drops cancelled ones and plans
the moves that keep live sequences contiguous. The owner loop (`funasr_nano.decoding.scheduler`)
is the only caller, on the one thread that touches llama.cpp, and carries out what the planner
decides (prefill, `llama_decode`, KV removal and copies). So every rule the tokens or the fairness
depend on is tested without a model (tests/test_planner.py), the way vLLM v1 keeps its scheduler
apart from the engine core that runs the model.

Rules:
- admission: requests of one owner (a file, a request, a live stream) in the order they came;
  owners in turn (round robin), so a caller that queued a whole file does not hold back one that
  queued a single segment behind it;
- sequence ids: the lowest free one first, and when nothing waits, live sequences move down into
  freed ids (`moves`): llama.cpp's split KV cache batches only consecutive ids in one pass;
- capacity: a job whose prompt and new tokens cannot fit one sequence's cells is refused when it is
  submitted (`CapacityError`), before it could reach a round it would fail for everyone in it;
- cancellation: a waiting request leaves the line, a live one frees its sequence before the next
  round; an unknown or finished one is nothing to do.
"""

from __future__ import annotations

import bisect
from collections import OrderedDict, deque
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

from funasr_nano.decoding.prefixes import Prompt
from funasr_nano.decoding.sequence import SequenceState, StopRule
from funasr_nano.output.results import StageClock


class CapacityError(ValueError):
    """A segment's prompt and new tokens do not fit the engine's context (one line); only that call fails."""


@dataclass
class Job:
    """One segment to decode: its prompt, when to stop, and its draft (None: plain greedy rows).

    `length`: the prompt's positions (0: not known, not checked against the capacity). `clock`,
    when given, gets "prefill" and "decode" seconds added on the owner's thread (a round's time
    counts for every clock among the jobs it advanced).
    """

    prompt: Prompt
    rule: StopRule = StopRule()
    draft: Sequence[int] | None = None
    clock: StageClock | None = None
    length: int = 0


@dataclass(eq=False)
class Request:
    """A job on its way through the planner; `owner` is who asked (fairness, shared-round counts)."""

    id: int
    job: Job
    owner: Hashable
    handle: Any = None  # what the owner loop answers through (a Future); the planner never looks at it
    seq: int | None = None  # its sequence, once admitted
    state: SequenceState | None = None  # set once its prompt is in its sequence


@dataclass
class RoundPlanner:
    """Waiting line, live sequences and free ids of one context of `width` sequences of `capacity` cells."""

    width: int
    capacity: int
    waiting: OrderedDict[Hashable, deque[Request]] = field(default_factory=OrderedDict)
    live: dict[int, Request] = field(default_factory=dict)
    free: list[int] = field(init=False)

    def __post_init__(self) -> None:
        self.width = max(1, int(self.width))
        self.free = list(range(self.width))
        self._where: dict[int, Request] = {}  # request id -> request, waiting or live

    # ------------------------------------------------------------------ requests in and out

    def check(self, job: Job, what: str = "a job") -> None:
        """CapacityError when `job` cannot fit one sequence (reads only the fixed capacity: any thread);
        `what` names the job in the message."""
        self.check_fits(job.length, job.rule.max_new_tokens, what)

    def check_fits(self, length: int, max_new_tokens: int, what: str) -> None:
        """`check` for a prompt of `length` positions and up to `max_new_tokens` (before its job exists)."""
        positions = length + max_new_tokens - 1  # the last token is never fed back
        if positions > self.capacity:
            raise CapacityError(
                f"{what} needs {positions} positions ({length} for the prompt, up to "
                f"{max_new_tokens} new tokens) and this engine's context holds {self.capacity} per "
                "sequence: ask for fewer new tokens or fewer hotwords, or open the engine with larger limits "
                "(EngineConfig's max_new_tokens, max_segment_seconds, max_hotword_chars)")

    def add(self, request: Request) -> None:
        """Queue a request behind its owner's earlier ones (CapacityError: refused, nothing queued)."""
        self.check(request.job)
        self.waiting.setdefault(request.owner, deque()).append(request)
        self._where[request.id] = request

    def cancel(self, request_id: int) -> int | None:
        """Drop a request: the sequence to free when it was live, else None (waiting, finished or unknown)."""
        request = self._where.pop(request_id, None)
        if request is None:
            return None
        if request.seq is None:  # still waiting
            line = self.waiting[request.owner]
            line.remove(request)
            if not line:
                del self.waiting[request.owner]
            return None
        seq = request.seq
        del self.live[seq]
        self._free(seq)
        return seq

    @property
    def has_waiting(self) -> bool:
        return bool(self.waiting)

    @property
    def idle(self) -> bool:
        return not self.waiting and not self.live

    def can_admit(self) -> bool:
        """Whether free sequences may take waiting requests now (continuous batching: always)."""
        return True

    def admit(self) -> list[tuple[int, Request]]:
        """(sequence id, request) for each waiting request a free sequence takes now, owners in turn."""
        out: list[tuple[int, Request]] = []
        if not self.can_admit():
            return out
        while self.free and self.waiting:
            owner, line = next(iter(self.waiting.items()))
            request = line.popleft()
            del self.waiting[owner]
            if line:
                self.waiting[owner] = line  # to the back of the line: the next owner goes first
            seq = request.seq = self.free.pop(0)
            self.live[seq] = request
            out.append((seq, request))
        return out

    def started(self, seq: int, state: SequenceState) -> bool:
        """The owner placed the prompt of `seq`'s request; True when it already ended (its first token
        was a stop or its only one), and the sequence is then free again."""
        request = self.live[seq]
        request.state = state
        if state.done:
            self._finish(seq)
            return True
        return False

    def failed(self, seq: int) -> Request:
        """The prompt of `seq` could not be placed: its request leaves, the sequence is free."""
        return self._finish(seq)

    # ------------------------------------------------------------------ rounds

    def round(self) -> list[SequenceState]:
        """The states a round advances, in increasing sequence order (llama.cpp batches consecutive ids)."""
        return [self.live[seq].state for seq in sorted(self.live) if self.live[seq].state is not None]

    def owners(self, states: Sequence[SequenceState]) -> int:
        """How many owners' requests a round of these states serves (shared rounds prove batching)."""
        return len({self.live[s.seq].owner for s in states})

    def ended(self) -> list[tuple[int, Request]]:
        """After a round: the requests whose states are done, taken out, their sequences free."""
        done = [seq for seq in sorted(self.live) if self.live[seq].state is not None and self.live[seq].state.done]
        return [(seq, self._finish(seq)) for seq in done]

    def fail_round(self, states: Sequence[SequenceState]) -> list[tuple[int, Request]]:
        """A round failed (llama_decode): every request of it leaves, its sequence free."""
        return [(s.seq, self._finish(s.seq)) for s in states if s.seq in self.live]

    def moves(self) -> list[tuple[int, int]]:
        """Moves (from, to) that leave the live ids 0..n-1, applied here; the owner copies the caches.

        Only when nothing waits: a waiting request fills a gap at once, a move costs about one step.
        """
        out: list[tuple[int, int]] = []
        if self.waiting:
            return out
        while self.live and self.free and self.free[0] < max(self.live):
            src, dst = max(self.live), self.free.pop(0)
            request = self.live.pop(src)
            request.seq = dst
            if request.state is not None:
                request.state.seq = dst
            self.live[dst] = request
            bisect.insort(self.free, src)
            out.append((src, dst))
        return out

    def drain(self) -> list[Request]:
        """Every request, waiting or live, taken out (the owner is closing or broken)."""
        out = list(self.live.values())
        for line in self.waiting.values():
            out.extend(line)
        self.live.clear()
        self.waiting.clear()
        self._where.clear()
        self.free = list(range(self.width))
        return out

    # ------------------------------------------------------------------ internals

    def _finish(self, seq: int) -> Request:
        request = self.live.pop(seq)
        self._where.pop(request.id, None)
        self._free(seq)
        return request

    def _free(self, seq: int) -> None:
        bisect.insort(self.free, seq)


__all__ = ["CapacityError", "Job", "Request", "RoundPlanner"]
