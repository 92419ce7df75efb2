"""The documentation stays true: a short README, links that resolve, a complete module map, and
README commands that run.

- README.md is at most 300 lines (reference material lives in docs/).
- Every relative link of README.md and docs/*.md (`[text](path)`, `![alt](path)`, `path#anchor`,
  `#anchor`) names a file or folder that exists and, for an anchor, a heading of that page
  (GitHub's slugs).
- docs/design.md's module map lists every module of `funasr_nano/`, and nothing else.
- Every command line of the README's `bash` blocks either runs here or carries a marker comment
  (`# needs: WHAT`, at its end or on the line before it) saying what CI lacks for it. The unmarked
  ones run in order, as written, in a temporary copy of the project's scripts and `funasr_nano/`
  whose `model-gguf/` holds the tiny exported model and whose `examples/` holds the example clip.
  A command marked `# needs: a free port` starts the server: it runs in the background until
  `/health` answers, the commands (and Python blocks) marked `# needs: a running server` run
  against it, then it is stopped with Ctrl-C. Console-script lines (`# needs: pip install .`) run
  through `python -m funasr_nano` where the package has a `__main__`. Unmarked Python blocks run too.
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
MAX_README_LINES = 300

# What CI cannot give a README command (the part of the marker before any parenthesis).
NEEDS = {"network", "gpu", "microphone", "cluster", "pip install .", "a free port", "a running server"}
MARKER = re.compile(r"(?:^|\s)#\s*needs:\s*(?P<what>[^(#]*?)\s*(?:\(.*)?$")
SERVER_START, WITH_SERVER, CONSOLE = "a free port", "a running server", "pip install ."
COMMAND_TIMEOUT = 300
SERVER_START_TIMEOUT = 180


# --------------------------------------------------------------------------- Markdown


def _without_code(text: str) -> str:
    """The text with fenced blocks blanked (line numbers kept) and inline code spans removed."""
    out, fenced = [], False
    for line in text.splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            out.append("")
            continue
        out.append("" if fenced else re.sub(r"`[^`]*`", "", line))
    return "\n".join(out)


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, markup and punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading.strip())  # a link keeps its text
    text = text.replace("`", "").lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    seen: dict[str, int] = {}
    result = set()
    fenced = False
    for line in page.read_text(encoding="utf-8").splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
        elif not fenced and (m := re.match(r"#{1,6}\s+(.*?)\s*#*\s*$", line)):
            slug = _slug(m.group(1))
            n = seen.get(slug, 0)
            seen[slug] = n + 1
            result.add(slug if n == 0 else f"{slug}-{n}")
    return result


LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")


def relative_links(page: Path) -> list[tuple[int, str]]:
    links = []
    for number, line in enumerate(_without_code(page.read_text(encoding="utf-8")).splitlines(), 1):
        for target in LINK.findall(line):
            if not re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                links.append((number, target))
    return links


def test_readme_is_short():
    lines = README.read_text(encoding="utf-8").count("\n")
    assert lines <= MAX_README_LINES, f"README.md has {lines} lines: move reference material to docs/"


def test_every_relative_link_resolves():
    assert DOCS, "no docs/*.md"
    broken = []
    for page in PAGES:
        for number, target in relative_links(page):
            path_part, _, anchor = target.partition("#")
            path = (page.parent / path_part).resolve() if path_part else page
            where = f"{page.relative_to(ROOT)}:{number}: {target}"
            if not path.exists():
                broken.append(f"{where}: no such file")
            elif anchor and path.suffix == ".md" and anchor not in anchors(path):
                broken.append(f"{where}: no heading with that anchor in {path.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_links_are_checked_at_all():
    """The checker sees the README's links (a regex that matches nothing would pass everything)."""
    targets = {t for _, t in relative_links(README)}
    assert {"docs/cli.md", "docs/server.md", "docs/page.png"} <= targets, targets
    assert _slug("2026-12-01 00:30: GPU check on an H200") == "2026-12-01-0030-gpu-check-on-an-h200"
    assert _slug("`POST /v1/audio/transcriptions` (multipart)") == "post-v1audiotranscriptions-multipart"


