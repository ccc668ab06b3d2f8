"""Compiled decode step (hfaccel/compile.py): token-exact against Transformers' greedy loop on every
architecture and cache type, no recompilation after warm-up, fallbacks for what the step cannot reproduce."""

from __future__ import annotations

import pytest
import torch

import hfaccel
from hfaccel import compile as hc
from hfaccel import models
from hfaccel.compile import BUCKET, step_attention, verify_attention, why_not
from tests.conftest import StreamRecorder, assert_compiled_greedy_equal, greedy, prompts


def left_padded(vocab: int, lengths=(9, 14), seed: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(lengths)
    ids = prompts(vocab, batch=len(lengths), length=width, seed=seed)
    mask = torch.ones_like(ids)
    for r, n in enumerate(lengths):
        ids[r, : width - n] = 0
        mask[r, : width - n] = 0
    return ids, mask


def compiled(arch: str, kv: str = "paged", **cfg):
    model = models.tiny(arch)
    ref = models.tiny(arch)
    report = hfaccel.accelerate_model(model, kv_cache={"type": kv, "max_cache_tokens": 4096},
                                      compile={"enabled": True, **cfg})
    return model, ref, report


@pytest.mark.parametrize("arch", models.TINY_ARCHS)
def test_greedy_equals_transformers_on_every_architecture(arch):
    model, ref, report = compiled(arch)
    assert any(c.feature == "compile" and c.target == "generate" for c in report.changes), report
    stats = model.hfaccel_compile_stats
    warm = stats.compilations
    assert warm == 1 and stats.warmup_seconds > 0
    vocab = ref.config.vocab_size
    one = prompts(vocab, batch=1, length=11)
    assert torch.equal(greedy(model, one, n=20), greedy(ref, one, n=20))
    assert stats.compilations == warm                 # batch 1, first bucket: the warm-up's graph
    other = prompts(vocab, batch=1, length=23, seed=5)
    assert torch.equal(greedy(model, other, n=20), greedy(ref, other, n=20))
    assert stats.compilations == warm                 # another prompt length: no recompilation
    ids, mask = left_padded(vocab)
    assert torch.equal(greedy(model, ids, mask, n=16), greedy(ref, ids, mask, n=16))
    assert stats.compilations == warm + 1             # batch 2 compiles once
    ids, mask = left_padded(vocab, lengths=(17, 6), seed=4)
    assert torch.equal(greedy(model, ids, mask, n=16), greedy(ref, ids, mask, n=16))
    assert stats.compilations == warm + 1
    assert stats.compiled_calls == 4 and stats.fallback_calls == 0


@pytest.mark.parametrize("kv", ["dynamic", "static"])
def test_other_cache_types(kv):
    model, ref, _ = compiled("qwen2", kv)
    ids, mask = left_padded(ref.config.vocab_size)
    assert torch.equal(greedy(model, ids, mask, n=14), greedy(ref, ids, mask, n=14))
    assert model.hfaccel_compile_stats.compiled_calls == 1


def test_eos_stops_rows_pads_them_and_trims_like_generate():
    model, ref, _ = compiled("llama")
    ids, mask = left_padded(ref.config.vocab_size)
    free = ref.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=0)
    new = free[:, ids.shape[1]:]
    # an EOS that row 0 emits early and row 1 later (or never): rows finish at different steps
    eos = int(new[0, 3])
    for kw in ({"eos_token_id": eos}, {"eos_token_id": [eos, int(new[1, 5])]},
               {"eos_token_id": eos, "min_new_tokens": 6}):
        want = ref.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=2, **kw)
        got = model.generate(ids, attention_mask=mask, max_new_tokens=30, do_sample=False, pad_token_id=2, **kw)
        assert torch.equal(got, want), kw
        if isinstance(kw["eos_token_id"], list):          # both rows finish: the output is trimmed
            assert got.shape[1] < free.shape[1]
    assert model.hfaccel_compile_stats.fallback_calls == 0


def test_streamer_gets_the_prompt_then_each_token_then_end():
    model, ref, _ = compiled("llama")
    ids = prompts(ref.config.vocab_size, batch=1, length=8)
    new = ref.generate(ids, max_new_tokens=30, do_sample=False)[0, 8:]

    for kw in ({}, {"eos_token_id": int(new[5])}):
        want, got = StreamRecorder(), StreamRecorder()
        a = ref.generate(ids, max_new_tokens=30, do_sample=False, streamer=want, **kw)
        b = model.generate(ids, max_new_tokens=30, do_sample=False, streamer=got, **kw)
        assert torch.equal(a, b) and got.calls == want.calls
    assert model.hfaccel_compile_stats.compiled_calls == 2


