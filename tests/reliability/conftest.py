"""tests/reliability: faults injected into every accelerate_model step, load on the Engine, memory over many
calls. Prints one summary line at the end of the run: inputs tried, faults injected, leaks found, failures."""

from __future__ import annotations

TALLY = {"inputs": 0, "faults": 0, "leaks": 0}


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    ran = [r for key in ("passed", "failed", "error") for r in terminalreporter.stats.get(key, [])
           if "tests/reliability/" in getattr(r, "nodeid", "")]
    if not ran:
        return
    failed = sum(1 for r in ran if r.outcome != "passed" or r.when != "call")
    terminalreporter.write_line(f"reliability: inputs tried {TALLY['inputs']}, faults injected {TALLY['faults']}, "
                                f"leaks found {TALLY['leaks']}, failures {failed}")
