"""weight_layout (hfaccel/layout.py): column-major fp32 Linear weights. Greedy tokens equal plain
Transformers on every architecture, checkpoints stay contiguous and tied, revert restores row-major."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import hfaccel
from hfaccel import layout, models
from tests.conftest import assert_compiled_greedy_equal, greedy, prompts


@pytest.fixture
def always(monkeypatch):
    """Relayout every shape whatever the timing says (tiny shapes time too close to call)."""
    monkeypatch.setattr(layout, "MIN_GAIN", 0.0)


def relaid(model) -> list[str]:
    return [n for n, p in model.named_parameters() if p.dim() == 2 and p.stride() == (1, p.shape[0])
            and p.shape[0] > 1]


@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_greedy_equals_transformers_on_every_architecture(arch, always):
    model, ref = models.tiny(arch), models.tiny(arch)
    report = hfaccel.accelerate_model(model, fusion={"weight_layout": True})
    changes = [c for c in report.changes if c.feature == "weight_layout"]
    assert changes and relaid(model), report
    linears = {n for n, m in model.named_modules() if type(m) is torch.nn.Linear}
    assert {n.rsplit(".", 1)[0] for n in relaid(model)} - {"model.embed_tokens", "transformer.wte"} <= linears
    ids = prompts(ref.config.vocab_size, batch=2, length=13)
    assert torch.equal(greedy(model, ids, n=16), greedy(ref, ids, n=16))


def test_with_the_compiled_step_and_paged_cache(always):
    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, "cpu-fast")
    assert relaid(model)
    assert_compiled_greedy_equal(model, ref)


def test_checkpoint_is_contiguous_tied_and_reloads_equal(always, tmp_path):
    model = models.tiny("llama", tie_word_embeddings=True)
    ref = models.tiny("llama", tie_word_embeddings=True)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    hfaccel.accelerate_model(model, fusion={"weight_layout": True})
    assert not model.lm_head.weight.is_contiguous()
    state = model.state_dict()
    assert all(v.is_contiguous() for v in state.values())
    assert state["lm_head.weight"].data_ptr() == state["model.embed_tokens.weight"].data_ptr()
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    want = ref.state_dict()
    got = back.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)


def test_revert_restores_row_major_and_removes_the_hook(always):
    model, ref = models.tiny("qwen2"), models.tiny("qwen2")
    hfaccel.accelerate_model(model, fusion={"weight_layout": True})
    assert relaid(model)
    assert hfaccel.revert_model(model) == []
    assert not relaid(model) and all(p.is_contiguous() for p in model.parameters())
    assert not model._state_dict_hooks
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_second_call_is_a_noop(always):
    model = models.tiny("llama")
    hfaccel.accelerate_model(model, fusion={"weight_layout": True})
    before = [p.stride() for p in model.parameters()]
    again = hfaccel.accelerate_model(model, fusion={"weight_layout": True})
    assert again.noop and [p.stride() for p in model.parameters()] == before


def test_keeps_row_major_where_it_is_not_faster(monkeypatch):
    monkeypatch.setattr(layout, "MIN_GAIN", 1e9)
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, fusion={"weight_layout": True})
    assert not [c for c in report.changes if c.feature == "weight_layout"]
    assert not relaid(model) and not model._state_dict_hooks


def test_off_by_default_and_skipped_without_fp32_linears():
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model)
    assert not [c for c in report.changes if c.feature == "weight_layout"]
    half = models.tiny("llama", dtype=torch.bfloat16)
    report = hfaccel.accelerate_model(half, fusion={"weight_layout": True})
    skip = [s for s in report.skipped if s.feature == "weight_layout"]
    assert skip and "no fp32 nn.Linear" in skip[0].reason
    assert not relaid(half)
