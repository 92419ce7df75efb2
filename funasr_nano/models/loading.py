"""Loading the models side by side: llama.cpp, the encoder's session, the CTC head's and the VAD's.

Each load spends its time in C (llama.cpp's model and context set-up through ctypes, ONNX Runtime's
session creation), where Python's GIL is released, and none of them keeps a core busy all the
time (much of it is mapping files and touching memory). So the transcriber starts the llama.cpp
load and, when the run will need them, the CTC head and the VAD in threads, and creates the
encoder's session meanwhile. Measured at the full shapes (2-core EPYC, warm page cache, cached
ONNX graphs, fresh processes): int8 encoder 0.25 s + fp32 CTC head 0.10 s + q8_0 decoder 0.31 s
one after another = 0.65-0.68 s, all three at once 0.50-0.55 s.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import TypeVar

T = TypeVar("T")


def in_background(make: Callable[[], T], name: str, seconds: dict[str, float] | None = None) -> Future[T]:
    """Run `make()` in a daemon thread; `.result()` gives its value or raises its exception.

    With `seconds`, the time `make()` took is stored under `name` (the load-time breakdown).
    """
    future: Future[T] = Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        t0 = time.perf_counter()
        try:
            value = make()
        except BaseException as exc:  # handed to whoever waits for the value
            future.set_exception(exc)
            return
        if seconds is not None:  # before the value: a waiter reads the time once it has the value
            seconds[name] = time.perf_counter() - t0
        future.set_result(value)

    threading.Thread(target=run, name=name, daemon=True).start()
    return future
