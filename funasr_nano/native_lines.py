"""Keep known lines that native libraries write to fd 2 off the user's stderr, and nothing else.

Two libraries we call write lines a user cannot act on straight to file descriptor 2, bypassing
Python (so no logging setting hides them):

- libmpg123 (inside libsndfile), one line per damaged MP3 frame ("Note: Illegal Audio-MPEG-Header
  ...", "[src/libmpg123/layer3.c:...] error: part2_3_length ..."); `audio.load`'s one warning
  says more (what was skipped, seconds decoded of seconds announced);
- Ray's core worker, once per actor Ray Data starts for the corpus: an `E ... core_worker.cc`
  line saying that the actor's constructor arguments are in the object store while restarts are
  on. Ray Data always puts them there, and restarts are what lets the corpus survive a crash.

Pointing fd 2 at /dev/null would hide them, but also every other thread's output: a server's log
lines and a crash's stack go to fd 2 too. So while such a call runs, fd 2 is a pipe, and a relay
thread passes every line on to where fd 2 pointed before, except those matching one of the
patterns in use. The relay is shared and counted (decodes on several threads use one) and lives
only while a caller needs it: for an MP3, while libsndfile reads a block. `FUNASR_DEBUG=1` shows
everything.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import os
import re
import select
import sys
import threading
from collections.abc import Callable, Iterator

# libmpg123's message shapes: "Note: ...", "Warning: ...", "[src/libmpg123/parse.c:wetwork():1349] error: ...".
MPG123_NOTES = re.compile(rb"^(?:Note: |Warning: |\[[^\]\s]*\.c:[^\]]*\] (?:error|warning|note): )")
# "[2026-12-07 06:12:42,370 E 2134 2134] core_worker.cc:2465: Actor with class name: '...' and ID: '...' has
# constructor arguments in the object store and max_restarts > 0. ..."
RAY_ACTOR_ARGUMENTS = re.compile(rb"^\[[^\]]*\] core_worker\.cc:\d+: Actor with class name: .* has constructor "
                                 rb"arguments in the object store and max_restarts > 0")


def _gil_holding_libc() -> ctypes.PyDLL | None:
    """libc through `ctypes.PyDLL`, whose calls keep the GIL (None where there is no such libc)."""
    try:
        libc = ctypes.PyDLL(None, use_errno=True)
        libc.dup2.argtypes, libc.dup2.restype = (ctypes.c_int, ctypes.c_int), ctypes.c_int
        for call in (libc.read, libc.write):
            call.argtypes, call.restype = (ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t), ctypes.c_ssize_t
        return libc
    except (OSError, AttributeError, TypeError):
        return None


_LIBC = _gil_holding_libc()


class _Relay:
    """fd 2 -> pipe -> this thread -> the previous fd 2, without the lines of the patterns in use.

    Lines keep their order when fd 2 is pointed back. The pipe is read and its lines passed on
    only under `lock`, so closing (which takes it) finds no chunk half passed on; it then points
    fd 2 back and passes on what the pipe still holds through libc calls that keep the GIL, so no
    Python thread's next line can reach the real fd 2 before its previous one left the pipe.
    (Before, the switch left those lines to this thread, and a busy machine let a logging thread's
    next line overtake them.) Native threads that write to fd 2 themselves are not held back.
    """

    def __init__(self) -> None:
        sys.stderr.flush()
        self.poller = select.poll()  # where there is none, there is no relay (before fd 2 is touched)
        self.target = os.dup(2)
        read_end, write_end = os.pipe()
        os.set_blocking(read_end, False)
        self.poller.register(read_end, select.POLLIN)
        os.dup2(write_end, 2)
        os.close(write_end)
        self.read_end = read_end
        # Patterns stay until the relay closes: lines a caller's call wrote may still be in the pipe after it
        # returns, and closing drains the pipe.
        self.patterns: set[re.Pattern[bytes]] = set()
        self.users = 0
        self.lock = threading.Lock()
        self.pending = b""  # the start of a line that may still match a pattern
        self.ended = False  # the pipe reached its end (no write end left)
        self.thread = threading.Thread(target=self._pump, name="native-lines", daemon=True)
        self.thread.start()

    def _dropped(self, line: bytes) -> bool:
        return any(p.match(line) for p in list(self.patterns))

    def _may_be_dropped(self, partial: bytes) -> bool:
        """A line start that may still match once the rest arrives: held back until it does."""
        return partial[:1] in (b"[", b"N", b"W")

    def _write(self, data: bytes, write: Callable[[int, bytes], int]) -> None:
        with contextlib.suppress(OSError):
            while data:
                data = data[write(self.target, data):]

    def _pass_on(self, hold_gil: bool = False) -> None:
        """Pass on every line the pipe holds now (caller holds `lock`); `ended` once it is at its end.

        `hold_gil`: through libc calls that keep the GIL, so that no Python thread can write a line
        in between (closing).
        """
        read, write = (_gil_read, _gil_write) if hold_gil and _LIBC is not None else (os.read, os.write)
        while not self.ended:
            try:
                chunk = read(self.read_end, 65536)
            except BlockingIOError:
                return
            if not chunk:
                self.ended = True
                if self.pending and not self._dropped(self.pending):
                    self._write(self.pending, write)
                self.pending = b""
                return
            lines = (self.pending + chunk).split(b"\n")
            self.pending = lines.pop()
            kept = [line + b"\n" for line in lines if not self._dropped(line)]
            if self.pending and not self._may_be_dropped(self.pending):  # a progress bar's "\r..." goes on at once
                kept.append(self.pending)
                self.pending = b""
            if kept:
                self._write(b"".join(kept), write)

    def _pump(self) -> None:
        try:
            while True:
                self.poller.poll()
                with self.lock:
                    self._pass_on()
                    if self.ended:
                        return
        finally:
            os.close(self.read_end)
            os.close(self.target)

    def close(self) -> None:
        sys.stderr.flush()
        with self.lock:
            # Closes our write end: later lines go straight to the real fd 2, after those still in the
            # pipe. Python threads cannot write between the two (the GIL stays held); native ones could.
            if _LIBC is None or _LIBC.dup2(self.target, 2) < 0:
                os.dup2(self.target, 2)
            self._pass_on(hold_gil=True)
        # A child process started meanwhile holds the write end too; its output still goes through
        # the (daemon) pump after this, so do not wait for it longer than the pipe takes to drain.
        self.thread.join(timeout=1.0)


def _gil_read(fd: int, n: int) -> bytes:
    """`os.read` without letting go of the GIL."""
    buf = ctypes.create_string_buffer(n)
    while (got := _LIBC.read(fd, buf, n)) < 0:
        err = ctypes.get_errno()
        if err == errno.EAGAIN:
            raise BlockingIOError(err, os.strerror(err))
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))
    return buf.raw[:got]


def _gil_write(fd: int, data: bytes) -> int:
    """`os.write` without letting go of the GIL."""
    while (done := _LIBC.write(fd, data, len(data))) < 0:
        err = ctypes.get_errno()
        if err != errno.EINTR:
            raise OSError(err, os.strerror(err))
    return done


_lock = threading.Lock()
_relay: _Relay | None = None


@contextlib.contextmanager
def lines_dropped(pattern: re.Pattern[bytes]) -> Iterator[None]:
    """While inside, lines written to fd 2 (by any thread, in C or Python) that match `pattern` are dropped."""
    global _relay
    if os.environ.get("FUNASR_DEBUG"):
        yield
        return
    with _lock:
        if _relay is None:
            try:
                _relay = _Relay()
            except (OSError, ValueError, AttributeError):  # no real fd 2 (embedded interpreters, closed stderr)
                _relay = None
        relay = _relay
        if relay is not None:
            relay.patterns.add(pattern)
            relay.users += 1
    try:
        yield
    finally:
        if relay is not None:
            with _lock:
                relay.users -= 1
                if relay.users == 0 and _relay is relay:
                    relay.close()
                    _relay = None


def mpg123_notes_dropped() -> contextlib.AbstractContextManager[None]:
    return lines_dropped(MPG123_NOTES)


__all__ = ["MPG123_NOTES", "RAY_ACTOR_ARGUMENTS", "lines_dropped", "mpg123_notes_dropped"]
