"""Paged decode kernels against sdpa on random pools with odd shapes (fp32 tolerance)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from hfaccel import models
from hfaccel.cache import attention as pa
from hfaccel.cache.paged import quantize_int8

from ..conftest import greedy, prompts

has_triton = pytest.mark.skipif(not pa.triton_available(), reason="triton is not installed")


def random_case(b=3, hq=6, hkv=2, d=20, bs=8, length=37, offsets=(0, 5, 13), seed=0, device="cpu"):
    """A pool with scattered blocks, rows left-padded by `offsets`, one extra masked key in row 0."""
    g = torch.Generator().manual_seed(seed)
    nb = 4 * b * (-(-length // bs))
    k_pool = torch.randn(nb * bs + bs, hkv, d, generator=g)
    v_pool = torch.randn(nb * bs + bs, hkv, d, generator=g)
    perm = torch.randperm(nb, generator=g).tolist()
    tables = [perm[i * 10: i * 10 + -(-(length - o) // bs)] for i, o in enumerate(offsets)]
    width = max(map(len, tables))
    table = torch.tensor([t + [nb] * (width - len(t)) for t in tables], dtype=torch.int32)
    off = torch.tensor(offsets, dtype=torch.int32)
    pos = torch.arange(length)
    rel = pos[None] - off[:, None].long()
    slots = torch.where(rel < 0, nb * bs + pos % bs, table.long().gather(1, rel.clamp(0) // bs) * bs + rel.clamp(0) % bs)
    valid = rel >= 0
    if length > 4:
        valid[0, 3] = False
    q = torch.randn(b, hq, d, generator=g)
    case = dict(q=q, k_pool=k_pool, v_pool=v_pool, table=table, offsets=off, slots=slots, valid=valid, bs=bs,
                length=length)
    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in case.items()}


def sdpa_reference(c, scale, k_pool=None, v_pool=None):
    k = (c["k_pool"] if k_pool is None else k_pool)[c["slots"]].transpose(1, 2)
    v = (c["v_pool"] if v_pool is None else v_pool)[c["slots"]].transpose(1, 2)
    out = torch.nn.functional.scaled_dot_product_attention(
        c["q"][:, :, None], k, v, attn_mask=c["valid"][:, None, None], enable_gqa=True, scale=scale)
    return out[:, :, 0]


SHAPES = [dict(), dict(b=1, hq=4, hkv=4, d=64, bs=16, length=1, offsets=(0,)),
          dict(b=2, hq=9, hkv=3, d=7, bs=4, length=50, offsets=(0, 49)),
          dict(b=4, hq=2, hkv=1, d=33, bs=32, length=100, offsets=(0, 31, 32, 90))]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "-".join(f"{k}{v}" for k, v in s.items()) or "default")
def test_block_wise_reference_matches_sdpa(shape):
    c = random_case(**shape)
    out = pa.decode_reference(c["q"], c["k_pool"], c["v_pool"], c["slots"], c["valid"], 0.3)
    torch.testing.assert_close(out, sdpa_reference(c, 0.3), atol=2e-6, rtol=1e-5)


def test_block_wise_reference_int8_matches_dequantized_sdpa():
    c = random_case()
    kq, ks = quantize_int8(c["k_pool"])
    vq, vs = quantize_int8(c["v_pool"])
    out = pa.decode_reference(c["q"], kq, vq, c["slots"], c["valid"], 0.25, ks, vs)
    deq_k = kq.float() * ks.float()[..., None]
    deq_v = vq.float() * vs.float()[..., None]
    torch.testing.assert_close(out, sdpa_reference(c, 0.25, deq_k, deq_v), atol=2e-6, rtol=1e-5)
    # and the quantization itself is accurate: ~40 dB on Gaussian data
    err = (deq_k - c["k_pool"]).pow(2).sum() / c["k_pool"].pow(2).sum()
    assert err < 1e-3


def test_compiled_cpu_kernel_matches_sdpa():
    for shape in SHAPES[:3]:                        # dynamic shapes: one compilation serves them all
        c = random_case(**shape)
        out = pa._compiled_decode()(c["q"], c["k_pool"], c["v_pool"], c["slots"], c["valid"], 0.3, None, None)
        torch.testing.assert_close(out, sdpa_reference(c, 0.3), atol=2e-6, rtol=1e-5)


@has_triton
def test_triton_kernel_in_the_interpreter_matches_sdpa():
    """TRITON_INTERPRET=1 runs the kernel on CPU tensors; it must be set before triton is imported."""
    script = textwrap.dedent("""
        import torch
        from hfaccel.cache.paged import quantize_int8
        from hfaccel.cache.triton_decode import paged_decode_triton
        from tests.cache.test_paged_attention import SHAPES, random_case, sdpa_reference
        for shape in SHAPES:
            c = random_case(**shape)
            out = paged_decode_triton(c["q"], c["k_pool"], c["v_pool"], c["table"], c["offsets"], c["length"],
                                      c["valid"], 0.3, c["bs"])
            torch.testing.assert_close(out, sdpa_reference(c, 0.3), atol=2e-6, rtol=1e-5)
            none = paged_decode_triton(c["q"], c["k_pool"], c["v_pool"], c["table"], c["offsets"], c["length"],
                                       None, 0.3, c["bs"])
            pos = torch.arange(c["length"])[None]
            c["valid"] = pos >= c["offsets"][:, None]
            torch.testing.assert_close(none, sdpa_reference(c, 0.3), atol=2e-6, rtol=1e-5)
            kq, ks = quantize_int8(c["k_pool"]); vq, vs = quantize_int8(c["v_pool"])
            out8 = paged_decode_triton(c["q"], kq, vq, c["table"], c["offsets"], c["length"], c["valid"], 0.3,
                                       c["bs"], ks, vs)
            ref8 = sdpa_reference(c, 0.3, kq.float() * ks.float()[..., None], vq.float() * vs.float()[..., None])
            torch.testing.assert_close(out8, ref8, atol=2e-6, rtol=1e-5)
        print("ok", len(SHAPES))
    """)
    env = dict(os.environ, TRITON_INTERPRET="1")
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    run = subprocess.run([sys.executable, "-c", script], env=env, cwd=root, capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.strip() == f"ok {len(SHAPES)}"


def test_attention_function_falls_back_to_sdpa_without_a_paged_cache():
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    model = models.tiny("llama")
    module = model.model.layers[0].self_attn
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 4, 5, 16, generator=g)
    k = torch.randn(2, 2, 5, 16, generator=g)
    v = torch.randn(2, 2, 5, 16, generator=g)
    got, _ = pa.paged_attention_forward(module, q, k, v, None, scaling=0.25)
    want, _ = sdpa_attention_forward(module, q, k, v, None, scaling=0.25)
    assert torch.equal(got, want)


@pytest.mark.parametrize("kernel", ["gather", "compiled"])
def test_whole_model_greedy_with_each_cpu_decode_kernel(kernel):
    import hfaccel

    plain = models.tiny("qwen2")
    model = models.tiny("qwen2")
    hfaccel.accelerate_model(model, kv_cache={"max_cache_tokens": 2048, "block_size": 8})
    x = prompts(plain.config.vocab_size, batch=3, length=19)
    mask = torch.ones_like(x)
    mask[0, :6] = 0
    pa.set_decode_kernel(kernel)
    try:
        assert torch.equal(greedy(model, x, mask, n=14), greedy(plain, x, mask, n=14))
    finally:
        pa.set_decode_kernel(None)


def test_decode_kernel_choice_is_validated():
    with pytest.raises(ValueError, match=r"decode kernel 'flash' is not allowed; allowed: gather, compiled, triton"):
        pa.set_decode_kernel("flash")
    assert pa.decode_kernel_for(torch.device("cpu")) == pa.DEFAULT_DECODE["cpu"]


@pytest.mark.gpu
def test_triton_kernel_on_cuda_matches_sdpa_and_whole_model_greedy():
    import hfaccel

    for shape in SHAPES:
        c = random_case(**shape, device="cuda")
        c["table"], c["offsets"] = c["table"].cuda(), c["offsets"].cuda()
        from hfaccel.cache.triton_decode import paged_decode_triton

        out = paged_decode_triton(c["q"], c["k_pool"], c["v_pool"], c["table"], c["offsets"], c["length"],
                                  c["valid"], 0.3, c["bs"])
        torch.testing.assert_close(out, sdpa_reference(c, 0.3), atol=1e-5, rtol=1e-4)
        for dtype, tol in ((torch.float16, 2e-3), (torch.bfloat16, 1.6e-2)):
            out = paged_decode_triton(c["q"].to(dtype), c["k_pool"].to(dtype), c["v_pool"].to(dtype), c["table"],
                                      c["offsets"], c["length"], c["valid"], 0.3, c["bs"])
            torch.testing.assert_close(out.float(), sdpa_reference(c, 0.3), atol=tol, rtol=tol)
    plain = models.tiny("llama").cuda()
    model = models.tiny("llama").cuda()
    hfaccel.accelerate_model(model, kv_cache={"max_cache_tokens": 4096})
    assert pa.decode_kernel_for(torch.device("cuda")) == "triton"
    x = prompts(plain.config.vocab_size, batch=3, length=19).cuda()
    mask = torch.ones_like(x)
    mask[0, :6] = 0
    assert torch.equal(greedy(model, x, mask, n=14), greedy(plain, x, mask, n=14))
