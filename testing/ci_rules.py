"""CI's rules for a pytest run, as a plugin (`tests/conftest.py` loads it; `-p testing.ci_rules` elsewhere).

Two environment variables, both set by `.ci/run`, change nothing for a plain local `pytest`:

- `FUNASR_STRICT_SKIPS=1`: a skipped test fails the run. Tests skip themselves where an optional
  package or tool is missing, which is right on a partial local install (the skip says what to
  install) but would let CI pass with the parity tests never run. The only skips allowed are those
  of tests marked `needs_hardware("...")` (a GPU, a microphone: what a CI machine cannot have); they
  are listed at the end. A skip raised by the test or its set-up becomes a failure of that test; a
  module skipped whole at import (a module-level `importorskip`) is listed and fails the session.
  The summary always gives the count: `unexpected skips: 0 (allowed: ...)`.
- `FUNASR_FAULT_LOG=FILE`: a native crash (SIGSEGV, SIGILL, SIGABRT... in llama.cpp or onnxruntime)
  writes every thread's Python stack to FILE, which `.ci/run` prints after the run. A CI log showed
  a full run end with exit 139 and nothing else; a file does not depend on where stderr goes. pytest's
  own faulthandler plugin enables the handler onto stderr in its `pytest_configure`; this plugin's
  runs after it (trylast) and points the same handler at FILE (faulthandler has one output), and
  re-arms it before each test. `faulthandler_timeout` keeps working: it has its own output.
"""

from __future__ import annotations

import faulthandler
import os
from dataclasses import dataclass, field
from typing import IO

import pytest

STRICT_ENV = "FUNASR_STRICT_SKIPS"
FAULT_LOG_ENV = "FUNASR_FAULT_LOG"
MARKER = "needs_hardware"
MARKER_HELP = (f"{MARKER}(what): the test skips where `what` (a GPU, a microphone) is missing; the only skips "
               f"CI allows ({STRICT_ENV}=1)")


def strict_skips() -> bool:
    """Whether this run fails on skips (`FUNASR_STRICT_SKIPS` set to anything but empty or 0)."""
    return os.environ.get(STRICT_ENV, "").strip() not in ("", "0")


_FAULT_FILE = pytest.StashKey[IO[str]]()


@pytest.hookimpl(trylast=True)  # after pytest's faulthandler plugin, which enables it onto captured stderr
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", MARKER_HELP)
    config.pluginmanager.register(SkipRule(strict_skips()), "funasr-skip-rule")
    path = os.environ.get(FAULT_LOG_ENV, "").strip()
    if path:
        log = open(path, "a", encoding="utf-8")  # open for the whole session
        config.stash[_FAULT_FILE] = log
        faulthandler.enable(file=log, all_threads=True)


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    """Re-arm the handler before each test: a library imported meanwhile may have put its own signal
    handler in place of faulthandler's (Ray chains to it; nothing says every library does)."""
    log = item.config.stash.get(_FAULT_FILE, None)
    if log is not None:
        faulthandler.disable()
        faulthandler.enable(file=log, all_threads=True)


@pytest.hookimpl(trylast=True)  # after pytest's faulthandler plugin, which disables it
def pytest_unconfigure(config: pytest.Config) -> None:
    log = config.stash.get(_FAULT_FILE, None)
    if log is not None:
        if not config.pluginmanager.has_plugin("faulthandler"):  # -p no:faulthandler: nobody else disables it
            faulthandler.disable()
        log.close()
        del config.stash[_FAULT_FILE]


def pytest_report_header(config: pytest.Config) -> list[str]:
    lines = []
    if strict_skips():
        lines.append(f"{STRICT_ENV}=1: a skip fails the run unless the test is marked {MARKER}(...)")
    if _FAULT_FILE in config.stash:
        lines.append(f"{FAULT_LOG_ENV}: native crash stacks go to {config.stash[_FAULT_FILE].name}")
    return lines


def _reason(report: pytest.TestReport | pytest.CollectReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@dataclass(eq=False)  # a plugin object: pytest keeps it in sets, by identity
class SkipRule:
    """The skips of one session: counted, the unexpected ones failed where `strict`."""

    strict: bool
    unexpected: list[tuple[str, str]] = field(default_factory=list)  # (node id, reason)
    allowed: list[tuple[str, str, str]] = field(default_factory=list)  # (node id, hardware, reason)
    modules: int = 0  # modules skipped whole at collection: no test report fails for them

    @pytest.hookimpl(wrapper=True)
    def pytest_runtest_makereport(self, item: pytest.Item, call: pytest.CallInfo[None]):  # noqa: ANN201
        report: pytest.TestReport = yield
        if not report.skipped or hasattr(report, "wasxfail"):
            return report
        reason = _reason(report)
        marker = item.get_closest_marker(MARKER)
        if marker is not None and marker.args and str(marker.args[0]).strip():
            self.allowed.append((report.nodeid, str(marker.args[0]), reason))
            return report
        self.unexpected.append((report.nodeid, reason))
        if self.strict:
            report.outcome = "failed"
            report.longrepr = (f"skipped, and {STRICT_ENV}=1 (CI) allows no skip: {reason}\n"
                               f"Install what it needs, or mark a test that needs hardware CI lacks "
                               f"with @pytest.mark.{MARKER}(\"...\").")
        return report

    def pytest_collectreport(self, report: pytest.CollectReport) -> None:
        if report.skipped:  # a module-level skip (importorskip): its tests never exist
            self.unexpected.append((report.nodeid, _reason(report)))
            self.modules += 1

    def pytest_terminal_summary(self, terminalreporter: pytest.TerminalReporter) -> None:
        if not self.strict and not self.allowed:
            return
        by_hardware: dict[str, int] = {}
        for _, what, _ in self.allowed:
            by_hardware[what] = by_hardware.get(what, 0) + 1
        allowed = ", ".join(f"{n} {MARKER}({what!r})" for what, n in sorted(by_hardware.items())) or "none"
        tr = terminalreporter
        if self.strict:
            tr.write_sep("=", f"unexpected skips: {len(self.unexpected)} (allowed: {allowed})",
                         red=bool(self.unexpected), green=not self.unexpected)
            for nodeid, reason in self.unexpected:
                tr.write_line(f"UNEXPECTED SKIP {nodeid}: {reason}")
        else:
            tr.write_sep("=", f"skips CI allows: {allowed}")
        for nodeid, what, reason in self.allowed:
            tr.write_line(f"allowed skip ({MARKER} {what!r}) {nodeid}: {reason}")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.strict and self.modules and session.exitstatus == pytest.ExitCode.OK:
            session.exitstatus = pytest.ExitCode.TESTS_FAILED  # a module skipped whole has no test to fail
