"""The one llama.cpp log hook of the process: quiet by default, warnings remembered, sinks on demand.

llama.cpp prints its model card, tensor lists and per-tensor quantization lines to stderr unless
a callback takes them. This module installs one callback, once: it keeps the last warnings and
errors (so that a failure message can quote them) and passes every line to the sinks that
`capture()` pushes for a while (the exporter's verbose mode, the tests' log checks); with
FUNASR_DEBUG set, every line also goes to stderr.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections import deque
from collections.abc import Callable, Iterator

import llama_cpp as L

WARN, ERROR = 3, 4  # GGML_LOG_LEVEL_WARN, GGML_LOG_LEVEL_ERROR

_lock = threading.Lock()
_recent: deque[str] = deque(maxlen=50)
_sinks: list[Callable[[int, str], None]] = []
_callback = None  # the ctypes thunk must live as long as llama.cpp may call it


def install() -> None:
    """Take over llama.cpp's log (idempotent)."""
    global _callback
    if _callback is not None:
        return

    passthrough = bool(os.environ.get("FUNASR_DEBUG"))  # the whole log on stderr, for crash reports

    @L.llama_log_callback
    def callback(level: int, text: bytes | None, _user: ctypes.c_void_p) -> None:
        if not text:
            return
        line = text.decode("utf-8", "replace")
        if passthrough:
            sys.stderr.write(line)
        with _lock:
            if level in (WARN, ERROR):
                _recent.append(line.rstrip())
            sinks = list(_sinks)
        for sink in sinks:
            sink(level, line)

    _callback = callback
    L.llama_log_set(callback, ctypes.c_void_p(0))


def recent_warnings() -> list[str]:
    """Warnings and errors llama.cpp logged so far in this process (the last 50)."""
    with _lock:
        return list(_recent)


@contextlib.contextmanager
def capture(sink: Callable[[int, str], None]) -> Iterator[None]:
    """Also hand every log line to `sink(level, text)` inside the block."""
    install()
    with _lock:
        _sinks.append(sink)
    try:
        yield
    finally:
        with _lock:
            _sinks.remove(sink)
