"""Triton kernels for CUDA: RMSNorm (with the residual add fused in), rotate_half RoPE on q and k, SwiGLU.

Each is one program per row (a token, or a token-head for RoPE) over the last dimension, padded to a power
of two and masked; statistics and activations in fp32, outputs in the input dtype - the same arithmetic as
hfaccel.kernels.reference. Imported lazily (triton is optional); the tests run them on CPU tensors under
TRITON_INTERPRET=1 and, when a GPU is present, on CUDA in fp32, fp16 and bf16.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(X, R, W, OUT, RES_OUT, n, eps, stride_x, stride_r, stride_o, stride_ro,
                     HAS_RES: tl.constexpr, PLUS_ONE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    mask = cols < n
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        x = x + tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        tl.store(RES_OUT + row * stride_ro + cols, x, mask=mask)
    h = x.to(tl.float32)
    var = tl.sum(h * h, axis=0) / n
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if PLUS_ONE:
        w = w + 1.0
    y = h * (1.0 / tl.sqrt(var + eps)) * w
    tl.store(OUT + row * stride_o + cols, y.to(OUT.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             plus_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * w, x + residual), like reference.rms_norm; x [..., N]."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1]).contiguous()
    rows, n = x2.shape
    out = torch.empty_like(x2)
    if residual is not None:
        r2 = residual.reshape(-1, n).contiguous()
        res_out = torch.empty_like(x2)
    else:
        r2, res_out = x2, x2
    _rms_norm_kernel[(rows,)](x2, r2, weight.contiguous(), out, res_out, n, eps, x2.stride(0), r2.stride(0),
                              out.stride(0), res_out.stride(0), HAS_RES=residual is not None, PLUS_ONE=plus_one,
                              BLOCK=triton.next_power_of_2(n))
    return out.view(shape), (res_out if residual is not None else x2).view(shape)


@triton.jit
def _rope_kernel(T, COS, SIN, OUT, heads, seq, stride_tb, stride_th, stride_ts, stride_cb, stride_cs,
                 stride_ob, stride_oh, stride_os, HALF: tl.constexpr, BLOCK: tl.constexpr):
    pid = tl.program_id(0)                     # one (batch, head, position)
    s = pid % seq
    h = (pid // seq) % heads
    b = pid // (seq * heads)
    d = tl.arange(0, BLOCK)
    mask = d < HALF
    base = T + b * stride_tb + h * stride_th + s * stride_ts
    x1 = tl.load(base + d, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(base + HALF + d, mask=mask, other=0.0).to(tl.float32)
    cbase = b * stride_cb + s * stride_cs
    c1 = tl.load(COS + cbase + d, mask=mask, other=0.0).to(tl.float32)
    c2 = tl.load(COS + cbase + HALF + d, mask=mask, other=0.0).to(tl.float32)
    s1 = tl.load(SIN + cbase + d, mask=mask, other=0.0).to(tl.float32)
    s2 = tl.load(SIN + cbase + HALF + d, mask=mask, other=0.0).to(tl.float32)
    obase = OUT + b * stride_ob + h * stride_oh + s * stride_os
    tl.store(obase + d, (x1 * c1 - x2 * s1).to(OUT.dtype.element_ty), mask=mask)
    tl.store(obase + HALF + d, (x2 * c2 + x1 * s2).to(OUT.dtype.element_ty), mask=mask)


def _rope_one(t: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    b, h, s, d = t.shape
    if d % 2:
        raise ValueError(f"rotate_half RoPE needs an even head_dim, got {d}")
    out = torch.empty(b, h, s, d, dtype=t.dtype, device=t.device)
    cos, sin = cos.expand(b, s, d).contiguous(), sin.expand(b, s, d).contiguous()
    _rope_kernel[(b * h * s,)](t, cos, sin, out, h, s, t.stride(0), t.stride(1), t.stride(2), cos.stride(0),
                               cos.stride(1), out.stride(0), out.stride(1), out.stride(2), HALF=d // 2,
                               BLOCK=triton.next_power_of_2(d // 2))
    return out


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_half RoPE like reference.rope: q, k [B, H, S, D] (last dim contiguous); cos, sin [B or 1, S, D]."""
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rope: q and k need a contiguous last dimension")
    return _rope_one(q, cos, sin), _rope_one(k, cos, sin)


@triton.jit
def _swiglu_kernel(GU, OUT, inter, stride_g, stride_o, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    start = tl.program_id(1) * BLOCK
    cols = start + tl.arange(0, BLOCK)
    mask = cols < inter
    g = tl.load(GU + row * stride_g + cols, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(GU + row * stride_g + inter + cols, mask=mask, other=0.0).to(tl.float32)
    y = g / (1.0 + tl.exp(-g)) * u
    tl.store(OUT + row * stride_o + cols, y.to(OUT.dtype.element_ty), mask=mask)


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [..., 2I] = [gate | up], like reference.swiglu."""
    shape = gate_up.shape
    if shape[-1] % 2:
        raise ValueError(f"swiglu needs [..., 2 * I], got a last dimension of {shape[-1]}")
    g2 = gate_up.reshape(-1, shape[-1]).contiguous()
    inter = shape[-1] // 2
    out = torch.empty(g2.shape[0], inter, dtype=gate_up.dtype, device=gate_up.device)
    block = min(1024, triton.next_power_of_2(inter))
    _swiglu_kernel[(g2.shape[0], triton.cdiv(inter, block))](g2, out, inter, g2.stride(0), out.stride(0), BLOCK=block)
    return out.view(*shape[:-1], inter)


__all__ = ["rms_norm", "rope", "swiglu"]
