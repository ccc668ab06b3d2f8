"""Reference versions of the fused ops, in plain torch, computed as Transformers computes them."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, residual: torch.Tensor | None = None,
             plus_one: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(x + residual) * w, x + residual): fp32 statistics, output in x's dtype (Llama's RMSNorm)."""
    h = x if residual is None else x + residual
    hf = h.float()
    normed = hf * torch.rsqrt(hf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.float() + 1.0 if plus_one else weight.float()
    return (normed * w).to(x.dtype), h


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """rotate_half RoPE: q, k [B, H, S, D]; cos, sin [B, S, D]."""
    def rotate_half(t):
        a, b = t.chunk(2, dim=-1)
        return torch.cat((-b, a), dim=-1)

    c, s = cos[:, None], sin[:, None]
    return q * c + rotate_half(q) * s, k * c + rotate_half(k) * s


def swiglu(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for [..., 2I] = [gate | up]."""
    gate, up = gate_up.chunk(2, dim=-1)
    return F.silu(gate) * up