def test_the_first_token_is_streamed_before_the_prefill_cache_is_copied(monkeypatch):
    # TTFT is when the user sees the first token: the copy of the prefill's KV into the decode buffers comes after
    model, ref, _ = compiled("llama")
    ids = prompts(ref.config.vocab_size, batch=1, length=8)
    got, seen = StreamRecorder(), []
    real = hc.CompiledDecoder.load_prefill
    monkeypatch.setattr(hc.CompiledDecoder, "load_prefill", lambda self, *a: (seen.append(len(got.calls)),
                                                                              real(self, *a))[1])
    out = model.generate(ids, max_new_tokens=5, do_sample=False, streamer=got)
    assert seen == [2] and got.calls[1] == out[:, 8].tolist()        # the prompt, then the first token
    assert model.hfaccel_compile_stats.compiled_calls == 1


def test_max_length_and_generation_config_budgets():
    model, ref, _ = compiled("llama")
    ids = prompts(ref.config.vocab_size, batch=1, length=8)
    for kw in ({"max_length": 19}, {}):
        assert torch.equal(model.generate(ids, do_sample=False, **kw), ref.generate(ids, do_sample=False, **kw))


def test_calls_the_step_cannot_reproduce_fall_back_with_a_reason():
    model, ref, _ = compiled("llama")
    ids = prompts(ref.config.vocab_size, batch=1, length=8)
    torch.manual_seed(7)
    want = ref.generate(ids, do_sample=True, max_new_tokens=8)
    torch.manual_seed(7)
    got = model.generate(ids, do_sample=True, max_new_tokens=8)
    assert torch.equal(got, want)
    assert torch.equal(model.generate(ids, max_new_tokens=8, repetition_penalty=1.3),
                       ref.generate(ids, max_new_tokens=8, repetition_penalty=1.3))
    model.generate(ids, max_new_tokens=1)
    stats = model.hfaccel_compile_stats
    assert stats.fallback_calls == 3 and stats.compiled_calls == 0
    assert dict(stats.fallback_reasons) == {"do_sample=True": 1, "repetition_penalty=1.3": 1,
                                            "fewer than 2 new tokens": 1}


