"""benchmarks/per_token.py compares like with like: the same GGUF file and the same number of tokens.

The C++ runtime is replaced by a stand-in that records its arguments and prints the timing line
the real one prints; our side is the real 03 script on the tiny checkpoint. Random weights never
stop, so without its cap our side would run on past `--tokens` (until the repetition guard), and
a comparison across two GGUF files would compare where their pages lie in memory as well.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from funasr_nano.presets import GGUF_Q8_0

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "per_token.py"

STAND_IN = """\
import json, sys
args = sys.argv[1:]
with open({log!r}, "a") as f:
    f.write(json.dumps(args) + "\\n")
n = int(args[args.index("-n") + 1]) - {short}
print("text")
print(f"[timing] threads=2 load_ms=1.0 fbank_ms=1.0 encoder_ms=2.0 prefill_ms=3.0 decode_ms={{4.0 * n}} "
      f"n_prompt=44 n_gen={{n}} decode_ms_per_tok=4.00 windows=1 total_ms=10.0", file=sys.stderr)
"""


def _stand_in(tmp_path: Path, short: int) -> tuple[Path, Path]:
    log = tmp_path / "calls.jsonl"
    cli = tmp_path / "llama-funasr-cli"
    cli.write_text(f"#!{sys.executable}\n" + STAND_IN.format(log=str(log), short=short), encoding="utf-8")
    cli.chmod(0o755)
    return cli, log


def _run(tmp_path: Path, cli: Path, models: Path, audio: Path, tokens: int) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(SCRIPT), "--cli", str(cli), "--enc", str(tmp_path / "enc.gguf"), "--wav", str(audio),
           "--models", str(models), "--tokens", str(tokens), "--runs", "1"]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_same_file_and_same_token_count(tmp_path: Path, tiny_models: Path, zh_mp3: Path) -> None:
    cli, log = _stand_in(tmp_path, short=0)
    proc = _run(tmp_path, cli, tiny_models, zh_mp3, tokens=6)
    assert proc.returncode == 0, proc.stderr[-3000:]
    call = json.loads(log.read_text(encoding="utf-8").splitlines()[0])
    assert Path(call[call.index("-m") + 1]) == tiny_models / GGUF_Q8_0  # the file our side maps
    assert "| ours |" in proc.stdout and "| official |" in proc.stdout
    assert "pair by pair" in proc.stdout


@pytest.mark.slow
def test_refuses_runs_of_different_lengths(tmp_path: Path, tiny_models: Path, zh_mp3: Path) -> None:
    cli, _ = _stand_in(tmp_path, short=2)  # the C++ side stopped 2 tokens early (a stop token)
    proc = _run(tmp_path, cli, tiny_models, zh_mp3, tokens=6)
    assert proc.returncode != 0
    assert "not the same work" in proc.stderr
    assert "'ours': 6" in proc.stderr and "'official': 4" in proc.stderr  # ours capped at --tokens exactly