def test_module_map_lists_every_module():
    text = (ROOT / "docs" / "design.md").read_text(encoding="utf-8")
    table = text.split("<!-- module map", 1)[1].split("\n\n", 1)[0]
    listed = set(re.findall(r"^\| `([\w/]+\.py)` \|", table, flags=re.M))
    package = ROOT / "funasr_nano"
    modules = {p.relative_to(package).as_posix() for p in package.rglob("*.py") if "__pycache__" not in p.parts}
    assert not modules - listed, f"docs/design.md's module map lacks {sorted(modules - listed)}"
    assert not listed - modules, f"docs/design.md's module map lists modules that do not exist: {sorted(listed - modules)}"


# --------------------------------------------------------------------------- the README's commands


@dataclass(frozen=True)
class Command:
    line: int
    text: str
    needs: str | None  # None: runs in CI


@dataclass(frozen=True)
class PythonBlock:
    line: int
    code: str
    needs: str | None


def _marker(text: str) -> str | None:
    m = MARKER.search(text)
    return m.group("what").strip() if m else None


def readme_blocks() -> tuple[list[Command], list[PythonBlock]]:
    commands, blocks = [], []
    lines = README.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        fence = re.match(r"\s*```(\w*)", lines[i])
        if not fence:
            i += 1
            continue
        language, start, body = fence.group(1), i + 1, []
        i += 1
        while i < len(lines) and not lines[i].lstrip().startswith("```"):
            body.append(lines[i])
            i += 1
        i += 1
        if language in ("bash", "sh"):
            commands += _commands(body, start)
        elif language == "python" and body:
            first = body[0].strip()
            blocks.append(PythonBlock(start + 1, "\n".join(body), _marker(first) if first.startswith("#") else None))
    return commands, blocks


def _commands(body: list[str], start: int) -> list[Command]:
    commands: list[Command] = []
    pending, joined, first = None, "", 0
    for offset, raw in enumerate(body, 1):
        if not joined:
            first = start + offset
        stripped = raw.strip()
        if not joined and (not stripped or stripped.startswith("#")):
            if stripped:
                pending = _marker(stripped) or pending
            continue
        if stripped.endswith("\\"):
            joined += stripped[:-1] + " "
            continue
        text = (joined + stripped).strip()
        joined = ""
        commands.append(Command(first, text, _marker(text) or pending))
        pending = None
    return commands


COMMANDS, PYTHON_BLOCKS = readme_blocks()


def test_every_readme_command_runs_in_ci_or_says_why_not():
    unknown = [f"README.md:{c.line}: needs: {c.needs!r}" for c in COMMANDS if c.needs is not None and c.needs not in NEEDS]
    unknown += [f"README.md:{b.line}: needs: {b.needs!r}" for b in PYTHON_BLOCKS if b.needs not in (None, *NEEDS)]
    assert not unknown, "markers must name one of " + ", ".join(sorted(NEEDS)) + ":\n" + "\n".join(unknown)
    runs = [c for c in COMMANDS if c.needs is None]
    assert 1 <= len(runs) <= 8, f"{len(runs)} README commands run in CI: keep it to a handful ({runs})"
    # what the README promises a user on a fresh machine: two commands do the whole set-up
    first = COMMANDS[0]
    assert first.needs == "network" and first.text.endswith("python 03_inference_cpu_int8.py examples/hello_en.mp3")
    assert "--index-url https://download.pytorch.org/whl/cpu" in first.text, "torch's CPU build, from PyTorch's index"
    assert any(c.text.startswith("bash .ci/run") for c in COMMANDS)
    starts = [c for c in COMMANDS if c.needs == SERVER_START]
    assert len(starts) <= 1, "one server start per README"
    if any(c.needs == WITH_SERVER for c in COMMANDS) or any(b.needs == WITH_SERVER for b in PYTHON_BLOCKS):
        assert starts, "commands need a running server, but no command starts one"


def _sandbox(root: Path, models: Path) -> Path:
    """The project as a user's clone has it after the first run: scripts, package, example, model-gguf/."""
    root.mkdir()
    for script in ROOT.glob("*.py"):
        shutil.copy2(script, root / script.name)
    shutil.copytree(ROOT / "funasr_nano", root / "funasr_nano", ignore=shutil.ignore_patterns("__pycache__"))
    (root / "examples").mkdir()
    shutil.copy2(ROOT / "examples" / "hello_en.mp3", root / "examples" / "hello_en.mp3")
    (root / "model-gguf").mkdir()
    for item in models.iterdir():
        if not item.name.startswith("."):  # caches are per folder
            (root / "model-gguf" / item.name).symlink_to(item)
    return root