def test_why_not_names_the_setting():
    model = models.tiny("llama")
    ids = torch.ones(1, 4, dtype=torch.long) * 7
    assert why_not(model, {"input_ids": ids}) is None
    assert why_not(model, {"input_ids": ids, "num_beams": 2}) == "num_beams=2"
    assert why_not(model, {"input_ids": ids, "output_scores": True}) == "output_scores=True"
    assert why_not(model, {"input_ids": ids, "past_key_values": object()}).startswith("the call brings its own")
    assert why_not(model, {"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 1]])}) \
        == "attention_mask is not left padding"
    pad = model.generation_config.pad_token_id or 0
    assert why_not(model, {"input_ids": torch.tensor([[pad, 5, 6]])}) == \
        "pad token in the prompt without an attention_mask"


@pytest.mark.parametrize("pad_is_eos", [False, True])
def test_pad_tokens_in_a_prompt_without_a_mask_decode_compiled_as_generate_reads_them(pad_is_eos):
    """No attention_mask and the pad token in the prompt: generate() infers ids != pad, unless the pad token
    is an EOS token (chat prompts of SmolLM2, whose pad and EOS are both <|im_end|>), where it attends to all
    of them. The compiled step runs either way, with the mask generate() would use."""
    model, ref, _ = compiled("llama")
    pad = 0
    eos = pad if pad_is_eos else 1
    ids = prompts(ref.config.vocab_size, batch=1, length=12)
    ids[0, 4] = pad                                           # inside the prompt, as a chat template's <|im_end|>
    left = torch.cat([torch.full((1, 3), pad), prompts(ref.config.vocab_size, batch=1, length=9)], dim=1)
    for x in (ids, left):
        kw = {"max_new_tokens": 10, "min_new_tokens": 10, "do_sample": False, "pad_token_id": pad,
              "eos_token_id": eos}
        assert torch.equal(model.generate(x, **kw), ref.generate(x, **kw))
    stats = model.hfaccel_compile_stats
    if pad_is_eos:
        assert stats.compiled_calls == 2 and stats.fallback_calls == 0
    else:                             # ids != pad with a pad inside the prompt is not left padding
        assert stats.compiled_calls == 1 and dict(stats.fallback_reasons) == {"attention_mask is not left padding": 1}


def test_longer_output_uses_a_larger_bucket():
    model, ref, _ = compiled("llama")
    ids = prompts(ref.config.vocab_size, batch=1, length=BUCKET - 10)
    assert torch.equal(greedy(model, ids, n=20), greedy(ref, ids, n=20))
    assert model.hfaccel_compile_stats.compilations == 2          # the warm-up's bucket, then 2 x BUCKET


def test_warmup_off_compiles_at_the_first_call_and_revert_restores_everything():
    model, ref, report = compiled("llama", warmup=False)
    assert any("compiled at first call" in c.after for c in report.changes)
    stats = model.hfaccel_compile_stats
    assert stats.compilations == 0
    ids = prompts(ref.config.vocab_size, batch=1, length=8)
    assert torch.equal(greedy(model, ids), greedy(ref, ids))
    assert stats.compilations == 1 and stats.compile_seconds > 0
    assert model.config._attn_implementation.startswith("hfaccel_step+")
    hfaccel.revert_model(model)
    assert "generate" not in model.__dict__ and "hfaccel_compile_stats" not in model.__dict__
    assert model.config._attn_implementation == ref.config._attn_implementation
    assert torch.equal(greedy(model, ids), greedy(ref, ids))


def test_every_graph_of_the_decoder_drops_the_module_guards(monkeypatch):
    """torch.compile pops guard_filter_fn out of the options dict it is given: with one dict shared by the three
    graphs, the verify graphs kept a guard on every parameter (~1 ms per verify call on SmolLM2)."""
    from hfaccel import compile as hc

    seen = []
    real = torch.compile

    def recording(fn, **kw):
        seen.append(dict(kw.get("options") or {}))
        return real(fn, **kw)

    monkeypatch.setattr(hc.torch, "compile", recording)
    hc.CompiledDecoder(models.tiny("llama"))
    assert len(seen) == 3
    assert all(o.get("guard_filter_fn") is torch.compiler.skip_guard_on_all_nn_modules_unsafe for o in seen)


def _resize_vocab(model, ref, extra: int = 8) -> None:
    """The same new token rows on both (resize_token_embeddings initialises them at random)."""
    n = model.config.vocab_size + extra
    for m in (model, ref):
        m.resize_token_embeddings(n, mean_resizing=False)
    with torch.no_grad():
        ref.get_input_embeddings().weight.copy_(model.get_input_embeddings().weight)
        ref.get_output_embeddings().weight.copy_(model.get_output_embeddings().weight)


@pytest.mark.parametrize("draft", [None, "prompt-lookup"])
def test_a_model_changed_after_compiling_runs_uncompiled_and_says_why(draft):
    """The graphs neither guard nor assert on the model's tensors (that cost ~1 ms per step): a parameter
    replaced, resized, cast or moved after compiling is caught once per generate(), and that call decodes
    without the graphs (Transformers' loop; with a draft the eager verify), with the same tokens."""
    model, ref = models.tiny("llama"), models.tiny("llama")
    hfaccel.accelerate_model(model, kv_cache={"type": "paged", "max_cache_tokens": 4096}, compile={"enabled": True},
                             **({"speculative": {"draft": draft}} if draft else {}))
    ids = prompts(ref.config.vocab_size, batch=1, length=8)
    assert torch.equal(greedy(model, ids), greedy(ref, ids))
    stats = model.hfaccel_compile_stats
    assert stats.compiled_calls == 1 and stats.fallback_calls == 0
    _resize_vocab(model, ref)
    assert torch.equal(greedy(model, ids), greedy(ref, ids))
    assert stats.fallback_calls == 1
    (reason,) = stats.fallback_reasons
    assert "the model's tensors changed after it was compiled (model.embed_tokens.weight)" in reason
    assert reason.endswith(": eager verify") == (draft is not None)


def test_eager_inner_attention_and_int8_kv_skip():
    model = models.tiny("mistral")
    ref = models.tiny("mistral")
    model.set_attn_implementation("eager")
    ref.set_attn_implementation("eager")
    hfaccel.accelerate_model(model, attention={"backend": "eager"}, kv_cache={"type": "dynamic"},
                             compile={"enabled": True})
    assert model.config._attn_implementation == "hfaccel_step+eager"
    ids, mask = left_padded(ref.config.vocab_size)
    assert torch.equal(greedy(model, ids, mask), greedy(ref, ids, mask))
    other = models.tiny("llama")
    report = hfaccel.accelerate_model(other, kv_cache={"type": "paged", "dtype": "int8", "max_cache_tokens": 4096},
                                      compile={"enabled": True})
    skip = {s.feature: s.reason for s in report.skipped}
    assert "kv_cache.dtype int8" in skip["compile"]


@pytest.fixture(params=[False, True], ids=["torch", "cpp"])
def attention_kernel(request, monkeypatch):
    """The step's and the verify's attention in torch (Inductor) or through hfaccel's C++ kernels."""
    from hfaccel import compile as hc
    from hfaccel.kernels import cpu_attention

    if request.param and not cpu_attention.status()[0]:
        pytest.skip(f"hfaccel's C++ attention does not build here: {cpu_attention.status()[1]}")
    monkeypatch.setattr(hc, "_cpp_step_attention", request.param)
    return request.param


# bf16: a bf16 model's step (cpu-int4 on a CPU with native bf16); against sdpa in fp32 on the same bf16 values
DTYPE_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE), ids=["fp32", "bf16"])
def test_step_attention_matches_sdpa_with_padding_gqa_and_window(attention_kernel, dtype):
    torch.manual_seed(0)
    b, hq, hkv, d, t, col = 3, 6, 2, 16, 32, 20
    keys = [torch.randn(b, hkv, t, d).to(dtype)]
    values = [torch.randn(b, hkv, t, d).to(dtype)]
    q, k, v = (torch.randn(b, h, 1, d).to(dtype) for h in (hq, hkv, hkv))
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :4] = False
    valid &= torch.arange(t) <= col

    class Layer:
        layer_idx = 0

    for window in (None, 7):
        kb, vb = [x.clone() for x in keys], [x.clone() for x in values]
        out, _ = step_attention(Layer(), q, k, v, (kb, vb, torch.tensor([col]), valid), sliding_window=window)
        assert torch.equal(kb[0][:, :, col], k[:, :, 0]) and torch.equal(vb[0][:, :, col], v[:, :, 0])
        allowed = valid if window is None else valid & (torch.arange(t) > col - window)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), kb[0].float().repeat_interleave(hq // hkv, 1), vb[0].float().repeat_interleave(hq // hkv, 1),
            attn_mask=allowed[:, None, None, :])
        assert out.dtype == dtype
        tol = DTYPE_TOLERANCE[dtype]
        torch.testing.assert_close(out.float(), ref.transpose(1, 2), rtol=tol, atol=tol)


