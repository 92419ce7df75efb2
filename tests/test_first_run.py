"""What a new user hits (issue 26), each through the command line as a user runs it.

- the first run's export writes nothing to stdout: stdout is exactly the transcript (JSON parses);
- the model folder records the release it was exported from: another --release-dir (or a changed
  release) exports again, a folder that is not a release is an error;
- no audio at all out of a non-empty file is a failed input (exit 1), partial audio a warning;
- segments reach stdout as they are decoded, and Ctrl-C keeps what was printed;
- a missing package is one `error:` line with its install command (exit 2), no traceback: the
  scripts run under a `sys.meta_path` blocker that makes the package look uninstalled, which is
  what a venv without that extra looks like to the import system (cheaper than a venv per case);
- Ctrl-C on the server: its graceful shutdown, then exit 130 without a traceback;
- `-` reads the audio from stdin; the reported language is set.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from testing.imports import RUN_SCRIPT
from testing.server import wait_until_healthy
from testing.signals import with_default_sigint

ROOT = Path(__file__).resolve().parent.parent
FAST = ("--max-new-tokens", "4", "--threads", "2")


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("FUNASR_DEBUG", "RAY_ADDRESS")}
    return {**env, **extra}


def run(script: str, *args: object, timeout: float = 300, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=_env(), **kwargs)


def _release_copy(ckpt: Path, dest: Path) -> Path:
    """A release folder made of links to `ckpt`'s files, config.yaml copied (so a test can change it)."""
    dest.mkdir()
    for item in ckpt.iterdir():
        if item.name == "config.yaml":
            (dest / item.name).write_bytes(item.read_bytes())
        else:
            (dest / item.name).symlink_to(item)
    return dest


def _record(models: Path) -> dict:
    return json.loads((models / "release.json").read_text(encoding="utf-8"))


# --------------------------------------------------------------------------- 1, 2: the first run, the release


@pytest.fixture(scope="module")
def first_run(tiny_ckpt: Path, tmp_path_factory: pytest.TempPathFactory):
    """A 03 run on an empty model folder (the export included), --format json on stdout."""
    base = tmp_path_factory.mktemp("first-run")
    release = _release_copy(tiny_ckpt, base / "release")
    models = base / "models"
    models.mkdir()
    proc = run("03_inference_cpu.py", ROOT / "examples" / "hello_en.mp3", "--model-dir", models, "--release-dir",
               release, "--format", "json", *FAST, timeout=600)
    return release, models, proc


def test_first_run_stdout_is_exactly_the_transcript(first_run):
    release, models, proc = first_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "exporting the model from" in proc.stderr  # the export ran, and said so on stderr
    transcript = json.loads(proc.stdout)  # the six exported paths are not in front of it any more
    assert transcript["source"].endswith("hello_en.mp3") and transcript["text"]
    assert str(models) not in proc.stdout
    record = _record(models)
    assert {part: entry["release"] for part, entry in record.items()} == {"onnx": str(release), "gguf": str(release)}


def test_another_or_changed_release_exports_again_and_a_non_release_is_an_error(first_run, tiny2_ckpt, tmp_path):
    release, models, first = first_run
    assert first.returncode == 0, first.stderr[-3000:]
    audio = ROOT / "examples" / "hello_en.mp3"

    same = run("03_inference_cpu.py", audio, "--model-dir", models, "--release-dir", release, *FAST)
    assert same.returncode == 0 and "exporting" not in same.stderr, same.stderr  # the export is that release's

    not_a_release = tmp_path / "downloads"
    not_a_release.mkdir()
    (not_a_release / "notes.txt").write_text("x")
    proc = run("03_inference_cpu.py", audio, "--model-dir", models, "--release-dir", not_a_release, *FAST)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == [
        f"error: {not_a_release}: not a Fun-ASR-Nano release folder (missing config.yaml, model.pt)"]

    other = run("03_inference_cpu.py", audio, "--model-dir", models, "--release-dir", tiny2_ckpt, "--format", "json",
                *FAST, timeout=600)
    assert other.returncode == 0, other.stderr[-3000:]
    assert f"was exported from {release}, not {tiny2_ckpt}: exporting the model from {tiny2_ckpt}" in other.stderr
    json.loads(other.stdout)
    assert {e["release"] for e in _record(models).values()} == {str(tiny2_ckpt)}
    assert not json.loads((models / "funasr_nano.json").read_text())["ctc"].get("present")  # tiny2 has no CTC head

    # the release the folder came from changes (a re-download): the next run, without --release-dir, re-exports
    back = run("03_inference_cpu.py", audio, "--model-dir", models, "--release-dir", release, *FAST, timeout=600)
    assert back.returncode == 0 and f"exporting the model from {release}" in back.stderr, back.stderr[-3000:]
    fingerprint = _record(models)["onnx"]["fingerprint"]
    with open(release / "config.yaml", "a", encoding="utf-8") as f:
        f.write("\n# a newer release\n")
    changed = run("03_inference_cpu.py", audio, "--model-dir", models, *FAST, timeout=600)
    assert changed.returncode == 0, changed.stderr[-3000:]
    assert f"{release} has changed since {models} was exported from it" in changed.stderr
    assert _record(models)["onnx"]["fingerprint"] != fingerprint


