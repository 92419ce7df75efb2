#!/usr/bin/env python3
"""Load benchmark of 05_server.py: concurrent clients, cross-request batching vs one request at a time.

Starts the server twice on a loopback port, `--batch-size` (the preset's server batch unless given)
and `--batch-size 1` (one sequence: what servers without cross-request batching do), and for each
client count (1, 4, 8, 16) runs that many asyncio + httpx clients, each sending `--requests`
requests back to back: the clip, or with `--mixed` a set of 2-30 s clips cut from it (the clip
repeated when shorter). Reported per row: throughput (audio seconds per wall second), p50/p95
latency, the server's peak RSS (psutil, polled), and the scheduler's shared rounds. `--soak S`
then keeps 16 clients busy for S seconds on the batched server and reports RSS over time
(no growth expected).

Random-weight models never stop, so `--force-tokens N` makes every segment decode exactly N tokens
(the 03 scripts' benchmark hook as the minimum, `--max-new-tokens N` as the cap; 20 per VAD segment
of the 10 s clip is about real speech's 4 tokens per second); with real weights leave it at 0.

    python benchmarks/load_server.py --model-dir model-gguf --preset cpu-int8 --force-tokens 0
    python benchmarks/load_server.py --model-dir ~/.cache/funasr-nano-bench/full-seed0/models --force-tokens 20 --mixed --soak 600
    python benchmarks/load_server.py --model-dir /tmp/tiny --clients 1,4 --requests 2 --force-tokens 20   # smoke
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import numpy as np
import psutil
import soundfile as sf

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from testing.server import wait_until_healthy  # noqa: E402

SR = 16000
MIXED_SECONDS = (2, 5, 8, 12, 20, 30)


@dataclass
class Row:
    batch: int
    clients: int
    audio_seconds: float
    wall: float
    latencies: list[float]
    peak_rss_mb: float
    shared_rounds: float
    errors: int = 0

    @property
    def throughput(self) -> float:
        return self.audio_seconds / self.wall if self.wall > 0 else 0.0

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        return float(np.percentile(self.latencies, q))


class RssPeak:
    """Polls a process tree's RSS on a thread; `peak` in MB, `samples` (time, MB)."""

    def __init__(self, pid: int, interval: float = 0.2) -> None:
        self.proc = psutil.Process(pid)
        self.interval, self.peak, self.samples = interval, 0.0, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _rss(self) -> float:
        try:
            procs = [self.proc, *self.proc.children(recursive=True)]
            return sum(p.memory_info().rss for p in procs) / 2**20
        except psutil.Error:
            return 0.0

    def _run(self) -> None:
        t0 = time.monotonic()
        while not self._stop.is_set():
            rss = self._rss()
            self.peak = max(self.peak, rss)
            self.samples.append((time.monotonic() - t0, rss))
            self._stop.wait(self.interval)

    def reset(self) -> None:
        self.peak = self._rss()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


@dataclass
class Server:
    args: argparse.Namespace
    batch: int
    port: int = 0
    proc: subprocess.Popen | None = None
    rss: RssPeak | None = None
    url: str = ""
    log: list[str] = field(default_factory=list)

    def __enter__(self) -> Server:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, str(ROOT / "05_server.py"), "--preset", self.args.preset, "--port", str(self.port),
               "--threads", str(self.args.threads), "--batch-size", str(self.batch), "--max-queue", "64",
               "--log-level", "warning", "--force-tokens", str(self.args.force_tokens)]
        if self.args.no_speculative:
            cmd.append("--no-speculative")
        if self.args.force_tokens > 0:  # exactly that many: random weights would otherwise run to the cap
            cmd += ["--max-new-tokens", str(self.args.force_tokens)]
        if self.args.model_dir:
            cmd += ["--model-dir", str(self.args.model_dir)]
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        if not wait_until_healthy(self.url, self.proc, 600, poll=0.5):
            self.__exit__()
            raise SystemExit(f"server exited with {self.proc.returncode} or did not come up: {' '.join(cmd)}")
        self.rss = RssPeak(self.proc.pid)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rss is not None:
            self.rss.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=120)

    def metric(self, name: str) -> float:
        for line in httpx.get(f"{self.url}/metrics", timeout=10).text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[1])
        return 0.0


