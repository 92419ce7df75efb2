"""Synthetic drafts made from the decoder's own greedy output (tests and the speculative benchmark)."""

from __future__ import annotations

import numpy as np

KINDS = ("own", "half", "third", "random", "empty")


def make_draft(own: list[int], kind: str, rng: np.random.Generator, n_vocab: int) -> list[int]:
    """`own`: the output itself (the upper bound); `half` / `third`: every second / third token wrong;
    `random`: random ids of the same length; `empty`: no draft."""
    if kind == "own":
        return list(own)
    if kind == "half":
        return [t if i % 2 == 0 else (t + 1) % n_vocab for i, t in enumerate(own)]
    if kind == "third":
        return [t if i % 3 != 2 else (t + 1) % n_vocab for i, t in enumerate(own)]
    if kind == "random":
        return [int(x) for x in rng.integers(0, n_vocab, size=len(own))]
    if kind == "empty":
        return []
    raise ValueError(f"unknown draft kind {kind!r}")
