"""Triton paged-decode attention: one query token per row, K/V read through the block table in place.

Grid: (rows, query heads). Each program walks its row's logical blocks from the row's left-padding offset,
loads one block of keys (block_size x head_dim) straight from the pool, and keeps an online softmax
(running max, running sum, fp32 accumulator). int8 K/V are dequantized in registers with their per-token
per-head fp16 scales. GQA: query head h reads KV head h // (Hq / Hkv).

Imported lazily (triton is an optional dependency). Tests run it under TRITON_INTERPRET=1 on CPU tensors;
on a CUDA device it compiles to PTX.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(
    Q, K, V, KS, VS, TABLE, OFFSETS, MASK, OUT,
    length, scale,
    stride_qb, stride_qh,
    stride_ks, stride_kh,
    stride_vs, stride_vh,
    stride_ss, stride_sh,
    stride_tb, stride_mb,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, D_POW2: tl.constexpr, BLOCK: tl.constexpr,
    HAS_MASK: tl.constexpr, INT8: tl.constexpr,
):
    row = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    d = tl.arange(0, D_POW2)
    dmask = d < HEAD_DIM
    q = tl.load(Q + row * stride_qb + head * stride_qh + d, mask=dmask, other=0.0).to(tl.float32) * scale

    offset = tl.load(OFFSETS + row)
    m_i = float("-inf")
    l_i = 0.0
    acc = tl.zeros([D_POW2], dtype=tl.float32)
    i = tl.arange(0, BLOCK)
    num_blocks = (length - offset + BLOCK - 1) // BLOCK
    for j in range(0, num_blocks):
        block = tl.load(TABLE + row * stride_tb + j)
        pos = offset + j * BLOCK + i                      # logical positions of this block
        live = pos < length
        if HAS_MASK:
            live = live & (tl.load(MASK + row * stride_mb + pos, mask=live, other=0) != 0)
        slot = block * BLOCK + i
        kv_mask = live[:, None] & dmask[None, :]
        k = tl.load(K + slot[:, None] * stride_ks + kv_head * stride_kh + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + slot[:, None] * stride_vs + kv_head * stride_vh + d[None, :], mask=kv_mask, other=0.0)
        k = k.to(tl.float32)
        v = v.to(tl.float32)
        if INT8:
            k = k * tl.load(KS + slot * stride_ss + kv_head * stride_sh, mask=live, other=0.0).to(tl.float32)[:, None]
            v = v * tl.load(VS + slot * stride_ss + kv_head * stride_sh, mask=live, other=0.0).to(tl.float32)[:, None]
        s = tl.sum(k * q[None, :], axis=1)
        s = tl.where(live, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp(m_i - m_safe)
        p = tl.exp(s - m_safe)
        l_i = l_i * alpha + tl.sum(p, axis=0)
        acc = acc * alpha + tl.sum(p[:, None] * v, axis=0)
        m_i = m_new
    out = tl.where(l_i > 0, acc / l_i, 0.0)
    tl.store(OUT + row * stride_ob + head * stride_oh + d, out.to(OUT.dtype.element_ty), mask=dmask)


def paged_decode_triton(q: torch.Tensor, k_pool: torch.Tensor, v_pool: torch.Tensor, table: torch.Tensor,
                        offsets: torch.Tensor, length: int, valid: torch.Tensor | None, scale: float,
                        block_size: int, k_scale: torch.Tensor | None = None,
                        v_scale: torch.Tensor | None = None) -> torch.Tensor:
    """q [B, Hq, D]; k_pool, v_pool [slots, Hkv, D] (one layer); table [B, W] int32; offsets [B] int32;
    valid [B, length] bool or None; k_scale, v_scale [slots, Hkv] for int8 pools. Returns [B, Hq, D]."""
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    if hq % hkv:
        raise ValueError(f"{hq} query heads do not group over {hkv} KV heads")
    if block_size & (block_size - 1):
        raise ValueError(f"block_size = {block_size} is not allowed for the Triton kernel; allowed: powers of 2")
    q = q.contiguous()
    out = torch.empty_like(q)
    int8 = k_scale is not None
    mask = valid.to(torch.int8).contiguous() if valid is not None else q        # q: an unused placeholder
    ks = k_scale if int8 else q
    vs = v_scale if int8 else q
    _paged_decode_kernel[(b, hq)](
        q, k_pool, v_pool, ks, vs, table, offsets, mask, out,
        length, scale,
        q.stride(0), q.stride(1),
        k_pool.stride(0), k_pool.stride(1),
        v_pool.stride(0), v_pool.stride(1),
        ks.stride(0) if int8 else 0, ks.stride(1) if int8 else 0,
        table.stride(0), mask.stride(0) if valid is not None else 0,
        out.stride(0), out.stride(1),
        GROUP=hq // hkv, HEAD_DIM=d, D_POW2=triton.next_power_of_2(d), BLOCK=block_size,
        HAS_MASK=valid is not None, INT8=int8,
    )
    return out
