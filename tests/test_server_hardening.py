"""05_server.py against hostile and careless clients: nothing a client sends may lock, starve or
outlast the server.

Each test replays one attack against a live server (a uvicorn child process on a loopback port,
the tiny exported model) and checks what the server gave back: its queue slots, its temporary
uploads, its CPU, its memory, its connections. `benchmarks/attack_server.py` replays the same
attacks against any running server and prints what each got.
"""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import time
from pathlib import Path

import httpx
import numpy as np
import psutil
import pytest
import soundfile as sf

from testing import attacks
from tests.server_process import KEY, Server

AUTH = {"Authorization": f"Bearer {KEY}"}
ALLOWED = "https://allowed.example"
SR = 16000


# ------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def inputs(zh_mp3: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    folder = tmp_path_factory.mktemp("attacks")
    out = {"speech": folder / "speech.wav"}
    from funasr_nano.audio.load import load_audio

    sf.write(out["speech"], load_audio(zh_mp3)[: 3 * SR], SR)
    out["silence_bomb"] = attacks.lying_mkv(folder / "silence.mkv", "anullsrc=r=8000:cl=mono", 1800, 10)
    out["noise_bomb"] = attacks.lying_mkv(folder / "noise.mkv", "anoisesrc=a=0.003:r=8000:c=white", 1800, 10)
    out["long_silence"] = folder / "long_silence.mkv"  # honest, long: for cancellation
    attacks.ffmpeg("-f", "lavfi", "-i", "anoisesrc=a=0.002:r=8000:c=white", "-t", "3000", "-ac", "1", "-c:a", "pcm_alaw",
            str(out["long_silence"]))
    out["one_hz"] = folder / "one_hz.wav"
    sf.write(out["one_hz"], np.zeros(15, np.int16), 1, subtype="PCM_16")  # 15 s at 1 Hz, under the limit
    out["flac_unknown_length"] = folder / "streamed.flac"  # written to a pipe: no length in its header
    with open(out["flac_unknown_length"], "wb") as f:
        subprocess.run(["ffmpeg", "-loglevel", "error", "-i", str(out["speech"]), "-f", "flac", "pipe:1"],
                       stdout=f, check=True, timeout=60)
    return out


def _uploads(folder: Path, pid: int | None = None) -> list[Path]:
    return sorted(folder.glob(f"funasr-upload-{pid}-*" if pid else "funasr-upload-*"))


def _error(response: httpx.Response, status: int, code: str) -> dict:
    assert response.status_code == status, (response.status_code, response.text)
    body = response.json()["error"]
    assert body["code"] == code, body
    assert "\n" not in body["message"]
    return body


def _cpu_seconds(srv: Server, window: float) -> float:
    """CPU seconds the server process (all its threads) used over the next `window` seconds."""
    proc = psutil.Process(srv.proc.pid)
    before = proc.cpu_times()
    time.sleep(window)
    after = proc.cpu_times()
    return (after.user + after.system) - (before.user + before.system)


def _post(srv: Server, path: Path, timeout: float = 120, headers: dict | None = None, **data: str) -> httpx.Response:
    with open(path, "rb") as f:
        return httpx.post(f"{srv.url}/v1/audio/transcriptions", headers=AUTH if headers is None else headers,
                          data=data or {"model": "x"}, files={"file": (path.name, f.read())}, timeout=timeout)


# ------------------------------------------------------------------ servers


