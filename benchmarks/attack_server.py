#!/usr/bin/env python3
"""Replay hostile and careless clients against a running 05_server.py and print what each got.

The attacks of the server's hardening (tests/test_server_hardening.py runs the same ones through
`testing/attacks.py`, with assertions): a header-breaking `model` field, audio whose header lies
about its length (silence and noise), a client that leaves mid-transcription, slow uploads,
slowloris connections, simultaneous WebSocket connects, a WebSocket client that never reads,
bad WebSocket settings, a page of another origin, an absurd sample rate. After each one the
server must still answer `/health` with nothing in flight.

Every loop is bounded in count and time. Only loopback addresses are accepted: point it at a
server of your own on this machine.

    python 05_server.py --model-dir model-gguf --api-key k --max-audio-seconds 60 &
    python benchmarks/attack_server.py --url http://127.0.0.1:8000 --api-key k --pid $!
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import numpy as np
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from testing import attacks  # noqa: E402


class Target:
    def __init__(self, url: str, key: str | None, pid: int | None) -> None:
        parts = urlsplit(url)
        self.url, self.host, self.port = url.rstrip("/"), parts.hostname or "127.0.0.1", parts.port or 80
        self.key, self.pid = key, pid
        self.auth = {"Authorization": f"Bearer {key}"} if key else {}
        self.ws = f"ws://{self.host}:{self.port}/v1/realtime?intent=transcription"

    def post(self, path: Path, timeout: float = 300, headers: dict | None = None, **fields: str) -> httpx.Response:
        with open(path, "rb") as f:
            return httpx.post(f"{self.url}/v1/audio/transcriptions", headers={**self.auth, **(headers or {})},
                              data=fields or {"model": "x"}, files={"file": (path.name, f.read())}, timeout=timeout)

    def health(self) -> str:
        try:
            response = httpx.get(f"{self.url}/health", timeout=10)
        except httpx.HTTPError as exc:
            return f"/health failed: {type(exc).__name__}"
        if response.status_code != 200:
            return f"/health {response.status_code}"
        return f"/health 200, in_flight {response.json().get('in_flight')}"

    def cpu_seconds(self, window: float) -> str:
        if self.pid is None:
            return "(no --pid: CPU not measured)"
        import psutil

        proc = psutil.Process(self.pid)
        before = proc.cpu_times()
        time.sleep(window)
        after = proc.cpu_times()
        used = max(0.0, after.user + after.system - before.user - before.system)
        return f"server CPU {used:.2f} s in the next {window:g} s"


def _answer(response: httpx.Response) -> str:
    try:
        error = response.json().get("error") or {}
    except (ValueError, AttributeError):
        error = {}
    return f"{response.status_code} {error.get('code', '')}".strip()


def run_attacks(target: Target, folder: Path) -> list[tuple[str, str, float]]:
    speech = folder / "tone.wav"
    t = np.arange(3 * 16000) / 16000
    sf.write(speech, (0.1 * np.sin(2 * np.pi * 220 * t)).astype(np.float32), 16000)
    rows: list[tuple[str, str, float]] = []

    def attack(name: str, action: Callable[[], str]) -> None:
        t0 = time.monotonic()
        try:
            result = action()
        except Exception as exc:  # noqa: BLE001 - reported as what the attack got
            result = f"client error: {type(exc).__name__}: {exc}"
        elapsed = time.monotonic() - t0
        rows.append((name, f"{result}; then {target.health()}", elapsed))
        print(f"{name}: {rows[-1][1]} ({elapsed:.1f} s)", file=sys.stderr)

    attack("newline in `model`, streamed, x64", lambda: ", ".join(sorted({
        _answer(target.post(speech, model="a\nb", stream="true")) for _ in range(64)})))
    attack("non-Latin-1 `model`", lambda: _answer(target.post(speech, model="模型")))
    # 8 kHz A-law is 8 KB a second: the files stay under the upload limit while they outlast the audio limit
    limits = httpx.get(f"{target.url}/health", timeout=10).json().get("limits", {})
    limit = float(limits.get("max_audio_seconds", 1800))
    bytes_cap = int(limits.get("max_upload_bytes", 25 * 2**20))
    over = int(min(limit + 60, bytes_cap / 8000 - 10))
    silence = attacks.lying_mkv(folder / "silence.mkv", "anullsrc=r=8000:cl=mono", over, 10)
    noise = attacks.lying_mkv(folder / "noise.mkv", "anoisesrc=a=0.003:r=8000:c=white", over, 10)
    attack(f"header says 10 s, holds {over} s of silence", lambda: _answer(target.post(silence)))
    attack(f"header says 10 s, holds {over} s of noise", lambda: _answer(target.post(noise)))
    within = attacks.lying_mkv(folder / "within.mkv", "anoisesrc=a=0.003:r=8000:c=white", int(min(limit, over) - 5),
                               10)

    def leave() -> str:
        try:
            target.post(within, timeout=2.0)
            return "answered within 2 s (file too short to test leaving)"
        except httpx.ReadTimeout:
            pass
        time.sleep(1.0)
        return f"client left after 2 s; {target.cpu_seconds(1.0)}"

    attack("client leaves mid-transcription", leave)
    one_hz = folder / "one_hz.wav"
    sf.write(one_hz, np.zeros(15, np.int16), 1, subtype="PCM_16")
    attack("WAV at 1 Hz", lambda: _answer(target.post(one_hz)))

    def slow_uploads() -> str:
        socks = [attacks.slow_upload(target.host, target.port, target.key) for _ in range(64)]
        statuses = [attacks.status_of(s, trickle=True, limit_seconds=200) for s in socks]
        return "statuses " + ", ".join(f"{s} x{statuses.count(s)}" for s in sorted(set(statuses)))

    attack("64 uploads at 1 byte/s", slow_uploads)

    def slowloris() -> str:
        socks = [attacks.incomplete_headers(target.host, target.port) for _ in range(200)]
        health = target.health()
        waits = [attacks.seconds_until_closed(s, 30) for s in socks]
        closed = [w for w in waits if w is not None]
        longest = f", the last after {max(closed):.1f} s" if closed else ""
        return f"during: {health}; {len(closed)} of 200 closed by the server within 30 s{longest}"

    attack("200 connections with incomplete headers", slowloris)
    attack("100 simultaneous WebSocket connects", lambda: ", ".join(
        f"{code} x{n}" for code, n in _counts(asyncio.run(attacks.first_events(target.ws, 100, target.auth)))))

    def non_reader() -> str:
        dropped, sent = attacks.spam_without_reading(attacks.websocket_handshake(target.host, target.port,
                                                                                target.key))
        return f"{'dropped' if dropped else 'NOT dropped'} after {sent} invalid frames"

    attack("WebSocket client that never reads", non_reader)

    def bad_settings() -> str:
        events = asyncio.run(attacks.session_events(target.ws, [
            attacks.session_update({"prompt": "x" * 10_000}),
            attacks.session_update({"language": ["zh"]}),
            "[" * 100_000 + "]" * 100_000,
            json.dumps({"type": "input_audio_buffer.clear"}),
        ], target.auth))
        return ", ".join(e["error"]["code"] if e["type"] == "error" else e["type"] for e in events)

    attack("WebSocket: long prompt, list language, deep JSON, clear", bad_settings)
    attack("POST from a page of another origin", lambda: _answer(target.post(speech, headers={
        "Origin": "https://evil.example"})))
    attack("/docs, /redoc, /openapi.json without a key", lambda: ", ".join(
        f"{p} {httpx.get(target.url + p, timeout=10).status_code}" for p in ("/docs", "/redoc", "/openapi.json")))
    attack("a normal request after all that", lambda: _answer(target.post(speech)))
    return rows


def _counts(items: list[str]) -> list[tuple[str, int]]:
    return [(item, items.count(item)) for item in sorted(set(items))]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--url", default="http://127.0.0.1:8000", help="the server (loopback only)")
    p.add_argument("--api-key", default=None, help="the server's --api-key, if any")
    p.add_argument("--pid", type=int, default=None, help="the server's process id: report its CPU after a client leaves")
    args = p.parse_args(argv)
    host = urlsplit(args.url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        print(f"error: {host} is not a loopback address: attack only a server of your own on this machine",
              file=sys.stderr)
        return 2
    with tempfile.TemporaryDirectory() as folder:
        rows = run_attacks(Target(args.url, args.api_key, args.pid), Path(folder))
    print("| attack | what the server did | seconds |\n|---|---|---|")
    for name, result, elapsed in rows:
        print(f"| {name} | {result} | {elapsed:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
