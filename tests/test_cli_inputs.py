"""What the scripts do with bad, odd and repeated input: one line per problem, never a traceback.

Bad input (exit 1 for an input file, 2 for the models, non-zero for a release folder) gets exactly
one stderr line, `error: <path>: <problem>`. Odd but valid input (sub-frame clips, ten minutes of
digital silence, 8 kHz or 6-channel audio, an MP3 cut after its first frames) just works. Output
files are written atomically and an existing output is skipped unless --overwrite.

The rules chosen here:
- a file that decodes to 0 samples is an error ("no audio samples"): there is nothing to transcribe
  and an empty transcript would hide the problem; 1 to 399 samples (less than one 25 ms frame) is
  valid audio that holds no speech, and gives empty text;
- an MP3 truncated inside its header (200 bytes) is broken; one truncated after a few whole frames
  (2 KB) is valid short audio, with a warning that it decoded to less than its header announces.

The tests under "what a new user hits" (issue 15) each run the scripts as a user would and check
the exit code, the message and the files left on disk.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import stat
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPTS = ("01_export_onnx.py", "02_export_gguf.py", "03_inference_cpu.py", "03_inference_cpu_int8.py",
           "03_inference_gpu.py")
FAST = ("--max-new-tokens", "4", "--threads", "2")


def run(script: str | Path, *args: str, timeout: float = 300, cwd: Path = ROOT, umask: int | None = None
        ) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FUNASR_DEBUG"}
    preexec = None if umask is None else (lambda: os.umask(umask))
    return subprocess.run([sys.executable, str(ROOT / script), *map(str, args)], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env=env, preexec_fn=preexec)


def transcribe(models: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return run("03_inference_cpu.py", *args, "--model-dir", models, *FAST, timeout=timeout)


def assert_one_error_line(proc: subprocess.CompletedProcess, path: Path | str, problem: str, code: int) -> str:
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {len(lines)}:\n{proc.stderr}"
    line = lines[0]
    assert line.startswith(f"error: {path}:"), line
    assert problem in line, line
    assert proc.returncode == code, (proc.returncode, line)
    return line


def assert_clean_success(proc: subprocess.CompletedProcess) -> None:
    """Exit 0 and nothing on stderr but our own prefixed warnings (no library chatter, no traceback)."""
    assert proc.returncode == 0, proc.stderr
    assert all(line.startswith("warning:") for line in proc.stderr.splitlines()), proc.stderr


@pytest.fixture(scope="module")
def speech(zh_mp3) -> np.ndarray:
    """The first 4 s of the shared news clip at 16 kHz: real speech the VAD keeps."""
    from funasr_nano.audio.load import load_audio

    return load_audio(zh_mp3)[: 4 * 16000]


def _write_wav(path: Path, data: np.ndarray, sr: int, subtype: str = "PCM_16") -> Path:
    import soundfile

    soundfile.write(str(path), data, sr, subtype=subtype)
    return path


# --------------------------------------------------------------------------- --help


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_exits_0_and_shows_examples(script):
    proc = run(script, "--help", timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "examples:" in proc.stdout
    assert f"python {script} " in proc.stdout.split("examples:", 1)[1]


# --------------------------------------------------------------------------- bad audio files


def _empty(d: Path, zh_mp3: Path) -> Path:
    (d / "empty.wav").write_bytes(b"")
    return d / "empty.wav"


def _zero_samples(d: Path, zh_mp3: Path) -> Path:
    return _write_wav(d / "zero.wav", np.zeros(0, np.float32), 16000)


def _text_as_mp3(d: Path, zh_mp3: Path) -> Path:
    (d / "notes.mp3").write_text("This is a text file, not an MP3.\n" * 20, encoding="utf-8")
    return d / "notes.mp3"


def _truncated_mp3(d: Path, zh_mp3: Path) -> Path:
    (d / "cut.mp3").write_bytes(zh_mp3.read_bytes()[:200])  # inside the ID3/Xing header: no frame at all
    return d / "cut.mp3"


def _corrupt_wav_header(d: Path, zh_mp3: Path) -> Path:
    good = _write_wav(d / "tmp.wav", np.zeros(16000, np.float32), 16000).read_bytes()
    bad = good[:12] + b"fmt " + (4).to_bytes(4, "little") + b"\0\0\0\0" + good[44:]  # 'fmt ' chunk too short
    (d / "corrupt.wav").write_bytes(bad)
    return d / "corrupt.wav"


def _missing(d: Path, zh_mp3: Path) -> Path:
    return d / "does-not-exist.wav"


def _directory(d: Path, zh_mp3: Path) -> Path:
    (d / "folder.wav").mkdir()
    return d / "folder.wav"


BAD_AUDIO = {
    "empty_file": (_empty, "empty file"),
    "zero_samples": (_zero_samples, "no audio samples"),
    "text_named_mp3": (_text_as_mp3, "not a readable audio file"),
    "truncated_mp3": (_truncated_mp3, "not a readable audio file"),
    "corrupt_wav_header": (_corrupt_wav_header, "not a readable audio file"),
    "missing_path": (_missing, "no such file"),
    "directory": (_directory, "is a directory"),
}


@pytest.mark.parametrize("case", sorted(BAD_AUDIO))
def test_bad_audio_gets_one_line_and_exit_1(case, tiny_models, zh_mp3, tmp_path):
    make, problem = BAD_AUDIO[case]
    path = make(tmp_path, zh_mp3)
    proc = transcribe(tiny_models, path)
    assert_one_error_line(proc, path, problem, 1)
    assert proc.stdout == ""


# --------------------------------------------------------------------------- bad model folders


def _model_copy(tiny_models: Path, dest: Path, skip: tuple[str, ...] = ()) -> Path:
    """The exported folder, by symlinks (cheap), without the `skip` names."""
    dest.mkdir()
    for item in tiny_models.iterdir():
        if item.name not in skip:
            (dest / item.name).symlink_to(item)
    return dest


def test_missing_model_files_name_them_and_the_export_commands(tiny_models, zh_mp3, tmp_path):
    models = _model_copy(tiny_models, tmp_path / "models", skip=("qwen3-0.6b-asr.gguf", "FunASR_Nano_Encoder.onnx"))
    proc = transcribe(models, zh_mp3)
    assert "Traceback" not in proc.stderr and proc.returncode == 2, proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: missing ")
    for needed in ("qwen3-0.6b-asr.gguf", "FunASR_Nano_Encoder.onnx", "python 01_export_onnx.py",
                   "python 02_export_gguf.py"):
        assert needed in line, line


@pytest.mark.parametrize("name,problem", [
    ("qwen3-0.6b-asr.gguf", "cannot load this GGUF"),
    ("FunASR_Nano_Encoder.onnx", "not a valid ONNX model"),
])
def test_truncated_model_file_gets_one_line_and_exit_2(name, problem, tiny_models, zh_mp3, tmp_path):
    models = _model_copy(tiny_models, tmp_path / "models", skip=(name,))
    data = (tiny_models / name).read_bytes()
    (models / name).write_bytes(data[: len(data) // 2])
    proc = transcribe(models, zh_mp3)
    assert_one_error_line(proc, models / name, problem, 2)


class _RunsCode:
    """A pickle payload that creates a file when unpickled: what torch.load(weights_only=False) would run."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("script,protocol", [("01_export_onnx.py", 2), ("02_export_gguf.py", 4)])
