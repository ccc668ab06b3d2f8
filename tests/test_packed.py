"""packed_weights (hfaccel/packed.py): CPU Linear layers on oneDNN reordered weights. Greedy tokens equal plain
Transformers on every architecture, in eager and compiled decode; state_dict and checkpoints unchanged; tied
weights stay shared; revert restores the exact nn.Linear; training is refused."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers import AutoModelForCausalLM

import hfaccel
from hfaccel import models, packed
from hfaccel.device import weight_bytes
from tests.conftest import assert_compiled_greedy_equal, greedy, prompts

pytestmark = pytest.mark.skipif(packed.available() is not None, reason=str(packed.available()))

ON = {"packed_weights": True}


@pytest.fixture
def always(monkeypatch):
    """Pack every shape whatever the timing says (tiny shapes time too close to call)."""
    monkeypatch.setattr(packed, "MIN_GAIN", 0.0)


def packed_paths(model) -> list[str]:
    return [n for n, m in model.named_modules() if isinstance(m, packed.PackedLinear)]


def test_layer_matches_linear_for_2d_3d_bias_and_bf16():
    torch.manual_seed(0)
    for dtype, tol in ((torch.float32, 1e-5), (torch.bfloat16, 2e-2)):
        if dtype not in packed.packable_dtypes():            # oneDNN has no bf16 path on an AVX2-only CPU
            with pytest.raises(RuntimeError, match="cannot pack torch.bfloat16 weights: oneDNN has no bf16 path"):
                packed.PackedLinear(nn.Linear(37, 53).to(dtype))
            continue
        lin = nn.Linear(37, 53, bias=True).to(dtype)
        p = packed.PackedLinear(lin)
        for shape in ((1, 37), (5, 37), (2, 3, 37)):
            x = torch.randn(shape, dtype=dtype)
            with torch.inference_mode():
                torch.testing.assert_close(p(x), lin(x), rtol=tol, atol=tol)
        assert torch.equal(p.weight, lin.weight.detach())
    if torch.bfloat16 in packed.packable_dtypes():
        with pytest.raises(TypeError, match="holds torch.bfloat16 weights; got a torch.float32 input"):
            p(torch.randn(1, 37))


def test_gradients_reach_the_input_and_bias():
    torch.manual_seed(0)
    lin = nn.Linear(12, 7)
    p = packed.PackedLinear(copy.deepcopy(lin))              # its own bias parameter
    x = torch.randn(2, 3, 12, requires_grad=True)
    x2 = x.detach().clone().requires_grad_(True)
    (p(x) ** 2).sum().backward()
    (lin(x2) ** 2).sum().backward()
    torch.testing.assert_close(x.grad, x2.grad, rtol=1e-5, atol=1e-5)
    assert p.bias is not lin.bias
    torch.testing.assert_close(p.bias.grad, lin.bias.grad, rtol=1e-5, atol=1e-5)


def test_custom_op_under_torch_compile():
    lin = nn.Linear(24, 40)
    p = packed.PackedLinear(lin)
    fn = torch.compile(lambda x: p(x) * 2, fullgraph=True)
    x = torch.randn(3, 24)
    with torch.inference_mode():
        torch.testing.assert_close(fn(x), lin(x) * 2, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_greedy_equals_transformers_on_every_architecture(arch, always):
    model, ref = models.tiny(arch), models.tiny(arch)
    report = hfaccel.accelerate_model(model, fusion={**ON, "qkv": False, "gate_up": False})
    linears = {n for n, m in ref.named_modules() if type(m) is nn.Linear}
    assert packed_paths(model) and set(packed_paths(model)) <= linears, report
    ids = prompts(ref.config.vocab_size, batch=2, length=13)
    assert torch.equal(greedy(model, ids, n=16), greedy(ref, ids, n=16))


def test_fused_projections_keep_their_gemm_and_the_rest_is_packed(always):
    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, fusion=ON)
    names = {n.rsplit(".", 1)[-1] for n in packed_paths(model)}
    assert names == {"o_proj", "down_proj", "lm_head"}
    ids = prompts(ref.config.vocab_size, batch=1, length=9)
    assert torch.equal(greedy(model, ids, n=12), greedy(ref, ids, n=12))


def test_compiled_decode_step_runs_packed_layers(always):
    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, "cpu-fast", fusion=ON)
    assert packed_paths(model)
    assert_compiled_greedy_equal(model, ref)


def test_state_dict_checkpoint_and_tied_head(always, tmp_path):
    model = models.tiny("llama", tie_word_embeddings=True)
    ref = models.tiny("llama", tie_word_embeddings=True)
    before = weight_bytes(model)
    report = hfaccel.accelerate_model(model, fusion={**ON, "qkv": False, "gate_up": False})
    head = model.lm_head
    assert isinstance(head, packed.PackedLinear) and head.weight is model.model.embed_tokens.weight
    assert any("tied weight kept" in c.after for c in report.changes if c.target == "lm_head")
    extra = head.packed.numel() * head.packed.element_size()
    assert weight_bytes(model) == before + extra            # untied layers hold no dense copy
    assert model.model.layers[0].self_attn.q_proj.packed is not None
    want, got = ref.state_dict(), model.state_dict()
    assert want.keys() == got.keys() and all(torch.equal(want[k], got[k]) for k in want)
    model.save_pretrained(tmp_path)
    back = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert all(torch.equal(want[k], v) for k, v in back.state_dict().items())
    # loading a state dict repacks: new weights reach the packed layers
    other = copy.deepcopy(ref)
    with torch.no_grad():
        for p in other.parameters():
            p.mul_(-1.25)
    model.load_state_dict(other.state_dict())
    assert torch.equal(model.lm_head.packed.to_dense(), other.lm_head.weight)
    ids = prompts(ref.config.vocab_size, batch=1, length=7)
    assert torch.equal(greedy(model, ids, n=8), greedy(other, ids, n=8))


def test_deepcopy_keeps_the_tie_and_the_tokens(always):
    model = models.tiny("llama", tie_word_embeddings=True)
    hfaccel.accelerate_model(model, fusion={**ON, "qkv": False, "gate_up": False})
    twin = copy.deepcopy(model)
    assert isinstance(twin.lm_head, packed.PackedLinear) and twin.lm_head.handle != model.lm_head.handle
    assert twin.lm_head.weight is twin.model.embed_tokens.weight
    ids = prompts(model.config.vocab_size, batch=1, length=7)
    assert torch.equal(greedy(twin, ids, n=8), greedy(model, ids, n=8))


def test_revert_restores_exact_linears_and_second_call_is_a_noop(always):
    model, ref = models.tiny("qwen2"), models.tiny("qwen2")
    hfaccel.accelerate_model(model, fusion={**ON, "qkv": False, "gate_up": False})
    assert packed_paths(model)
    again = hfaccel.accelerate_model(model, fusion={**ON, "qkv": False, "gate_up": False})
    assert again.noop
    assert hfaccel.revert_model(model) == []
    assert not packed_paths(model)
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if n.endswith("_proj"))
    want, got = ref.state_dict(), model.state_dict()
    assert all(torch.equal(want[k], got[k]) for k in want)
    assert all(p.is_contiguous() and p.numel() for p in model.parameters())


def test_bf16_layers_are_left_with_the_reason_where_onednn_has_no_bf16_path(monkeypatch, always):
    """An AVX2-only CPU (an EPYC, seen): oneDNN refuses to reorder bf16 weights. A bf16 model keeps its Linears
    there, with the reason, and the compiled step's certified bf16 head holds a plain bf16 Linear instead."""
    from hfaccel import certified_head

    monkeypatch.setattr(packed, "_onednn_bf16", lambda: False)
    assert packed.packable_dtypes() == (torch.float32,)
    bf16 = models.tiny("llama").to(torch.bfloat16)
    report = hfaccel.accelerate_model(bf16, fusion=ON)
    assert not packed_paths(bf16)
    assert any(s.feature == "packed_weights" and "no fp32 nn.Linear layers" in s.reason and "no bf16 path" in s.reason
               for s in report.skipped), report.skipped
    model = models.tiny("llama")
    assert isinstance(certified_head.CertifiedHead(model.lm_head.weight).low, nn.Linear)   # aten's bf16 path
    hfaccel.accelerate_model(model, fusion=ON, compile={"enabled": True, "warmup": False})
    assert packed_paths(model)


def test_kept_where_not_faster_refused_in_training_and_off_by_default(monkeypatch):
    model = models.tiny("llama")
    assert not packed_paths(copy.deepcopy(model)) and not [
        c for c in hfaccel.accelerate_model(copy.deepcopy(model)).changes if c.feature == "packed_weights"]
    monkeypatch.setattr(packed, "MIN_GAIN", 1e9)
    slow = copy.deepcopy(model)
    hfaccel.accelerate_model(slow, fusion=ON)
    assert not packed_paths(slow)
    monkeypatch.setattr(packed, "MIN_GAIN", 0.0)
    train = copy.deepcopy(model).train()
    report = hfaccel.accelerate_model(train, fusion=ON)
    assert any(s.feature == "packed_weights" and "training mode" in s.reason for s in report.skipped)
    assert not packed_paths(train)
