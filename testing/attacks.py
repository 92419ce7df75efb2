"""Hostile and careless clients of 05_server.py, as plain functions: the hardening tests and
`benchmarks/attack_server.py` replay the same attacks with them.

Every function is bounded in time and in what it sends; none needs more than the standard
library, httpx, websockets and the ffmpeg command line (for the length-lying files).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import socket
import struct
import subprocess
import time
from pathlib import Path


def ffmpeg(*args: str) -> None:
    subprocess.run(["ffmpeg", "-loglevel", "error", "-y", *args], check=True, timeout=120)


def lying_mkv(path: Path, source: str, seconds: int, claimed_seconds: float) -> Path:
    """A Matroska file of `seconds` of 8 kHz A-law `source` (an ffmpeg lavfi source, e.g.
    `anullsrc=r=8000:cl=mono`) whose header says it lasts `claimed_seconds` (Duration patched)."""
    ffmpeg("-f", "lavfi", "-i", source, "-t", str(seconds), "-ac", "1", "-c:a", "pcm_alaw", str(path))
    data = bytearray(path.read_bytes())
    at = data.find(b"\x44\x89\x88")  # Duration: an 8-byte float in TimecodeScale units (ms)
    if at < 0:
        raise RuntimeError(f"{path}: no Duration element to patch")
    data[at + 3:at + 11] = struct.pack(">d", claimed_seconds * 1000.0)
    path.write_bytes(bytes(data))
    return path


def slow_upload(host: str, port: int, key: str | None = None, declared_bytes: int = 100_000) -> socket.socket:
    """A multipart POST whose headers arrive whole and whose body has only begun (see `status_of`)."""
    boundary = "b0undary"
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"a.wav\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall((f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}:{port}\r\n{auth}"
                  f"Content-Type: multipart/form-data; boundary={boundary}\r\n"
                  f"Content-Length: {declared_bytes}\r\n\r\n").encode() + part)
    return sock


def status_of(sock: socket.socket, trickle: bool, limit_seconds: float = 60) -> int:
    """The HTTP status the server answers on `sock` (0: closed without one), sending a byte a
    second meanwhile when `trickle`; closes the socket."""
    sock.settimeout(1.0)
    data = b""
    deadline = time.monotonic() + limit_seconds
    while b"\r\n" not in data and time.monotonic() < deadline:
        try:
            chunk = sock.recv(4096)
        except TimeoutError:
            if trickle:
                try:
                    sock.sendall(b"x")
                except OSError:
                    pass
            continue
        except OSError:
            break
        if not chunk:
            break
        data += chunk
    sock.close()
    return int(data.split(b" ", 2)[1]) if data.startswith(b"HTTP/1.1 ") else 0


def incomplete_headers(host: str, port: int) -> socket.socket:
    """A connection that sends part of a request's headers and nothing more (slowloris)."""
    sock = socket.create_connection((host, port), timeout=30)
    sock.sendall(f"POST /v1/audio/transcriptions HTTP/1.1\r\nHost: {host}\r\n".encode())
    return sock


def seconds_until_closed(sock: socket.socket, limit_seconds: float) -> float | None:
    """How long until the server closes `sock` (None: still open after `limit_seconds`); closes it."""
    t0 = time.monotonic()
    sock.settimeout(limit_seconds)
    try:
        closed = sock.recv(1) == b""
    except TimeoutError:
        closed = False
    except OSError:
        closed = True
    sock.close()
    return time.monotonic() - t0 if closed else None


def websocket_handshake(host: str, port: int, key: str | None = None, rcvbuf: int = 4096) -> socket.socket:
    """A raw WebSocket connection to /v1/realtime with a small receive buffer (a client that reads
    nothing then fills up fast)."""
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.settimeout(30)
    sock.connect((host, port))
    nonce = base64.b64encode(os.urandom(16)).decode()
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    sock.sendall((f"GET /v1/realtime?intent=transcription HTTP/1.1\r\nHost: {host}:{port}\r\n"
                  f"Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {nonce}\r\n"
                  f"Sec-WebSocket-Version: 13\r\n{auth}\r\n").encode())
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(1)
        if not chunk:
            raise ConnectionError("closed during the WebSocket handshake")
        data += chunk
    if not data.startswith(b"HTTP/1.1 101"):
        raise ConnectionError(f"WebSocket refused: {data.splitlines()[0]!r}")
    return sock


def text_frame(text: str) -> bytes:
    """One masked WebSocket text frame (a client's), payload under 126 bytes."""
    payload = text.encode()
    if len(payload) >= 126:
        raise ValueError("short frames only")
    mask = os.urandom(4)
    return bytes([0x81, 0x80 | len(payload)]) + mask + bytes(b ^ mask[i % 4] for i, b in enumerate(payload))


def spam_without_reading(sock: socket.socket, limit_frames: int = 2_000_000, limit_seconds: float = 60) -> tuple[
        bool, int]:
    """Send invalid one-byte frames and never read; (whether the server dropped us, frames sent)."""
    sock.settimeout(0.5)
    burst = text_frame("x") * 100
    sent = 0
    deadline = time.monotonic() + limit_seconds
    try:
        while time.monotonic() < deadline and sent < limit_frames:
            try:
                sock.sendall(burst)
                sent += 100
            except TimeoutError:
                continue  # the server stopped reading: it should drop us soon
            except OSError:
                return True, sent
        return False, sent
    finally:
        sock.close()


async def first_events(url: str, n: int, headers: dict[str, str] | None = None) -> list[str]:
    """Open `n` WebSocket connections at once; each one's first event (its type, or its error code)."""
    import websockets

    async def first(connection) -> dict:  # noqa: ANN001
        return json.loads(await asyncio.wait_for(connection.recv(), 30))

    connections = await asyncio.gather(*[websockets.connect(url, additional_headers=headers or {}, open_timeout=30)
                                         for _ in range(n)])
    try:
        events = await asyncio.gather(*[first(c) for c in connections])
    finally:
        await asyncio.gather(*[c.close() for c in connections], return_exceptions=True)
    return [e["type"] if e["type"] != "error" else e["error"]["code"] for e in events]


async def session_events(url: str, messages: list[str], headers: dict[str, str] | None = None,
                         origin: str | None = None, quiet_seconds: float = 1.5) -> list[dict]:
    """The events one client gets for `messages` (session.created first), until a quiet spell."""
    import websockets

    out = []
    async with websockets.connect(url, additional_headers=headers or {}, origin=origin, open_timeout=30) as ws:
        out.append(json.loads(await asyncio.wait_for(ws.recv(), 30)))
        for message in messages:
            await ws.send(message)
        try:
            while True:
                out.append(json.loads(await asyncio.wait_for(ws.recv(), quiet_seconds)))
        except (TimeoutError, websockets.ConnectionClosed):
            pass
    return out


def session_update(transcription: dict) -> str:
    """A `session.update` client event with these transcription settings (16 kHz PCM16)."""
    return json.dumps({"type": "session.update", "session": {"type": "transcription", "audio": {
        "input": {"format": {"type": "audio/pcm", "rate": 16000}, "transcription": transcription}}}})
