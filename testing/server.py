"""Waiting for a 05_server.py child process to come up (the server tests and the load benchmark)."""

from __future__ import annotations

import subprocess
import time

import httpx


def wait_until_healthy(url: str, proc: subprocess.Popen, timeout: float, poll: float = 0.3) -> bool:
    """True once `GET {url}/health` answers 200; False if `proc` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return True
        except httpx.HTTPError:
            pass
        time.sleep(poll)
    return False
