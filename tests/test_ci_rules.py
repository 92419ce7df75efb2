"""Rules that keep CI honest, tested on themselves.

- Every llama.cpp model load goes through the guarded loader of `funasr_nano/models/llm.py`: a test
  helper that loaded GGUFs with llama.cpp's default parameters took the AMX kernels on an AMX Xeon
  and the suite died with SIGSEGV, while the runtime itself was safe.
- `FUNASR_STRICT_SKIPS=1` (set by `.ci/run`): a skipped test fails the run, unless it is marked
  `needs_hardware`; a plain local run keeps its skips and their install hints.
- `FUNASR_FAULT_LOG=FILE` (set by `.ci/run`): a native crash writes the Python stacks to FILE.
- The test requirements are installed: a test that only skips without them could never fail.

The plugin is checked by running pytest in a subprocess on tiny throwaway test modules.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# The one file allowed to load a llama.cpp model (LlamaDecoder and the test/benchmark helpers call it).
LOADER = ROOT / "funasr_nano" / "models" / "llm.py"
# Calls that load a model with llama.cpp's own defaults, or build those defaults (low- and high-level API).
DIRECT_LOAD = re.compile(r"\bllama_model_default_params\s*\(|\bllama_(?:model_load|load_model)_from_file\s*\("
                         r"|\bLlama\s*\(|\bLlama\.from_pretrained\b|\bLlamaModel\s*\(")
SKIP_DIRS = {"model-gguf", "Fun-ASR-Nano-2512", "__pycache__", "node_modules", "build", "dist"}


def _project_sources() -> list[Path]:
    """The repository's Python files and notebooks, without the virtualenv, caches and model folders."""
    found = []
    for folder, dirs, files in os.walk(ROOT):
        dirs[:] = [d for d in dirs if not d.startswith(".") and d not in SKIP_DIRS]
        found += [Path(folder) / f for f in files if f.endswith((".py", ".ipynb"))]
    return found


def test_only_the_guarded_loader_loads_llama_cpp_models():
    sources = _project_sources()
    assert LOADER in sources and len(sources) > 50, "the scan missed the project's files"
    offenders = []
    for path in sources:
        for number, line in enumerate(path.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            if DIRECT_LOAD.search(line) and path not in (LOADER, Path(__file__)):  # this file: its examples
                offenders.append(f"{path.relative_to(ROOT)}:{number}: {line.strip()}")
    assert not offenders, ("load llama.cpp models with funasr_nano.models.llm.load_llama_model / load_llama_api "
                           "(they keep llama.cpp's AMX kernels off where they crash), not directly:\n"
                           + "\n".join(offenders))


def test_the_rule_sees_a_direct_load():
    # (spaced before the parenthesis, so that a plain grep for direct loads finds only the loader)
    for line in ("m = llama_cpp.llama_model_load_from_file (p, params)", "params = L.llama_model_default_params ()",
                 "llm = llama_cpp.Llama (model_path=gguf)", "llm = Llama (path)", "Llama.from_pretrained(repo)"):
        assert DIRECT_LOAD.search(line), line
    for line in ("decoder = LlamaDecoder(path)", "load_llama_api(gguf, n_ctx=512)", "the high-level `Llama` class",
                 'monkeypatch.setattr(llm.L, "llama_model_load_from_file", record)'):
        assert not DIRECT_LOAD.search(line), line


def test_openai_client_is_installed() -> None:
    """requirements-test.txt installs it; tests/test_server.py skips without it, so this one fails."""
    import openai  # noqa: F401


# ---------------------------------------------------------------------------------------------- the plugin

SKIPPING = textwrap.dedent('''
    import pytest

    def test_passes():
        pass

    def test_needs_a_missing_tool():
        pytest.skip("frobnicate is not installed (apt-get install frobnicate)")

    @pytest.mark.skipif(True, reason="no frobnicator here")
    def test_skipped_by_marker():
        pass
''')

HARDWARE = textwrap.dedent('''
    import pytest

    def test_passes():
        pass

    @pytest.mark.needs_hardware("gpu")
    def test_on_the_gpu():
        pytest.skip("no CUDA device")
''')

MODULE_SKIP = textwrap.dedent('''
    import pytest

    pytest.importorskip("a_module_nobody_installs", reason="pip install a-module-nobody-installs")

    def test_never_collected():
        pass
''')

CRASHING = textwrap.dedent('''
    import faulthandler

    def test_crashes_natively():
        faulthandler._sigsegv()  # what a llama.cpp kernel does on a bad path
''')


def _pytest(folder: Path, modules: dict[str, str], **env: str) -> subprocess.CompletedProcess[str]:
    """pytest in a fresh process on `modules` (name -> source), with CI's plugin and only `env` of its settings."""
    for name, source in modules.items():
        (folder / name).write_text(source)
    (folder / "pytest.ini").write_text("[pytest]\naddopts = -ra\n")  # this folder is the rootdir
    clean = {k: v for k, v in os.environ.items()
             if k not in ("FUNASR_STRICT_SKIPS", "FUNASR_FAULT_LOG", "PYTEST_ADDOPTS")}
    clean["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "testing.ci_rules", "-p", "no:cacheprovider",
                           "-q", str(folder)], cwd=folder, env={**clean, **env},
                          capture_output=True, text=True, timeout=120)


