"""hfaccel's C++ row decode attention (hfaccel/kernels/cpu_attention.cpp) against sdpa per row, and its use in
the batching engine's decode_rows. Skipped where the op does not build (no compiler, no ninja)."""

from __future__ import annotations

import pytest
import torch

from hfaccel.kernels import cpu_attention


@pytest.fixture(scope="module", autouse=True)
def built():
    ok, why = cpu_attention.status()
    if not ok:
        pytest.skip(f"hfaccel's C++ row decode does not build here: {why}")


def reference(q, k, v, segments, scale):
    """Each row alone: its keys gathered in order, sdpa in float64, GQA by repeating the KV heads."""
    outs = []
    hq, hkv = q.shape[1], k.shape[0]
    for b, segs in enumerate(segments):
        idx = torch.cat([torch.arange(s, s + n) for s, n in segs])
        kk = k[:, idx].double().repeat_interleave(hq // hkv, 0)
        vv = v[:, idx].double().repeat_interleave(hq // hkv, 0)
        p = torch.softmax((q[b].double()[:, None] @ kk.transpose(1, 2)) * scale, dim=-1)
        outs.append((p @ vv)[:, 0])
    return torch.stack(outs).float()


# G = hq / hkv: 1, 3 (SmolLM2) and 8 take the vectorized tasks, 9 and a head_dim of 20 the generic loop
@pytest.mark.parametrize("hq,hkv,d", [(4, 4, 64), (9, 3, 64), (8, 1, 128), (9, 1, 64), (6, 2, 20), (2, 1, 8)])
def test_matches_each_row_alone(hq, hkv, d):
    torch.manual_seed(hq * 100 + d)
    slots = 1024
    k, v = torch.randn(hkv, slots, d), torch.randn(hkv, slots, d)
    segments = [[(0, 300)], [(512, 16), (100, 37), (700, 5)], [(900, 1)], [(320, 7)], [(1000, 24)]]
    q = torch.randn(len(segments), hq, d) * 2
    segs = cpu_attention.segments_tensors(segments, "cpu")
    out = cpu_attention.paged_decode(q, k, v, *segs, 0.3)
    assert out.shape == q.shape and out.dtype == torch.float32
    torch.testing.assert_close(out, reference(q, k, v, segments, 0.3), rtol=2e-5, atol=2e-5)
    # bf16 (a bf16 model's pool): read as fp32, computed in fp32, rounded once - the fp32 op on the same values
    qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
    got = cpu_attention.paged_decode(qb, kb, vb, *segs, 0.3)
    assert got.dtype == torch.bfloat16
    want = cpu_attention.paged_decode(qb.float(), kb.float(), vb.float(), *segs, 0.3)
    torch.testing.assert_close(got.float(), want, rtol=2 ** -8, atol=1e-6)
    torch.testing.assert_close(got.float(), reference(q, k, v, segments, 0.3), rtol=0.03, atol=0.03)


def test_large_scores_do_not_overflow_and_tiny_probabilities_flush_cleanly():
    k = torch.zeros(1, 64, 16)
    v = torch.arange(64, dtype=torch.float32)[None, :, None].expand(1, 64, 16).contiguous()
    k[0, 10] = 50.0                          # one key dominates by exp(50 * 50 * scale): the others underflow
    q = torch.full((1, 1, 16), 50.0)
    out = cpu_attention.paged_decode(q, k, v, *cpu_attention.segments_tensors([[(0, 64)]], "cpu"), 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.full((1, 1, 16), 10.0))


def test_bad_arguments_name_what_is_wrong():
    k = v = torch.zeros(2, 32, 8)
    q = torch.zeros(1, 4, 8)
    ok = cpu_attention.segments_tensors([[(0, 4)]], "cpu")
    with pytest.raises(RuntimeError, match="outside the pool's 32 slots"):
        cpu_attention.paged_decode(q, k, v, *cpu_attention.segments_tensors([[(30, 4)]], "cpu"), 1.0)
    with pytest.raises(RuntimeError, match="row 0 has no keys"):
        cpu_attention.paged_decode(q, k, v, *cpu_attention.segments_tensors([[]], "cpu"), 1.0)
    with pytest.raises(RuntimeError, match="B \\+ 1 = 3"):
        cpu_attention.paged_decode(torch.zeros(2, 4, 8), k, v, *ok, 1.0)
    with pytest.raises(RuntimeError, match="not a multiple of Hkv"):
        cpu_attention.paged_decode(torch.zeros(1, 3, 8), k, v, *ok, 1.0)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16, got BFloat16, Float and Float"):
        cpu_attention.paged_decode(q.bfloat16(), k, v, *ok, 1.0)
    with pytest.raises(RuntimeError, match="all float32 or all bfloat16, got Half"):
        cpu_attention.paged_decode(q.half(), k.half(), v.half(), *ok, 1.0)


def test_row_kernel_choice():
    from hfaccel.cache import attention
    from hfaccel.cache.paged import KVPool

    pool = KVPool(1, 1, 8, 4)
    assert attention.row_kernel_for(pool, torch.zeros(1, 1, 1, 8)) == "cpp"
    assert attention.row_kernel_for(pool, torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16)) == "sdpa"
    bf16_pool = KVPool(1, 1, 8, 4, dtype=torch.bfloat16)
    assert attention.row_kernel_for(bf16_pool, torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16)) == "cpp"
    assert attention.row_kernel_for(bf16_pool, torch.zeros(1, 1, 1, 8)) == "sdpa"
    assert attention.row_kernel_for(KVPool(1, 1, 8, 4, kv_dtype="int8"), torch.zeros(1, 1, 1, 8)) == "sdpa"
    try:
        attention.set_row_kernel("sdpa")
        assert attention.row_kernel_for(pool, torch.zeros(1, 1, 1, 8)) == "sdpa"
        attention.set_row_kernel("cpp")
        with pytest.raises(RuntimeError, match="takes float32 or bfloat16 on the CPU"):
            attention.row_kernel_for(pool, torch.zeros(1, 1, 1, 8, dtype=torch.bfloat16))
        with pytest.raises(ValueError, match="allowed: auto, cpp, sdpa"):
            attention.set_row_kernel("triton")
    finally:
        attention.set_row_kernel("auto")


