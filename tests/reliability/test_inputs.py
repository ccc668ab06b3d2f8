"""Hostile and bad input: each gets a specific error before anything changes, or a documented fallback, and
the model stays usable."""

from __future__ import annotations

import warnings

import pytest
import torch

import hfaccel
from hfaccel import models
from tests.conftest import greedy, prompts

from .conftest import TALLY


@pytest.fixture
def accelerated():
    model = models.tiny("llama")
    hfaccel.accelerate_model(model, "cpu-fast", compile={"warmup": False}, kv_cache={"max_cache_tokens": 4096})
    return model


def usable(model) -> None:
    plain = models.tiny("llama")
    ids = prompts(plain.config.vocab_size, batch=1, length=7)
    assert torch.equal(greedy(model, ids, n=5), greedy(plain, ids, n=5))


def test_empty_prompts_are_refused(accelerated):
    TALLY["inputs"] += 2
    with pytest.raises(ValueError, match=r"empty prompt: input_ids has shape \[1, 0\]"):
        accelerated.generate(torch.zeros(1, 0, dtype=torch.long), max_new_tokens=3)
    with pytest.raises(ValueError, match="empty prompt"):
        hfaccel.generate_batch(accelerated, [[4, 5], []])
    usable(accelerated)


def test_prompts_past_the_position_limit(accelerated):
    TALLY["inputs"] += 2
    limit = accelerated.config.max_position_embeddings
    with pytest.raises(ValueError, match=f"prompt of {limit + 1} tokens reaches the model's max_position_embeddings"):
        hfaccel.generate_batch(accelerated, [[5] * (limit + 1)], max_new_tokens=2)
    # generate() keeps Transformers' behaviour (RoPE models run past the limit): the same tokens as plain
    plain = models.tiny("llama")
    ids = prompts(plain.config.vocab_size, batch=1, length=limit + 8)
    assert torch.equal(greedy(accelerated, ids, n=4), greedy(plain, ids, n=4))


def test_models_without_weights_or_wrapped_are_refused_untouched():
    TALLY["inputs"] += 3
    meta = models.tiny("llama").to("meta")
    with pytest.raises(ValueError, match=r"parameter\(s\) on the meta device \(e.g. model.embed_tokens.weight\)"):
        hfaccel.accelerate_model(meta)
    assert "hfaccel_report" not in meta.__dict__ and "generate" not in meta.__dict__
    model = models.tiny("llama")
    with pytest.raises(TypeError, match=r"torch.compile wrapper \(OptimizedModule\) around LlamaForCausalLM"):
        hfaccel.accelerate_model(torch.compile(model))
    with pytest.raises(TypeError, match="got str"):
        hfaccel.accelerate_model("HuggingFaceTB/SmolLM2-135M")
    usable(model)


def test_training_mode_warns_and_keeps_gradients_flowing():
    TALLY["inputs"] += 1
    model, plain = models.tiny("llama").train(), models.tiny("llama").train()
    with pytest.warns(UserWarning, match="training mode"):
        report = hfaccel.accelerate_model(model, "cpu-fast", compile={"warmup": False})
    assert any(s.feature == "packed_weights" and "training mode" in s.reason for s in report.skipped)
    ids = prompts(plain.config.vocab_size, batch=2, length=12)
    for m in (model, plain):
        m(ids, labels=ids).loss.backward()
    grads = dict(plain.named_parameters())
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.allclose(p.grad, grads[name].grad, atol=1e-5, rtol=1e-4), name
    model.eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        usable(model)


def test_bad_sampling_settings_name_the_value():
    TALLY["inputs"] += 4
    model = models.tiny("llama")
    for kw, message in (({"temperature": -1.0}, "temperature = -1.0"), ({"top_k": -2}, "top_k = -2"),
                        ({"max_new_tokens": 0}, "max_new_tokens = 0"), ({"beams": 2}, r"unknown sampling setting")):
        with pytest.raises(ValueError, match=message):
            hfaccel.generate_batch(model, [[4, 5]], **kw)


def test_inputs_on_another_device_or_of_the_wrong_kind(accelerated):
    TALLY["inputs"] += 3
    with pytest.raises(ValueError, match=r"input_ids are on meta, the model on cpu; move them first"):
        accelerated.generate(torch.ones(1, 4, dtype=torch.long, device="meta"), max_new_tokens=2)
    with pytest.raises(ValueError, match=r"a tensor prompt must hold token ids .* got torch.int64 on meta"):
        hfaccel.generate_batch(accelerated, [torch.ones(4, dtype=torch.long, device="meta")], max_new_tokens=2)
    with pytest.raises(ValueError, match=r"got torch.float32 on cpu"):
        hfaccel.generate_batch(accelerated, [torch.ones(4)], max_new_tokens=2)
    usable(accelerated)
