"""The runtime install in a fresh virtual environment (issue 25, items 1 and 2): what a user with an exported
model folder gets from `pip install funasr-nano`, used from a folder outside the clone.

One venv for the module: `python -m venv`, then `pip install <copy of the clone>` without any extra
(the copy is `git ls-files` of the checkout: what a clone has, nothing built or downloaded in it).
In it: torch, transformers and funasr cannot be imported; `funasr-nano transcribe` on the tiny exported
model gives the engine's text; `funasr-nano serve` is one line naming the server extra. Then the
server extra is added (still no torch): `funasr-nano serve` starts, `GET /health` is 200 and one
transcription matches. A second, dependency-free venv checks `pip install -e` of the copy.

Cost: pip resolves from the configured indexes and reuses pip's wheel cache, where the earlier
`pip install -e ".[test]"` of .ci/run left the llama-cpp-python wheel it compiled, so nothing is
compiled here (about 10 s for the runtime here; printed, with the venv's size, in the test output).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from testing.server import wait_until_healthy

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parent.parent
INSTALL_TIMEOUT = 1200  # a llama-cpp-python compile (no cached wheel) takes ~10 min on 2 cores
TOKENS = ("--max-new-tokens", "8", "--threads", "2", "--batch-invariant")
IGNORED = shutil.ignore_patterns(".git", ".venv", "__pycache__", "*.egg-info", "build", "model-gguf",
                                 "Fun-ASR-Nano-2512", ".pytest_cache", ".ruff_cache", ".cache")


def _copy_checkout(dest: Path) -> Path:
    """The files a clone has (tracked, plus new ones git does not ignore), copied: nothing built in the checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, check=True, timeout=60).stdout.decode().split("\0")
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked archive): copy it whole
        shutil.copytree(ROOT, dest, ignore=IGNORED, symlinks=True)
        return dest
    for name in filter(None, listed):
        source = ROOT / name
        if source.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, dest / name)
    return dest


@dataclass
class Venv:
    root: Path
    env: dict[str, str]
    install_seconds: float = 0.0

    @property
    def python(self) -> str:
        return str(self.root / "bin" / "python")

    @property
    def script(self) -> str:
        return str(self.root / "bin" / "funasr-nano")

    def run(self, *args: str, cwd: Path, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
        return subprocess.run(list(args), cwd=cwd, env=self.env, capture_output=True, text=True, timeout=timeout,
                              **kwargs)

    def pip_install(self, *args: str, cwd: Path) -> float:
        t0 = time.monotonic()
        proc = self.run(self.python, "-m", "pip", "install", "--disable-pip-version-check", *args, cwd=cwd,
                        timeout=INSTALL_TIMEOUT)
        assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
        return time.monotonic() - t0

    def importable(self, modules: list[str], cwd: Path) -> dict[str, bool]:
        code = ("import importlib.util, json, sys; "
                "print(json.dumps({m: importlib.util.find_spec(m) is not None for m in sys.argv[1:]}))")
        proc = self.run(self.python, "-c", code, *modules, cwd=cwd)
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

    def size(self) -> str:
        return subprocess.run(["du", "-sh", str(self.root)], capture_output=True, text=True).stdout.split()[0]


def _venv(root: Path) -> Venv:
    subprocess.run([sys.executable, "-m", "venv", str(root)], check=True, timeout=300)
    # the venv's bin first; nothing of the test's own environment leaks in (PYTHONPATH, an active venv)
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME",
                                                            "FUNASR_NANO_HOME")}
    env["PATH"] = f"{root / 'bin'}{os.pathsep}{env.get('PATH', '')}"
    # the installed package's default folders: here, not in ~/.cache/funasr-nano (HOME and XDG_CACHE_HOME stay:
    # pip's wheel cache is found through them)
    env["FUNASR_NANO_HOME"] = str(root.parent / "funasr-nano-home")
    return Venv(root, env)


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory):
    """(venv, source copy, outside folder, the probes taken right after the base install)."""
    work = tmp_path_factory.mktemp("install")
    source = _copy_checkout(work / "funasr-nano")
    outside = work / "elsewhere"
    outside.mkdir()
    venv = _venv(work / "venv")
    venv.install_seconds = venv.pip_install(str(source), cwd=outside)
    probes = {
        "importable": venv.importable(["torch", "transformers", "funasr", "torchaudio", "onnx", "funasr_nano",
                                       "llama_cpp", "onnxruntime", "fastapi"], outside),
        "location": venv.run(venv.python, "-c", "import funasr_nano; print(funasr_nano.__file__)", cwd=Path("/")),
        "serve": venv.run(venv.script, "serve", cwd=outside, timeout=120),
        "size": venv.size(),
    }
    print(f"\nruntime install: {venv.install_seconds:.1f} s, venv {probes['size']} ({venv.root})")
    return venv, source, outside, probes


