"""funasr_nano.native_lines: known native lines are dropped from fd 2, every other line passes in order.

Each run is a child process whose fd 2 the test reads: a thread writes numbered lines to fd 2 the
whole time (as a server's log does) while the main thread enters and leaves `mpg123_notes_dropped`
thousands of times, writing a line of the kind it drops inside each. Busy processes beside it keep
the cores loaded, which is when the relay's thread is late: its switch back to the real fd 2 used
to let a line written straight to it overtake the same thread's previous line, still in the pipe.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import os, sys, threading, time
from funasr_nano.native_lines import mpg123_notes_dropped

stop = threading.Event()
written = []
def log():
    n = 0
    while not stop.is_set():
        os.write(2, b"line %d\\n" % n)
        n += 1
        time.sleep(0.0005)
    written.append(n)
thread = threading.Thread(target=log)
thread.start()
for _ in range(int(sys.argv[1])):
    with mpg123_notes_dropped():
        os.write(2, b"Note: Illegal Audio-MPEG-Header 0x00000000 at offset 1234.\\n")
stop.set()
thread.join()
print(written[0])
"""

_BUSY = "import time\nend = time.monotonic() + 60\nwhile time.monotonic() < end: pass\n"


def test_other_lines_pass_in_order_across_thousands_of_switches() -> None:
    busy = [subprocess.Popen([sys.executable, "-c", _BUSY]) for _ in range(2)]
    try:
        proc = subprocess.run([sys.executable, "-c", _CHILD, "5000"], capture_output=True, timeout=300, cwd=ROOT,
                              env={k: v for k, v in os.environ.items() if k != "FUNASR_DEBUG"})
    finally:
        for p in busy:
            p.kill()
            p.wait()
    assert proc.returncode == 0, proc.stderr[-2000:]
    count = int(proc.stdout)
    lines = proc.stderr.decode().splitlines()
    assert count > 0
    assert [line for line in lines if not line.startswith("line ")] == []  # every note dropped, nothing else
    assert lines == [f"line {i}" for i in range(count)]  # none lost, none out of order