def _env(sandbox: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("FUNASR_DEBUG", "RAY_ADDRESS", "FUNASR_API_KEY", "PYTHONPATH")}
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    env["FUNASR_NANO_HOME"] = str(sandbox)  # an installed console script's default folders: the sandbox's
    # On cores other processes keep busy, llama.cpp's OpenMP threads spinning at each barrier made a
    # 2-second transcription take 10-40 s; sleeping waits keep the test's time independent of the load.
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    return env


def _console(command: Command, sandbox: Path) -> str | None:
    """The shell text to run a `funasr-nano ...` line with, or None where the package has no command line yet."""
    rest = command.text[len("funasr-nano"):]
    if (sandbox / "funasr_nano" / "__main__.py").is_file():
        return "python -m funasr_nano" + rest  # the sandbox's own copy (the current folder comes first)
    if shutil.which("funasr-nano"):
        return command.text
    return None


def _run(text: str, sandbox: Path, env: dict[str, str], where: str) -> subprocess.CompletedProcess:
    try:
        proc = subprocess.run(["bash", "-c", text], cwd=sandbox, env=env, capture_output=True, text=True,
                              timeout=COMMAND_TIMEOUT, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{where}: {text!r} still running after {COMMAND_TIMEOUT} s")
    assert proc.returncode == 0, f"{where}: {text!r} exited with {proc.returncode}\n{proc.stderr[-3000:]}"
    assert "Traceback" not in proc.stderr, f"{where}: {text!r}\n{proc.stderr[-3000:]}"
    return proc


def _run_python(block: PythonBlock, sandbox: Path, env: dict[str, str]) -> None:
    _run(f"python - <<'README_PYTHON'\n{block.code}\nREADME_PYTHON", sandbox, env, f"README.md:{block.line} (python)")


def _port(text: str) -> int:
    m = re.search(r"--port[ =](\d+)", text)
    return int(m.group(1)) if m else 8000


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _wait_healthy(proc: subprocess.Popen, port: int, log: Path, where: str) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{where}: the server exited with {proc.returncode}\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.3)
    pytest.fail(f"{where}: /health not ready within {SERVER_START_TIMEOUT} s")


def _stop(proc: subprocess.Popen, where: str) -> None:
    proc.send_signal(signal.SIGINT)  # Ctrl-C, what the README's reader does
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        pytest.fail(f"{where}: the server did not stop within 60 s of Ctrl-C")
    assert proc.returncode in (0, 130), f"{where}: the server exited with {proc.returncode} after Ctrl-C"


@pytest.mark.slow
def test_readme_commands_run(tiny_models, tmp_path):
    sandbox = _sandbox(tmp_path / "clone", tiny_models)
    env = _env(sandbox)
    ran = []
    for command in COMMANDS:
        where = f"README.md:{command.line}"
        if command.needs is None:
            _run(command.text, sandbox, env, where)
            ran.append(command.text)
        elif command.needs == CONSOLE and command.text.startswith("funasr-nano "):
            text = _console(command, sandbox)
            if text is not None:
                _run(text, sandbox, env, where)
                ran.append(text)
    for block in PYTHON_BLOCKS:
        if block.needs is None:
            _run_python(block, sandbox, env)
            ran.append(f"python block at line {block.line}")
    assert ran

    starts = [c for c in COMMANDS if c.needs == SERVER_START]
    if not starts:
        return
    (start,) = starts
    where = f"README.md:{start.line}"
    port = _port(start.text)
    if not _port_free(port):
        pytest.fail(f"{where}: port {port} is in use here, so the README's server command cannot be run")
    log = tmp_path / "server.log"
    with log.open("w") as sink:
        server = subprocess.Popen(["bash", "-c", f"exec {start.text}"], cwd=sandbox, env=env,
                                  stdin=subprocess.DEVNULL, stdout=sink, stderr=subprocess.STDOUT)
    try:
        _wait_healthy(server, port, log, where)
        for command in COMMANDS:
            if command.needs == WITH_SERVER:
                proc = _run(command.text, sandbox, env, f"README.md:{command.line}")
                if command.text.startswith("curl"):  # curl exits 0 on an HTTP error too
                    assert proc.stdout.strip() and '"error"' not in proc.stdout, (command.text, proc.stdout)
        for block in PYTHON_BLOCKS:
            if block.needs == WITH_SERVER:
                _run_python(block, sandbox, env)
    finally:
        if server.poll() is None:
            _stop(server, where)