def test_the_runtime_install_has_no_torch_transformers_or_funasr(base):
    venv, _, _, probes = base
    assert probes["importable"] == {"torch": False, "transformers": False, "funasr": False, "torchaudio": False,
                                    "onnx": False, "funasr_nano": True, "llama_cpp": True, "onnxruntime": True,
                                    "fastapi": False}
    location = probes["location"]
    assert location.returncode == 0, location.stderr
    assert Path(location.stdout.strip()).is_relative_to(venv.root)  # the installed copy, not the checkout


def test_serve_without_its_extra_is_one_line_naming_it(base):
    proc = base[3]["serve"]
    assert "Traceback" not in proc.stderr and proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: funasr-nano serve needs the Python module 'fastapi'"), line
    assert line.endswith('install it with: pip install "funasr-nano[server]"'), line


def _engine_text(models: Path, audio: Path) -> str:
    from funasr_nano.engine import Engine, TranscribeOptions

    with Engine.from_preset("cpu", models, threads=2, max_new_tokens=8, batch_invariant=True) as engine:
        return engine.transcribe(audio, TranscribeOptions(max_new_tokens=8)).text


@pytest.fixture(scope="module")
def engine_text(tiny_models: Path, zh_mp3: Path) -> str:
    text = _engine_text(tiny_models, zh_mp3)
    assert text.strip()
    return text


def test_transcribe_from_outside_the_clone_gives_the_engines_text(base, tiny_models, tiny_ckpt, zh_mp3,
                                                                  engine_text):
    venv, _, outside, _ = base
    shutil.copy(zh_mp3, outside / "clip.mp3")
    proc = venv.run(venv.script, "transcribe", "clip.mp3", "--preset", "cpu", "--model-dir", str(tiny_models),
                    "--format", "json", *TOKENS, cwd=outside)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["text"] == engine_text
    # several formats into a folder; then an empty model folder: the export needs the extra, said in one line
    out = venv.run(venv.script, "transcribe", "clip.mp3", "--preset", "cpu", "--model-dir", str(tiny_models),
                   "--format", "txt,srt", "--output-dir", "out", *TOKENS, cwd=outside)
    assert out.returncode == 0, out.stderr
    assert (outside / "out" / "clip.txt").read_text(encoding="utf-8").strip() == engine_text.strip()
    assert (outside / "out" / "clip.srt").is_file()
    empty = outside / "no-models"
    empty.mkdir()
    proc = venv.run(venv.script, "transcribe", "clip.mp3", "--model-dir", str(empty), "--release-dir",
                    str(tiny_ckpt), *TOKENS, cwd=outside)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {empty} is empty, and the export cannot run: ") and "'torch'" in line, line
    assert line.endswith('&& pip install "funasr-nano[export]"') and "download.pytorch.org/whl/cpu" in line, line
    assert not list(empty.iterdir())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_serve_with_the_server_extra_answers(base, tiny_models, zh_mp3, engine_text):
    import httpx

    venv, source, outside, _ = base
    seconds = venv.pip_install(f"{source}[server]", cwd=outside)
    print(f"\nserver extra: {seconds:.1f} s, venv {venv.size()}")
    assert venv.importable(["torch", "transformers", "funasr", "fastapi", "uvicorn"], outside) == {
        "torch": False, "transformers": False, "funasr": False, "fastapi": True, "uvicorn": True}
    port = _free_port()
    proc = subprocess.Popen([venv.script, "serve", "--preset", "cpu", "--model-dir", str(tiny_models), "--port",
                             str(port), "--log-level", "warning", *TOKENS], cwd=outside, env=venv.env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        assert wait_until_healthy(url, proc, 120), proc.stdout.read() if proc.poll() is not None else "not healthy"
        assert httpx.get(f"{url}/health", timeout=10).status_code == 200
        with open(zh_mp3, "rb") as f:
            answer = httpx.post(f"{url}/v1/audio/transcriptions", files={"file": ("clip.mp3", f, "audio/mpeg")},
                                data={"model": "fun-asr-nano"}, timeout=120)
        assert answer.status_code == 200, answer.text
        assert answer.json()["text"] == engine_text
        # the WebSocket (/v1/realtime, the page's microphone) needs a WebSocket library the extra brings
        import asyncio

        from testing.attacks import first_events

        assert asyncio.run(first_events(f"ws://127.0.0.1:{port}/v1/realtime", 1)) == ["session.created"]
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_an_editable_install_imports_from_the_source_anywhere(base, tmp_path):
    """`pip install -e` (no dependencies: the package alone) points `import funasr_nano` at the source tree."""
    _, source, _, _ = base
    venv = _venv(tmp_path / "venv-editable")
    venv.pip_install("--no-deps", "-e", str(source), cwd=tmp_path)
    where = venv.run(venv.python, "-c", "import funasr_nano; print(funasr_nano.__file__)", cwd=Path("/"))
    assert where.returncode == 0, where.stderr
    assert Path(where.stdout.strip()) == source / "funasr_nano" / "__init__.py"
    usage = venv.run(venv.script, "--help", cwd=Path("/"))
    assert usage.returncode == 0 and "transcribe" in usage.stdout, usage.stderr
