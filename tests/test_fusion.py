"""fuse (hfaccel/fusion.py): one GEMM for q/k/v and for gate/up, RMSNorm as one op. Greedy tokens equal
plain Transformers on every architecture, float and quantized, eager and compiled; weights are views of
the fused tensor (no extra memory, same state_dict); revert and a later cast restore the plain path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import hfaccel
from hfaccel import fusion, layout, models
from hfaccel.quant.layers import Int4Linear, Int8Linear
from tests.conftest import greedy, prompts

GATED = ("llama", "mistral", "qwen2", "qwen3", "gemma")
EAGER = {"kv_cache": {"type": "dynamic"}, "compile": {"enabled": False}}


def fused(report) -> dict[str, str]:
    return {c.target: c.after for c in report.changes if c.feature == "fuse"}


def storage(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()


@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_greedy_equals_transformers_on_every_architecture(arch):
    model, ref = models.tiny(arch), models.tiny(arch)
    report = hfaccel.accelerate_model(model, **EAGER)
    done = fused(report)
    if arch in GATED:
        n = model.config.num_hidden_layers
        assert done[f"{n} x q_proj+k_proj+v_proj (Linear)"].startswith("1 GEMM")
        assert done[f"{n} x gate_proj+up_proj (Linear)"].endswith("then act(gate) * up")
        attn = model.model.layers[0].self_attn
        assert storage(attn.q_proj.weight) == storage(attn.k_proj.weight) == storage(attn.v_proj.weight)
    if arch == "phi3":
        assert any("already one projection in the checkpoint (qkv_proj)" in n for n in report.notes)
    if arch == "gpt2":
        assert not done and "fuse_rope" not in {s.feature for s in report.skipped}
    else:
        assert any("RMSNorm" in t for t in done)
    ids = prompts(ref.config.vocab_size, batch=2, length=13)
    with torch.no_grad():                       # on these shapes the fused GEMMs are bit-identical
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert torch.equal(greedy(model, ids, n=16), greedy(ref, ids, n=16))


def test_state_dict_save_and_reload_are_unchanged(tmp_path):
    model, ref = models.tiny("qwen2"), models.tiny("qwen2")       # qwen2: q/k/v with biases
    report = hfaccel.accelerate_model(model, **EAGER)
    assert report.weight_bytes_after == report.weight_bytes_before    # views of one tensor: no more, no less
    attn = model.model.layers[0].self_attn
    assert storage(attn.q_proj.bias) == storage(attn.v_proj.bias)
    want, got = ref.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path).state_dict()
    assert back.keys() == want.keys() and all(torch.equal(want[k], back[k]) for k in want)


def test_router_serves_any_order_and_any_input():
    a, b, c = (torch.nn.Linear(8, n) for n in (6, 4, 4))
    want = [F.linear(x, m.weight, m.bias) for x in (torch.randn(2, 8),) for m in (a, b, c)]
    undos = []
    shared, _ = fusion._fuse_group([a, b, c], "linear", undos)
    x = torch.randn(2, 8)
    want = [F.linear(x, m.weight, m.bias) for m in (a, b, c)]
    assert [torch.equal(g, w) for g, w in zip((b(x), c(x), a(x)), want[1:] + want[:1])] == [True] * 3
    assert shared.parts is None and shared.x is None           # nothing held after the last slice
    y = torch.randn(3, 8)
    assert torch.equal(a(x), want[0]) and torch.equal(b(y), F.linear(y, b.weight, b.bias))
    assert torch.equal(c(x), want[2])                           # x's slices were still pending
    for u in reversed(undos):
        u()
    assert "forward" not in a.__dict__ and storage(a.weight) != storage(b.weight)


def test_falls_back_to_own_weights_after_a_cast():
    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, **EAGER)
    model.double()
    ref.double()
    ids = prompts(ref.config.vocab_size, batch=1, length=9)
    assert torch.equal(greedy(model, ids, n=10), greedy(ref, ids, n=10))


def test_revert_restores_separate_weights_and_forwards():
    model, ref = models.tiny("qwen3"), models.tiny("qwen3")
    hfaccel.accelerate_model(model, **EAGER)
    assert hfaccel.revert_model(model) == []
    attn, mlp = model.model.layers[1].self_attn, model.model.layers[1].mlp
    assert storage(attn.q_proj.weight) != storage(attn.k_proj.weight)
    assert not [n for n, m in model.named_modules() if "forward" in m.__dict__ or "_hfaccel_eps" in m.__dict__]
    assert all(torch.equal(x, y) for x, y in zip(model.state_dict().values(), ref.state_dict().values()))
    assert storage(mlp.gate_proj.weight) != storage(mlp.up_proj.weight)


@pytest.mark.parametrize("bits,kind", [(8, Int8Linear), (4, Int4Linear)])
def test_quantized_projections_fuse_and_give_the_same_tokens(bits, kind):
    q = {"method": "rtn", "bits": bits, "group_size": 32}
    model, ref = models.tiny("llama"), models.tiny("llama")
    report = hfaccel.accelerate_model(model, quantization=q, **EAGER)
    hfaccel.accelerate_model(ref, quantization=q, fusion={"qkv": False, "gate_up": False}, **EAGER)
    done = fused(report)
    assert done[f"2 x q_proj+k_proj+v_proj ({kind.__name__})"].startswith("1 GEMM [128, 64]")
    attn = model.model.layers[0].self_attn
    if bits == 4 and attn.q_proj.kernel == "int4pack_cpu":   # N = 64 + 32 + 32: only q_proj is a whole 64-row
        assert "held twice" in done[f"2 x gate_proj+up_proj ({kind.__name__})"]   # block of aten's packing
        assert storage(attn.q_proj.qweight) != storage(attn.v_proj.qweight)
    else:                                           # int8, and hfaccel's int4 layout: rows are independent
        assert storage(attn.q_proj.qweight) == storage(attn.v_proj.qweight)
    ids = prompts(model.config.vocab_size, batch=2, length=11)
    assert torch.equal(greedy(model, ids, n=14), greedy(ref, ids, n=14))


def test_int4_packed_rows_are_shared_in_blocks_of_64():
    model = models.tiny("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=32)          # q 128, k 64, v 64, gate/up 256 rows
    ref = models.tiny("llama", hidden_size=128, intermediate_size=256, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=32)
    q = {"method": "rtn", "bits": 4, "group_size": 64}
    report = hfaccel.accelerate_model(model, quantization=q, **EAGER)
    hfaccel.accelerate_model(ref, quantization=q, fusion={"qkv": False, "gate_up": False}, **EAGER)
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    if attn.q_proj.kernel in ("int4pack_cpu", "avx512", "avx2"):
        assert storage(attn.q_proj.qweight) == storage(attn.k_proj.qweight) == storage(attn.v_proj.qweight)
        assert storage(mlp.gate_proj.qweight) == storage(mlp.up_proj.qweight)
    assert any("held twice: int4 scales" in a for a in fused(report).values())
    ids = prompts(model.config.vocab_size, batch=2, length=11)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)


def test_with_the_compiled_step_no_recompilation(monkeypatch):
    monkeypatch.setattr(layout, "MIN_GAIN", 0.0)                # fused weights inherit the column-major layout
    model, ref = models.tiny("llama"), models.tiny("llama")
    report = hfaccel.accelerate_model(model, "cpu-fast", fusion={"qkv": True, "gate_up": True})
    assert fused(report) and any(c.feature == "weight_layout" for c in report.changes)
    attn = model.model.layers[0].self_attn
    assert attn.q_proj.weight.stride() == (1, 128)              # a row view of the [128, 64] column-major tensor
    stats = model.hfaccel_compile_stats
    for length, seed in ((9, 0), (21, 5)):
        ids = prompts(ref.config.vocab_size, batch=1, length=length, seed=seed)
        assert torch.equal(greedy(model, ids, n=20), greedy(ref, ids, n=20))
    assert stats.compilations == 1 and stats.compiled_calls == 2 and stats.fallback_calls == 0


def test_norms_that_are_not_bit_identical_are_left_alone(monkeypatch):
    monkeypatch.setattr(fusion, "_same_as_module", lambda norm, fn: norm is not model.model.norm)
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, **EAGER)
    assert "left as they were" in fused(report)["4 x LlamaRMSNorm"]
    assert "forward" not in model.model.norm.__dict__
    assert "forward" in model.model.layers[0].input_layernorm.__dict__


def test_off_switches_and_unsupported_layers():
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, fusion={"qkv": False, "gate_up": False, "rms_norm": False}, **EAGER)
    assert not fused(report) and not [s for s in report.skipped if s.feature == "fuse"]
    model = models.tiny("llama")
    model.model.layers[0].self_attn.k_proj = torch.nn.Linear(64, 32, bias=True)   # one bias in three
    report = hfaccel.accelerate_model(model, **EAGER)
    assert any("qkv in model.layers.0: some projections have a bias" in n for n in report.notes)
    assert "1 x q_proj+k_proj+v_proj (Linear)" in fused(report)
