"""fuse_rope (hfaccel/rope.py, kernels/cpu_rope.cpp): q and k rotated by one op in eager mode. The op equals
Transformers' apply_rotary_pos_emb bit for bit (values and layout) in every CPU dtype; whole models keep their
logits and greedy tokens; compiled graphs and tensors that need grad keep Transformers' ops; nothing outside
the accelerated instances changes, and revert removes it."""

from __future__ import annotations

import functools

import pytest
import torch
from transformers.models.llama import modeling_llama
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb as llama_rope
from transformers.models.phi3.modeling_phi3 import apply_rotary_pos_emb as phi3_rope

import hfaccel
from hfaccel import models, rope
from hfaccel.kernels import cpu_rope
from tests.conftest import greedy, prompts

pytestmark = pytest.mark.skipif(not cpu_rope.status()[0], reason=f"no fused RoPE op: {cpu_rope.status()[1]}")

EAGER = {"kv_cache": {"type": "dynamic"}, "compile": {"enabled": False}}
ROTARY = [a for a in models.TINY_ARCHS if a != "gpt2"]


def inputs(b, hq, hk, s, d, r, bc, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = (torch.randn(b, s, hq, d, generator=g) * 3).to(dtype).transpose(1, 2)   # as the projections give them
    k = (torch.randn(b, s, hk, d, generator=g) * 3).to(dtype).transpose(1, 2)
    ang = torch.randn(bc, s, r // 2, generator=g) * 20
    return q, k, torch.cat([ang.cos()] * 2, -1).to(dtype), torch.cat([ang.sin()] * 2, -1).to(dtype)


def said(report) -> str:
    """What a report gave instead of a change: its skips and notes, for an assertion's message."""
    return f"skipped: {[(s.feature, s.reason) for s in report.skipped]}; notes: {report.notes}"


def rope_change(report):
    """The report's fuse_rope change; where there is none, the assertion says what the report gave instead."""
    found = [c for c in report.changes if c.feature == "fuse_rope"]
    assert found, f"no fuse_rope change; {said(report)}"
    return found[0]


def op_calls(fn) -> int:
    """How many times fn() ran hfaccel's RoPE op (from the profiler: nothing is patched to count)."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    return sum(e.count for e in prof.key_averages() if e.key == "hfaccel_cpu_rope::rope")


@pytest.mark.parametrize("dtype", cpu_rope.DTYPES)
@pytest.mark.parametrize("shape", [(1, 9, 3, 1, 64, 64, 1),       # SmolLM2's decode step
                                   (2, 4, 2, 7, 32, 32, 2),       # a cos per row
                                   (3, 2, 2, 5, 10, 10, 1),       # head_dim not a multiple of a vector
                                   (1, 3, 1, 17, 48, 24, 1),      # partial rotary (Phi-3 style)
                                   (2, 5, 5, 33, 128, 64, 2)])
def test_the_op_equals_transformers_bit_for_bit(shape, dtype):
    q, k, cos, sin = inputs(*shape, dtype)
    partial = shape[5] < shape[4]
    want = (phi3_rope if partial else llama_rope)(q, k, cos, sin)
    got = cpu_rope.rope(q, k, cos, sin, contiguous=partial)     # Phi-3's function ends in a cat: contiguous
    for a, b in zip(want, got):
        assert torch.equal(a, b)
        assert a.stride() == b.stride()
    if not partial:                                              # the other layout holds the same values
        assert all(torch.equal(a, b) and b.is_contiguous() for a, b in zip(want, cpu_rope.rope(q, k, cos, sin, True)))
    if dtype is torch.bfloat16 and not partial:                 # the test can tell one rounding from three
        h = shape[4] // 2
        once = (q.float() * cos[:, None].float()
                + torch.cat([-q[..., h:], q[..., :h]], -1).float() * sin[:, None].float()).to(dtype)
        assert not torch.equal(once, want[0])


def test_the_op_names_what_it_does_not_take():
    q, k, cos, sin = inputs(1, 4, 2, 3, 16, 16, 1, torch.float32)
    cases = [((q, k, cos[..., :15], sin[..., :15]), "rotary width must be even"),
             ((q, k.double(), cos, sin), "k is Double"),
             ((q, k, cos[:, :2], sin[:, :2]), "cos has 2 positions, q 3"),
             ((q, k, torch.cat([cos, cos], -1), torch.cat([sin, sin], -1)), "cos is 32 wide"),
             ((q.transpose(-1, -2), k, cos, sin), "contiguous last dimension"),
             ((q, k, cos, sin[..., :8]), "of one shape")]
    for args, message in cases:
        with pytest.raises(RuntimeError, match=message):
            cpu_rope.rope(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("arch", ROTARY)
def test_models_keep_their_logits_and_tokens_with_the_fused_rope(arch, dtype):
    model, ref = models.tiny(arch, dtype=dtype), models.tiny(arch, dtype=dtype)
    report = hfaccel.accelerate_model(model, **EAGER)
    n = model.config.num_hidden_layers
    change = rope_change(report)
    assert change.target.startswith(f"{n} x ") and change.lossless and change.reversible
    ids = prompts(ref.config.vocab_size, batch=2, length=11)
    with torch.no_grad():
        assert op_calls(lambda: model(ids)) == n                 # one op per layer: it really ran
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert torch.equal(greedy(model, ids, n=10), greedy(ref, ids, n=10))


def test_nothing_outside_the_instance_changes_and_revert_removes_it():
    cls_forward, module_fn = modeling_llama.LlamaAttention.forward, modeling_llama.apply_rotary_pos_emb
    model, other = models.tiny("llama"), models.tiny("llama")
    rope_change(hfaccel.accelerate_model(model, **EAGER))
    attn = model.model.layers[0].self_attn
    assert "forward" in attn.__dict__
    assert modeling_llama.LlamaAttention.forward is cls_forward and modeling_llama.apply_rotary_pos_emb is module_fn
    ids = prompts(other.config.vocab_size, batch=1, length=5)
    with torch.no_grad():
        assert op_calls(lambda: other(ids)) == 0                 # another model in the process: untouched
        hfaccel.revert_model(model)
        assert "forward" not in attn.__dict__ and op_calls(lambda: model(ids)) == 0


def test_compiled_graphs_and_gradients_keep_transformers_ops():
    model, ref = models.tiny("qwen2"), models.tiny("qwen2")
    hfaccel.accelerate_model(model, **EAGER)
    ids = prompts(ref.config.vocab_size, batch=1, length=6)
    compiled = torch.compile(model, backend="eager", fullgraph=False)
    with torch.no_grad():
        assert op_calls(lambda: compiled(ids)) == 0              # Dynamo traced Transformers' function
        assert torch.equal(compiled(ids).logits, ref(ids).logits)
    model.train()
    loss = model(ids, labels=ids).loss
    assert op_calls(lambda: model(ids, labels=ids).loss.backward()) == 0
    loss.backward()
    assert model.model.layers[0].input_layernorm.weight.grad is not None      # through q, k and RoPE


def test_a_probe_that_differs_leaves_rope_alone_and_says_why(monkeypatch):
    real = cpu_rope.rope
    monkeypatch.setattr(cpu_rope, "rope", lambda q, k, cos, sin, contiguous=False:
                        tuple(t + 1e-3 for t in real(q, k, cos, sin, contiguous)))
    model = models.tiny("mistral")
    report = hfaccel.accelerate_model(model, **EAGER)
    assert not any(c.feature == "fuse_rope" for c in report.changes)
    assert any("fuse_rope: not bit-identical" in n and "left as Transformers' ops" in n
               for n in report.notes), said(report)
    assert "forward" not in model.model.layers[0].self_attn.__dict__


def test_fusion_rope_false_and_models_without_rotary_ask_for_nothing():
    report = hfaccel.accelerate_model(models.tiny("llama"), fusion={"rope": False}, **EAGER)
    assert not any("rope" in c.feature for c in report.changes) and not any(s.feature == "fuse_rope"
                                                                           for s in report.skipped)
    report = hfaccel.accelerate_model(models.tiny("gpt2"), **EAGER)
    assert not any(c.feature == "fuse_rope" for c in report.changes)


def _scale(x):
    return x


def test_with_global_copies_the_function_and_its_wrappers_only():
    def deco(fn):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            return fn(*args, **kwargs) * 10
        return wrapper

    @deco
    def f(x, times=2):
        return _scale(x) * times

    g = rope.with_global(f, "_scale", lambda x: -x)
    assert f(3) == 60 and g(3) == -60 and _scale(3) == 3        # the module's own global is unchanged
    assert g.__wrapped__ is not f.__wrapped__ and g.__wrapped__(3) == -6 and f.__wrapped__(3) == 6
    assert g.__name__ == "f" and g.__wrapped__.__defaults__ == (2,)
    assert rope.with_global(f, "not_a_global_here", 1) is None