@pytest.fixture(scope="module")
def tmpdir_of_server(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("server-tmp")
    # what a server killed with SIGKILL leaves: its pid no longer runs
    dead = subprocess.Popen(["true"])
    dead.wait()
    (folder / f"funasr-upload-{dead.pid}-abc.wav").write_bytes(b"left behind")
    return folder


@pytest.fixture(scope="module")
def hard_server(tiny_models: Path, tmpdir_of_server: Path):
    srv = Server(tiny_models, "--api-key", KEY, "--max-queue", "6", "--max-slow-uploads", "2", "--upload-timeout", "3",
                 "--header-timeout", "2", "--max-connections", "40", "--max-streams", "2",
                 "--max-audio-seconds", "20", "--max-prompt-chars", "40", "--allowed-origins", ALLOWED,
                 "--max-upload-mb", "40", env={"TMPDIR": str(tmpdir_of_server)})
    yield srv
    assert srv.stop() in (0, -15), srv.output()
    log = srv.output()
    assert "Traceback" not in log and "never retrieved" not in log, log
    assert "socket.send() raised exception" not in log, log  # nothing written to dropped connections
    assert not _uploads(tmpdir_of_server), "temporary uploads left after shutdown"


@pytest.fixture(scope="module")
def slow_server(tiny_models: Path, tmp_path_factory: pytest.TempPathFactory):
    """Long audio accepted and a short --timeout: the work a request leaves behind shows as CPU."""
    folder = tmp_path_factory.mktemp("slow-tmp")
    srv = Server(tiny_models, "--max-queue", "4", "--max-audio-seconds", "100000", "--timeout", "3",
                 "--max-upload-mb", "40", env={"TMPDIR": str(folder)})
    srv.tmpdir = folder
    yield srv
    srv.stop()
    log = srv.output()
    assert "Traceback" not in log and "never retrieved" not in log, log


# ------------------------------------------------------------------ 1. the model field and the response header


def test_a_header_breaking_model_name_is_refused_and_frees_everything(hard_server, inputs, tmpdir_of_server):
    srv = hard_server
    for stream in ("true", "false"):
        for model in ("fun\nasr", "a\r\nX-Injected: 1", "模型", "x" * 500):
            body = _error(_post(srv, inputs["speech"], model=model, stream=stream), 400, "invalid_value")
            assert body["param"] == "model"
    # more such requests than the queue holds: none keeps its slot or its upload
    for _ in range(10):
        _error(_post(srv, inputs["speech"], model="a\nb", stream="true"), 400, "invalid_value")
    assert srv.metric("funasr_requests_in_progress") == 0
    assert not _uploads(tmpdir_of_server, srv.proc.pid)
    response = _post(srv, inputs["speech"], model="whisper-1", stream="true")
    assert response.status_code == 200 and response.headers["openai-model"] == "whisper-1"
    assert '"type": "transcript.text.done"' in response.text or "transcript.text.done" in response.text


def test_a_streamed_response_that_fails_before_its_body_still_releases():
    """The mechanism behind the lock: the HTTP layer refuses the headers, the body never starts."""
    from funasr_nano.server.app import _OwningStream

    released = []

    async def body():
        yield b"never"

    async def refuse(message):
        raise RuntimeError("headers refused")

    async def receive():
        return {"type": "http.disconnect"}

    response = _OwningStream(body(), lambda: released.append(1), media_type="text/event-stream")
    with pytest.raises(RuntimeError):
        asyncio.run(response({"type": "http", "asgi": {"spec_version": "2.4"}}, receive, refuse))
    assert released == [1]


def test_uploads_of_killed_servers_are_removed_at_start(hard_server, tmpdir_of_server):
    assert not list(tmpdir_of_server.glob("funasr-upload-*-abc.wav"))


# ------------------------------------------------------------------ 2. length-lying audio, orphaned work


@pytest.mark.parametrize("bomb", ["silence_bomb", "noise_bomb"])
def test_audio_whose_header_lies_stops_at_the_limit_of_decoded_audio(hard_server, inputs, bomb):
    """10 s in the header, 30 min inside: refused once 20 s (--max-audio-seconds) are decoded."""
    t0 = time.monotonic()
    body = _error(_post(hard_server, inputs[bomb]), 413, "audio_too_long")
    elapsed = time.monotonic() - t0
    assert "goes on past the limit" in body["message"]  # stopped by the decoded amount, not a header
    assert elapsed < 15, elapsed  # decoding the whole file and its VAD took minutes before
    assert hard_server.idle(5)


def test_an_absurd_sample_rate_is_refused_not_expanded(hard_server, inputs):
    body = _error(_post(hard_server, inputs["one_hz"]), 400, "invalid_audio")
    assert "sample rate" in body["message"]


def test_a_flac_of_unknown_length_is_transcribed(hard_server, inputs):
    response = _post(hard_server, inputs["flac_unknown_length"])
    assert response.status_code == 200, response.text


def test_a_client_that_goes_away_stops_its_work_within_a_second(slow_server, inputs):
    srv = slow_server
    assert _cpu_seconds(srv, 1.0) < 0.3  # idle to start with
    with open(inputs["long_silence"], "rb") as f, pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{srv.url}/v1/audio/transcriptions", files={"file": ("long.mkv", f.read())},
                   timeout=httpx.Timeout(60, read=2.0))  # gives up while the server reads 50 minutes of noise
    time.sleep(1.0)  # the disconnect is noticed within DISCONNECT_POLL_SECONDS, then the next block
    assert _cpu_seconds(srv, 1.0) < 0.3
    assert srv.idle(2)
    assert not _uploads(srv.tmpdir, srv.proc.pid)


