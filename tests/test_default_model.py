"""Lossless configs on the real default model: greedy tokens equal plain Transformers."""

from __future__ import annotations

import copy

import pytest
import torch

import hfaccel
from hfaccel.bench.runner import make_prompts

from .conftest import greedy, needs_default_model

pytestmark = needs_default_model


# low-latency (~110 s: it compiles the decode and verify steps) runs in CI's second step, with the slow tests
@pytest.mark.parametrize("config", [None, "cpu-fast", pytest.param("low-latency", marks=pytest.mark.slow)])
def test_default_model_greedy_equal(default_model, config):
    plain, tok = default_model
    model = copy.deepcopy(plain)
    report = hfaccel.accelerate_model(model, config)
    assert report.lossless and report.spec == "llama"
    x = make_prompts(tok, plain.config.vocab_size, 2, 40, seed=5)
    mask = torch.ones_like(x)
    mask[0, :7] = 0
    assert torch.equal(greedy(model, x, mask, n=24), greedy(plain, x, mask, n=24))


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


def test_default_model_chat_prompt_through_unchanged_generate(default_model):
    plain, tok = default_model
    model = copy.deepcopy(plain)
    hfaccel.accelerate_model(model, "cpu-fast")
    msgs = [{"role": "user", "content": "Name one colour of the rainbow."}]
    enc = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    a = model.generate(**enc, max_new_tokens=20, do_sample=False)
    b = plain.generate(**enc, max_new_tokens=20, do_sample=False)
    assert torch.equal(a, b)
