"""A decoder without a model, for the scheduler's tests: what `LlamaDecoder` offers the planner's owner
loop, computed in microseconds.

Each sequence is a list of cells (one key per position: a token id, or a digest of an embedding row).
The logits after a position are a one-hot vector whose hot index is a hash of every cell of that
sequence up to it, so a sequence's tokens depend on its own prompt and output only, like a real
model's, and a scheduler that put a row in the wrong sequence, position or order gets other tokens.
Writing a position whose predecessors are missing raises, as llama.cpp's split cache would misbehave.
"""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence

import numpy as np

N_VOCAB = 97
N_EMBD = 8
STOP = N_VOCAB - 1


class FakeDecoder:
    """`n_seq_max` sequences of `n_ctx` cells; `seconds_per_round` of sleep per decode call (timing tests)."""

    kv_unified = False

    def __init__(self, n_seq_max: int = 4, n_ctx: int = 256, n_batch: int = 64, seconds_per_round: float = 0.0,
                 stop_every: int = 0) -> None:
        self.n_seq_max, self.n_ctx, self.n_batch = n_seq_max, n_ctx, n_batch
        self.stop_ids = frozenset({STOP})
        self.path = "fake.gguf"
        self.seconds_per_round = seconds_per_round
        self.stop_every = stop_every  # >0: a cell hash divisible by this gives the stop token
        self.cells: dict[int, list[object]] = {seq: [] for seq in range(n_seq_max)}
        self.decode_calls = 0
        self.round_times: list[float] = []  # perf_counter at the end of each decode call
        self.thread_ids: set[int] = set()  # the threads that called it (must be one)
        self._logits = np.zeros((0, N_VOCAB), dtype=np.float32)

    # ------------------------------------------------------------------ text

    def tokenize(self, text: str) -> list[int]:
        return [ord(c) % (N_VOCAB - 1) for c in text]

    def token_embeddings(self, tokens: Sequence[int]) -> np.ndarray:
        rows = np.zeros((len(tokens), N_EMBD), dtype=np.float32)
        rows[:, 0] = tokens
        rows[:, 1] = -1.0  # marks a token row
        return rows

    # ------------------------------------------------------------------ cache

    def clear(self, seq: int = -1, start: int = 0) -> None:
        for s in (self.cells if seq < 0 else [seq]):
            del self.cells[s][start:]

    def copy_sequence(self, src: int, dst: int) -> None:
        self.cells[dst] = list(self.cells[src])

    def copy_pending(self, seq: int) -> bool:
        return False

    def sequence_state(self, seq: int) -> bytes:
        raise NotImplementedError

    def restore_sequence_state(self, seq: int, data: bytes, n_positions: int) -> bool:
        return False

    # ------------------------------------------------------------------ decoding

    def decode_tokens(self, tokens: Sequence[int], start: int, seq: int = 0, *, all_logits: bool = False) -> None:
        self._decode([("t", int(t)) for t in tokens], list(range(start, start + len(tokens))), [seq] * len(tokens),
                     [all_logits] * (len(tokens) - 1) + [True])

    def decode_embeddings(self, rows: np.ndarray, start: int, seq: int = 0, *, all_logits: bool = False) -> None:
        keys = [self._row_key(r) for r in rows]
        self._decode(keys, list(range(start, start + len(keys))), [seq] * len(keys),
                     [all_logits] * (len(keys) - 1) + [True])

    def decode_many(self, tokens: Sequence[int], positions: Sequence[int], seqs: Sequence[int],
                    outputs: Sequence[bool]) -> None:
        self._decode([("t", int(t)) for t in tokens], positions, seqs, outputs)

    def decode_rows(self, rows: np.ndarray, positions: Sequence[int], seqs: Sequence[int],
                    outputs: Sequence[bool]) -> None:
        self._decode([self._row_key(r) for r in rows], positions, seqs, outputs)

    def step(self, token: int, pos: int, seq: int = 0) -> np.ndarray:
        self._decode([("t", int(token))], [pos], [seq], [True])
        return self._logits[0]

    def logits_rows(self, count: int) -> np.ndarray:
        return self._logits[:count]

    def logits(self, index: int = -1) -> np.ndarray:
        return self._logits[index]

    def _decode(self, keys: list[object], positions: Sequence[int], seqs: Sequence[int],
                outputs: Sequence[bool]) -> None:
        self.thread_ids.add(threading.get_ident())
        if len(keys) > self.n_batch:
            raise RuntimeError(f"{len(keys)} rows, more than n_batch={self.n_batch}")
        self.decode_calls += 1
        rows = []
        for key, pos, seq, out in zip(keys, positions, seqs, outputs):
            cells = self.cells[seq]
            if pos >= self.n_ctx:
                raise RuntimeError(f"position {pos} beyond the context ({self.n_ctx})")
            if pos > len(cells):
                raise RuntimeError(f"sequence {seq}: position {pos} written with only {len(cells)} cells before it")
            del cells[pos:]
            cells.append(key)
            if out:
                rows.append(self._hot(cells))
        if self.seconds_per_round:
            time.sleep(self.seconds_per_round)
        self._logits = np.stack(rows) if rows else np.zeros((0, N_VOCAB), dtype=np.float32)
        self.round_times.append(time.perf_counter())

    def _hot(self, cells: list[object]) -> np.ndarray:
        digest = int.from_bytes(hashlib.blake2b(repr(cells).encode(), digest_size=8).digest(), "little")
        token = digest % (N_VOCAB - 1)
        if self.stop_every and digest % self.stop_every == 0:
            token = STOP
        row = np.zeros(N_VOCAB, dtype=np.float32)
        row[token] = 1.0
        row[(token + 1) % (N_VOCAB - 1)] = 0.5  # the runner-up, taken when a forced length passes a stop
        return row

    @staticmethod
    def _row_key(row: np.ndarray) -> object:
        if row[1] == -1.0 and float(row[0]).is_integer():
            return ("t", int(row[0]))  # a token's embedding row is that token
        return ("r", hashlib.blake2b(np.ascontiguousarray(row, dtype=np.float32).tobytes(), digest_size=8).hexdigest())


def decode_alone(prompt_keys: list[object], n_tokens: int, stop_every: int = 0) -> list[int]:
    """The tokens greedy decoding gives a prompt (cell keys) on a FakeDecoder, by the definition alone."""
    fake = FakeDecoder(n_seq_max=1, stop_every=stop_every)
    cells = list(prompt_keys)
    out: list[int] = []
    while len(out) < n_tokens:
        token = int(np.argmax(fake._hot(cells)))
        if token == STOP:
            break
        out.append(token)
        cells.append(("t", token))
    return out


def prompt_keys(prompt, fake: FakeDecoder) -> list[object]:  # noqa: ANN001 - a funasr_nano.decoding.Prompt
    """The cells a prompt fills on a FakeDecoder: prefix tokens, audio rows, suffix tokens."""
    return ([("t", t) for t in fake.tokenize(prompt.prefix)] + [FakeDecoder._row_key(r) for r in prompt.audio_rows]
            + [("t", int(t)) for t in prompt.suffix_ids])
