"""accelerate_model / revert_model: report, idempotency, exact revert, transactions, unchanged generate()."""

from __future__ import annotations

import inspect
import json

import pytest
import torch

import hfaccel
from hfaccel import models
from hfaccel.errors import AccelError, RevertError
from hfaccel.registry import UNAVAILABLE

from .conftest import greedy, prompts


def snapshot(model):
    """Everything revert must restore: tensors (values and dtypes), instance forwards, attention, config dtype."""
    return {
        "state": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "forwards": {n for n, m in model.named_modules() if "forward" in m.__dict__},
        "attn": model.config._attn_implementation,
        "dtype": getattr(model.config, "dtype", None),
        "instance_attrs": set(model.__dict__),
        "modules": {n: type(m) for n, m in model.named_modules()},
    }


def assert_same(a, b):
    assert a["state"].keys() == b["state"].keys()
    for k in a["state"]:
        assert a["state"][k].dtype == b["state"][k].dtype, k
        assert torch.equal(a["state"][k], b["state"][k]), k
    for key in ("forwards", "attn", "dtype", "instance_attrs", "modules"):
        assert a[key] == b[key], key


def test_report_lists_changes_skips_and_unavailable_features():
    from hfaccel.kernels import cpu_attention, cpu_rope

    model = models.tiny("llama")
    model.set_attn_implementation("eager")
    report = hfaccel.accelerate_model(model, "cpu-fast", kv_cache={"max_cache_tokens": 4096},
                                      compile={"warmup": False, "certified_head": False},        # timed: varies
                                      fusion={"weight_layout": False, "packed_weights": False,   # timed: varies
                                              "small_gemm": False, "qkv": True, "gate_up": True})
    assert [(c.feature, c.target, c.before, c.after) for c in report.changes] == [
        ("fuse", "2 x q_proj+k_proj+v_proj (Linear)", "3 GEMMs", "1 GEMM [128, 64]"),
        ("fuse", "2 x gate_proj+up_proj (Linear)", "2 GEMMs", "1 GEMM [256, 64], then act(gate) * up"),
        ("fuse", "5 x LlamaRMSNorm", "module forward (6 ops)", "F.rms_norm (bit-identical on a probe)"),
        *([("fuse_rope", "2 x LlamaAttention.apply_rotary_pos_emb", "about 10 tensor ops for q and k per layer",
            "1 op (hfaccel_cpu_rope::rope, bit-identical on a probe; compiled graphs keep Transformers' ops for "
            "Inductor)")] if cpu_rope.status()[0] else []),
        ("kv_cache", "hfaccel_kv_pool", "-", "256 blocks x 16 tokens (2.0 MiB, float32; max_cache_tokens = 4096)"),
        ("kv_cache", "config._attn_implementation", "eager", "hfaccel_paged"),
        ("kv_cache", "hfaccel_stats", "-", "prefix hits, reuse, evictions"),
        ("kv_cache", "generate", "GenerationMixin.generate()", "generate() on a PagedCache (paged attention)"),
        ("compile", "config._attn_implementation", "hfaccel_paged", "hfaccel_step+hfaccel_paged"),
        ("compile", "hfaccel_compile_stats", "-", "compiled calls, fallbacks, compilations, warm-up"),
        ("compile", "generate", "generate() on a PagedCache (paged attention)",
         "greedy decode through a compiled step (torch.compile mode=default, "
         + ("hfaccel's C++ step attention for fp32 and bf16, " if cpu_attention.status()[0] else "")
         + "compiled at first call)")]
    assert report.lossless and report.reversible and not report.noop
    assert not [s for s in report.skipped if s.status == UNAVAILABLE] and not report.unavailable
    assert report.spec == "llama" and report.architecture == "llama"
    d = json.loads(report.to_json())
    kv = [c for c in d["changes"] if c["feature"] == "kv_cache"]
    assert kv[1]["after"] == "hfaccel_paged" and d["lossless"] is True
    text = str(report)
    assert "not available in this version" not in text and "hfaccel_kv_pool" in text
    assert model.hfaccel_report is report


