"""`hfaccel bench` smoke runs and the JSON schema (no timing is asserted anywhere)."""

from __future__ import annotations

import json

import pytest

from hfaccel import models
from hfaccel.bench.metrics import percentile, summary
from hfaccel.bench.runner import BenchSettings, ratios
from hfaccel.cli import main

from ..conftest import needs_default_model

SUMMARY_KEYS = {"p50", "p95", "p99", "mean", "n"}
SYSTEM_KEYS = {"ttft_ms", "tpot_ms", "e2e_ms", "decode_tok_s", "throughput_tok_s", "peak_memory_mb",
               "peak_memory_delta_mb", "weight_bytes"}


def check_schema(result: dict, batches: list[int], systems: set[str]) -> None:
    assert result["schema"] == "hfaccel.bench/1"
    assert {"hfaccel", "torch", "transformers"} <= set(result["versions"])
    assert set(result["systems"]) == systems
    for name, r in result["systems"].items():
        assert SYSTEM_KEYS <= set(r), name
        for key in ("ttft_ms", "tpot_ms", "e2e_ms"):
            assert set(r[key]) == SUMMARY_KEYS
            assert r[key]["p50"] > 0
        assert r["decode_tok_s"] > 0 and r["weight_bytes"] > 0
        if name != "llama.cpp":
            assert set(r["throughput_tok_s"]) == {str(b) for b in batches}
            assert r["peak_memory_mb"] > 0 and r["peak_memory_delta_mb"] >= 0
    assert set(result["ratios"]) == systems - {"transformers"}
    c = result["correctness"]
    assert {"lossless", "greedy_match", "token_agreement", "checked_sequences", "perplexity"} <= set(c)
    assert result["report"]["config_name"] == result["settings"]["preset"]


def test_bench_smoke_tiny_lossless(tmp_path, capsys):
    out = tmp_path / "b.json"
    plot = tmp_path / "b.png"
    rc = main(["bench", "--model", "tiny:llama", "--runs", "1", "--new-tokens", "4", "--prompt-tokens", "8",
               "--batch", "1,2", "--json", str(out), "--plot", str(plot), "--quiet"])
    assert rc == 0
    result = json.loads(out.read_text())
    check_schema(result, [1, 2], {"transformers", "hfaccel"})
    assert result["correctness"]["lossless"] and result["correctness"]["greedy_match"]
    assert result["correctness"]["perplexity"] is None
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    text = capsys.readouterr().out
    assert "TTFT p50 (ms)" in text and "identical greedy tokens" in text and "hfaccel gain" in text


def test_bench_lossy_preset_reports_quality(tmp_path, capsys):
    out = tmp_path / "b.json"
    rc = main(["bench", "--model", "tiny:qwen2", "--preset", "memory-saver", "--runs", "1", "--new-tokens", "4",
               "--prompt-tokens", "8", "--json", str(out), "--quiet", "--ppl-windows", "1"])
    assert rc == 0
    result = json.loads(out.read_text())
    check_schema(result, [1], {"transformers", "hfaccel"})
    c = result["correctness"]
    assert not c["lossless"] and set(c["perplexity"]) == {"transformers", "hfaccel", "delta_pct"}
    assert "perplexity" in capsys.readouterr().out


@pytest.mark.slow          # ~110 s: CI's second step runs it (the default run stays near 20 minutes)
@needs_default_model
def test_bench_smoke_default_model(tmp_path):
    out = tmp_path / "b.json"
    rc = main(["bench", "--runs", "1", "--new-tokens", "4", "--prompt-tokens", "16", "--json", str(out), "--quiet"])
    assert rc == 0
    result = json.loads(out.read_text())
    check_schema(result, [1], {"transformers", "hfaccel"})
    assert result["model"]["parameters"] > 100e6 and result["settings"]["preset"] == "cpu-fast"


@pytest.mark.parametrize("kw, message", [
    (dict(batch=[0]), "--batch = [0] is not allowed"),
    (dict(runs=0), "--runs = 0 is too small; allowed: >= 1"),
    (dict(new_tokens=1), "--new-tokens = 1 is too small; allowed: >= 2"),
    (dict(device="tpu"), "--device = 'tpu' is not allowed; allowed: auto, cpu, cuda"),
    (dict(compare=["vllm"]), "--compare = 'vllm' is not allowed; allowed: llama.cpp"),
])
def test_bad_settings(kw, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace("]", r"\]")):
        BenchSettings(**kw)


