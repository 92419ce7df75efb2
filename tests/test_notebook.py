"""04_inference.ipynb runs top to bottom (on the tiny random model) and prints a transcript.

The kernel is this test's own interpreter: a `python3` kernel spec written to a temporary
JUPYTER_PATH (searched before the user's and the system's folders), so a stray user-level
kernel pointing at another Python cannot be picked up. It runs in a folder outside the project,
with the package importable as an install makes it (PYTHONPATH), and finds the example clip in
the project folder itself; what its text says about the clip is checked against what it prints.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "04_inference.ipynb"


def _kernel_spec(folder: Path) -> Path:
    spec_dir = folder / "kernels" / "python3"
    spec_dir.mkdir(parents=True)
    spec = {"argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
            "display_name": "Python 3 (test)", "language": "python"}
    (spec_dir / "kernel.json").write_text(json.dumps(spec), encoding="utf-8")
    return folder


def _stdout(cell) -> str:
    return "".join(o.get("text", "") for o in cell.get("outputs", []) if o.get("output_type") == "stream"
                   and o.get("name") == "stdout")


def test_committed_notebook_is_light_and_reads_its_settings_from_the_environment():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert NOTEBOOK.stat().st_size < 100_000, "commit the notebook without its outputs (images)"
    source = "\n".join(c.source for c in nb.cells if c.cell_type == "code")
    for variable in ("FUNASR_MODEL_DIR", "FUNASR_AUDIO", "FUNASR_MAX_NEW_TOKENS"):
        assert variable in source
    assert any("transcript" in c.metadata.get("tags", []) for c in nb.cells)


def test_notebook_text_names_modules_that_exist():
    nb = nbformat.read(NOTEBOOK, as_version=4)
    text = "\n".join(c.source for c in nb.cells)
    named = set(re.findall(r"funasr_nano/[\w/]+(?:\.py|/)", text))
    assert named, "the notebook names no module"
    for path in named:
        assert (ROOT / path).exists(), f"04_inference.ipynb names {path}, which does not exist"


def test_notebook_executes_from_another_folder_and_prints_a_transcript(tiny_models, tmp_path, monkeypatch):
    monkeypatch.setenv("JUPYTER_PATH", str(_kernel_spec(tmp_path / "jupyter")))
    monkeypatch.setenv("FUNASR_MODEL_DIR", str(tiny_models))
    monkeypatch.delenv("FUNASR_AUDIO", raising=False)  # the default: examples/hello_en.mp3 of the project
    monkeypatch.setenv("FUNASR_MAX_NEW_TOKENS", "8")
    monkeypatch.setenv("FUNASR_THREADS", "2")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    # importable as an install makes it, not because the kernel happens to start in the clone
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()

    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = NotebookClient(nb, timeout=300, kernel_name="python3", allow_errors=False,
                            resources={"metadata": {"path": str(elsewhere)}})
    client.execute()  # raises CellExecutionError on the first failing cell

    for cell in nb.cells:
        if cell.cell_type == "code":
            assert not [o for o in cell.outputs if o.get("output_type") == "error"]
    (cell,) = [c for c in nb.cells if "transcript" in c.metadata.get("tags", [])]
    out = _stdout(cell)
    for name in ("[fp32 + f16]", "[int8 + q8_0]"):
        assert name in out, out
    text_lines = [line for line in out.splitlines() if line.strip() and not line.startswith("[")]
    assert text_lines, f"no transcript text in the cell output: {out!r}"
    layout = _stdout(next(c for c in nb.cells if c.cell_type == "code" and "prepare(" in c.source))
    assert "audio rows]" in layout and "<|im_start|>" in layout

    setup = _stdout(next(c for c in nb.cells if c.cell_type == "code"))
    assert f"audio: {ROOT / 'examples' / 'hello_en.mp3'}" in setup, setup
    # the text says how many segments the clip has; the transcript cell prints it for both engines
    said = {int(n) for c in nb.cells if c.cell_type == "markdown"
            for n in re.findall(r"(\d+)(?:\s+segments\s+of\s+speech)?\s+(?:in|for)\s+`examples/hello_en.mp3`", c.source)}
    assert len(said) == 1, said
    (n_segments,) = said
    printed = re.findall(r"^\[[^]]+\] (\d+) segments", out, flags=re.M)
    assert printed == [str(n_segments)] * 2, out
