"""Tensor parallel on CPU: two processes (gloo) load a tiny model with tp_plan="auto" and accelerate it; the
greedy tokens must equal the single-process plain model's, and each rank must hold its own shards."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hfaccel import models

WORKER = Path(__file__).with_name("tp_worker.py")
CONFIGS = ["none", "cpu-fast", "cpu-int8", "rtn-int4", "cpu-int4"]
X = torch.tensor([[5, 7, 9, 11, 13, 17, 19, 23, 29], [31, 37, 41, 43, 47, 53, 59, 61, 67]])

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available")


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp")
    plain = models.tiny("llama")
    plain.save_pretrained(tmp / "model")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).parents[2])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER),
           str(tmp / "model"), str(tmp / "res"), ",".join(CONFIGS)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    ranks = [json.loads((tmp / f"res.rank{r}.json").read_text()) for r in (0, 1)]
    with torch.no_grad():
        logits = plain(X).logits[:, -1]
    want = plain.generate(X, attention_mask=torch.ones_like(X), max_new_tokens=10, do_sample=False).tolist()
    return ranks, want, logits


@pytest.mark.parametrize("name", ["none", "cpu-fast"])
def test_lossless_configs_give_the_single_process_tokens_on_every_rank(runs, name):
    ranks, want, _ = runs
    for r, res in enumerate(ranks):
        got = res[name]
        assert got["tokens"] == want and got["tokens_after_revert"] == want
        assert got["device"].endswith(f"tensor-parallel rank {r} of 2")
        assert got["q_proj"] == ["Linear", 32] and got["o_proj"] == "RowParallelLinear"      # 64 q rows / 2 ranks
        assert got["pool_kv_heads"] == 1                                                    # 2 KV heads / 2 ranks
        assert any("10 colwise + 4 rowwise Linear on rank-local shards" in n for n in got["notes"])


def test_fused_projections_keep_the_column_parallel_sharding(runs):
    for res in runs[0]:
        fused = {c[1]: c[2] for c in res["cpu-fast"]["changes"] if c[0] == "fuse"}
        qkv = next(v for k, v in fused.items() if "q_proj+k_proj+v_proj" in k)
        gate_up = next(v for k, v in fused.items() if "gate_proj+up_proj" in k)
        assert qkv.startswith("1 GEMM [64, 64]")          # this rank's 32 q + 16 k + 16 v rows (128 unsharded)
        assert gate_up.startswith("1 GEMM [128, 64]")     # this rank's 64 gate + 64 up rows (256 unsharded)


def sqnr(ref: torch.Tensor, got: torch.Tensor) -> float:
    return float(10 * torch.log10(ref.pow(2).sum() / (ref - got).pow(2).sum()))


@pytest.mark.parametrize("name, kind, bar", [("cpu-int8", "Int8Linear", 25.0), ("rtn-int4", "Int4Linear", 10.0)])
def test_rtn_quantization_runs_per_shard(runs, name, kind, bar):
    ranks, want, logits = runs
    assert ranks[0][name]["tokens"] == ranks[1][name]["tokens"]
    for res in ranks:
        got = res[name]
        assert got["q_proj"][0] == kind and got["q_proj"][1] == 32
        quantized = [c for c in got["changes"] if c[0] == "quantize"]
        assert any(c[1].endswith("o_proj.linear") for c in quantized)   # the rowwise shard's own columns
        assert sqnr(logits, torch.tensor(got["logits"])) > bar
        assert got["tokens_after_revert"] == want


def test_calibrated_quantization_says_why_it_does_not_run_sharded(runs):
    for res in runs[0]:
        reason = res["cpu-int4"]["skipped"]["quantize"]
        assert "gptq on a tensor-parallel model (2 ranks): only rtn runs per shard" in reason
        assert "tensor parallel (2 ranks)" in res["cpu-fast"]["skipped"]["compile"]
