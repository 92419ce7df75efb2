"""Decoding in llama.cpp: one scheduler owns a context's sequences and serves any number of callers.

- `planner`: the decisions, without threads or llama.cpp: admission, rounds, cancellation, compaction;
- `scheduler`: the owner thread: carries out the planner's decisions on llama.cpp, hands out results;
- `prefixes`: prompts into sequences, the cached text before the audio keyed by that text;
- `rounds`: one `llama_decode` that advances every live sequence (greedy and draft rows alike);
- `sequence`: one sequence's state and the one stop rule;
- `speculation`: drafts: alignment, acceptance records, proposal lengths;
- `repetition`: the loop guard.

`funasr_nano.models.llm.LlamaDecoder` stays the thin llama.cpp binding underneath.
"""

from funasr_nano.decoding.planner import CapacityError, Job, RoundPlanner
from funasr_nano.decoding.prefixes import Prompt
from funasr_nano.decoding.repetition import NO_GUARD, RepetitionGuard
from funasr_nano.decoding.scheduler import Scheduler, SchedulerStats
from funasr_nano.decoding.sequence import Decoded, StopRule
from funasr_nano.decoding.speculation import SpeculativeConfig

__all__ = ["CapacityError", "Decoded", "Job", "NO_GUARD", "Prompt", "RepetitionGuard", "RoundPlanner", "Scheduler",
           "SchedulerStats", "SpeculativeConfig", "StopRule"]
