"""The package and its installs (issue 25, items 1 and 2), the quick checks; tests/test_install.py does real
installs into fresh virtual environments.

- pyproject.toml's dependencies are the runtime only, and each requirements*.txt lists exactly the
  packages and version specifiers of its extra: `pip install "funasr-nano[server]"` and
  `pip install -r requirements-server.txt` install the same versions. (The files are kept as lists,
  not `-e .[server]` one-liners, so that a checkout's scripts, notebook and benchmarks run from them
  without building the package; this test is what keeps the two in step.)
- `import funasr_nano` works from `/` and the console script is installed (CI: `pip install -e`);
  tests/conftest.py patches no sys.path (pytest's `pythonpath` setting has the checkout).
- The default folders: the project folder in a checkout, the user's data folder when installed.
- A missing extra under the console script is one line naming its install command.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from testing.imports import RUN_CONSOLE_SCRIPT

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib  # type: ignore[no-redef]

ROOT = Path(__file__).resolve().parent.parent
EXTRA_FILES = {None: "requirements.txt", "export": "requirements-export.txt", "server": "requirements-server.txt",
               "mic": "requirements-mic.txt", "corpus": "requirements-corpus.txt", "diarize": "requirements-diarize.txt",
               "test": "requirements-test.txt"}
EXPORT_ONLY = {"torch", "transformers", "funasr", "onnx", "onnxscript", "modelscope", "silero-vad", "torchaudio"}


def _project() -> dict:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _split(requirement: str) -> tuple[str, str]:
    """'ray[data]==2.60.0' -> ('ray[data]', '==2.60.0'): the name (with extras, canonical) and the specifier."""
    match = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*(.*?)\s*", requirement)
    assert match, requirement
    return _canonical(match.group(1)) + (match.group(2) or ""), match.group(3).replace(" ", "")


def _from_extras(extra: str | None) -> dict[str, str]:
    """name -> specifier of what `pip install "funasr-nano[extra]"` asks for (the base always comes along)."""
    project = _project()
    wanted = dict(_split(r) for r in project["dependencies"])
    for requirement in project["optional-dependencies"].get(extra, []) if extra else []:
        name, spec = _split(requirement)
        if name.startswith("funasr-nano["):  # a self-reference: the extras it names
            for inner in name[len("funasr-nano["):-1].split(","):
                wanted.update(_from_extras(inner.strip()))
        else:
            wanted[name] = spec
    return wanted


def _from_file(name: str, stack: tuple[str, ...] = ()) -> dict[str, str]:
    """name -> specifier of what `pip install -r FILE` asks for, following -r lines (a file included twice, by
    two others, is fine; a loop is not)."""
    assert name not in stack, f"-r loop: {' -> '.join((*stack, name))}"
    wanted: dict[str, str] = {}
    for raw in (ROOT / name).read_text(encoding="utf-8").splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("-r "):
            included = line[3:].strip()
            for key, spec in _from_file(included, (*stack, name)).items():
                assert wanted.get(key, spec) == spec, f"{name}: {key} {wanted[key]} vs {spec} in {included}"
                wanted[key] = spec
            continue
        assert not line.startswith("-"), f"{name}: option lines are not mirrored in pyproject.toml: {line}"
        key, spec = _split(line)
        assert wanted.get(key, spec) == spec, f"{name}: {key} twice, {wanted[key]} and {spec}"
        wanted[key] = spec
    return wanted


@pytest.mark.parametrize("extra,filename", list(EXTRA_FILES.items()))
def test_each_requirements_file_is_its_extra(extra, filename):
    assert _from_file(filename) == _from_extras(extra)


def test_the_base_install_brings_no_torch_transformers_or_funasr():
    base = {name.split("[")[0] for name in _from_extras(None)}
    assert not base & EXPORT_ONLY
    assert {"onnxruntime", "llama-cpp-python", "numpy", "soundfile", "av"} <= base
    assert {"torch", "funasr", "transformers", "onnx", "modelscope"} <= set(_from_extras("export"))
    assert _from_extras("export")["torch"] == "==2.13.0"  # the CPU wheel CI installs first (.ci/run)


def test_the_package_metadata():
    text = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    config = tomllib.loads(text)
    assert config["project"]["name"] == "funasr-nano"
    assert config["project"]["scripts"] == {"funasr-nano": "funasr_nano.__main__:main"}
    assert config["tool"]["setuptools"]["packages"]["find"]["include"] == ["funasr_nano*"]  # not tests/, testing/
    assert config["tool"]["setuptools"]["package-data"]["funasr_nano.server"] == ["ui/*"]
    assert set(config["project"]["optional-dependencies"]) == {"export", "server", "mic", "corpus", "diarize", "test"}
    assert config["tool"]["pytest"]["ini_options"]["pythonpath"] == ["."]


def test_import_from_anywhere_and_the_console_script():
    """`pip install -e .` (what .ci/run does) makes the package importable from `/` and installs `funasr-nano`."""
    proc = subprocess.run([sys.executable, "-c", "import funasr_nano, sys; print(funasr_nano.__file__)"], cwd="/",
                          capture_output=True, text=True, timeout=60, env=_clean_env())
    assert proc.returncode == 0, f"not installed? run: pip install -e '.[test]'\n{proc.stderr}"
    assert Path(proc.stdout.strip()) == ROOT / "funasr_nano" / "__init__.py"
    script = Path(sys.executable).parent / "funasr-nano"
    assert script.is_file(), f"{script}: no console script; run: pip install -e '.[test]'"
    version = subprocess.run([str(script), "--version"], cwd="/", capture_output=True, text=True, timeout=60)
    from funasr_nano import __version__

    assert version.returncode == 0 and version.stdout.strip() == f"funasr-nano {__version__}"


def test_conftest_patches_no_sys_path():
    assert "sys.path" not in (ROOT / "tests" / "conftest.py").read_text(encoding="utf-8").replace(
        "no sys.path here", "")


def _clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "FUNASR_NANO_HOME")}
    return {**env, **extra}


def test_default_folders_checkout_installed_and_override(tmp_path):
    """A checkout keeps its project folder; a package in site-packages uses ~/.cache/funasr-nano; the
    environment variable wins over both."""
    from funasr_nano import paths

    assert paths.CHECKOUT_DIR == ROOT and not paths.INSTALLED
    site = tmp_path / "lib" / "python3" / "site-packages" / "funasr_nano"
    assert paths._installed(site) and not paths._installed(ROOT / "funasr_nano")
    code = "from funasr_nano import paths, options; print(paths.data_dir()); print(options.DEFAULT_MODEL_DIR)"
    here = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60,
                          env=_clean_env())
    assert here.stdout.splitlines() == [str(ROOT), str(ROOT / "model-gguf")], here.stderr
    moved = subprocess.run([sys.executable, "-c", code], cwd="/", capture_output=True, text=True, timeout=60,
                           env=_clean_env(FUNASR_NANO_HOME=str(tmp_path / "home")))
    assert moved.stdout.splitlines() == [str(tmp_path / "home"), str(tmp_path / "home" / "model-gguf")]
    cache = subprocess.run([sys.executable, "-c", "from funasr_nano import paths; print(paths._user_data_dir())"],
                           capture_output=True, text=True, timeout=60, env=_clean_env(XDG_CACHE_HOME=str(tmp_path)))
    assert cache.stdout.strip() == str(tmp_path / "funasr-nano")




@pytest.mark.parametrize("command,blocked,install", [
    (["serve"], "fastapi", "pip install -r requirements-server.txt"),
    (["corpus", "in/", "--output-dir", "out"], "ray", "pip install -r requirements-corpus.txt"),
    (["transcribe", "a.wav"], "llama_cpp", "pip install -r requirements.txt"),
    (["export"], "torch", "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && "
                          "pip install -r requirements-export.txt"),
])
def test_a_missing_extra_under_the_console_script_is_one_line(command, blocked, install, tmp_path):
    proc = subprocess.run([sys.executable, "-c", RUN_CONSOLE_SCRIPT, blocked, *command], cwd=ROOT, capture_output=True,
                          text=True, timeout=120, env=_clean_env())
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2, proc.stderr
    assert line.startswith(f"error: funasr-nano {command[0]} needs the Python module {blocked!r}"), line
    assert line.endswith(install), line


def test_an_installed_package_names_the_pip_extra(monkeypatch):
    """Installed (no checkout), the message gives the extra, not a requirements file."""
    from funasr_nano import requirements

    monkeypatch.setattr(requirements, "CHECKOUT_DIR", None)
    assert requirements.install_command(requirements.EXTRAS["server"]) == 'pip install "funasr-nano[server]"'
    assert requirements.install_command(requirements.EXTRAS["base"]) == "pip install funasr-nano"
    assert requirements.install_command(requirements.EXTRAS["export"]) == (
        "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu && "
        'pip install "funasr-nano[export]"')