def test_code_running_model_pt_is_refused_unexecuted(script, protocol, tiny_ckpt, tmp_path):
    release = tmp_path / "release"
    release.mkdir()
    for item in tiny_ckpt.iterdir():
        if item.name != "model.pt":
            (release / item.name).symlink_to(item)
    marker = tmp_path / "pwned"
    with open(release / "model.pt", "wb") as f:
        pickle.dump({"model": {"weight": _RunsCode(marker)}}, f, protocol=protocol)

    proc = run(script, "--release-dir", release, "--model-dir", tmp_path / "out", "--quiet")
    assert not marker.exists(), "the pickle's code ran"
    line = assert_one_error_line(proc, release / "model.pt", "refused, not a weights-only checkpoint", 2)
    assert "Weights only load failed" not in line  # torch's boilerplate is dropped, its reason kept
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())

    # The payload is real: plain pickle runs it.
    subprocess.run([sys.executable, "-c", f"import pickle; pickle.load(open({str(release / 'model.pt')!r}, 'rb'))"],
                   check=True, capture_output=True)
    assert marker.exists()


# --------------------------------------------------------------------------- odd but valid


def test_audio_shorter_than_one_frame_gives_empty_text(tiny_models, tmp_path):
    rng = np.random.default_rng(0)
    paths = [_write_wav(tmp_path / f"short{n}.wav", 0.3 * rng.standard_normal(n).astype(np.float32), 16000)
             for n in (1, 200, 399)]
    for extra in ((), ("--vad", "none")):
        proc = transcribe(tiny_models, *paths, *extra)
        assert_clean_success(proc)
        assert proc.stdout == "\n".join(f"==> {p} <==\n\n" for p in paths)  # each header, then its empty text


