"""Benchmark the 03 presets at the real Fun-ASR-Nano shapes against funasr (PyTorch) and raw llama.cpp.

    python benchmarks/benchmark.py                        # full shapes, 3 runs, 45 tokens
    python benchmarks/benchmark.py --out /tmp/report.md   # then add its figures to benchmarks/RESULTS.md under a dated heading
    python benchmarks/benchmark.py --variants cpu-int8 --skip-baselines --runs 5
    python benchmarks/benchmark.py --smoke                # tiny checkpoint, 1 run, 8 tokens (CI)

The real weights are not needed: a checkpoint of the full shapes with random weights
(testing/checkpoint.py) is built once and exported with 01 and 02 (fp32 + int8 ONNX, f16 +
q8_0 GGUF) into a cache folder outside git (default ~/.cache/funasr-nano-bench/,
`--cache DIR`; `--checkpoint DIR` / `--models DIR` reuse folders built elsewhere).
Random weights give meaningless text, so every run is forced to generate exactly
`--tokens` tokens (stop tokens suppressed), the same in every engine compared.

Every engine runs in its own child process (so its peak RSS is its own) with the same
thread count: our Engine per 03 preset, funasr's AutoModel in fp32 and with
llm_dtype=bf16, and llama.cpp generating from a text prompt of the same length on the
same GGUFs (the ceiling for our decode speed). Stage times are medians of `--runs`
runs after `--warmup` runs; the warm-up leaves the constant prompt prefix in the KV
cache, as in a multi-file run, and the prefill with that prefix recomputed is
reported separately. Results: one markdown table on stdout (and in `--out FILE`).
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks.runner import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