def test_cli_reports_bad_preset_cleanly(capsys):
    rc = main(["bench", "--model", "tiny:llama", "--preset", "cpu-fsat", "--quiet"])
    assert rc == 2
    assert "unknown preset 'cpu-fsat'" in capsys.readouterr().err


def test_percentiles_and_ratios():
    assert percentile([1, 2, 3, 4], 50) == 2.5 and percentile([5], 99) == 5
    s = summary([10, 20, 30])
    assert s["p50"] == 20 and s["n"] == 3
    base = {"ttft_ms": {"p50": 100}, "tpot_ms": {"p50": 10}, "decode_tok_s": 100, "e2e_ms": {"p50": 1000},
            "peak_memory_mb": 200, "weight_bytes": 4, "throughput_tok_s": {"1": 50}}
    new = {"ttft_ms": {"p50": 50}, "tpot_ms": {"p50": 5}, "decode_tok_s": 200, "e2e_ms": {"p50": 500},
           "peak_memory_mb": 100, "weight_bytes": 1, "throughput_tok_s": {"1": 150}}
    r = ratios(base, new)
    assert r == {"ttft": 2, "tpot": 2, "decode_tok_s": 2, "e2e_p50": 2, "peak_memory": 2, "weight_bytes": 4,
                 "throughput_b1": 3}


@needs_default_model
def test_bench_compares_llama_cpp_when_installed(tmp_path):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    out = tmp_path / "b.json"
    rc = main(["bench", "--runs", "1", "--new-tokens", "4", "--prompt-tokens", "16", "--compare", "llama.cpp",
               "--json", str(out), "--quiet"])
    assert rc == 0
    result = json.loads(out.read_text())
    check_schema(result, [1], {"transformers", "hfaccel", "llama.cpp"})
    lc = result["systems"]["llama.cpp"]
    assert lc["gguf"].endswith(".gguf") and 0 <= lc["token_agreement_with_transformers"] <= 1


def test_a_llama_cpp_prefill_that_crashes_is_detected_in_a_subprocess(monkeypatch):
    from hfaccel.bench import llamacpp

    monkeypatch.setattr(llamacpp, "_PROBE", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)")
    llamacpp.extra_buffers_work.cache_clear()
    ok, why = llamacpp.extra_buffers_work("model.gguf")
    assert not ok and "exited with -11" in why
    monkeypatch.setattr(llamacpp, "_PROBE", "import sys; assert sys.argv[1] == 'model.gguf'")
    llamacpp.extra_buffers_work.cache_clear()
    assert llamacpp.extra_buffers_work("model.gguf") == (True, "")
    llamacpp.extra_buffers_work.cache_clear()


@needs_default_model
def test_llama_cpp_loads_without_extra_buffers_where_they_crash(monkeypatch):
    pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (pip install llama-cpp-python)")
    import llama_cpp.llama as module

    from hfaccel.bench import llamacpp

    default = module.llama_cpp.llama_model_default_params
    monkeypatch.setattr(llamacpp, "extra_buffers_work", lambda path: (False, "it crashed"))
    llm, note = llamacpp.load(models.default_gguf_path(), n_ctx=64, n_threads=1, verbose=False)
    assert llm.model_params.use_extra_bufts is False and note.endswith("it crashed")
    assert module.llama_cpp.llama_model_default_params is default
    assert len(llm.tokenize(b"Hello there")) >= 1


def test_llama_cpp_compare_needs_the_default_model(capsys, monkeypatch):
    import hfaccel.bench.runner as runner

    monkeypatch.setattr(runner.models, "load", lambda *a: (_ for _ in ()).throw(AssertionError("loaded a model")))
    rc = main(["bench", "--model", "tiny:llama", "--runs", "1", "--new-tokens", "2", "--prompt-tokens", "8",
               "--compare", "llama.cpp", "--quiet"])
    assert rc == 2
    assert "--compare llama.cpp needs the GGUF file of the model" in capsys.readouterr().err


def test_llama_cpp_that_cannot_be_imported_is_named_before_anything_runs(monkeypatch):
    """llama-cpp-python installed with --no-deps imports diskcache and fails (seen): the check must say so up
    front, not after the Transformers and hfaccel runs."""
    import importlib.util
    import sys

    from hfaccel.bench.runner import BenchSettings, _check_llama_cpp
    from hfaccel.errors import MissingDependencyError

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "llama_cpp" else None)
    monkeypatch.setitem(sys.modules, "llama_cpp", None)          # `import llama_cpp` raises ImportError
    with pytest.raises(MissingDependencyError, match="llama-cpp-python is installed but cannot be imported"):
        _check_llama_cpp(BenchSettings())
