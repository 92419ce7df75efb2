"""07_transcribe_corpus.py on a local Ray cluster (2 CPUs) with the tiny exported model.

One cluster for the module (Ray starts in seconds, not milliseconds). The oracle for every row is
the 03 script itself: `03_inference_cpu.py FILES --format json` with the same options.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from tests.conftest import ROOT

ray = pytest.importorskip("ray", reason="pip install -r requirements-corpus.txt")

from funasr_nano.corpus.cli import main as corpus_main  # noqa: E402
from funasr_nano.corpus.inputs import AudioFile, InputError, collect_inputs  # noqa: E402
from funasr_nano.corpus.store import CONSOLIDATED, FILES, PARTS, TIMING_COLUMNS, CorpusStore, read_corpus  # noqa: E402
from testing import corpus_faults  # noqa: E402

# --batch-invariant on both sides: files batched with different company still get the same tokens (f16 GGUF)
OPTIONS = ["--preset", "cpu", "--max-new-tokens", "8", "--threads", "2", "--quiet", "--batch-invariant"]
N_GOOD, N_BAD = 10, 2


@pytest.fixture(scope="module")
def cluster():
    from funasr_nano.corpus.pipeline import connect

    connect(num_cpus=2)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def corpus(zh_mp3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """12 files under one folder (some in a sub-folder): 10 cuts of the shared clip, 2 that are not audio."""
    import soundfile

    from funasr_nano.audio.load import load_audio

    wave = load_audio(zh_mp3)
    folder = tmp_path_factory.mktemp("corpus")
    (folder / "sub").mkdir()
    for i in range(N_GOOD):
        start = i * 8000  # 0.5 s apart, 2..4.25 s long: different audio, different segments
        cut = wave[start:start + 32000 + i * 4000]
        name = f"sub/clip{i:02d}.flac" if i % 3 == 0 else f"clip{i:02d}.wav"
        soundfile.write(str(folder / name), cut, 16000)
    (folder / "broken.wav").write_bytes(b"RIFF\x00\x00\x00\x00not a wave file at all")
    (folder / "empty.mp3").write_bytes(b"")
    (folder / "notes.txt").write_text("not audio, not searched for")
    return folder


@pytest.fixture(scope="module")
def first_run(cluster, corpus: Path, tiny_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("out") / "run"
    code = corpus_main([str(corpus), "--output-dir", str(out), "--model-dir", str(tiny_models), "--format", "json,srt",
                        *OPTIONS])
    assert code == 1  # two files failed, the others were transcribed
    return out


def _cli_json(files: list[str], tiny_models: Path) -> dict[str, dict]:
    """The 03 script's JSON for each file (one process, JSON Lines on stdout)."""
    cmd = [sys.executable, str(ROOT / "03_inference_cpu.py"), *files, "--format", "json",
           "--model-dir", str(tiny_models), "--max-new-tokens", "8", "--threads", "2", "--quiet", "--batch-invariant"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    records = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    return {r["source"]: r for r in records}


def _without_timings(table):
    return table.drop_columns(list(TIMING_COLUMNS)).to_pylist()


def _inputs(corpus: Path) -> list[str]:
    return [f.path for f in collect_inputs([str(corpus)])]


def _assert_one_dataset(folder: Path, paths: list[str]) -> None:
    """What a user's Parquet reader makes of the folder: exactly one row per file of `paths`, read_corpus's rows."""
    import pandas as pd
    import pyarrow.dataset as ds

    assert sorted(pd.read_parquet(folder)["path"]) == sorted(paths)
    table = ds.dataset(folder, format="parquet").to_table()
    assert sorted(table["path"].to_pylist()) == sorted(paths)
    assert table.sort_by("path").to_pylist() == read_corpus(folder).to_pylist()


def test_every_file_has_one_row_with_the_clis_text_or_its_error(first_run: Path, corpus: Path, tiny_models: Path):
    table = read_corpus(first_run)
    rows = {r["path"]: r for r in table.to_pylist()}
    assert table.num_rows == N_GOOD + N_BAD == len(rows)
    failed = {p: r["error"] for p, r in rows.items() if r["error"] is not None}
    assert sorted(Path(p).name for p in failed) == ["broken.wav", "empty.mp3"]
    for path, error in failed.items():
        assert error.startswith(path) and "\n" not in error
        assert rows[path]["text"] is None
    good = sorted(p for p in rows if p not in failed)
    oracle = _cli_json(good, tiny_models)
    assert set(oracle) == set(good)
    for path in good:
        row, cli = rows[path], oracle[path]
        assert row["text"] == cli["text"], path
        assert json.loads(row["segments"]) == cli["segments"], path
        assert row["duration"] == cli["duration"] and row["n_tokens"] == cli["n_tokens"]
        assert row["size"] == Path(path).stat().st_size and row["preset"] == "cpu"
    assert any(rows[p]["text"] for p in good)  # the model wrote something (random weights, but not nothing)
    # the consolidated file is that same view, and the per-file outputs are the 03 script's
    assert pq.read_table(first_run / CONSOLIDATED).to_pylist() == table.to_pylist()
    some = good[0]
    written = json.loads((first_run / FILES / Path(some).relative_to(corpus).with_suffix(".json")).read_text())
    assert written["text"] == oracle[some]["text"] and written["segments"] == oracle[some]["segments"]
    assert (first_run / FILES / Path(some).relative_to(corpus).with_suffix(".srt")).is_file()


def test_the_output_folder_is_one_dataset_with_one_row_per_file(first_run: Path, corpus: Path):
    # the per-file outputs (json, srt) and the journal sit beside the dataset, where readers do not look
    _assert_one_dataset(first_run, _inputs(corpus))
    assert sorted(p.name for p in first_run.iterdir() if not p.name.startswith(".")) == sorted(
        [CONSOLIDATED, PARTS, FILES])
    assert not list((first_run / PARTS).glob("*.parquet"))  # merged into the dataset, then deleted


def test_a_worker_killed_mid_run_is_replaced_and_nothing_is_lost_or_doubled(first_run: Path, corpus: Path,
                                                                            tiny_models: Path, tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch):
    journal: list[dict] = []  # every row the driver received, read from the parts before they are merged
    consolidate = CorpusStore.consolidate

    def consolidate_after_reading_the_parts(store: CorpusStore, *args, **kwargs):
        journal.extend(row for part in store.part_files() for row in pq.read_table(part).to_pylist())
        return consolidate(store, *args, **kwargs)

    monkeypatch.setattr(CorpusStore, "consolidate", consolidate_after_reading_the_parts)
    out = tmp_path / "crash"
    code = corpus_faults.main([str(corpus), "--output-dir", str(out), "--model-dir", str(tiny_models), *OPTIONS],
                              crash_after=3)
    assert code == 1
    assert (out / corpus_faults.CRASH_MARKER).is_file()  # the actor really exited after 3 files
    assert sorted(r["path"] for r in journal) == sorted(r["path"] for r in read_corpus(first_run).to_pylist())
    assert _without_timings(read_corpus(out)) == _without_timings(read_corpus(first_run))
    _assert_one_dataset(out, _inputs(corpus))


def test_an_interrupted_run_resumed_gives_the_same_dataset(first_run: Path, corpus: Path, tiny_models: Path,
                                                           tmp_path: Path):
    out = tmp_path / "resumed"
    args = [str(corpus), "--output-dir", str(out), "--model-dir", str(tiny_models), "--rows-per-part", "2", *OPTIONS]
    assert corpus_faults.main(args, stop_after=4) == 130
    partial = read_corpus(out)
    assert 4 <= partial.num_rows < N_GOOD + N_BAD
    _assert_one_dataset(out, partial["path"].to_pylist())  # the interrupted run's rows are the dataset already
    # what a driver killed at the wrong moment leaves: a write cut short, and a part whose rows the dataset
    # already holds (killed between renaming the merged file and deleting the parts)
    (out / PARTS / ".part-deadbeef.parquet.1234.tmp").write_bytes(b"half a part")
    CorpusStore(out).write_part(partial.to_pylist()[:2])
    _assert_one_dataset(out, partial["path"].to_pylist())
    assert corpus_main(args) == 1
    resumed = read_corpus(out)
    assert _without_timings(resumed) == _without_timings(read_corpus(first_run))
    _assert_one_dataset(out, _inputs(corpus))
    # the files done before the interruption were not transcribed again: their rows kept their timings
    before = {r["path"]: r["seconds"] for r in partial.to_pylist() if r["error"] is None}
    after = {r["path"]: r["seconds"] for r in resumed.to_pylist()}
    assert before and all(after[p] == s for p, s in before.items())


def test_a_run_with_everything_done_transcribes_nothing(first_run: Path, corpus: Path, tiny_models: Path,
                                                        capsys: pytest.CaptureFixture):
    code = corpus_main([str(corpus), "--output-dir", str(first_run), "--model-dir", str(tiny_models), *OPTIONS])
    assert code == 1  # the two bad files are retried and fail again
    line = capsys.readouterr().out.strip().splitlines()[-1]
    assert f"{N_GOOD + N_BAD} files ({N_BAD} this run, {N_GOOD} already done), {N_BAD} failed" in line
    assert "audio hours per wall hour" in line
    _assert_one_dataset(first_run, _inputs(corpus))  # the failed files' new rows replaced their old ones


def test_manifest_languages_are_per_file_and_a_bad_one_fails_only_its_file(cluster, corpus: Path, tiny_models: Path,
                                                                          tmp_path: Path):
    clips = sorted(str(p) for p in corpus.glob("clip0[12].wav"))
    manifest = tmp_path / "list.csv"
    manifest.write_text(f"path,language,hotwords\n{clips[0]},en,\n{clips[1]},klingon,\n")
    assert corpus_main([str(manifest), "--output-dir", str(tmp_path / "out"), "--model-dir", str(tiny_models),
                        *OPTIONS]) == 1
    english, bad = read_corpus(tmp_path / "out").to_pylist()
    _assert_one_dataset(tmp_path / "out", clips)
    assert english["language"] == "en" and english["error"] is None and english["text"] is not None
    assert bad["error"].startswith(clips[1]) and "klingon" in bad["error"]


def test_diarize_gives_each_segment_its_speaker_and_the_row_the_count(cluster, dialogue: Path, diarize_models: Path,
                                                                      tmp_path: Path):
    """--diarize on the two-voice dialogue (CAM++ beside the model): the row's segments are the 03 script's
    with --diarize, a speaker each, and `speakers` the count; rows without --diarize leave it null."""
    common = ["--model-dir", str(diarize_models), "--gguf", str(diarize_models / "qwen3-0.6b-asr.f32.gguf"),
              "--vad", "fsmn", "--speakers", "2"]
    assert corpus_main([str(dialogue), "--output-dir", str(tmp_path / "out"), *common, *OPTIONS]) == 0
    (row,) = read_corpus(tmp_path / "out").to_pylist()
    assert row["error"] is None and row["speakers"] == 2
    segments = json.loads(row["segments"])
    assert len(segments) == 6 and all(s["speaker"] in (0, 1) for s in segments) and segments[0]["speaker"] == 0
    cmd = [sys.executable, str(ROOT / "03_inference_cpu.py"), str(dialogue), "--format", "json", *common,
           "--max-new-tokens", "8", "--threads", "2", "--quiet", "--batch-invariant"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    cli = json.loads(done.stdout)
    assert segments == cli["segments"] and cli["speakers"] == row["speakers"]


def test_diarize_without_cam_plus_plus_is_a_setup_error_before_ray(dialogue: Path, tiny_models: Path, tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "out"
    assert corpus_main([str(dialogue), "--output-dir", str(out), "--model-dir", str(tiny_models), "--diarize",
                        *OPTIONS]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "campplus.onnx" in err and "--spk-release-dir" in err and "\n" not in err
    assert corpus_main([str(dialogue), "--output-dir", str(out), "--model-dir", str(tiny_models), "--min-speakers", "3",
                        "--max-speakers", "2", *OPTIONS]) == 2
    assert capsys.readouterr().err.startswith("error: --min-speakers 3 --max-speakers 2")
    assert not (out / CONSOLIDATED).exists()


def test_rows_written_before_the_speakers_column_read_as_null(tmp_path: Path):
    """A folder an earlier version wrote (no `speakers` column) merges with this version's parts."""
    import pyarrow as pa

    from funasr_nano.corpus.store import ROW_SCHEMA

    old_schema = pa.schema([f for f in ROW_SCHEMA if f.name != "speakers"])
    old = {k: v for k, v in _row("/a.wav").items() if k != "speakers"}
    pq.write_table(pa.Table.from_pylist([old], schema=old_schema), tmp_path / CONSOLIDATED)
    store = CorpusStore(tmp_path)
    store.prepare()
    store.write_part([{**_row("/b.wav"), "speakers": 3}])
    assert [(r["path"], r["speakers"]) for r in store.consolidate().to_pylist()] == [("/a.wav", None), ("/b.wav", 3)]
    assert pq.read_table(tmp_path / CONSOLIDATED).schema.equals(ROW_SCHEMA)


# ---------------------------------------------------------------------------------------- inputs (no Ray)


def test_inputs_folder_glob_and_manifests(tmp_path: Path):
    for name in ("a.wav", "b.mp3", "deep/c.flac", "deep/readme.md"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"x")
    abs_ = lambda name: str((tmp_path / name).resolve())  # noqa: E731
    assert [f.path for f in collect_inputs([str(tmp_path)])] == [abs_("a.wav"), abs_("b.mp3"), abs_("deep/c.flac")]
    assert [f.path for f in collect_inputs([str(tmp_path / "**" / "*.flac")])] == [abs_("deep/c.flac")]
    (tmp_path / "list.txt").write_text("# corpus\na.wav\n\ndeep/c.flac\na.wav\n")
    assert [f.path for f in collect_inputs([str(tmp_path / "list.txt")])] == [abs_("a.wav"), abs_("deep/c.flac")]
    (tmp_path / "m.csv").write_text("path,language,hotwords\na.wav,en,\nb.mp3,,\"通义,魔搭\"\n")
    assert collect_inputs([str(tmp_path / "m.csv")]) == [AudioFile(abs_("a.wav"), "en", None),
                                                         AudioFile(abs_("b.mp3"), None, "通义,魔搭")]
    (tmp_path / "m.jsonl").write_text('{"path": "deep/c.flac", "language": "zh"}\n')
    assert collect_inputs([str(tmp_path / "m.jsonl")]) == [AudioFile(abs_("deep/c.flac"), "zh", None)]
    # a missing file is that file's failure (an error row); a pattern or manifest that names nothing is the run's
    assert collect_inputs([str(tmp_path / "gone.wav")]) == [AudioFile(abs_("gone.wav"))]
    for bad, message in ((str(tmp_path / "*.ogg"), "matches no file"), (str(tmp_path / "deep" / "x.csv"), "path")):
        if bad.endswith(".csv"):
            Path(bad).write_text("file\na.wav\n")
        with pytest.raises(InputError, match=message):
            collect_inputs([bad])


def test_one_row_per_key_prefers_a_transcript_to_an_error(tmp_path: Path):
    from funasr_nano.corpus.store import ROW_SCHEMA, CorpusStore

    store = CorpusStore(tmp_path)
    store.prepare()
    blank = dict.fromkeys(ROW_SCHEMA.names)
    failed = {**blank, "path": "/a.wav", "size": 1, "mtime_ns": 5, "error": "/a.wav: decoder crashed"}
    done = {**blank, "path": "/a.wav", "size": 1, "mtime_ns": 5, "text": "hello"}
    changed = {**done, "mtime_ns": 6, "text": "hello again"}  # the file changed since: another key
    store.write_part([failed])
    store.write_part([done, changed])
    store.write_part([done])  # the same rows again: the same part name, replaced not added
    assert len(store.part_files()) == 2
    assert [(r["mtime_ns"], r["text"]) for r in store.rows().to_pylist()] == [(5, "hello"), (6, "hello again")]
    assert store.done_keys() == {("/a.wav", 1, 5), ("/a.wav", 1, 6)}
    assert np.all(np.diff(store.consolidate()["mtime_ns"].to_numpy()) > 0)
    # a run whose inputs hold /a.wav as it is now (mtime 6) keeps that file's row only
    assert [r["mtime_ns"] for r in store.consolidate({"/a.wav": ("/a.wav", 1, 6)}).to_pylist()] == [6]
    assert [r["mtime_ns"] for r in pq.read_table(tmp_path).to_pylist()] == [6]


def _row(path: str, error: str | None = None) -> dict:
    from funasr_nano.corpus.store import ROW_SCHEMA

    return {**dict.fromkeys(ROW_SCHEMA.names), "path": path, "size": 1, "mtime_ns": 1,
            "text": None if error else f"text of {path}", "error": error}


def _folder_rows(folder: Path) -> list[tuple[str, str | None]]:
    """(path, error) of each row a reader of the folder gets, pandas and pyarrow.dataset alike."""
    import pandas as pd
    import pyarrow.dataset as ds

    by_arrow = [(r["path"], r["error"]) for r in ds.dataset(folder, format="parquet").to_table().to_pylist()]
    frame = pd.read_parquet(folder)
    assert sorted(frame["path"]) == sorted(p for p, _ in by_arrow)
    return sorted(by_arrow, key=lambda row: (row[0], row[1] or ""))


def test_a_consolidation_cut_short_never_shows_a_row_twice_nor_loses_one(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch):
    store = CorpusStore(tmp_path)
    store.prepare()
    store.write_part([_row("/a.wav"), _row("/b.wav", "/b.wav: not audio")])
    store.consolidate()  # run 1: b failed
    store.write_part([_row("/b.wav")])  # run 2 (b retried, now transcribed; c new), parts not yet merged
    store.write_part([_row("/c.wav")])
    before = [("/a.wav", None), ("/b.wav", "/b.wav: not audio")]
    after = [("/a.wav", None), ("/b.wav", None), ("/c.wav", None)]
    assert _folder_rows(tmp_path) == before  # mid-run: the parts are not part of the dataset yet
    assert [(r["path"], r["error"]) for r in read_corpus(tmp_path).to_pylist()] == after

    def crash(*args, **kwargs):
        raise OSError("killed")

    with monkeypatch.context() as m:  # killed before the merged file replaced the dataset
        m.setattr("funasr_nano.corpus.store.os.replace", crash)
        with pytest.raises(OSError, match="killed"):
            store.consolidate()
    assert _folder_rows(tmp_path) == before and len(store.part_files()) == 2
    with monkeypatch.context() as m:  # killed after it, before the merged parts were deleted
        m.setattr(Path, "unlink", crash)
        with pytest.raises(OSError, match="killed"):
            store.consolidate()
    assert _folder_rows(tmp_path) == after and len(store.part_files()) == 2
    (tmp_path / f".{CONSOLIDATED}.x1.tmp").write_bytes(b"half a dataset")  # and one killed while writing it
    assert [(r["path"], r["error"]) for r in store.consolidate().to_pylist()] == after  # the next run's
    assert _folder_rows(tmp_path) == after and store.part_files() == []
    assert not list(tmp_path.glob(".*.tmp"))


def test_a_folder_of_the_earlier_layout_becomes_one_dataset(tmp_path: Path):
    import pyarrow as pa

    from funasr_nano.corpus.store import ROW_SCHEMA

    (tmp_path / "parts").mkdir()
    (tmp_path / "files").mkdir()
    (tmp_path / "files" / "a.txt").write_text("text of /a.wav\n")
    pq.write_table(pa.Table.from_pylist([_row("/a.wav")], schema=ROW_SCHEMA), tmp_path / CONSOLIDATED)
    pq.write_table(pa.Table.from_pylist([_row("/a.wav"), _row("/b.wav")], schema=ROW_SCHEMA),
                   tmp_path / "parts" / "part-0123.parquet")
    store = CorpusStore(tmp_path)
    assert store.done_keys() == {("/a.wav", 1, 1), ("/b.wav", 1, 1)}  # a resumed run skips both
    store.prepare()
    store.consolidate()
    assert _folder_rows(tmp_path) == [("/a.wav", None), ("/b.wav", None)]
    assert not (tmp_path / "parts").exists() and not (tmp_path / "files").exists()
    assert (tmp_path / FILES / "a.txt").read_text() == "text of /a.wav\n"


def test_the_script_shows_our_lines_only_and_warnings_name_their_file(corpus: Path, tiny_models: Path,
                                                                      tmp_path: Path):
    """07 without --verbose on a fresh local cluster: Ray Data's execution and progress logs stay in
    Ray's log files, the core worker's line about actor arguments is dropped; the workers' warnings (random weights loop) say which file they are about."""
    files = sorted(str(p) for p in corpus.glob("*") if p.suffix in (".wav", ".mp3") and p.stat().st_size > 100)[:2]
    cmd = [sys.executable, str(ROOT / "07_transcribe_corpus.py"), *files, "--output-dir", str(tmp_path / "out"),
           "--model-dir", str(tiny_models), "--num-cpus", "2", "--preset", "cpu", "--threads", "2", "--quiet"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert "corpus done" in done.stdout, done.stderr
    for noise in ("streaming_executor", "logging_progress", "Execution plan", "Running Dataset", "core_worker.cc"):
        assert noise not in done.stderr, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "warning:" in line]
    assert warnings  # random weights loop until the repetition guard stops them
    assert warnings == [line for line in done.stderr.splitlines() if line.strip()], done.stderr  # nothing else
    assert all(any(f in line for f in files) for line in warnings), warnings