def test_step_attention_choice_is_reported_and_inductor_can_be_asked_for(monkeypatch):
    """fp32 on the CPU: hfaccel's C++ buffer attention where it builds, named in the report; with
    HFACCEL_STEP_ATTENTION=inductor the Inductor-fused loops, token-exact too."""
    from hfaccel import compile as hc
    from hfaccel.kernels import cpu_attention

    monkeypatch.setattr(hc, "_cpp_step_attention", hc._cpp_step_attention)      # restored after the test
    model, ref, report = compiled("llama")
    label = next(c.after for c in report.changes if c.feature == "compile" and c.target == "generate")
    assert ("hfaccel's C++ step attention for fp32" in label) == cpu_attention.status()[0]
    monkeypatch.setenv(hc.STEP_ATTENTION_ENV, "inductor")
    model, ref, report = compiled("llama")
    assert not hc._cpp_step_attention
    label = next(c.after for c in report.changes if c.feature == "compile" and c.target == "generate")
    assert "C++ step attention" not in label
    assert_compiled_greedy_equal(model, ref)


@pytest.mark.parametrize("arch", ["llama", "gemma"])
def test_a_bf16_model_steps_through_the_cpp_attention_with_inductors_tokens(arch, monkeypatch):
    """A bf16 model (cpu-int4 on a CPU with native bf16) now attends through the C++ kernel too: its compiled
    greedy tokens are those of the same step with Inductor's fused attention loops (checked on these prompts:
    bf16 rounding differs between the two, the tokens do not)."""
    from hfaccel import compile as hc
    from hfaccel.kernels import cpu_attention

    if not cpu_attention.status()[0]:
        pytest.skip(f"hfaccel's C++ attention does not build here: {cpu_attention.status()[1]}")
    monkeypatch.setattr(hc, "_cpp_step_attention", hc._cpp_step_attention)      # restored after the test
    outs = []
    for env in (None, "inductor"):
        if env:
            monkeypatch.setenv(hc.STEP_ATTENTION_ENV, env)
        model = models.tiny(arch).to(torch.bfloat16)
        hfaccel.accelerate_model(model, kv_cache={"type": "paged", "max_cache_tokens": 4096}, compile={"enabled": True})
        assert hc._cpp_step_attention is (env is None)
        outs.append(greedy(model, prompts(model.config.vocab_size, batch=2, length=9), n=20))
        assert model.hfaccel_compile_stats.compiled_calls == 1
    assert torch.equal(outs[0], outs[1])


