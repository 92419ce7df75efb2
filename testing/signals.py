"""Child processes that take Ctrl-C as a terminal user's would, however the test run was started.

A shell without job control starts background commands with SIGINT ignored (POSIX), and an ignored
disposition survives exec: a test run started with `... &` (nohup, a CI script) would start every
child with Ctrl-C switched off, Python would then never raise KeyboardInterrupt, and the tests of
what Ctrl-C does would see a process that finishes its work instead. The tests that send SIGINT
start their child through `with_default_sigint`, which puts SIGINT back to its default and execs
the command (same process, so its pid and group stay what the test signals).
"""

from __future__ import annotations

import sys
from collections.abc import Sequence

_RESET_AND_EXEC = ("import os, signal, sys; signal.signal(signal.SIGINT, signal.SIG_DFL); "
                   "os.execvp(sys.argv[1], sys.argv[1:])")


def with_default_sigint(cmd: Sequence[str]) -> list[str]:
    """`cmd`, run with SIGINT at its default disposition."""
    return [sys.executable, "-c", _RESET_AND_EXEC, *map(str, cmd)]
