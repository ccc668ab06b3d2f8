"""hfaccel's fused rotary embedding on CPU (cpu_rope.cpp): q and k rotated in one op, bit-identical to
Transformers' eager apply_rotary_pos_emb (rotate_half, optionally partial). Built once per torch version into
the hfaccel cache; where it cannot be built `status()` says why and the eager ops stay.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_rope.cpp")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


@functools.cache
def status() -> tuple[bool, str]:
    """(the op is loaded, how / why not); builds on the first call."""
    from .cpp_build import build_ops, portable_flags

    # -ffp-contract=off: the product and the add are two roundings in the eager ops; an FMA would round once
    return build_ops("hfaccel_cpu_rope", SOURCE, [*portable_flags(), "-ffp-contract=off"], {
        "hfaccel_cpu_rope::rope": lambda q, k, cos, sin, contiguous: (torch.empty_like(q), torch.empty_like(k))})


def rope(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
         contiguous: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """q [B, Hq, S, D], k [B, Hk, S, D], cos / sin [B or 1, S, R] (R even, <= D), one dtype, last dimensions
    contiguous -> (q', k') with the values apply_rotary_pos_emb(q, k, cos, sin) returns (columns R.. copied);
    contiguous outputs, or laid out like q and k (as elementwise ops lay theirs out). Inputs it does not take
    raise a RuntimeError that names the tensor, before anything is written."""
    return torch.ops.hfaccel_cpu_rope.rope(q, k, cos, sin, contiguous)


__all__ = ["DTYPES", "rope", "status"]
