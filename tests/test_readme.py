"""The README's two commands exist, and CI runs exactly the README's test command."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _commands() -> list[str]:
    return re.findall(r"```bash\n(.+?)\n```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_starts_with_bench_and_test_commands():
    bench, test = _commands()[:2]
    assert bench.startswith("pip install torch==2.13.0") and bench.endswith("hfaccel bench")
    assert test.startswith("pip install torch==2.13.0") and "pytest" in test


def test_ci_runs_the_readme_test_command():
    test = _commands()[1]
    ci = (ROOT / ".ci" / "run").read_text()
    assert test in ci.splitlines()


def test_readme_config_reference_is_current():
    from hfaccel.config import reference_markdown

    assert reference_markdown() in (ROOT / "README.md").read_text(), "regenerate the README config reference"
