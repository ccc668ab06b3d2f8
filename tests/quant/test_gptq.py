"""GPTQ: lower layer-output error than round-to-nearest, act-order, padding, and the sequential pass."""

from __future__ import annotations


import pytest
import torch

import hfaccel
from hfaccel import models
from hfaccel.quant.gptq import gptq_quantize
from hfaccel.quant.layers import Int4Linear, quantize_int4_groups

from . import default_model_ppl
from ..conftest import greedy, needs_default_model, prompts


def output_error(x, w, codes, scales, zeros, g):
    deq = (codes.float() - 8) * scales.T.repeat_interleave(g, 1) + zeros.T.repeat_interleave(g, 1)
    return ((x @ w.T - x @ deq.T) ** 2).mean().item()


@pytest.mark.parametrize("act_order", [False, True])
@pytest.mark.parametrize("sym", [True, False])
def test_gptq_beats_round_to_nearest_on_correlated_inputs(act_order, sym):
    g = torch.Generator().manual_seed(0)
    n, k, gs = 48, 128, 32
    w = torch.randn(n, k, generator=g)
    x = torch.randn(1024, k, generator=g) @ (0.3 * torch.randn(k, k, generator=g)) + torch.randn(k, generator=g)
    h = 2 * x.T @ x / len(x)
    codes, scales, zeros = gptq_quantize(w, h, gs, sym, 0.01, act_order)
    assert codes.dtype == torch.uint8 and int(codes.max()) <= 15 and scales.shape == (k // gs, n)
    rtn = output_error(x, w, *quantize_int4_groups(w, gs, sym), gs)
    assert output_error(x, w, codes, scales, zeros, gs) < 0.7 * rtn


def test_gptq_handles_dead_inputs_and_rejects_unpadded_weights():
    w = torch.randn(16, 64)
    x = torch.randn(256, 64)
    x[:, 5] = 0                                          # an input that is never active
    h = 2 * x.T @ x / len(x)
    codes, scales, zeros = gptq_quantize(w, h, 32)
    layer = Int4Linear(codes, scales, zeros, 32)
    assert torch.isfinite(layer.dequantize()).all()
    with pytest.raises(ValueError, match=r"K = 60 is not a multiple of group_size 32: pad first"):
        gptq_quantize(torch.randn(16, 60), torch.eye(60), 32)


@pytest.mark.parametrize("arch", ["llama", "qwen3", "gpt2"])
def test_sequential_gptq_on_tiny_models(arch):
    plain = models.tiny(arch)
    model = models.tiny(arch)
    report = hfaccel.accelerate_model(model, quantization={
        "method": "gptq", "bits": 4, "group_size": 32, "calibration_samples": 4, "calibration_seq_len": 32,
        "desc_act": arch == "qwen3"}, calibration=["some text to calibrate on " * 20])
    swapped = [c for c in report.changes if c.feature == "quantize"]
    assert swapped and all(c.after.endswith("gptq)") for c in swapped)
    assert any("calibration: 4 x 32 tokens of the given 1 strings" in n for n in report.notes)
    x = prompts(plain.config.vocab_size, batch=2, length=8)
    assert greedy(model, x, n=6).shape == greedy(plain, x, n=6).shape


def test_calibration_input_is_checked():
    model = models.tiny("llama")
    with pytest.raises(hfaccel.AccelError, match=r"calibration must be a string, a list of strings or a "
                                                   r"datasets.Dataset"):
        hfaccel.accelerate_model(model, quantization={"method": "gptq", "calibration_samples": 2,
                                                      "calibration_seq_len": 16}, calibration=42)
    assert "hfaccel_report" not in model.__dict__


@needs_default_model
def test_default_model_gptq_beats_rtn_at_the_same_group_size(default_model):
    assert default_model_ppl(default_model, "gptq") < default_model_ppl(default_model, "rtn")
