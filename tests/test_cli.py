"""hfaccel presets | demo | eval."""

from __future__ import annotations

import subprocess
import sys

from hfaccel.cli import main

from .conftest import needs_default_model


def test_presets_lists_every_preset(capsys):
    assert main(["presets"]) == 0
    out = capsys.readouterr().out
    for name in ("cpu-fast", "cpu-int8", "cpu-int4", "gpu-throughput", "gpu-int4", "low-latency", "memory-saver"):
        assert name in out
    assert "lossless" in out


def test_console_script_entry_point():
    proc = subprocess.run([sys.executable, "-m", "hfaccel.cli", "presets"], capture_output=True, text=True)
    assert proc.returncode == 0 and "cpu-fast" in proc.stdout


def test_eval_ppl_tiny(capsys):
    assert main(["eval", "ppl", "--model", "tiny:llama", "--preset", "memory-saver", "--windows", "1",
                 "--window", "64"]) == 0
    out = capsys.readouterr().out
    assert "transformers: perplexity" in out and "hfaccel memory-saver: perplexity" in out


@needs_default_model
def test_demo_prints_report_and_answer(capsys):
    assert main(["demo", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr().out
    assert "config cpu-fast" in out and "answer:" in out and "Paris" in out