def test_a_timed_out_request_stops_its_work_and_frees_its_worker(slow_server, inputs):
    srv = slow_server
    for _ in range(5):  # more than --max-queue: orphans would fill the worker pool
        _error(_post(srv, inputs["long_silence"], headers={}), 504, "timeout")
        time.sleep(1.0)
        assert _cpu_seconds(srv, 1.0) < 0.3
    assert _post(srv, inputs["speech"], headers={}).status_code == 200


# ------------------------------------------------------------------ 3. slow uploads


def test_slow_uploads_hold_a_bounded_share_of_the_queue_and_time_out(hard_server, inputs):
    srv = hard_server
    t0 = time.monotonic()
    slow = [attacks.slow_upload("127.0.0.1", srv.port, KEY) for _ in range(4)]
    statuses = [attacks.status_of(sock, trickle=True) for sock in slow]
    # --max-slow-uploads 2 of the 6 places: the others are refused after 2 s, the two time out (--upload-timeout 3)
    assert sorted(statuses) == [408, 408, 503, 503], statuses
    assert time.monotonic() - t0 < 10
    assert srv.idle(5)
    assert _post(srv, inputs["speech"], timeout=60).status_code == 200


# ------------------------------------------------------------------ 4, 5. WebSocket limits, headers, connections


def test_simultaneous_websocket_connects_get_exactly_max_streams(hard_server):
    url = f"ws://127.0.0.1:{hard_server.port}/v1/realtime?intent=transcription"
    answers = asyncio.run(attacks.first_events(url, 12, AUTH))
    assert answers.count("session.created") == 2, answers  # --max-streams 2
    assert answers.count("too_many_sessions") == 10, answers
    time.sleep(1.0)
    assert asyncio.run(attacks.first_events(url, 1, AUTH)) == ["session.created"]  # the places came back


def test_incomplete_request_headers_time_out(hard_server):
    waited = attacks.seconds_until_closed(attacks.incomplete_headers("127.0.0.1", hard_server.port), 10)
    assert waited is not None and waited < 5  # --header-timeout 2


def test_connections_beyond_the_cap_are_closed_and_health_answers_after(hard_server):
    socks = []
    for _ in range(60):  # --max-connections 40
        try:
            socks.append(socket.create_connection(("127.0.0.1", hard_server.port), timeout=10))
        except OSError:
            break
    closed = 0
    for sock in socks:
        sock.settimeout(6)
        try:
            closed += sock.recv(1) == b""
        except OSError:
            closed += 1
        sock.close()
    assert closed == len(socks)  # the extra ones at once, the rest at the header deadline
    assert httpx.get(f"{hard_server.url}/health", timeout=10).status_code == 200


def test_a_websocket_client_that_never_reads_is_closed_with_memory_bounded(hard_server):
    srv = hard_server
    rss_before = psutil.Process(srv.proc.pid).memory_info().rss
    dropped, sent = attacks.spam_without_reading(attacks.websocket_handshake("127.0.0.1", srv.port, KEY))
    rss_after = psutil.Process(srv.proc.pid).memory_info().rss
    assert dropped, f"still open after {sent} invalid frames"
    assert rss_after - rss_before < 100 * 2**20, (rss_before, rss_after)
    url = f"ws://127.0.0.1:{srv.port}/v1/realtime"
    assert asyncio.run(attacks.first_events(url, 1, AUTH)) == ["session.created"]