@pytest.mark.parametrize("extra", [(), ("--vad", "none"), ("--vad", "none", "--batch-size", "1")],
                         ids=["vad", "no-vad-batched", "no-vad-sequential"])
def test_ten_minutes_of_digital_silence_is_empty_and_quick(extra, tiny_models, tmp_path_factory):
    folder = tmp_path_factory.getbasetemp() / "silence"
    path = folder / "silence.wav"
    if not path.is_file():
        folder.mkdir(exist_ok=True)
        _write_wav(path, np.zeros(600 * 16000, np.int16), 16000)
    t0 = time.perf_counter()
    proc = run("03_inference_cpu.py", path, "--model-dir", tiny_models, "--threads", "2", *extra)
    elapsed = time.perf_counter() - t0
    assert_clean_success(proc)
    assert proc.stdout == "\n"
    assert elapsed < 30, f"{elapsed:.1f} s for ten minutes of silence"


@pytest.mark.parametrize("sr,channels", [(8000, 1), (48000, 6)])
def test_other_rates_and_channel_counts_transcribe(sr, channels, speech, tiny_models, tmp_path):
    import soxr

    wave = soxr.resample(speech, 16000, sr)
    data = np.stack([wave * (0.5 + 0.1 * c) for c in range(channels)], axis=1)
    path = _write_wav(tmp_path / f"speech_{sr}_{channels}ch.wav", data, sr)
    proc = transcribe(tiny_models, path)
    assert_clean_success(proc)
    assert proc.stdout.strip(), "the tiny model always says something about real speech"


def test_mp3_cut_after_a_few_frames_is_short_valid_audio(tiny_models, zh_mp3, tmp_path):
    path = tmp_path / "first2k.mp3"
    path.write_bytes(zh_mp3.read_bytes()[:2048])
    proc = transcribe(tiny_models, path, "--vad", "none")
    assert_clean_success(proc)  # mpg123's "Warning: Xing stream size off" does not reach the terminal
    assert proc.stdout.endswith("\n")


# --------------------------------------------------------------------------- progress bars