def test_every_feature_a_preset_names_is_built_and_reported():
    model = models.tiny("llama")
    report = hfaccel.accelerate_model(model, "memory-saver", speculative={"draft": "prompt-lookup"},
                                      compile={"enabled": True}, kv_cache={"dtype": "model"})
    reasons = {s.feature: s.reason for s in report.skipped if s.status == UNAVAILABLE}
    assert "quantize" not in reasons and any(c.feature == "quantize" for c in report.changes)   # rtn int8 landed
    assert "speculative" not in reasons and any(c.feature == "speculative" for c in report.changes)
    assert not reasons                                                       # every named feature is built
    assert any(c.feature == "fuse_rope" for c in report.changes) or any(s.feature == "fuse_rope"
                                                                         for s in report.skipped)
    assert not any(s.feature == "compile" for s in report.skipped)           # speculative: its verify step is compiled
    assert "hfaccel_compiled_verify" in [c.target for c in report.changes if c.feature == "compile"]


def test_second_call_is_a_noop_that_says_so():
    model = models.tiny("qwen2")
    model.set_attn_implementation("eager")
    first = hfaccel.accelerate_model(model)
    second = hfaccel.accelerate_model(model)
    assert second.noop and not first.noop
    assert second.changes == first.changes
    assert "already accelerated" in second.notes[-1]
    with pytest.warns(UserWarning, match="call hfaccel.revert_model\\(model\\) first"):
        third = hfaccel.accelerate_model(model, "memory-saver")
    assert third.noop and model.config._attn_implementation == "hfaccel_paged"


@pytest.mark.parametrize("config", [None, "cpu-fast", {"dtype": "bfloat16", "keep_original": True}])
def test_revert_restores_exactly(tiny_arch, config):
    model = models.tiny(tiny_arch)
    model.set_attn_implementation("eager")
    before = snapshot(model)
    report = hfaccel.accelerate_model(model, config)
    assert report.changes, "something must have changed for this test to mean anything"
    assert hfaccel.revert_model(model) == []
    assert_same(before, snapshot(model))
    # and it can be accelerated again afterwards
    assert not hfaccel.accelerate_model(model, config).noop


def test_lossy_change_without_original_is_irreversible():
    model = models.tiny("llama")
    model.set_attn_implementation("eager")
    report = hfaccel.accelerate_model(model, dtype="bf16")
    cast = next(c for c in report.changes if c.feature == "dtype")
    assert not cast.reversible and not cast.lossless and not report.lossless
    assert any("weight SQNR" in n for n in report.notes)
    with pytest.raises(RevertError, match="dtype: parameters float32 .* -> bfloat16 kept no original"):
        hfaccel.revert_model(model)
    assert model.dtype == torch.bfloat16 and model.config._attn_implementation == "hfaccel_paged"   # untouched
    stuck = hfaccel.revert_model(model, strict=False)
    assert [c.feature for c in stuck] == ["dtype"]
    assert model.config._attn_implementation == "eager" and model.dtype == torch.bfloat16


def test_widening_cast_reverts_exactly_without_keep_original():
    model = models.tiny("llama", dtype=torch.bfloat16)
    before = snapshot(model)
    report = hfaccel.accelerate_model(model, dtype="float32")
    assert report.changes[0].reversible and report.changes[0].lossless
    assert model.dtype == torch.float32
    hfaccel.revert_model(model)
    assert_same(before, snapshot(model))


def test_failure_midway_rolls_back_and_names_the_step(monkeypatch):
    from hfaccel.rewrite import Rewriter

    model = models.tiny("llama")
    model.set_attn_implementation("eager")
    before = snapshot(model)

    def boom(self, impl):
        raise RuntimeError("injected")

    monkeypatch.setattr(Rewriter, "set_attn_implementation", boom)
    with pytest.raises(AccelError, match=r"failed in step 'kv_cache' \(RuntimeError: injected\); the model was "
                                         r"restored") as info:
        hfaccel.accelerate_model(model, dtype="bf16")    # dtype (lossy) and the pool applied first, then the fault
    assert info.value.step == "kv_cache"
    assert "hfaccel_kv_pool" not in model.__dict__ and "generate" not in model.__dict__
    assert_same(before, snapshot(model))
    assert model.dtype == torch.float32


def test_generate_signature_and_kwargs_unchanged():
    model = models.tiny("llama")
    plain = models.tiny("llama")
    sig = inspect.signature(model.generate)
    hfaccel.accelerate_model(model, "cpu-fast")
    assert inspect.signature(model.generate) == sig
    x = prompts(model.config.vocab_size, batch=2)
    kw = dict(attention_mask=torch.ones_like(x), max_new_tokens=6, pad_token_id=0)
    a = model.generate(x, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw)
    b = plain.generate(x, do_sample=False, output_scores=True, return_dict_in_generate=True, **kw)
    assert torch.equal(a.sequences, b.sequences)
    assert all(torch.allclose(s, t, atol=1e-5) for s, t in zip(a.scores, b.scores))
    torch.manual_seed(3)
    s1 = model.generate(x, do_sample=True, top_k=20, temperature=0.8, **kw)
    torch.manual_seed(3)
    s2 = plain.generate(x, do_sample=True, top_k=20, temperature=0.8, **kw)
    assert torch.equal(s1, s2)
    beams = model.generate(x, num_beams=2, num_return_sequences=2, do_sample=False, **kw)
    assert torch.equal(beams, plain.generate(x, num_beams=2, num_return_sequences=2, do_sample=False, **kw))


