"""small_gemm (hfaccel/small_gemm.py): Linear layers with 1-16 rows of input on hfaccel's few-row GEMM. Greedy
tokens equal plain Transformers on every architecture (eager, compiled, at batch 1, 4 and in the engine),
revert restores the forward and the weight layout, training-style calls keep F.linear's autograd."""

from __future__ import annotations

import pytest
import torch

import hfaccel
from hfaccel import models, small_gemm
from hfaccel.kernels import cpu_gemm
from tests.conftest import assert_compiled_greedy_equal, greedy, prompts


@pytest.fixture(autouse=True)
def always(monkeypatch):
    """Take every shape whatever the timing says (tiny shapes time too close to call)."""
    ok, why = cpu_gemm.status()
    if not ok:
        pytest.skip(f"hfaccel's few-row GEMM does not build here: {why}")
    monkeypatch.setattr(small_gemm, "MIN_GAIN", 0.0)
    monkeypatch.setattr(small_gemm, "SLOWER_OK", float("inf"))


def routed(model) -> list[str]:
    return [n for n, m in model.named_modules()
            if type(m) is torch.nn.Linear and getattr(m.__dict__.get("forward"), "__func__", None) is small_gemm._forward]


@pytest.mark.parametrize("arch", models.TINY_ARCHS)
@pytest.mark.parametrize("batch", [1, 4])
def test_greedy_equals_transformers_on_every_architecture(arch, batch):
    model, ref = models.tiny(arch), models.tiny(arch)
    report = hfaccel.accelerate_model(model, fusion={"small_gemm": True})
    assert [c for c in report.changes if c.feature == "small_gemm"] and routed(model), report
    ids = prompts(ref.config.vocab_size, batch=batch, length=13)       # prefill: 13-52 rows; decode: 1 or 4
    assert torch.equal(greedy(model, ids, n=16), greedy(ref, ids, n=16))


def test_outputs_match_the_layer_and_the_op_runs(monkeypatch):
    model = models.tiny("qwen2")                                        # q/k/v carry biases
    ref = models.tiny("qwen2")
    hfaccel.accelerate_model(model, fusion={"small_gemm": True, "qkv": False})   # q_proj stays its own Linear
    calls = []
    real = torch.ops.hfaccel_cpu_gemm.small_linear
    monkeypatch.setattr(small_gemm.torch.ops.hfaccel_cpu_gemm, "small_linear",
                        lambda *a: calls.append(a[0].shape) or real(*a), raising=False)
    layer, plain = model.model.layers[0].self_attn.q_proj, ref.model.layers[0].self_attn.q_proj
    assert layer.bias is not None
    with torch.no_grad():
        for shape in [(1, 1, layer.in_features), (4, 1, layer.in_features), (2, 8, layer.in_features),
                      (3, 40, layer.in_features)]:
            x = torch.randn(shape)
            torch.testing.assert_close(layer(x), plain(x), rtol=1e-5, atol=1e-5)
    assert calls == [(1, layer.in_features), (4, layer.in_features), (16, layer.in_features)]   # 120 rows: F.linear


def test_with_grad_it_keeps_f_linear_and_its_backward():
    model = models.tiny("llama")
    hfaccel.accelerate_model(model, fusion={"small_gemm": True})
    layer = model.model.layers[0].mlp.down_proj
    x = torch.randn(2, layer.in_features, requires_grad=True)
    layer(x).sum().backward()
    assert x.grad is not None and layer.weight.grad is not None
    torch.testing.assert_close(x.grad, layer.weight.sum(0).expand(2, -1).detach())


def test_with_the_compiled_step_and_paged_cache():
    model, ref = models.tiny("llama"), models.tiny("llama")
    report = hfaccel.accelerate_model(model, "cpu-fast")
    assert [c for c in report.changes if c.feature == "small_gemm"], report
    assert_compiled_greedy_equal(model, ref)


def test_in_the_batching_engine_greedy_equals_each_prompt_alone():
    model, ref = models.tiny("mistral"), models.tiny("mistral")
    hfaccel.accelerate_model(model, fusion={"small_gemm": True}, kv_cache={"max_cache_tokens": 4096})
    assert routed(model)
    ids = [prompts(ref.config.vocab_size, batch=1, length=n, seed=n)[0].tolist() for n in (5, 23, 9, 40, 17)]
    results = hfaccel.generate_batch(model, ids, max_new_tokens=12, do_sample=False, max_batch=4, token_budget=32)
    for p, r in zip(ids, results):
        want = greedy(ref, torch.tensor([p]), n=12)[0, len(p):]
        assert r.token_ids == want.tolist()[:len(r.token_ids)] and len(r.token_ids) == min(12, len(want))


def test_revert_restores_the_forward_and_the_column_major_layout(monkeypatch):
    from hfaccel import layout

    monkeypatch.setattr(layout, "MIN_GAIN", 0.0)
    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, fusion={"small_gemm": True, "weight_layout": True})
    names = routed(model)
    assert names and all(model.get_submodule(n).weight.is_contiguous() for n in names)   # the op wants row-major
    undone = hfaccel.revert_model(model)
    assert undone == [] and not routed(model)
    assert all(p.is_contiguous() for p in model.parameters())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), ref.state_dict().values()))


def test_second_call_is_a_noop_and_revert_then_again_works():
    model = models.tiny("llama")
    hfaccel.accelerate_model(model, fusion={"small_gemm": True})
    again = hfaccel.accelerate_model(model, fusion={"small_gemm": True})
    assert again.noop
    hfaccel.revert_model(model)
    assert not routed(model)
    hfaccel.accelerate_model(model, fusion={"small_gemm": True})
    assert routed(model)


def test_not_taken_where_not_faster_and_off_by_default(monkeypatch):
    model = models.tiny("llama")
    assert not [c for c in hfaccel.accelerate_model(model).changes if c.feature == "small_gemm"]
    monkeypatch.setattr(small_gemm, "MIN_GAIN", 1e9)
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, fusion={"small_gemm": True})
    assert not [c for c in report.changes if c.feature == "small_gemm"] and not routed(model)
    half = models.tiny("llama", dtype=torch.bfloat16)
    report = hfaccel.accelerate_model(half, fusion={"small_gemm": True})
    skip = [s for s in report.skipped if s.feature == "small_gemm"]
    assert skip and "no fp32 nn.Linear" in skip[0].reason and not routed(half)
