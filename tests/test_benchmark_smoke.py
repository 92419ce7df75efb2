"""benchmarks/benchmark.py keeps working: its --smoke mode end to end on a tiny checkpoint.

The smoke run times both CPU presets (plain and speculative), the speculative-decoding and
long-audio cases, raw llama.cpp and both funasr baselines, each in a child process, with a forced token count, and prints the report. It
reuses the session's tiny checkpoint and exports (the fixtures other tests build anyway)
instead of building its own, to stay well under two minutes. Numbers on tiny weights mean
nothing; the test checks that every engine ran, generated the forced length and landed in
the tables.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "benchmark.py"


@pytest.mark.slow
def test_benchmark_smoke(tmp_path: Path, zh_mp3: Path, tiny_ckpt: Path, tiny_models: Path) -> None:
    out, raw = tmp_path / "results.md", tmp_path / "results.json"
    cmd = [sys.executable, str(SCRIPT), "--smoke", "--checkpoint", str(tiny_ckpt), "--models", str(tiny_models),
           "--cache", str(tmp_path / "cache"), "--audio", str(zh_mp3), "--out", str(out), "--json", str(raw), "--long"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "building" not in proc.stderr  # complete folders given: nothing is rebuilt

    report = out.read_text(encoding="utf-8")
    assert report == proc.stdout
    results = json.loads(raw.read_text(encoding="utf-8"))["results"]
    expected = {"ours cpu", "ours cpu-int8", "ours cpu-int8 +spec", "funasr fp32", "funasr bf16",
                "llama.cpp f16 (LlamaDecoder)", "llama.cpp f16 (Llama API)",
                "llama.cpp q8_0 (LlamaDecoder)", "llama.cpp q8_0 (Llama API)"}
    assert expected <= set(results), sorted(results)
    for name in expected:
        assert "error" not in results[name], (name, results[name])
        assert results[name]["n_tokens"] == [8], (name, results[name]["n_tokens"])
        assert results[name]["peak_rss"] > 0
        assert f"| {name} |" in report
    ours = results["ours cpu-int8"]
    for key in ("load_s", "features_s", "encoder_s", "prefill_s", "prefill_uncached_s", "decode_tok_s", "total_s",
                "rtf"):
        assert ours[key] > 0, key
    assert ours["prompt_positions"] > ours["prompt_prefix_tokens"] + ours["audio_rows"] > ours["audio_rows"] > 0
    assert ours["speculative"] is False
    # issue 17: the load broken down, and the 03 script timed as a whole process
    assert ours["imports_s"] > 0 and set(ours["load_times"]) == {"encoder", "llama.cpp"}  # plain greedy: no CTC
    for name in ("whole process cpu", "whole process cpu-int8"):
        assert "error" not in results[name] and results[name]["whole_s"] > 0, results[name]
    assert "## Start-up: load time and whole process" in report
    assert results["ours cpu-int8 +spec"]["speculative"] is True
    assert results["funasr bf16"]["llm_param_dtype"] == "torch.bfloat16"
    assert results["funasr fp32"]["llm_param_dtype"] == "torch.float32"
    assert results["llama.cpp q8_0 (Llama API)"]["c_decode_tok_s"] > 0
    assert "cpu-int8 vs the peer FunASR llama.cpp runtime" in report
    assert "Targets (issues 6, 7 and 9)" in report
    spec = results["speculative"]
    assert spec["identical"] is True and set(spec["speculative"]) == {"own", "half", "random"}
    assert spec["speculative"]["own"]["accepted"] == spec["speculative"]["own"]["proposed"] > 0
    assert "## Speculative decoding" in report
    for name in ("long sequential", "long batched x8", "rss 0.5 min", "rss 1 min", "mixed sequential",
                 "mixed batched x8, fixed groups", "mixed batched x8"):
        assert "error" not in results[name], (name, results[name])
        assert results[name]["segments"] >= 2 and f"| {name} |" in report
    assert results["rss 1 min"]["duration_s"] > 1.5 * results["rss 0.5 min"]["duration_s"]
    assert results["long sequential"]["n_tokens"] == results["long sequential"]["segments"] * 8
    mixed = [results[f"mixed {k}"] for k in ("sequential", "batched x8, fixed groups", "batched x8")]
    assert len({r["n_tokens"] for r in mixed}) == 1 and mixed[0]["n_tokens"] > mixed[0]["segments"]