@pytest.mark.parametrize("config", [None, "cpu-fast", "low-latency"])
def test_greedy_equal_to_plain_transformers(tiny_arch, config):
    plain = models.tiny(tiny_arch)
    plain.set_attn_implementation("eager")     # the model as a user might load it
    model = models.tiny(tiny_arch)
    model.set_attn_implementation("eager")
    report = hfaccel.accelerate_model(model, config)
    assert report.lossless
    x = prompts(plain.config.vocab_size, batch=3, length=9)
    mask = torch.ones_like(x)
    mask[1, :3] = 0                            # left padding on one row
    assert torch.equal(greedy(model, x, mask, n=16), greedy(plain, x, mask, n=16))


def test_unknown_architecture_gets_generic_features_and_says_so():
    import transformers

    cfg = transformers.GPTNeoXConfig(vocab_size=128, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                                     intermediate_size=64)
    plain = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    model.load_state_dict(plain.state_dict())
    report = hfaccel.accelerate_model(model, "cpu-fast")
    assert report.spec is None
    arch = next(s for s in report.skipped if s.feature == "architecture")
    assert arch.reason.startswith("generic features only: no patches/ spec for model_type 'gpt_neox'")
    assert [c.feature for c in report.changes if c.feature not in ("weight_layout", "packed_weights")] == \
        ["kv_cache"] * 4 + ["compile"] * 3
    x = prompts(128)
    assert torch.equal(greedy(model, x), greedy(plain, x))


def test_attention_choices_and_refusals():
    model = models.tiny("llama")
    dynamic = {"type": "dynamic"}
    report = hfaccel.accelerate_model(model, attention={"backend": "flash_attention_2"}, kv_cache=dynamic)
    skip = next(s for s in report.skipped if s.feature == "attention")
    assert skip.reason == "flash_attention_2 needs a CUDA device; the model is on cpu"
    assert not [c for c in report.changes if c.feature not in ("fuse", "fuse_rope")]
    hfaccel.revert_model(model)
    report = hfaccel.accelerate_model(model, attention={"backend": "eager"}, kv_cache=dynamic)
    assert [c.after for c in report.changes if c.feature == "attention"] == ["eager"]
    hfaccel.revert_model(model)
    report = hfaccel.accelerate_model(model, attention={"backend": "paged"}, kv_cache=dynamic)
    assert [s.reason for s in report.skipped if s.feature == "attention"] == [
        "backend paged reads the paged KV cache; kv_cache.type is dynamic"]
    hfaccel.revert_model(model)
    hfaccel.accelerate_model(model, attention={"backend": "paged"})
    assert model.config._attn_implementation == "hfaccel_paged"
    hfaccel.revert_model(model)
    report = hfaccel.accelerate_model(model, attention={"backend": "eager"})      # paged cache, gathered K/V
    assert model.config._attn_implementation == "eager"
    assert report.changes[-1].after == "generate() on a PagedCache (gather attention)"


def test_auto_dtype_follows_the_hardware(monkeypatch):
    from hfaccel import device

    model = models.tiny("llama")
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: False)
    report = hfaccel.accelerate_model(model, dtype="auto")
    assert model.dtype == torch.float32 and not any(c.feature == "dtype" for c in report.changes)
    assert "no native bf16" in next(s.reason for s in report.skipped if s.feature == "dtype")
    hfaccel.revert_model(model)
    monkeypatch.setattr(device, "cpu_has_native_bf16", lambda: True)
    hfaccel.accelerate_model(model, dtype="auto")
    assert model.dtype == torch.bfloat16


def test_rejects_what_is_not_a_causal_lm():
    with pytest.raises(TypeError, match="expects a loaded transformers causal LM .* got Linear"):
        hfaccel.accelerate_model(torch.nn.Linear(2, 2))


def test_revert_of_a_plain_model_is_a_noop():
    assert hfaccel.revert_model(models.tiny("gpt2")) == []