@pytest.mark.parametrize("dtype", list(DTYPE_TOLERANCE), ids=["fp32", "bf16"])
def test_verify_attention_matches_sdpa_per_row_columns_gqa_and_window(attention_kernel, dtype):
    torch.manual_seed(0)
    b, hq, hkv, d, t, w = 3, 6, 2, 16, 40, 4
    keys, values = [torch.randn(b, hkv, t, d).to(dtype)], [torch.randn(b, hkv, t, d).to(dtype)]
    q, k, v = (torch.randn(b, h, w, d).to(dtype) for h in (hq, hkv, hkv))
    col = torch.tensor([20, 9, 31])                        # rows write at their own columns
    valid = torch.ones(b, t, dtype=torch.bool)
    valid[1, :4] = False                                   # left padding
    where = col[:, None] + torch.arange(w)
    allowed = valid[:, None, :] & (torch.arange(t) <= where[:, :, None])

    class Layer:
        layer_idx = 0

    for window in (None, 7):
        kb, vb = [x.clone() for x in keys], [x.clone() for x in values]
        out, _ = verify_attention(Layer(), q, k, v, (kb, vb, where, allowed), sliding_window=window)
        for r in range(b):
            c = int(col[r])
            assert torch.equal(kb[0][r, :, c:c + w], k[r]) and torch.equal(vb[0][r, :, c:c + w], v[r])
        mask = allowed if window is None else allowed & (torch.arange(t) > where[:, :, None] - window)
        ref = torch.nn.functional.scaled_dot_product_attention(
            q.float(), kb[0].float().repeat_interleave(hq // hkv, 1), vb[0].float().repeat_interleave(hq // hkv, 1),
            attn_mask=mask[:, None])
        assert out.dtype == dtype
        tol = DTYPE_TOLERANCE[dtype]
        torch.testing.assert_close(out.float(), ref.transpose(1, 2), rtol=tol, atol=tol)


def test_cpp_wrapper_reaches_inductor_and_stays_token_exact(monkeypatch):
    import torch._inductor.compile_fx as cfx

    real, seen = cfx.compile_fx, []

    def recording(gm, example_inputs, config_patches=None, **kw):
        seen.append(dict(config_patches or {}))
        return real(gm, example_inputs, config_patches=config_patches, **kw)

    monkeypatch.setattr(cfx, "compile_fx", recording)
    model, ref, report = compiled("llama", cpp_wrapper=True)
    assert any("C++ wrapper" in c.after for c in report.changes if c.target == "generate")
    assert seen[0].get("cpp_wrapper") is True          # (compile_fx then calls itself with the patches applied)
    vocab = ref.config.vocab_size
    for length, seed in ((11, 1), (19, 2)):
        ids = prompts(vocab, batch=1, length=length, seed=seed)
        assert torch.equal(greedy(model, ids, n=16), greedy(ref, ids, n=16))
    assert model.hfaccel_compile_stats.compilations == 1        # the warm-up's graph, no recompilation
    seen.clear()
    _, _, plain = compiled("llama")
    assert not any("C++ wrapper" in c.after for c in plain.changes)
    assert seen and not any(p.get("cpp_wrapper") for p in seen)


def test_tensor_state_names_what_changed():
    """CompiledDecoder.changed's record: the first tensor replaced, re-pointed, cast or resized by name, a
    replaced submodule by name, nothing for an untouched model."""
    from hfaccel.compile import TensorState

    model = models.tiny("llama")
    state = TensorState(model)
    assert state.changed() is None
    mlp = model.model.layers[1].mlp
    old = mlp.up_proj.weight.data
    mlp.up_proj.weight.data = old.clone()                      # same Parameter, new storage
    assert state.changed() == "model.layers.1.mlp.up_proj.weight"
    mlp.up_proj.weight.data = old
    assert state.changed() is None
    model.model.norm.weight.data = model.model.norm.weight.data.to(torch.float64)
    assert state.changed() == "model.norm.weight"
    model = models.tiny("llama")
    state = TensorState(model)
    model.model.layers[0].self_attn.o_proj = torch.nn.Linear(4, 4)
    assert state.changed() == "model.layers.0.self_attn.o_proj replaced"
    model = models.tiny("llama")
    state = TensorState(model)
    model.model.rotary_emb.inv_freq = model.model.rotary_emb.inv_freq[:2]      # a buffer resized
    assert state.changed() == "model.rotary_emb.inv_freq"
