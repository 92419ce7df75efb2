"""A 05_server.py child process on a free loopback port, for the server and page tests."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from testing.server import wait_until_healthy

ROOT = Path(__file__).resolve().parent.parent
KEY = "test-key"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A 05_server.py child process; `stop()` sends SIGTERM and returns its exit code.

    With --batch-invariant, as `cli_text`: llama.cpp computes a sequence left alone with one row
    in a micro-batch apart from batched rows (`funasr_nano.decoding.rounds`), so without it a request's
    text could depend on which other requests were decoding beside it, and the tests compare texts
    across such timings."""

    def __init__(self, models: Path, *extra: str, batch_invariant: bool = True,
                 env: dict[str, str] | None = None) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(models.parent / f"server-{self.port}.log", "w+")  # noqa: SIM115
        cmd = [sys.executable, str(ROOT / "05_server.py"), "--preset", "cpu", "--model-dir", str(models),
               "--port", str(self.port), "--threads", "2", "--log-level", "warning", *extra]
        if batch_invariant:
            cmd.append("--batch-invariant")
        env = {**{k: v for k, v in os.environ.items() if k != "FUNASR_API_KEY"}, **(env or {})}
        self.proc = subprocess.Popen(cmd, cwd=ROOT, stdout=self.log, stderr=subprocess.STDOUT, env=env)
        if not wait_until_healthy(self.url, self.proc, 120):
            self.stop()
            pytest.fail(f"server did not become healthy: {self.output()}")

    def client(self, key: str | None = KEY, **kwargs):  # noqa: ANN201 - an openai.OpenAI
        import openai

        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=key or "none", max_retries=0, **kwargs)

    def metric(self, name: str) -> float:
        text = httpx.get(f"{self.url}/metrics", timeout=10).text
        match = re.search(rf"^{name}(?:\{{\}})? (\S+)$", text, re.M)
        return float(match.group(1)) if match else 0.0

    def idle(self, seconds: float = 20) -> bool:
        """Whether no request is in progress and no sequence decoding, within `seconds`."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            if self.metric("funasr_requests_in_progress") == 0 and self.metric("funasr_sequences_in_flight") == 0:
                return True
            time.sleep(0.1)
        return False

    def output(self) -> str:
        self.log.flush()
        self.log.seek(0)
        return self.log.read()

    def stop(self) -> int:
        """SIGTERM; 0 or -SIGTERM (uvicorn re-raises the signal once its graceful shutdown is done)."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode
