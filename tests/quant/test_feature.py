"""quantization: {method: rtn} through accelerate_model: what is replaced, the report, revert, quality bars."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import hfaccel
from hfaccel import models
from hfaccel.errors import RevertError
from hfaccel.quant.layers import Int4Linear, Int8Linear
from hfaccel.quality import perplexity, token_agreement

from ..conftest import greedy, needs_default_model, prompts


def quantized(model) -> dict[str, nn.Module]:
    return {n: m for n, m in model.named_modules() if isinstance(m, (Int8Linear, Int4Linear))}


@pytest.mark.parametrize("bits", [8, 4])
def test_rtn_replaces_every_linear_but_the_head_and_reports_it(tiny_arch, bits):
    model = models.tiny(tiny_arch)
    from hfaccel.quant.layers import is_linear

    linears = [n for n, m in model.named_modules() if is_linear(m)]
    report = hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": bits, "group_size": 32})
    done = quantized(model)
    head = "lm_head"
    assert set(done) == set(linears) - {head}
    assert not report.lossless and not report.reversible
    assert any(n.startswith(f"head {head} kept in float") for n in report.notes)
    assert any("weight SQNR" in n for n in report.notes)
    assert [c.target for c in report.changes if c.feature == "quantize"] == [n for n in linears if n != head]
    x = prompts(model.config.vocab_size, batch=2, length=9)
    assert greedy(model, x, n=6).shape == (2, 15)


def test_int8_tracks_the_float_model_closely():
    plain = models.tiny("llama")
    model = models.tiny("llama")
    hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": 8})
    x = prompts(plain.config.vocab_size, batch=4, length=12)
    assert token_agreement(greedy(model, x, n=16), greedy(plain, x, n=16)) > 0.9


def test_modules_to_not_convert_and_quantized_head_copy():
    model = models.tiny("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    report = hfaccel.accelerate_model(model, quantization={
        "method": "rtn", "bits": 8, "modules_to_not_convert": ["mlp.down_proj", "*.0.self_attn.q_proj"],
        "quantize_lm_head": True})
    done = quantized(model)
    assert "lm_head" in done and not any("down_proj" in n for n in done)
    assert "model.layers.0.self_attn.q_proj" not in done and "model.layers.1.self_attn.q_proj" in done
    assert "head lm_head quantized int8 as its own copy; the tied input embedding stays float" in report.notes
    assert model.model.embed_tokens.weight.dtype == torch.float32


@pytest.mark.parametrize("method", ["rtn", "gptq"])
def test_int8_head_under_int4_layers(method):
    """lm_head_bits: 8 keeps the (tied) head int8 per channel, round to nearest, while every other layer is int4;
    its output stays within int8 rounding of the float head."""
    model = models.tiny("llama", tie_word_embeddings=True)
    head = copy.deepcopy(model.lm_head)
    report = hfaccel.accelerate_model(model, quantization={
        "method": method, "bits": 4, "group_size": 32, "quantize_lm_head": True, "lm_head_bits": 8,
        "calibration_samples": 4, "calibration_seq_len": 32})
    done = quantized(model)
    assert isinstance(done.pop("lm_head"), Int8Linear)
    assert done and all(isinstance(m, Int4Linear) for m in done.values())
    assert "head lm_head quantized int8 as its own copy; the tied input embedding stays float" in report.notes
    assert model.model.embed_tokens.weight.dtype == torch.float32            # the embedding is not touched
    x = torch.randn(3, 5, model.config.hidden_size)
    ref, out = head(x), model.lm_head(x.to(torch.bfloat16)).float()
    assert sqnr(ref, out) > 30
    int4 = models.tiny("llama", tie_word_embeddings=True)
    hfaccel.accelerate_model(int4, quantization={"method": "rtn", "bits": 4, "group_size": 32, "quantize_lm_head": True})
    assert isinstance(int4.lm_head, Int4Linear) and sqnr(ref, int4.lm_head(x.to(torch.bfloat16)).float()) < sqnr(ref, out)


def sqnr(ref: torch.Tensor, out: torch.Tensor) -> float:
    return (10 * torch.log10(ref.pow(2).sum() / (ref - out).pow(2).sum())).item()


def test_revert_refused_without_keep_original_and_exact_with_it():
    model = models.tiny("qwen2")
    hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": 4, "group_size": 32})
    with pytest.raises(RevertError, match=r"quantize: model.layers.0.self_attn.q_proj Linear -> Int4Linear"):
        hfaccel.revert_model(model)
    model = models.tiny("qwen2")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    report = hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": 4, "group_size": 32},
                                      keep_original=True)
    assert report.reversible and not report.lossless
    assert hfaccel.revert_model(model) == []
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)
    assert not quantized(model)


def test_failure_midway_restores_every_swapped_layer(monkeypatch):
    from hfaccel.quant import layers

    model = models.tiny("llama")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calls = []
    real = layers.Int8Linear.from_linear

    def flaky(linear):
        calls.append(1)
        if len(calls) == 5:
            raise RuntimeError("injected")
        return real(linear)

    monkeypatch.setattr(layers.Int8Linear, "from_linear", staticmethod(flaky))
    with pytest.raises(hfaccel.AccelError, match=r"failed in step 'quantize' \(RuntimeError: injected\)"):
        hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": 8})
    assert not quantized(model)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in before.items())


def test_unsupported_choices_are_reported():
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": 4, "group_size": -1})
    assert [s.reason for s in report.skipped if s.feature == "quantize"] == [
        "int4 needs group_size 32, 64, 128; it is -1 (per-channel int4 is not supported by the packed kernels)"]
    assert not quantized(model)


@needs_default_model
def test_default_model_perplexity_bars(default_model):
    plain, tok = default_model
    base = perplexity(plain, tok, window=256, max_windows=2)["perplexity"]
    got = {}
    for bits in (8, 4):
        model = copy.deepcopy(plain)
        hfaccel.accelerate_model(model, quantization={"method": "rtn", "bits": bits, "group_size": 64},
                                 kv_cache={"type": "dynamic"})
        got[bits] = perplexity(model, tok, window=256, max_windows=2)["perplexity"]
        layers = quantized(model).values()
        linear_bytes = sum(b.numel() * b.element_size() for m in layers for b in m.buffers())
        fp32_bytes = sum(m.in_features * m.out_features * 4 for m in layers)
        assert linear_bytes / fp32_bytes < (0.27 if bits == 8 else 0.15)
    assert got[8] / base < 1.01                      # int8 within +1%
    assert got[4] / base < 1.6                       # rtn int4 g64: the baseline GPTQ/AWQ must beat