def test_a_local_run_keeps_its_skips_with_their_reasons(tmp_path: Path):
    proc = _pytest(tmp_path, {"test_skipping.py": SKIPPING, "test_module_skip.py": MODULE_SKIP})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "1 passed, 3 skipped" in proc.stdout
    for reason in ("apt-get install frobnicate", "no frobnicator here", "pip install a-module-nobody-installs"):
        assert reason in proc.stdout
    assert "unexpected skips" not in proc.stdout


def test_strict_skips_fail_the_run_and_say_why(tmp_path: Path):
    proc = _pytest(tmp_path, {"test_skipping.py": SKIPPING}, FUNASR_STRICT_SKIPS="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unexpected skips: 2 (allowed: none)" in proc.stdout
    assert "1 failed, 1 passed, 1 error" in proc.stdout  # a skip in the test, and one in its set-up (skipif)
    assert "FUNASR_STRICT_SKIPS=1 (CI) allows no skip: frobnicate is not installed" in proc.stdout
    assert "UNEXPECTED SKIP test_skipping.py::test_skipped_by_marker: no frobnicator here" in proc.stdout


def test_strict_skips_fail_a_module_skipped_at_import(tmp_path: Path):
    modules = {"test_module_skip.py": MODULE_SKIP, "test_ok.py": "def test_ok():\n    pass\n"}
    proc = _pytest(tmp_path, modules, FUNASR_STRICT_SKIPS="1")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "unexpected skips: 1 (allowed: none)" in proc.stdout
    assert "UNEXPECTED SKIP test_module_skip.py: pip install a-module-nobody-installs" in proc.stdout
    assert _pytest(tmp_path, modules).returncode == 0  # the same, locally


def test_strict_skips_allow_tests_marked_with_the_hardware_they_need(tmp_path: Path):
    proc = _pytest(tmp_path, {"test_hardware.py": HARDWARE}, FUNASR_STRICT_SKIPS="1")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "unexpected skips: 0 (allowed: 1 needs_hardware('gpu'))" in proc.stdout
    assert "allowed skip (needs_hardware 'gpu') test_hardware.py::test_on_the_gpu: no CUDA device" in proc.stdout
    assert "1 passed, 1 skipped" in proc.stdout


def test_a_native_crash_leaves_its_python_stack_in_the_fault_log(tmp_path: Path):
    log = tmp_path / "fault.log"
    proc = _pytest(tmp_path, {"test_crash.py": CRASHING}, FUNASR_FAULT_LOG=str(log))
    assert proc.returncode == -signal.SIGSEGV, proc.stdout + proc.stderr
    stack = log.read_text()
    assert "Segmentation fault" in stack and "in test_crashes_natively" in stack, stack
    assert "test_crash.py" in stack
