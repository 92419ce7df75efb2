"""Decoding in llama.cpp: one scheduler owns a context's sequences and serves any number of callers.

- `scheduler`: the owner thread: admits jobs, runs the rounds, cancels, compacts, hands out results;
- `prefixes`: prompts into sequences, the cached text before the audio keyed by that text;
- `rounds`: one `llama_decode` that advances every live sequence (greedy and draft rows alike);
- `sequence`: one sequence's state and the one stop rule;
- `speculation`: drafts: alignment, acceptance records, proposal lengths;
- `repetition`: the loop guard.

`funasr_nano.models.llm.LlamaDecoder` stays the thin llama.cpp binding underneath.
"""

from funasr_nano.decoding.prefixes import Prompt
from funasr_nano.decoding.repetition import NO_GUARD, RepetitionGuard
from funasr_nano.decoding.scheduler import Job, Scheduler, SchedulerStats, StreamResults
from funasr_nano.decoding.sequence import Decoded, StopRule
from funasr_nano.decoding.speculation import SpeculativeConfig

__all__ = ["Decoded", "Job", "NO_GUARD", "Prompt", "RepetitionGuard", "Scheduler", "SchedulerStats", "SpeculativeConfig", "StreamResults", "StopRule"]
