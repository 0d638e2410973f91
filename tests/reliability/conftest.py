"""Reliability tests: the bad-input matrix reports its size in the terminal summary."""

from __future__ import annotations

import pytest


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """``bad-input matrix: N cases passed (of M built)`` when the matrix ran."""
    passed = terminalreporter.stats.get("passed", [])
    covered = sum(1 for report in passed if ("bad_input_case", True) in report.user_properties)
    built = [value for report in passed for key, value in report.user_properties
             if key == "bad_input_cases"]
    if covered or built:
        total = f" (of {built[0]} built)" if built else ""
        terminalreporter.write_line(f"bad-input matrix: {covered} cases passed{total}")
