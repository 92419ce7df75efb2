"""Running a script as if some packages were not installed, for the tests of the missing-package lines.

A `sys.meta_path` finder that raises ModuleNotFoundError for the blocked top-level names makes a
package look uninstalled to the import system (what a venv without that extra looks like), without
building a second venv. `without_packages(tail)` is Python source for `python -c SOURCE BLOCKED ...`:
argv[1] is the comma-separated names to block, `tail` runs what follows with the rest of argv.
"""

from __future__ import annotations

_BLOCKER = """
import runpy, sys
blocked = set(sys.argv[1].split(","))
class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in blocked:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Blocker())
"""

# argv[2] is a script's path, the rest its arguments
RUN_SCRIPT = _BLOCKER + """
script = sys.argv[2]
sys.argv = sys.argv[2:]
runpy.run_path(script, run_name="__main__")
"""

# argv[2:] are the console script's arguments
RUN_CONSOLE_SCRIPT = _BLOCKER + """
sys.argv = ["funasr-nano", *sys.argv[2:]]
runpy.run_module("funasr_nano", run_name="__main__", alter_sys=True)
"""
