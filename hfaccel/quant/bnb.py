"""bitsandbytes layers: LLM.int8 (Linear8bitLt, outlier threshold 6.0) and NF4 (Linear4bit).

Used when bitsandbytes is importable and, on a CPU, only after a self-check: one small layer is
quantized and run, and its output must match the float layer (bitsandbytes' CPU backend is young; where
it fails, the feature is skipped with the error). Measured on the 2-core CPU with bitsandbytes 0.50.2:
functional, but about 3x slower than a fp32 nn.Linear at batch 1 (576x1536: 139 us int8, 153 us nf4,
53 us fp32), so the CPU presets use hfaccel's own int8/int4 layers instead.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from torch import nn

from .layers import linear_weight


def bnb_available() -> bool:
    return importlib.util.find_spec("bitsandbytes") is not None


def bnb_layer(linear: nn.Module, method: str, compute_dtype: torch.dtype, device: torch.device) -> nn.Module:
    import bitsandbytes as bnb

    w = linear_weight(linear).clone()
    n, k = w.shape
    has_bias = getattr(linear, "bias", None) is not None
    if method == "bnb-int8":
        layer = bnb.nn.Linear8bitLt(k, n, bias=has_bias, has_fp16_weights=False, threshold=6.0)
        layer.weight = bnb.nn.Int8Params(w.to(compute_dtype), requires_grad=False, has_fp16_weights=False)
    elif method == "bnb-nf4":
        layer = bnb.nn.Linear4bit(k, n, bias=has_bias, quant_type="nf4", compute_dtype=compute_dtype)
        layer.weight = bnb.nn.Params4bit(w.to(compute_dtype), requires_grad=False, quant_type="nf4")
    else:
        raise ValueError(f"method {method!r} is not allowed here; allowed: bnb-int8, bnb-nf4")
    if has_bias:
        layer.bias = nn.Parameter(linear.bias.detach().to(compute_dtype), requires_grad=False)
    return layer.to(device)                     # bitsandbytes quantizes on the move to the device


@functools.cache
def cpu_self_check(method: str, compute_dtype: torch.dtype) -> str | None:
    """None when bitsandbytes' CPU backend runs `method` correctly, else why not."""
    try:
        torch.manual_seed(0)
        lin = nn.Linear(128, 64).to(compute_dtype)
        layer = bnb_layer(lin, method, compute_dtype, torch.device("cpu"))
        x = torch.randn(3, 128, dtype=compute_dtype)
        with torch.no_grad():
            got, want = layer(x).float(), lin(x).float()
        rel = ((got - want).pow(2).mean() / want.pow(2).mean()).item()
        if not rel < 0.05:
            return f"bitsandbytes' CPU backend gives wrong results for {method} (relative error {rel:.3g})"
    except Exception as e:                      # the backend's own failure, reported as the skip reason
        return f"bitsandbytes' CPU backend fails for {method}: {type(e).__name__}: {str(e)[:200]}"
    return None