# ------------------------------------------------------------------ buffer_decode: the compiled step's attention

@pytest.mark.parametrize("hq, hkv, d", [(9, 3, 64), (8, 8, 16), (4, 1, 12), (18, 2, 40)])
def test_buffer_decode_reads_only_the_valid_columns(hq, hkv, d):
    """Left padding, columns not written yet and a speculative step's rejected holes: each row equals its valid
    columns gathered alone (the float64 reference above); what sits in masked columns never matters."""
    torch.manual_seed(hq + d)
    b, t = 3, 40
    q, k, v = torch.randn(b, hq, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    valid = torch.zeros(b, t, dtype=torch.bool)
    valid[0, :25] = True                     # a row written up to column 24
    valid[1, 7:31] = True                    # left padding of 7
    valid[2, 2:30] = True
    valid[2, [5, 6, 17]] = False             # holes
    got = cpu_attention.buffer_decode(q, k, v, valid, 0.3)
    want = torch.stack([reference(q[i:i + 1], k[i], v[i], [[(int(j), 1) for j in valid[i].nonzero()]], 0.3)[0]
                        for i in range(b)])
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    k2, v2 = k.clone(), v.clone()
    k2[~valid[:, None, :, None].expand_as(k2)] = float("nan")
    v2[~valid[:, None, :, None].expand_as(v2)] = float("nan")
    assert torch.equal(cpu_attention.buffer_decode(q, k2, v2, valid, 0.3), got)
    # a bf16 step's buffer: the fp32 op on the same bf16 values, rounded once; masked NaN still never read
    got16 = cpu_attention.buffer_decode(q.bfloat16(), k2.bfloat16(), v2.bfloat16(), valid, 0.3)
    assert got16.dtype == torch.bfloat16
    want16 = cpu_attention.buffer_decode(q.bfloat16().float(), k.bfloat16().float(), v.bfloat16().float(), valid, 0.3)
    torch.testing.assert_close(got16.float(), want16, rtol=2 ** -8, atol=1e-6)


def test_buffer_decode_bad_arguments_name_what_is_wrong():
    q, k = torch.randn(2, 4, 8), torch.randn(2, 2, 5, 8)
    valid = torch.ones(2, 5, dtype=torch.bool)
    with pytest.raises(RuntimeError, match=r"valid must be bool \[2, 5\]"):
        cpu_attention.buffer_decode(q, k, k, valid.float(), 1.0)
    with pytest.raises(RuntimeError, match="row 1 has no valid column"):
        cpu_attention.buffer_decode(q, k, k, torch.tensor([[True] * 5, [False] * 5]), 1.0)
    with pytest.raises(RuntimeError, match=r"k and v must be the same \[B, Hkv, T, D\]"):
        cpu_attention.buffer_decode(q, k, k[:, :, :4], valid, 1.0)
    with pytest.raises(RuntimeError, match="k has 1 rows, q 2"):
        cpu_attention.buffer_decode(q, k[:1], k[:1], valid, 1.0)


def test_buffer_verify_gives_each_token_its_own_columns_of_its_rows_buffer():
    """A speculative verify: W tokens per row, token i of row b over allowed[b, i] of row b's K/V. Each equals
    buffer_decode of that one token with those columns; NaN in masked columns never matters."""
    torch.manual_seed(7)
    b, w, hq, hkv, t, d = 3, 4, 9, 3, 30, 64
    q, k, v = torch.randn(b, w, hq, d), torch.randn(b, hkv, t, d), torch.randn(b, hkv, t, d)
    start = torch.tensor([0, 6, 2])                                   # left padding per row
    col = torch.tensor([20, 12, 25])                                  # where each row's first token sits
    cols = torch.arange(t)
    where = col[:, None] + torch.arange(w)                            # [B, W]
    allowed = (cols >= start[:, None, None]) & (cols <= where[:, :, None])
    allowed[2, :, 9] = False                                          # a rejected hole
    got = cpu_attention.buffer_verify(q, k, v, allowed, 0.125)
    assert got.shape == (b, w, hq, d)
    for i in range(w):
        one = cpu_attention.buffer_decode(q[:, i].contiguous(), k, v, allowed[:, i].contiguous(), 0.125)
        torch.testing.assert_close(got[:, i], one, rtol=1e-6, atol=1e-6)
    k2, v2 = k.clone(), v.clone()
    seen = allowed.any(1)
    k2[~seen[:, None, :, None].expand_as(k2)] = float("nan")
    v2[~seen[:, None, :, None].expand_as(v2)] = float("nan")
    assert torch.equal(cpu_attention.buffer_verify(q, k2, v2, allowed, 0.125), got)
    with pytest.raises(RuntimeError, match=r"allowed must be bool \[3, 4, 30\]"):
        cpu_attention.buffer_verify(q, k, v, allowed[:, :3], 0.125)
    bad = allowed.clone()
    bad[1, 2] = False
    with pytest.raises(RuntimeError, match="row 1 token 2 has no valid column"):
        cpu_attention.buffer_verify(q, k, v, bad, 0.125)
