"""GPTQ (Frantar et al., 2022) for one weight matrix, and the sequential layer-by-layer driver.

For a linear layer with weight W [N, K] and calibration inputs X, GPTQ quantizes W column by column and
spreads each column's rounding error over the columns not yet quantized, weighted by the inverse Hessian
H^-1 of the layer's squared error (H = 2 X^T X / n). Implemented here:
- dampening: H += damp_percent * mean(diag H) * I; dead inputs (diag 0) get weight 0;
- blocks of 128 columns with lazy batch updates (the paper's formulation);
- groups of 32/64/128 columns with their own scale/zero, computed when the walk reaches the group (from
  the error-updated weights);
- act-order (desc_act): columns visited by decreasing diag H. Group parameters are then fixed before the
  walk from the original column order ("static groups"), so groups stay contiguous: g_idx is the trivial
  column // group_size and the packed kernels and the GPTQ file format read it as usual.
The result is the codes, scales and zeros of an Int4Linear.
"""

from __future__ import annotations

import torch

from .layers import int4_params


def _params(w: torch.Tensor, group_size: int, sym: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Group scale/zero rounded to bf16 first: the error GPTQ compensates is the error the kernels make."""
    s, z = int4_params(w, group_size, sym)
    return s.to(torch.bfloat16).float(), z.to(torch.bfloat16).float()


def gptq_quantize(w: torch.Tensor, h: torch.Tensor, group_size: int, sym: bool = True, damp_percent: float = 0.01,
                  act_order: bool = False, block_size: int = 128):
    """w [N, K] (K a multiple of group_size), h [K, K]. Returns (codes [N, K] uint8, scales, zeros [K/g, N])."""
    w = w.detach().float().clone()
    h = h.detach().float().clone()
    n, k = w.shape
    if k % group_size:
        raise ValueError(f"K = {k} is not a multiple of group_size {group_size}: pad first")
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0

    groups = k // group_size
    scales = torch.zeros(groups, n)
    zeros = torch.zeros(groups, n)
    if act_order:                                   # static groups: parameters from the original weights
        for g in range(groups):
            cols = slice(g * group_size, (g + 1) * group_size)
            s, z = _params(w[:, cols], group_size, sym)
            scales[g], zeros[g] = s[0], z[0]
        perm = torch.argsort(torch.diag(h), descending=True)
        w, h = w[:, perm], h[perm][:, perm]
    else:
        perm = torch.arange(k)
    group_of = perm // group_size                   # original group of each visited column

    damp = damp_percent * torch.mean(torch.diag(h))
    h += damp * torch.eye(k)
    hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(h)), upper=True)

    codes = torch.zeros(n, k, dtype=torch.uint8)
    for i1 in range(0, k, block_size):
        i2 = min(i1 + block_size, k)
        w1 = w[:, i1:i2].clone()
        err1 = torch.zeros_like(w1)
        hinv1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            g = int(group_of[col])
            if not act_order and col % group_size == 0:          # a new group: from the updated weights
                s, z = _params(torch.cat([w1[:, i:], w[:, i2:]], dim=1)[:, :group_size], group_size, sym)
                scales[g], zeros[g] = s[0], z[0]
            s, z = scales[g], zeros[g]
            q = torch.round((w1[:, i] - z) / s + 8).clamp_(0, 15)
            codes[:, col] = q.to(torch.uint8)
            deq = (q - 8) * s + z
            e = (w1[:, i] - deq) / hinv1[i, i]
            w1[:, i:] -= e[:, None] * hinv1[i, i:][None, :]
            err1[:, i] = e
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    if act_order:
        codes = codes[:, torch.argsort(perm)]
    return codes, scales, zeros