def _run_with_tty_stderr(*args: str) -> tuple[int, str]:
    """Run 03_inference_cpu.py with stderr on a pseudo-terminal (as in a shell); (exit code, stderr)."""
    import fcntl
    import pty
    import select
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))  # a 0-column tty hides the bar
    proc = subprocess.Popen([sys.executable, str(ROOT / "03_inference_cpu.py"), *map(str, args)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=slave)
    os.close(slave)
    chunks = []
    while True:  # drain as it comes so the child never blocks on a full terminal buffer
        ready, _, _ = select.select([master], [], [], 0.5)
        if ready:
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                data = b""
            if data:
                chunks.append(data)
                continue
        if proc.poll() is not None and not ready:
            break
        if ready:
            break
    code = proc.wait(timeout=300)
    os.close(master)
    return code, b"".join(chunks).decode("utf-8", "replace")


def test_progress_bar_on_a_terminal_only_and_not_with_quiet(speech, tiny_models, tmp_path):
    files = [_write_wav(tmp_path / f"p{i}.wav", speech[: 2 * 16000], 16000) for i in range(2)]
    code, stderr = _run_with_tty_stderr(*files, "--model-dir", tiny_models, *FAST)
    assert code == 0, stderr
    assert "2/2" in stderr and "file" in stderr, stderr  # tqdm's file counter
    code, stderr = _run_with_tty_stderr(*files, "--model-dir", tiny_models, *FAST, "--quiet")
    assert code == 0 and stderr == "", stderr
    proc = transcribe(tiny_models, *files)  # stderr is a pipe here: no bar
    assert_clean_success(proc)
    assert proc.stderr == ""


# --------------------------------------------------------------------------- batches and output files


def test_batch_with_two_bad_files_writes_the_good_ones_and_lists_the_bad(speech, tiny_models, tmp_path):
    good = [_write_wav(tmp_path / f"good{i}.wav", speech[i * 8000:], 16000) for i in range(3)]
    empty = tmp_path / "bad_empty.wav"
    empty.write_bytes(b"")
    missing = tmp_path / "bad_missing.mp3"
    inputs = [good[0], empty, good[1], missing, good[2]]
    out = tmp_path / "out"
    proc = transcribe(tiny_models, *inputs, "--output-dir", out)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert lines[0].startswith(f"error: {empty}:") and lines[1].startswith(f"error: {missing}:")
    assert lines[2] == f"error: 2 of 5 inputs failed: {empty}, {missing}"
    assert len(lines) == 3
    assert sorted(p.name for p in out.iterdir()) == ["good0.txt", "good1.txt", "good2.txt"]
    assert all(p.read_text(encoding="utf-8").endswith("\n") for p in out.iterdir())


def test_rerun_skips_existing_outputs_unless_overwrite(speech, tiny_models, tmp_path):
    audio = _write_wav(tmp_path / "clip.wav", speech, 16000)
    out = tmp_path / "out"
    target = out / "clip.json"

    first = transcribe(tiny_models, audio, "--output-dir", out, "--format", "json")
    assert_clean_success(first)
    content = target.read_text(encoding="utf-8")
    old = 1_000_000_000  # an mtime no write could give it
    os.utime(target, (old, old))

    second = transcribe(tiny_models, audio, "--output-dir", out, "--format", "json")
    assert second.returncode == 0, second.stderr
    assert "skipped" in second.stderr and str(target) in second.stderr
    assert target.stat().st_mtime == old and target.read_text(encoding="utf-8") == content

    quiet = transcribe(tiny_models, audio, "--output-dir", out, "--format", "json", "--quiet")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert target.stat().st_mtime == old

    third = transcribe(tiny_models, audio, "--output-dir", out, "--format", "json", "--overwrite")
    assert_clean_success(third)
    assert target.stat().st_mtime > old
    assert [p.name for p in out.iterdir()] == ["clip.json"]  # no *.part temporary left behind


def test_interrupted_write_leaves_neither_output_nor_temporary(tmp_path, monkeypatch):
    from funasr_nano.output import writers

    target = tmp_path / "out" / "a.txt"
    writers.write_atomic(target, "first\n")

    def fail(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(writers.os, "replace", fail)
    with pytest.raises(OSError):
        writers.write_atomic(target, "second\n")
    assert target.read_text(encoding="utf-8") == "first\n"
    assert [p.name for p in target.parent.iterdir()] == ["a.txt"]


@pytest.mark.parametrize("max_segment", [5.0, 30.0, 90.0])
@pytest.mark.parametrize("hotwords", ["", "通义,魔搭", "Kubernetes,PostgreSQL,张三丰,深度学习框架,ONNX Runtime,魔搭社区" * 4])
def test_context_holds_the_longest_segment_with_its_prompt(hotwords, max_segment, tiny_models):
    """The KV size the CLI asks for covers the real prompt of a segment at the VAD's longest (+ padding)."""
    from funasr_nano.engine import Engine
    from funasr_nano.models.prompt import PromptOptions, parse_hotwords
    from funasr_nano.presets import context_per_sequence

    engine = Engine(tiny_models)
    try:
        seconds = max_segment + 0.2  # the VAD pads a cut segment by 0.1 s on each side
        wave = (0.01 * np.random.default_rng(0).standard_normal(int(seconds * 16000))).astype(np.float32)
        prepared = engine.prepare(wave, PromptOptions(hotwords=parse_hotwords(hotwords)))
    finally:
        engine.close()
    max_new = 512
    cells = context_per_sequence(max_new, max_segment, hotwords)
    assert prepared.length + max_new <= cells
    assert cells % 256 == 0
    if not hotwords:  # hotwords are counted generously; without them, no more than llama.cpp's padding to spare
        assert cells - (prepared.length + max_new) < 256 + 64


# --------------------------------------------------------------------------- what a new user hits (issue 15)


def _files(folder: Path) -> list[str]:
    """Every file under `folder`, relative, sorted (hidden temporaries included)."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def _stderr_lines(proc: subprocess.CompletedProcess) -> list[str]:
    assert "Traceback" not in proc.stderr, proc.stderr
    return proc.stderr.strip().splitlines()


def test_1_same_named_inputs_each_keep_their_transcript(speech, tiny_models, tmp_path):
    (tmp_path / "sub").mkdir()
    a_wav = _write_wav(tmp_path / "a.wav", speech, 16000)
    sub_wav = _write_wav(tmp_path / "sub" / "a.wav", speech[16000:], 16000)
    a_flac = _write_wav(tmp_path / "a.flac", speech[8000:], 16000)
    a_again = tmp_path / "sub" / ".." / "a.wav"
    out = tmp_path / "out"
    proc = transcribe(tiny_models, a_wav, sub_wav, a_flac, a_again, "--output-dir", out, "--format", "json")
    assert proc.returncode == 0, proc.stderr
    lines = _stderr_lines(proc)
    assert lines[0] == f"warning: {a_again}: given twice (as {a_wav}), transcribed once"
    assert lines[1].startswith("warning: inputs share a name") and f"{a_wav} -> {out / 'a.wav.json'}" in lines[1]
    assert f"{a_flac} -> {out / 'a.flac.json'}" in lines[1] and len(lines) == 2
    assert _files(out) == ["a.flac.json", "a.wav.json", "sub/a.json"]
    for name, source in (("a.wav.json", a_wav), ("sub/a.json", sub_wav), ("a.flac.json", a_flac)):
        assert json.loads((out / name).read_text(encoding="utf-8"))["source"] == str(source)

    again = transcribe(tiny_models, a_wav, sub_wav, a_flac, "--output-dir", out, "--format", "json")
    assert again.returncode == 0 and again.stderr.count("skipped") == 3, again.stderr
    forced = transcribe(tiny_models, a_wav, sub_wav, a_flac, "--output-dir", out, "--format", "json", "--overwrite")
    assert forced.returncode == 0, forced.stderr
    assert _files(out) == ["a.flac.json", "a.wav.json", "sub/a.json"]
    assert json.loads((out / "a.flac.json").read_text(encoding="utf-8"))["source"] == str(a_flac)


@pytest.mark.parametrize("case", ["under_a_file", "exists_as_a_file", "sysfs"])
def test_2_unwritable_output_dir_is_a_setup_error_before_any_model_work(case, speech, tmp_path):
    audio = _write_wav(tmp_path / "clip.wav", speech, 16000)
    (tmp_path / "file").write_text("x")
    out = {"under_a_file": tmp_path / "file" / "out", "exists_as_a_file": tmp_path / "file",
           "sysfs": Path("/sys/funasr-out")}[case]
    if case == "sysfs" and not Path("/sys/kernel").is_dir():
        pytest.skip("no sysfs (not Linux)")
    empty_models = tmp_path / "models"  # reaching the model step would start an export here
    empty_models.mkdir()
    proc = transcribe(empty_models, audio, "--output-dir", out)
    (line,) = _stderr_lines(proc)
    assert proc.returncode == 2 and line.startswith(f"error: {out}: "), line
    assert ".part" not in line and "write-test" not in line
    assert ("not a folder" in line) if case == "exists_as_a_file" else ("cannot" in line)
    assert proc.stdout == "" and not list(empty_models.iterdir())
    assert _files(tmp_path) == ["clip.wav", "file"]


def test_2_a_write_that_fails_late_names_the_output_not_a_temporary(speech, tiny_models, tmp_path):
    audio = [_write_wav(tmp_path / f"{name}.wav", speech[: 2 * 16000], 16000) for name in ("a", "b")]
    out = tmp_path / "out"
    (out / "a.txt").mkdir(parents=True)  # a folder where a's transcript should go: the rename fails
    proc = transcribe(tiny_models, *audio, "--output-dir", out, "--overwrite")
    assert proc.returncode == 2
    assert _stderr_lines(proc) == [f"error: {out / 'a.txt'}: cannot write (Is a directory)",
                                   f"error: 1 of 2 inputs failed: {audio[0]}"]
    assert _files(out) == ["b.txt"]  # the other input is written, no temporary is left


def _damaged_mp3(zh_mp3: Path, path: Path) -> Path:
    """The clip with a sixth of its bytes, from a third in, replaced by noise: mpg123 gives up at about 2.7 s."""
    data = zh_mp3.read_bytes()
    start, size = len(data) // 3, len(data) // 6
    noise = np.random.default_rng(0).integers(0, 256, size, dtype=np.uint8).tobytes()
    path.write_bytes(data[:start] + noise + data[start + size:])
    return path


def test_3_mp3_damaged_midway_is_finished_by_ffmpeg_with_a_warning(tiny_models, zh_mp3, tmp_path):
    import soundfile

    path = _damaged_mp3(zh_mp3, tmp_path / "damaged.mp3")
    with soundfile.SoundFile(str(path)) as f, pytest.raises(RuntimeError):  # libsndfile alone fails midway
        while len(f.read(65536)):
            pass
    out = tmp_path / "out"
    proc = transcribe(tiny_models, path, "--format", "json", "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    (line,) = _stderr_lines(proc)
    assert line.startswith(f"warning: {path}: damaged audio: libsndfile stopped at "), line
    assert "FFmpeg decoded the rest" in line and "damaged packets skipped" in line
    assert line.endswith("of the 10.00 s its header gives"), line
    decoded = float(line.split("; ")[-1].split(" s decoded")[0])
    result = json.loads((out / "damaged.json").read_text(encoding="utf-8"))
    assert 6.0 < decoded < 9.5 and result["duration"] == pytest.approx(decoded, abs=0.01)
    assert result["text"], "the tiny model always says something about real speech"
    assert _files(out) == ["damaged.json"]


_LIBRARY_DECODE = """
import os, sys, threading, time
from funasr_nano.audio.load import load_audio

stop = threading.Event()
ticks = 0
def tick():  # another thread of the process writing to fd 2 while the MP3 is decoded, as a server's log does
    global ticks
    while not stop.is_set():
        os.write(2, b"tick %d\\n" % ticks)
        ticks += 1
        time.sleep(0.0005)
thread = threading.Thread(target=tick)
thread.start()
samples = sum(len(load_audio(sys.argv[1])) for _ in range(3))
stop.set()
thread.join()
print(samples, ticks)
"""


@pytest.mark.parametrize("debug", [False, True])
def test_the_library_drops_mpg123s_notes_and_nothing_else_written_to_fd_2(zh_mp3, tmp_path, debug):
    """mpg123 writes its notes on a damaged MP3 straight to fd 2 from inside libsndfile; a program using the
    library sees only our one warning per decode, and every line other threads write to fd 2 meanwhile
    (with FUNASR_DEBUG=1 the notes are shown: the check below does see them when they are there)."""
    path = _damaged_mp3(zh_mp3, tmp_path / "damaged.mp3")
    env = {**os.environ, "FUNASR_DEBUG": "1"} if debug else {k: v for k, v in os.environ.items() if k != "FUNASR_DEBUG"}
    proc = subprocess.run([sys.executable, "-c", _LIBRARY_DECODE, str(path)], capture_output=True, text=True,
                          timeout=120, env=env, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    samples, ticks = map(int, proc.stdout.split())
    lines = proc.stderr.splitlines()
    assert [line for line in lines if line.startswith("tick ")] == [f"tick {i}" for i in range(ticks)]
    others = [line for line in lines if not line.startswith("tick ")]
    notes = [line for line in others if "Illegal Audio-MPEG-Header" in line or "libmpg123" in line]
    assert bool(notes) == debug, others
    warnings = [line for line in others if "damaged audio: libsndfile stopped at" in line]
    assert len(warnings) == 3 and samples > 3 * 6 * 16000, others
    if not debug:
        assert others == warnings


def test_4_truncated_mp3_warns_with_seconds_decoded_and_announced(tiny_models, zh_mp3, tmp_path):
    path = tmp_path / "cut.mp3"
    path.write_bytes(zh_mp3.read_bytes()[:4000])
    out = tmp_path / "out"
    proc = transcribe(tiny_models, path, "--output-dir", out)
    assert proc.returncode == 0, proc.stderr
    (line,) = _stderr_lines(proc)
    assert line.startswith(f"warning: {path}: truncated or damaged audio: 0."), line
    assert line.endswith("s decoded of the 10.00 s its header gives"), line
    assert _files(out) == ["cut.txt"]
    ok = transcribe(tiny_models, _write_wav(tmp_path / "whole.wav", np.zeros(4000, np.float32), 16000))
    assert ok.returncode == 0 and ok.stderr == ""  # a short file that is whole is not warned about


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o027, 0o640)])
def test_5_output_files_get_the_umask_mode(umask, mode, speech, tiny_models, tmp_path):
    audio = _write_wav(tmp_path / "clip.wav", speech[: 2 * 16000], 16000)
    out = tmp_path / "out"
    proc = run("03_inference_cpu.py", audio, "--model-dir", tiny_models, *FAST, "--output-dir", out, umask=umask)
    assert_clean_success(proc)
    assert _files(out) == ["clip.txt"]
    assert stat.S_IMODE((out / "clip.txt").stat().st_mode) == mode


def test_6_readme_and_notebook_run_from_a_clone(tiny_models):
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    assert "../shared" not in readme
    first_block = readme.split("```bash\n", 1)[1].split("```", 1)[0]
    command = first_block.strip().split(" && ")[-1].split()
    assert command[:2] == ["python", "03_inference_cpu_int8.py"], command
    example = ROOT / command[2]
    tracked = subprocess.run(["git", "ls-files", "--error-unmatch", command[2]], cwd=ROOT, capture_output=True)
    assert tracked.returncode == 0, f"{command[2]} is not committed"
    assert example.stat().st_size < 200_000

    notebook = json.loads((ROOT / "04_inference.ipynb").read_text(encoding="utf-8"))
    code = "\n".join("".join(c["source"]) for c in notebook["cells"] if c["cell_type"] == "code")
    assert "../shared" not in code
    assert f'os.environ.get("FUNASR_AUDIO", "{command[2]}")' in code  # the notebook's default: the same clip

    proc = run(command[1], *command[2:], "--model-dir", tiny_models, *FAST, cwd=ROOT)
    assert_clean_success(proc)
    assert proc.stderr == "" and proc.stdout.strip(), (proc.stdout, proc.stderr)


def test_7_inputs_are_checked_before_any_model_step(speech, tiny_models, tmp_path):
    missing = tmp_path / "typo.mp3"
    empty_models = tmp_path / "models"  # reaching the model step would start an export here
    empty_models.mkdir()
    proc = transcribe(empty_models, missing)
    assert_one_error_line(proc, missing, "no such file", 1)
    assert not list(empty_models.iterdir())

    good = _write_wav(tmp_path / "good.wav", speech[: 2 * 16000], 16000)
    out = tmp_path / "out"
    proc = transcribe(tiny_models, missing, good, "--output-dir", out)
    assert proc.returncode == 1
    assert _stderr_lines(proc) == [f"error: {missing}: no such file", f"error: 1 of 2 inputs failed: {missing}"]
    assert _files(out) == ["good.txt"]


@pytest.mark.parametrize("script", ["01_export_onnx.py", "02_export_gguf.py", "03_inference_cpu.py"])
def test_8_one_option_name_per_folder_in_every_script(script, tiny_ckpt, tmp_path):
    help_text = " ".join(run(script, "--help", timeout=120).stdout.split())
    assert "--release-dir DIR official" in help_text and "release folder" in help_text
    assert "--model-dir DIR" in help_text and "--out-dir" not in help_text
    if script != "03_inference_cpu.py":
        # --model-dir used to name the release here: given one, it is refused before anything is written
        before = _files(tiny_ckpt)
        proc = run(script, "--model-dir", tiny_ckpt, "--quiet", timeout=120)
        (line,) = _stderr_lines(proc)
        assert proc.returncode == 2 and line.startswith(f"error: {tiny_ckpt}: this is a release folder"), line
        assert "pass it as --release-dir" in line and _files(tiny_ckpt) == before
        return
    # a --release-dir that is not a release is refused before any export, with no advice to download into it
    not_a_release = tmp_path / "release"
    not_a_release.mkdir()
    (not_a_release / "notes.txt").write_text("x")
    models = tmp_path / "models"
    models.mkdir()
    audio = _write_wav(tmp_path / "clip.wav", np.zeros(1600, np.float32), 16000)
    proc = run(script, audio, "--model-dir", models, "--release-dir", not_a_release, "--quiet", timeout=120)
    assert _stderr_lines(proc) == [
        f"error: {not_a_release}: not a Fun-ASR-Nano release folder (missing config.yaml, model.pt)"]
    assert proc.returncode == 2
    assert not list(models.iterdir())


def test_9_defaults_are_the_project_folder_and_named_folders_must_exist(speech, tiny_models, tmp_path):
    project = tmp_path / "project"  # a clone elsewhere, with its model folder exported
    project.mkdir()
    shutil.copy(ROOT / "03_inference_cpu.py", project)
    shutil.copytree(ROOT / "funasr_nano", project / "funasr_nano", ignore=shutil.ignore_patterns("__pycache__"))
    (project / "model-gguf").symlink_to(tiny_models)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    audio = _write_wav(elsewhere / "clip.wav", speech[: 2 * 16000], 16000)
    env = {k: v for k, v in os.environ.items() if k != "FUNASR_DEBUG"}
    proc = subprocess.run([sys.executable, str(project / "03_inference_cpu.py"), "clip.wav", *FAST], cwd=elsewhere,
                          capture_output=True, text=True, timeout=300, env=env)
    assert_clean_success(proc)
    assert proc.stderr == "" and proc.stdout.strip()

    proc = transcribe(tmp_path / "model-ggfu", audio)  # a typo: no download, no export, nothing created
    assert_one_error_line(proc, tmp_path / "model-ggfu", "no such folder (--model-dir)", 2)
    proc = transcribe(tiny_models, audio, "--release-dir", tmp_path / "Fun-ASR-Nano")
    assert_one_error_line(proc, tmp_path / "Fun-ASR-Nano", "no such folder (--release-dir)", 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["elsewhere", "project"]


@pytest.mark.parametrize("option", ["--gguf", "--encoder"])
def test_10_a_missing_model_file_option_names_the_option(option, tiny_models, tmp_path):
    audio = _write_wav(tmp_path / "clip.wav", np.zeros(1600, np.float32), 16000)
    proc = transcribe(tiny_models, audio, option, tmp_path / "nope.model")
    line = assert_one_error_line(proc, tmp_path / "nope.model", f"no such file ({option})", 2)
    assert "export" not in line
    assert proc.stdout == "" and _files(tmp_path) == ["clip.wav"]


@pytest.mark.parametrize("option,value,problem", [
    ("--threads", "0", "must be at least 1, not 0"),
    ("--max-new-tokens", "-3", "must be at least 1, not -3"),
    ("--batch-size", "0", "must be at least 1, not 0"),
    ("--max-segment", "0", "must be a number above 0, not 0"),
    ("--max-cue-seconds", "inf", "must be a number above 0, not inf"),
    ("--threads", "two", "a whole number is needed, not 'two'"),
])
def test_11_a_bad_option_value_names_the_option_and_the_value(option, value, problem, tmp_path):
    audio = _write_wav(tmp_path / "clip.wav", np.zeros(1600, np.float32), 16000)
    proc = run("03_inference_cpu.py", audio, option, value, timeout=60)
    (line,) = _stderr_lines(proc)
    assert proc.returncode == 2 and line.startswith(f"error: argument {option}: {problem}"), line
    assert proc.stdout == "" and _files(tmp_path) == ["clip.wav"]


def test_12_language_takes_the_models_names_and_iso_codes_only(speech, tiny_models, tmp_path):
    audio = _write_wav(tmp_path / "clip.wav", speech[: 2 * 16000], 16000)
    out = tmp_path / "out"
    proc = transcribe(tiny_models, audio, "--language", "xx", "--output-dir", out)
    (line,) = _stderr_lines(proc)
    assert proc.returncode == 2
    assert line == "error: --language: unknown language 'xx'; Fun-ASR-Nano-2512 takes 中文 (zh), 英文 (en), 日文 (ja), auto"
    assert not out.exists()
    for given, code in (("en", "en"), ("JA", "ja"), ("中文", "zh"), ("auto", None)):
        proc = transcribe(tiny_models, audio, "--language", given, "--format", "json")
        assert_clean_success(proc)
        result = json.loads(proc.stdout)
        if code is None:  # the model chose: the language of the text it wrote
            from funasr_nano.output.language import text_language

            assert (result["language"], result["language_from"]) == (text_language(result["text"]), "text")
        else:
            assert (result["language"], result["language_from"]) == (code, "request")


def test_13_several_inputs_on_stdout_stay_apart(speech, tiny_models, tmp_path):
    good = _write_wav(tmp_path / "good.wav", speech[: 2 * 16000], 16000)
    tiny = _write_wav(tmp_path / "tiny.wav", 0.3 * np.ones(200, np.float32), 16000)  # under a frame: empty text
    broken = tmp_path / "broken.wav"
    broken.write_bytes(b"RIFF....WAVEfmt garbage")
    inputs = (good, broken, tiny)

    txt = transcribe(tiny_models, *inputs)
    assert txt.returncode == 1
    lines = txt.stdout.split("\n")  # head(1)'s layout; the failed file has no block, the empty transcript has one
    assert lines == [f"==> {good} <==", lines[1], "", f"==> {tiny} <==", "", ""], txt.stdout
    assert lines[1].strip()
    assert f"error: {broken}:" in txt.stderr

    js = transcribe(tiny_models, *inputs, "--format", "json")
    assert js.returncode == 1
    records = [json.loads(line) for line in js.stdout.splitlines()]  # JSON Lines
    assert [r["source"] for r in records] == [str(good), str(tiny)] and records[1]["text"] == ""

    for fmt in ("srt", "vtt"):
        proc = transcribe(tiny_models, *inputs, "--format", fmt)
        (line,) = _stderr_lines(proc)
        assert proc.returncode == 2 and line == f"error: --format {fmt} with 3 inputs needs --output-dir " \
                                                "(one subtitle file per input)"
        assert proc.stdout == ""
    assert _files(tmp_path) == ["broken.wav", "good.wav", "tiny.wav"]


def test_14_two_runs_on_one_output_dir_both_finish_with_whole_files(speech, tiny_models, tmp_path):
    inputs = [_write_wav(tmp_path / f"c{i}.wav", speech[i * 8000:], 16000) for i in range(3)]
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "FUNASR_DEBUG"}
    cmd = [sys.executable, str(ROOT / "03_inference_cpu.py"), *map(str, inputs), "--model-dir", str(tiny_models),
           *FAST, "--output-dir", str(out), "--format", "json"]
    runs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
            for _ in range(2)]
    results = [r.communicate(timeout=300) for r in runs]
    for r, (_, stderr) in zip(runs, results):
        assert r.returncode == 0, stderr
        assert all(line.endswith("(use --overwrite)") for line in stderr.splitlines()), stderr
    assert _files(out) == ["c0.json", "c1.json", "c2.json"]  # no temporary left behind
    for i in range(3):
        assert json.loads((out / f"c{i}.json").read_text(encoding="utf-8"))["source"] == str(inputs[i])