def test_websocket_bad_settings_get_one_line_errors_without_server_paths(hard_server, tiny_models):
    url = f"ws://127.0.0.1:{hard_server.port}/v1/realtime?intent=transcription"

    update = attacks.session_update
    events = asyncio.run(attacks.session_events(url, headers=AUTH, messages=[
        update({"prompt": "hot," * 30}),  # 120 characters, --max-prompt-chars 40
        update({"language": ["zh", "en"]}),
        "[" * 100_000 + "]" * 100_000,  # nested deeper than Python's recursion limit
        json.dumps({"type": "input_audio_buffer.clear"}),
        update({"prompt": "ok"}),
    ]))
    assert events[0]["type"] == "session.created"
    errors = [e["error"] for e in events if e["type"] == "error"]
    assert [e["code"] for e in errors] == ["invalid_value", "invalid_value", "invalid_json", "session_not_configured"]
    assert "--max-prompt-chars" in errors[0]["message"] and errors[0]["param"] == "transcription.prompt"
    assert "must be a string" in errors[1]["message"]
    assert events[-1]["type"] == "session.updated"  # the session went on
    for event in events:
        text = json.dumps(event, ensure_ascii=False)
        assert str(tiny_models) not in text and "/tmp" not in text and "'list' object" not in text
    cleared = asyncio.run(attacks.session_events(url, [update({}), json.dumps({"type": "input_audio_buffer.clear"})],
                                                 AUTH))
    assert [e["type"] for e in cleared][-2:] == ["session.updated", "input_audio_buffer.cleared"]


# ------------------------------------------------------------------ 6. documentation pages, page headers, origins


def test_api_docs_need_the_key_and_load_nothing_from_cdns(hard_server):
    url = hard_server.url
    for path in ("/docs", "/redoc"):
        assert httpx.get(url + path, timeout=10).status_code == 404
    _error(httpx.get(url + "/openapi.json", timeout=10), 401, "invalid_api_key")
    schema = httpx.get(url + "/openapi.json", headers=AUTH, timeout=10)
    assert schema.status_code == 200 and "/v1/audio/transcriptions" in schema.json()["paths"]


def test_the_page_is_served_with_security_headers(hard_server):
    page = httpx.get(hard_server.url + "/", timeout=10)
    assert page.status_code == 200
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    policy = page.headers["content-security-policy"]
    assert "default-src 'self'" in policy and "frame-ancestors 'none'" in policy
    assert "x-content-type-options" in httpx.get(hard_server.url + "/health", timeout=10).headers


def test_pages_of_other_origins_are_refused_unless_allowed(hard_server, inputs):
    srv = hard_server
    _error(_post(srv, inputs["speech"], headers={**AUTH, "Origin": "https://evil.example"}), 403,
           "origin_not_allowed")
    assert _post(srv, inputs["speech"], headers={**AUTH, "Origin": ALLOWED}).status_code == 200
    assert _post(srv, inputs["speech"], headers={**AUTH, "Origin": srv.url}).status_code == 200  # the page's own
    preflight = httpx.options(f"{srv.url}/v1/audio/transcriptions", timeout=10, headers={
        "Origin": ALLOWED, "Access-Control-Request-Method": "POST"})
    assert preflight.headers.get("access-control-allow-origin") == ALLOWED
    url = f"ws://127.0.0.1:{srv.port}/v1/realtime?intent=transcription"
    refused = asyncio.run(attacks.session_events(url, [], AUTH, origin="https://evil.example"))
    assert refused[0]["type"] == "error" and refused[0]["error"]["code"] == "origin_not_allowed"
    assert asyncio.run(attacks.session_events(url, [], AUTH, origin=ALLOWED))[0]["type"] == "session.created"
    assert asyncio.run(attacks.session_events(url, [], AUTH, origin=srv.url))[0]["type"] == "session.created"


def test_retry_after_follows_the_rate_requests_finish():
    from funasr_nano.server.limits import RETRY_AFTER_UNKNOWN, Admission

    admission = Admission(max_queue=4, ready=True)
    slots = [admission.enter() for _ in range(4)]
    assert admission.retry_after() == RETRY_AFTER_UNKNOWN  # nothing finished yet: no rate
    for slot in slots[:2]:
        slot.release()
    admission._finished.clear()
    admission._finished.extend([0.0, 9.0, 18.0])  # one request finished every 9 s
    slots += [admission.enter(), admission.enter()]
    assert admission.in_flight == 4 and admission.retry_after() == 36
