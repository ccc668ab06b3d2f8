"""AWQ: scale folding leaves the float model unchanged, searches pick something, the pass runs on every
architecture, and it beats round-to-nearest on the default model."""

from __future__ import annotations


import pytest
import torch

import hfaccel
from hfaccel import models
from hfaccel.quant.awq import _fold_into_prev, _groups, _scale_inputs, fake_quant, search_clip, search_scale
from hfaccel.quant.layers import linear_weight
from hfaccel.registry import spec_for
from hfaccel.rewrite import Rewriter

from . import default_model_ppl
from ..conftest import greedy, needs_default_model, prompts


def test_folding_scales_keeps_the_float_model_exact(tiny_arch):
    model = models.tiny(tiny_arch)
    spec, _ = spec_for(model)
    x = prompts(model.config.vocab_size, batch=2, length=7)
    with torch.no_grad():
        before = model(x).logits
    rw = Rewriter(model)
    layer = model.get_submodule(spec.layers)[0]
    g = torch.Generator().manual_seed(0)
    for prev, kind, names in _groups(spec):
        prev_mod = layer.get_submodule(prev)
        width = linear_weight(layer.get_submodule(names[0])).shape[1]
        out = linear_weight(prev_mod).shape[0] if kind == "linear" else prev_mod.weight.shape[0]
        if out != width:
            continue
        s = torch.rand(width, generator=g) + 0.5
        _fold_into_prev(rw, prev_mod, prev, kind, s, keep=True)
        for n in names:
            _scale_inputs(rw, layer.get_submodule(n), n, s, keep=True)
    with torch.no_grad():
        after = model(x).logits
    torch.testing.assert_close(after, before, atol=2e-5, rtol=1e-4)
    rw.rollback()


def test_scale_search_protects_salient_channels():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(512, 64, generator=g)
    x[:, :4] *= 30                                      # four salient input channels
    w = torch.randn(32, 64, generator=g)
    s, alpha = search_scale(x, [w], 32, True)
    assert alpha > 0 and s[:4].mean() > s[4:].mean()
    err = lambda wq: (x @ wq.T - x @ w.T).pow(2).mean()   # noqa: E731
    assert err(fake_quant(w * s, 32, True) / s) < err(fake_quant(w, 32, True))


def test_clip_search_never_does_worse_than_no_clipping():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(16, 64, generator=g)
    w[0, 0] = 12.0                                       # an outlier that stretches its group
    x = torch.randn(256, 64, generator=g)
    clip = search_clip(w, x, 32, True)
    assert clip.shape == (16, 2) and float(clip.min()) >= 0.5 and float(clip[0, 0]) <= 1.0
    err = lambda c: (x @ fake_quant(w, 32, True, c).T - x @ w.T).pow(2).mean()   # noqa: E731
    assert err(clip) <= err(1.0)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "phi3", "gpt2"])
def test_awq_runs_on_each_architecture(arch):
    model = models.tiny(arch)
    report = hfaccel.accelerate_model(model, quantization={
        "method": "awq", "bits": 4, "group_size": 32, "calibration_samples": 4, "calibration_seq_len": 32})
    assert any(c.after.endswith("awq)") for c in report.changes)
    assert any(c.after == "rescaled" for c in report.changes) and not report.reversible
    x = prompts(model.config.vocab_size, batch=2, length=8)
    assert greedy(model, x, n=5).shape == (2, 13)


def test_awq_with_keep_original_reverts_exactly():
    model = models.tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hfaccel.accelerate_model(model, quantization={"method": "awq", "group_size": 32, "calibration_samples": 2,
                                                  "calibration_seq_len": 16}, keep_original=True)
    assert hfaccel.revert_model(model) == []
    after = model.state_dict()
    assert all(torch.equal(after[k], v) for k, v in before.items())


@needs_default_model
def test_default_model_awq_beats_rtn_at_the_same_group_size(default_model):
    assert default_model_ppl(default_model, "awq") < default_model_ppl(default_model, "rtn")