def make_clips(clip: Path, mixed: bool) -> list[tuple[bytes, float]]:
    """(wav bytes, seconds) of what the clients send: the clip, or 2-30 s cuts of it (repeated when short)."""
    from funasr_nano.audio.load import load_audio

    wave = load_audio(clip)
    if not mixed:
        return [(clip.read_bytes(), len(wave) / SR)]
    out = []
    for seconds in MIXED_SECONDS:
        n = int(seconds * SR)
        cut = np.tile(wave, n // len(wave) + 1)[:n]
        buf = io.BytesIO()
        sf.write(buf, cut, SR, format="WAV")
        out.append((buf.getvalue(), seconds))
    return out


async def run_clients(url: str, clips: list[tuple[bytes, float]], clients: int, requests: int,
                      until: float | None = None) -> tuple[float, list[float], float, int]:
    """(wall seconds, latencies, audio seconds, errors) of `clients` clients sending `requests` each (or until)."""
    latencies: list[float] = []
    audio = 0.0
    errors = 0

    async def client(index: int) -> None:
        nonlocal audio, errors
        async with httpx.AsyncClient(timeout=httpx.Timeout(3600)) as http:
            n = 0
            while (until is None and n < requests) or (until is not None and time.monotonic() < until):
                body, seconds = clips[(index + n) % len(clips)]
                t0 = time.perf_counter()
                r = await http.post(f"{url}/v1/audio/transcriptions", files={"file": ("clip.wav", body)},
                                    data={"response_format": "json"})
                if r.status_code == 200:
                    latencies.append(time.perf_counter() - t0)
                    audio += seconds
                else:
                    errors += 1
                n += 1

    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(clients)))
    return time.perf_counter() - t0, latencies, audio, errors


def bench(args: argparse.Namespace, clips: list[tuple[bytes, float]], batches: list[int]) -> list[Row]:
    rows: list[Row] = []
    for batch in batches:
        with Server(args, batch) as server:
            asyncio.run(run_clients(server.url, clips[:1], 1, 1))  # warm-up
            for clients in args.clients:
                assert server.rss is not None
                server.rss.reset()
                shared = server.metric("funasr_shared_rounds_total")
                wall, latencies, audio, errors = asyncio.run(run_clients(server.url, clips, clients, args.requests))
                row = Row(batch, clients, audio, wall, latencies, server.rss.peak,
                          server.metric("funasr_shared_rounds_total") - shared, errors)
                rows.append(row)
                print(f"batch {batch:>2}, {clients:>2} clients: {row.throughput:6.2f} audio s/s, "
                      f"p50 {row.percentile(50):6.2f} s, p95 {row.percentile(95):6.2f} s, "
                      f"peak RSS {row.peak_rss_mb:7.0f} MB, shared rounds {row.shared_rounds:.0f}, errors {errors}",
                      flush=True)
    return rows


def soak(args: argparse.Namespace, clips: list[tuple[bytes, float]], batch: int) -> list[tuple[float, float]]:
    """RSS samples (seconds, MB) while 16 clients keep the batched server busy for `--soak` seconds."""
    with Server(args, batch) as server:
        until = time.monotonic() + args.soak
        wall, latencies, audio, errors = asyncio.run(run_clients(server.url, clips, 16, 0, until=until))
        assert server.rss is not None
        samples = server.rss.samples
    print(f"soak {args.soak:.0f} s at batch {batch}: {len(latencies)} requests, {errors} errors, "
          f"RSS first minute max {max((m for t, m in samples if t < 60), default=0):.0f} MB, "
          f"last minute max {max((m for t, m in samples if t >= samples[-1][0] - 60), default=0):.0f} MB")
    return samples


def table(rows: list[Row]) -> str:
    lines = ["| max batch | clients | audio s / wall s | p50 latency s | p95 latency s | peak RSS MB | shared rounds |",
             "|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r.batch} | {r.clients} | {r.throughput:.2f} | {r.percentile(50):.2f} | "
                     f"{r.percentile(95):.2f} | {r.peak_rss_mb:.0f} | {r.shared_rounds:.0f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    from funasr_nano.presets import PRESETS

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model-dir", type=Path, default=None)
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu-int8")
    p.add_argument("--clip", type=Path, default=ROOT.parent / "shared" / "audio" / "zh_news_10s.mp3")
    p.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 4, 8, 16])
    p.add_argument("--requests", type=int, default=4, help="requests per client (default: 4)")
    p.add_argument("--batch-size", type=int, default=None, help="the batched server's --batch-size (default: preset's)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--force-tokens", type=int, default=0, help="tokens every segment decodes (random weights)")
    p.add_argument("--no-speculative", action="store_true",
                   help="both servers decode plain greedy (random weights make every CTC draft wrong)")
    p.add_argument("--mixed", action="store_true", help="also run the mixed 2-30 s clip set")
    p.add_argument("--soak", type=float, default=0.0, help="seconds of 16-client soak on the batched server")
    p.add_argument("--json", type=Path, default=None, help="write the rows here")
    args = p.parse_args(argv)

    batch = args.batch_size or PRESETS[args.preset].server_batch
    report: dict[str, object] = {}
    for name, mixed in (("clip", False), ("mixed", True)) if args.mixed else (("clip", False),):
        print(f"== {name}", flush=True)
        rows = bench(args, make_clips(args.clip, mixed), [batch, 1])
        print(table(rows))
        report[name] = [r.__dict__ | {"throughput": r.throughput, "p50": r.percentile(50), "p95": r.percentile(95)}
                        for r in rows]
    if args.soak > 0:
        report["soak_rss"] = soak(args, make_clips(args.clip, args.mixed), batch)
    if args.json:
        args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