# --------------------------------------------------------------------------- 5: no audio at all


def test_no_audio_decoded_from_a_non_empty_file_is_a_failed_input(tiny_models, zh_mp3, tmp_path):
    cut = tmp_path / "cut1k.mp3"
    cut.write_bytes(zh_mp3.read_bytes()[:1024])  # the header says 10 s; no whole frame follows
    for extra in ((), ("--vad", "none")):
        proc = run("03_inference_cpu.py", cut, "--model-dir", tiny_models, *FAST, *extra)
        assert proc.returncode == 1 and proc.stdout == "", proc.stderr
        (line,) = proc.stderr.strip().splitlines()
        assert line.startswith(f"error: {cut}: no audio decoded") and "of the 10.00 s its header gives" in line

    partial = tmp_path / "cut4k.mp3"
    partial.write_bytes(zh_mp3.read_bytes()[:4000])  # a few frames: short audio, a warning
    proc = run("03_inference_cpu.py", partial, "--model-dir", tiny_models, *FAST)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(f"warning: {partial}: truncated or damaged audio")


# --------------------------------------------------------------------------- 4: segments as they are decoded


@pytest.fixture(scope="module")
def three_segments(layout, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Three espeak sentences apart by silences: three VAD segments."""
    import soundfile

    wave, _ = layout
    path = tmp_path_factory.mktemp("three") / "three.wav"
    soundfile.write(str(path), wave, 16000)
    return path


SLOW = ("--threads", "2", "--batch-size", "1", "--no-speculative", "--force-tokens", "60", "--max-new-tokens", "60")


def test_json_stream_gives_each_segment_then_the_transcript(three_segments, tiny_models):
    proc = run("03_inference_cpu.py", three_segments, "--model-dir", tiny_models, "--format", "json", "--stream",
               *FAST)
    assert proc.returncode == 0, proc.stderr
    records = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["type"] for r in records] == ["segment"] * 3 + ["transcript"]
    assert [r["index"] for r in records[:3]] == [0, 1, 2]
    assert [r["text"] for r in records[:3]] == [s["text"] for s in records[3]["segments"]]
    whole = run("03_inference_cpu.py", three_segments, "--model-dir", tiny_models, "--format", "json", *FAST)
    assert json.loads(whole.stdout)["text"] == records[3]["text"]
    bad = run("03_inference_cpu.py", three_segments, "--model-dir", tiny_models, "--format", "srt", "--stream")
    assert bad.returncode == 2 and bad.stderr.startswith("error: --stream is for --format json on stdout")


def test_first_segment_shows_before_the_last_is_decoded_and_ctrl_c_keeps_it(three_segments, tiny_models):
    whole = run("03_inference_cpu.py", three_segments, "--model-dir", tiny_models, "--format", "json", *SLOW)
    assert whole.returncode == 0, whole.stderr
    texts = [s["text"] for s in json.loads(whole.stdout)["segments"]]
    assert len(texts) == 3

    proc = subprocess.Popen(with_default_sigint([sys.executable, str(ROOT / "03_inference_cpu.py"), str(three_segments),
                                                 "--model-dir", str(tiny_models), *SLOW]),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_env())
    try:
        first = os.read(proc.stdout.fileno(), 65536)  # blocks until the first segment's text is printed
        running = proc.poll() is None
        proc.send_signal(signal.SIGINT)
        rest, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    printed = (first + rest).decode()
    assert running, "the process ended before anything was printed: the text came only at the end"
    assert first.decode().strip() and texts[0].strip().startswith(first.decode().strip()[:10])
    assert proc.returncode == 130 and b"Traceback" not in stderr, stderr.decode()
    assert stderr.decode().strip().splitlines()[-1] == "error: interrupted"
    assert printed.strip() and printed.rstrip("\n") != texts[0] + texts[1] + texts[2]  # stopped early
    assert printed.startswith(texts[0].strip()[:10]) and printed.endswith("\n")  # kept, and the line ended


# --------------------------------------------------------------------------- 3: one line, not a traceback



@pytest.mark.parametrize("script,blocked,install", [
    ("05_server.py", "fastapi", "pip install -r requirements-server.txt"),
    ("07_transcribe_corpus.py", "ray", "pip install -r requirements-corpus.txt"),
    ("03_inference_cpu.py", "onnxruntime", "pip install -r requirements.txt"),
    ("01_export_onnx.py", "torch", "pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cpu "
                                   "&& pip install -r requirements-export.txt"),
])
def test_a_missing_package_is_one_line_naming_the_install_command(script, blocked, install, tmp_path):
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"x")
    args = {"05_server.py": (), "07_transcribe_corpus.py": (audio, "--output-dir", tmp_path / "out"),
            "03_inference_cpu.py": (audio,), "01_export_onnx.py": ("--model-dir", tmp_path / "m")}[script]
    proc = subprocess.run([sys.executable, "-c", RUN_SCRIPT, blocked, str(ROOT / script), *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=_env())
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith(f"error: {script} needs the Python module {blocked!r}"), line
    assert line.endswith(install) and sys.executable in line
    assert not (tmp_path / "out").exists() and not (tmp_path / "m").exists()


def test_a_late_missing_module_is_one_line_too(tmp_path):
    """A module imported lazily, after the up-front check (here: the base check passes, the import fails)."""
    code = ("import sys; sys.argv = ['03_inference_cpu.py']\n"
            "from funasr_nano.requirements import guarded\n"
            "with guarded('03_inference_cpu.py'):\n"
            "    import sounddevice_not_installed_anywhere\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and "'sounddevice_not_installed_anywhere'" in line and "pip install" in line


def test_corpus_address_auto_without_a_cluster_is_one_line(tiny_models, tmp_path):
    import soundfile

    audio = tmp_path / "a.wav"
    soundfile.write(str(audio), np.zeros(1600, np.float32), 16000)
    proc = run("07_transcribe_corpus.py", audio, "--output-dir", tmp_path / "out", "--address", "auto",
               "--model-dir", tiny_models, timeout=180)
    assert "Traceback" not in proc.stderr, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and line.startswith("error: --address auto: no Ray cluster"), line
    assert "ray start --head" in line


def test_ctrl_c_on_the_server_shuts_down_without_a_traceback(tiny_models, tmp_path):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(with_default_sigint([sys.executable, str(ROOT / "05_server.py"), "--preset", "cpu",
                                                 "--model-dir", str(tiny_models), "--port", str(port), "--threads",
                                                 "2"]),
                            cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(),
                            start_new_session=True)
    try:
        assert wait_until_healthy(f"http://127.0.0.1:{port}", proc, 120)
        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in a terminal does: the whole foreground group
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert "Traceback" not in stderr and "CancelledError" not in stderr, stderr
    assert "Application shutdown complete" in stderr
    assert proc.returncode == 130, stderr


# --------------------------------------------------------------------------- 8: stdin, language


def test_dash_reads_the_audio_from_stdin(tiny_models, zh_mp3):
    by_path = run("03_inference_cpu.py", zh_mp3, "--model-dir", tiny_models, "--format", "json", *FAST)
    assert by_path.returncode == 0, by_path.stderr
    proc = subprocess.run([sys.executable, str(ROOT / "03_inference_cpu.py"), "-", "--model-dir", str(tiny_models),
                           "--format", "json", *FAST], cwd=ROOT, input=zh_mp3.read_bytes(), capture_output=True,
                          timeout=300, env=_env())
    assert proc.returncode == 0, proc.stderr
    from_stdin = json.loads(proc.stdout)
    assert from_stdin["source"] == "-"
    assert from_stdin["text"] == json.loads(by_path.stdout)["text"]
    empty = subprocess.run([sys.executable, str(ROOT / "03_inference_cpu.py"), "-", "--model-dir", str(tiny_models)],
                           cwd=ROOT, input=b"", capture_output=True, timeout=120, env=_env())
    assert empty.returncode == 1 and empty.stderr.decode().strip() == "error: -: no audio on stdin (0 bytes)"


def test_the_reported_language_is_the_texts_when_the_model_chose(tiny_models, zh_mp3):
    from funasr_nano.output.language import text_language

    proc = run("03_inference_cpu.py", zh_mp3, "--model-dir", tiny_models, "--format", "json", *FAST)
    result = json.loads(proc.stdout)
    assert result["language"] == text_language(result["text"]) and result["language"] in ("zh", "en", "ja")
    assert result["language_from"] == "text"
    asked = json.loads(run("03_inference_cpu.py", zh_mp3, "--model-dir", tiny_models, "--format", "json",
                           "--language", "日文", *FAST).stdout)
    assert (asked["language"], asked["language_from"]) == ("ja", "request")


@pytest.mark.parametrize("text,language", [
    ("Hello world, this is a test.", "en"), ("今天天气很好。", "zh"), ("こんにちは、世界。", "ja"),
    ("我们用Kubernetes部署服务", "zh"), ("東京タワー", "ja"), ("OK 好", "zh"), ("", None), ("123, 456.", None),
    ("don't stop", "en"),
])
def test_language_of_a_text_follows_its_script(text, language):
    from funasr_nano.output.language import text_language

    assert text_language(text) == language


# --------------------------------------------------------------------------- 6: proxies, second source


class _RecordingProxy:
    """An HTTP proxy on 127.0.0.1 that records each request line (CONNECT host:443 for https) and refuses it."""

    def __init__(self) -> None:
        import http.server
        import threading

        self.requests: list[str] = []
        outer = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def _refuse(self) -> None:
                outer.requests.append(self.requestline)
                self.send_error(502, "test proxy: no upstream")

            do_CONNECT = do_GET = do_HEAD = _refuse  # noqa: N815 - http.server's method names

            def log_message(self, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def proxy():
    server = _RecordingProxy()
    yield server
    server.close()


@pytest.mark.parametrize("source,host", [("modelscope", "www.modelscope.cn:443"), ("huggingface", "huggingface.co:443")])
def test_the_download_check_goes_through_the_proxy_and_offers_the_other_source(source, host, proxy, tmp_path):
    release = tmp_path / "release"
    release.mkdir()  # an existing empty --release-dir is a download target
    env = _env(HTTPS_PROXY=proxy.url, https_proxy=proxy.url, NO_PROXY="", no_proxy="")
    proc = subprocess.run([sys.executable, str(ROOT / "01_export_onnx.py"), "--release-dir", str(release),
                           "--model-dir", str(tmp_path / "models"), "--source", source, "--quiet"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env=env)
    assert proxy.requests and proxy.requests[0].startswith(f"CONNECT {host} "), proxy.requests
    (line,) = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and f"(through the proxy {proxy.url})" in line, line
    other = "huggingface" if source == "modelscope" else "modelscope"
    assert f"--source {other}" in line and "CTC head" in line, line  # the Hugging Face copy's gap is said
    assert not list(release.iterdir())


def test_no_proxy_exempts_the_host(proxy, monkeypatch):
    from funasr_nano.export.release import reachable

    for name in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    reachable("http://127.0.0.1:9/", timeout=2)  # a check before the proxy is set must not pin "no proxy"
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "127.0.0.1")
    reachable("https://127.0.0.1:9/", timeout=2)  # exempt: straight to the (closed) port, not through the proxy
    assert proxy.requests == []
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "")
    assert not reachable("https://127.0.0.1:9/", timeout=2)
    assert len(proxy.requests) == 1 and proxy.requests[0].startswith("CONNECT 127.0.0.1:9 ")


# --------------------------------------------------------------------------- 8: words


def test_english_words_are_whole_words_and_chinese_ones_characters():
    from funasr_nano.output.alignment import word_times

    words = word_times("Hello, world. It's fine", 1.0, 4.0)
    assert [w.word for w in words] == ["Hello,", "world.", "It's", "fine"]
    assert words[0].start == 1.0 and words[-1].end == 4.0
    assert all(a.end == b.start for a, b in zip(words, words[1:]))
    assert [w.word for w in word_times("你好，世界。OK", 0.0, 2.0)] == ["你", "好，", "世", "界。", "OK"]
    times = [0.0, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]  # per character of "ab cd efgh."
    aligned = word_times("ab cd efgh.", 0.0, 2.0, times)
    assert [(w.word, w.start, w.end) for w in aligned] == [("ab", 0.0, 0.3), ("cd", 0.3, 0.6), ("efgh.", 0.6, 2.0)]


# --------------------------------------------------------------------------- 7: noise


def test_a_second_server_on_a_used_port_is_one_line_before_anything_else(tiny_models):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = run("05_server.py", "--preset", "cpu", "--model-dir", tiny_models, "--port", port, timeout=120)
    (line,) = proc.stderr.strip().splitlines()  # no page URL, no uvicorn start-up before the failure
    assert proc.returncode == 2 and line.startswith(f"error: cannot listen on 127.0.0.1:{port} ("), line


def test_warnings_while_a_file_is_transcribed_name_it(capsys):
    import logging

    from funasr_nano.cli import current_input, log_to_stderr

    log_to_stderr()
    log = logging.getLogger("funasr_nano.decoding.scheduler")
    with current_input("talk.mp3"):
        log.warning("segment 1.44-4.00 s: decoding loop detected after 300 tokens; segment stopped")
        log.warning("talk.mp3: truncated or damaged audio: 0.19 s decoded")
    with current_input("-", "/tmp/funasr-stdin-x.audio"):
        log.warning("/tmp/funasr-stdin-x.audio: truncated or damaged audio")
    log.warning("no input: as it was")
    assert capsys.readouterr().err.splitlines() == [
        "warning: talk.mp3: segment 1.44-4.00 s: decoding loop detected after 300 tokens; segment stopped",
        "warning: talk.mp3: truncated or damaged audio: 0.19 s decoded",
        "warning: -: truncated or damaged audio",
        "warning: no input: as it was",
    ]


@pytest.mark.parametrize("kind", ["vad", "spk"])
def test_the_releases_beside_the_main_one_download_through_the_proxy_or_say_how(kind, proxy, monkeypatch, tmp_path):
    """--vad-release-dir and --spk-release-dir name folders the export downloads from ModelScope when they are
    empty: through the proxy the environment names, and one line with the download command when that fails."""
    from funasr_nano.export.export_campplus import SpkReleaseError, ensure_spk_release
    from funasr_nano.export.export_fsmn_vad import VadReleaseError, ensure_vad_release

    ensure, error, model_id = {"vad": (ensure_vad_release, VadReleaseError, "iic/speech_fsmn_vad_zh-cn-16k-common-pytorch"),
                               "spk": (ensure_spk_release, SpkReleaseError, "iic/speech_campplus_sv_zh-cn_16k-common")}[kind]
    for name in ("HTTPS_PROXY", "https_proxy"):
        monkeypatch.setenv(name, proxy.url)
    for name in ("NO_PROXY", "no_proxy"):
        monkeypatch.setenv(name, "")
    folder = tmp_path / "release"
    folder.mkdir()
    with pytest.raises(error) as refused:
        ensure(folder, download=True)
    line = str(refused.value)
    assert "\n" not in line and f"(through the proxy {proxy.url})" in line, line
    assert f"`modelscope download --model {model_id} --local_dir {folder}`" in line, line
    assert proxy.requests and proxy.requests[0].startswith("CONNECT www.modelscope.cn:443 "), proxy.requests
    with pytest.raises(error, match="release not found"):
        ensure(tmp_path / "elsewhere", download=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(error, match=r"not a folder \(--(vad|spk)-release-dir\)"):
        ensure(tmp_path / "file", download=True)
