"""Lossless configs on the real default model: greedy tokens equal plain Transformers."""

from __future__ import annotations

import copy

import pytest
import torch

import hfaccel
from hfaccel.bench.runner import make_prompts

from .conftest import greedy, needs_default_model

pytestmark = needs_default_model


def test_default_model_greedy_equal(default_model):
    plain, tok = default_model
    model = copy.deepcopy(plain)
    report = hfaccel.accelerate_model(model)
    assert report.lossless and report.spec == "llama"
    x = make_prompts(tok, plain.config.vocab_size, 2, 40, seed=5)
    mask = torch.ones_like(x)
    mask[0, :7] = 0
    assert torch.equal(greedy(model, x, mask, n=24), greedy(plain, x, mask, n=24))


# One accelerated copy for batch 1 and a left-padded batch 2: each compile of the 30-layer decode step costs
# about a minute on 2 cores, so the default model's cpu-fast checks share it. low-latency on the default model
# runs in CI's second step (tests/test_speculative.py, rows 1 and 4).
def test_default_model_cpu_fast_is_token_exact(default_model):
    plain, tok = default_model
    fast = copy.deepcopy(plain)
    report = hfaccel.accelerate_model(fast, "cpu-fast")
    assert report.lossless and report.spec == "llama"
    tok = copy.copy(tok)
    tok.padding_side = "left"
    chat = tok.apply_chat_template([{"role": "user", "content": "Name one colour of the rainbow."}],
                                   add_generation_prompt=True, tokenize=False)
    enc = tok([chat, "def fibonacci(n):\n    "], return_tensors="pt", padding=True)
    one = enc.attention_mask[0].bool()
    for ids, mask in ((enc.input_ids[:1, one], enc.attention_mask[:1, one]), (enc.input_ids, enc.attention_mask)):
        want = plain.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
        got = fast.generate(ids, attention_mask=mask, max_new_tokens=40, do_sample=False)
        assert torch.equal(got, want)
    assert fast.hfaccel_compile_stats.compiled_calls == 2


def test_default_model_eager_to_sdpa_is_token_exact(default_model):
    plain, tok = default_model
    model = copy.deepcopy(plain)
    model.set_attn_implementation("eager")
    eager_out = greedy(model, make_prompts(tok, plain.config.vocab_size, 1, 60, seed=2), n=32)
    report = hfaccel.accelerate_model(model, kv_cache={"type": "dynamic"})
    assert [c.after for c in report.changes if c.feature == "attention"] == ["sdpa"]
    assert torch.equal(greedy(model, make_prompts(tok, plain.config.vocab_size, 1, 60, seed=2), n=32), eager_out)
    hfaccel.revert_model(model)
    assert model.config._attn_implementation == "eager"
