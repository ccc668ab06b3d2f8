"""bitsandbytes LLM.int8 / NF4: applied where bitsandbytes works, skipped with the reason where not."""

from __future__ import annotations

import pytest
import torch

import hfaccel
from hfaccel import models
from hfaccel.quant import bnb
from hfaccel.quality import token_agreement

from ..conftest import greedy, prompts

needs_bnb = pytest.mark.skipif(not bnb.bnb_available(), reason="bitsandbytes is not installed")


def test_missing_bitsandbytes_is_a_reported_skip(monkeypatch):
    monkeypatch.setattr(bnb, "bnb_available", lambda: False)
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, quantization={"method": "bnb-nf4"})
    assert [s.reason for s in report.skipped if s.feature == "quantize"] == [
        "bnb-nf4 needs bitsandbytes, which is not installed (pip install bitsandbytes)"]


def test_a_failing_cpu_backend_is_a_reported_skip(monkeypatch):
    monkeypatch.setattr(bnb, "bnb_available", lambda: True)
    monkeypatch.setattr(bnb, "cpu_self_check", lambda method, dtype: f"bitsandbytes' CPU backend fails for {method}: X")
    report = hfaccel.accelerate_model(models.tiny("llama"), quantization={"method": "bnb-int8"})
    assert [s.reason for s in report.skipped if s.feature == "quantize"] == [
        "bitsandbytes' CPU backend fails for bnb-int8: X"]


@needs_bnb
@pytest.mark.parametrize("method, bar_db", [("bnb-int8", 30), ("bnb-nf4", 12)])
def test_bitsandbytes_layers_on_cpu(method, bar_db):
    from hfaccel.quant.layers import sqnr_db

    plain = models.tiny("llama")
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, quantization={"method": method}, kv_cache={"type": "dynamic"})
    assert not report.lossless and "bitsandbytes" in report.changes[0].after
    x = prompts(plain.config.vocab_size, batch=2, length=10)
    with torch.no_grad():
        assert sqnr_db(plain(x).logits, model(x).logits) > bar_db          # logit SQNR bar
    assert greedy(model, x, n=4).shape == (2, 14)


@pytest.mark.gpu
@pytest.mark.parametrize("method", ["bnb-int8", "bnb-nf4"])
def test_bitsandbytes_on_cuda(method):
    if not bnb.bnb_available():
        pytest.skip("bitsandbytes is not installed")
    plain = models.tiny("llama", dtype=torch.bfloat16).cuda()
    model = models.tiny("llama", dtype=torch.bfloat16).cuda()
    hfaccel.accelerate_model(model, quantization={"method": method})
    x = prompts(plain.config.vocab_size, batch=2, length=10).cuda()
    assert token_agreement(greedy(model, x, n=12), greedy(plain, x, n=12)) >= 0.5
