"""Trainer callback, the from_pretrained wrapper (`hfaccel run`, patch_transformers) and the examples."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import hfaccel
from hfaccel import models
from hfaccel.errors import ConfigError

from .conftest import needs_default_model

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"ttft_ms", "tpot_ms", "tok_s", "base_tok_s", "speedup", "peak_memory_mb", "ppl", "base_ppl", "ppl_delta_pct",
        "greedy_exact_match"}


def _train(with_callback: bool, tmp_path: Path, attach: bool = True):
    from transformers import Trainer, TrainingArguments

    from hfaccel.integrations import AccelEvalCallback

    torch.manual_seed(0)
    model = models.tiny("llama")
    g = torch.Generator().manual_seed(1)
    rows = [torch.randint(3, model.config.vocab_size, (16,), generator=g) for _ in range(12)]
    data = [{"input_ids": r, "labels": r} for r in rows]
    args = TrainingArguments(output_dir=str(tmp_path / f"run{with_callback}"), max_steps=4, per_device_train_batch_size=2,
                             learning_rate=1e-3, eval_strategy="steps", eval_steps=2, logging_steps=1, report_to=[],
                             use_cpu=True, save_strategy="no", seed=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data, eval_dataset=data[:4])
    cb = None
    if with_callback:
        cb = AccelEvalCallback(max_new_tokens=4, ppl_window=32, ppl_windows=1, every=1,
                               trainer=trainer if attach else None)
        if not attach:
            trainer.add_callback(cb)
    trainer.train()
    return trainer, model, cb


def test_callback_logs_through_trainer_and_leaves_training_unchanged(tmp_path):
    plain_trainer, plain_model, _ = _train(False, tmp_path)
    trainer, model, cb = _train(True, tmp_path)
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert losses == [e["loss"] for e in plain_trainer.state.log_history if "loss" in e] and len(losses) == 4
    for a, b in zip(model.parameters(), plain_model.parameters()):
        assert torch.equal(a, b)
    assert model.training is plain_model.training and "hfaccel_report" not in model.__dict__
    logged = [e for e in trainer.state.log_history if "hfaccel/tok_s" in e]
    assert [e["step"] for e in logged] == [2, 4]
    for entry in logged:
        assert {k.removeprefix("hfaccel/") for k in entry if k.startswith("hfaccel/")} == KEYS
        assert entry["hfaccel/greedy_exact_match"] == 1.0          # cpu-fast is lossless
        assert entry["hfaccel/ppl_delta_pct"] == pytest.approx(0.0, abs=1e-4)
        assert entry["hfaccel/ttft_ms"] > 0 and entry["hfaccel/tpot_ms"] > 0 and entry["hfaccel/peak_memory_mb"] > 0
        assert entry["hfaccel/tok_s"] == pytest.approx(1e3 / entry["hfaccel/tpot_ms"])
    assert len(cb.history) == 2


def test_unattached_callback_warns_and_still_records(tmp_path):
    with pytest.warns(UserWarning, match=r"not attached to a Trainer \(use .attach\(trainer\)\)"):
        trainer, _, _ = _train(True, tmp_path, attach=False)
    assert sum("hfaccel/tok_s" in e for e in trainer.state.log_history) == 2


def test_callback_checks_its_arguments_up_front():
    from hfaccel.integrations import AccelEvalCallback

    with pytest.raises(ValueError, match=r"every = 0 is not allowed; allowed: >= 1"):
        AccelEvalCallback(every=0)
    with pytest.raises(ConfigError):
        AccelEvalCallback(preset="no-such-preset")


def test_patch_transformers_accelerates_every_load_and_unpatches_exactly(tmp_path):
    from transformers import AutoModelForCausalLM

    models.tiny("qwen2").save_pretrained(tmp_path)
    own = AutoModelForCausalLM.__dict__.get("from_pretrained")
    names = hfaccel.patch_transformers("cpu-fast", report=False)
    try:
        assert "AutoModelForCausalLM" in names
        a = AutoModelForCausalLM.from_pretrained(tmp_path)
        b = AutoModelForCausalLM.from_pretrained(tmp_path)
        assert a.hfaccel_report.config_name == "cpu-fast" and b.hfaccel_report is not a.hfaccel_report
        assert a.config._attn_implementation == "hfaccel_step+hfaccel_paged"
    finally:
        hfaccel.unpatch_transformers()
    assert AutoModelForCausalLM.__dict__.get("from_pretrained") is own
    c = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert "hfaccel_report" not in c.__dict__
    with pytest.raises(ConfigError):
        hfaccel.patch_transformers("no-such-preset")
    assert AutoModelForCausalLM.__dict__.get("from_pretrained") is own          # nothing was patched


def _run(cmd: list[str], **env) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, HFACCEL_SMOKE="1", **env))


@needs_default_model
def test_hfaccel_run_accelerates_an_unmodified_script():
    model_dir = str(models.default_model_dir())
    plain = _run([sys.executable, "examples/plain_script.py", model_dir, "6"])
    assert plain.returncode == 0, plain.stderr[-2000:]
    wrapped = _run([sys.executable, "-m", "hfaccel.cli", "run", "--preset", "cpu-fast", "examples/plain_script.py",
                    model_dir, "6"])
    assert wrapped.returncode == 0, wrapped.stderr[-2000:]
    assert "attention: sdpa" in plain.stdout and "attention: hfaccel_step+hfaccel_paged" in wrapped.stdout
    assert wrapped.stderr.count("config cpu-fast") == 1                       # the report, once per model
    assert plain.stdout.splitlines()[0] == wrapped.stdout.splitlines()[0]     # same greedy text
    missing = _run([sys.executable, "-m", "hfaccel.cli", "run", "nope.py"])
    assert missing.returncode == 2 and "script 'nope.py' does not exist" in missing.stderr


@needs_default_model
@pytest.mark.parametrize("example, expect", [
    ("quickstart.py", "greedy output identical to plain Transformers: True"),
    ("preset_file.py", "config my-preset"),
    ("prefix_reuse.py", "hit rate"),
    ("trainer_callback.py", "'hfaccel/greedy_exact_match': 1.0"),
    ("quantize_and_save.py", "reloaded model generates the same tokens: True"),
])
def test_examples_run_in_smoke_mode(example, expect, tmp_path):
    run = _run([sys.executable, f"examples/{example}"])
    assert run.returncode == 0, run.stderr[-3000:]
    assert expect in run.stdout
