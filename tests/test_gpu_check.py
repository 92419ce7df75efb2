"""The GPU check script (tests/gpu/check.py) in its CPU-only dry run: every step but the CUDA build.

On a GPU machine `tests/gpu/run.sh` runs the same script at the real shapes; here the tiny shape
and llama.cpp's CPU backend show that each step runs and reports what the README quotes.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_gpu_check_dry_run_reports_every_step(tiny_models: Path, tmp_path: Path):
    from tests.audio_fixtures import make_tone_wav

    clip = make_tone_wav(tmp_path / "clip.wav", seconds=3.0)
    report_path = tmp_path / "report.json"
    proc = subprocess.run([sys.executable, "-m", "tests.gpu.check", "--shape", "tiny", "--work", str(tmp_path / "work"),
                           "--model", str(tiny_models), "--audio", str(clip), "--out", str(report_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    report = json.loads(report_path.read_text(encoding="utf-8"))
    assert report["errors"] == {}

    injection = report["injection"]
    assert injection["llama_decode_calls"] == 1 and injection["prompt_rows"] > 8 and injection["finite"]
    logits = report["logits"]
    assert logits["nan"] == 0 and logits["positions"] == injection["prompt_rows"]
    assert logits["greedy_tokens_equal"] and logits["max_abs_err"] == 0.0  # CPU against CPU in the dry run
    assert [d["sequences"] for d in report["decode"]] == [1, 8]
    assert all(d["tokens_per_s"] > 0 for d in report["decode"])

    e2e = report["end_to_end"]
    for script in ("03_inference_gpu.py", "03_inference_cpu.py"):
        assert e2e[script]["exit_code"] == 0, e2e[script]
        assert e2e[script]["text"], f"{script} decoded nothing: {e2e[script]}"
    assert e2e["texts_equal"]
    assert "03_inference_gpu.py" in proc.stdout and "one llama_decode" in proc.stdout  # the Markdown summary
