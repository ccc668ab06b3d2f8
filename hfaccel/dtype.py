"""The dtype policy: which floating dtype the weights should have on this device.

`keep` (the default) leaves the model as loaded. `auto` picks bf16 where it runs in hardware (any CUDA
GPU, a CPU with AVX-512 BF16 or AMX) and fp32 otherwise. Any narrowing cast is lossy: the report
gives the weight SQNR it cost, and revert needs keep_original.
"""

from __future__ import annotations


import torch
from torch import nn

from .quality import sqnr_db
from .registry import Plan, register_feature
from .report import Skip

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def resolve_dtype(name: str, ctx) -> tuple[torch.dtype, str]:
    if name == "auto":
        if ctx.native_bf16:
            return torch.bfloat16, "auto: bf16 runs in hardware on this device"
        return torch.float32, "auto: this device has no native bf16 (no AVX-512 BF16/AMX, no GPU)"
    return DTYPES[name], f"asked for {name}"


def weight_sqnr_db(model: nn.Module, dtype: torch.dtype) -> tuple[float, float]:
    """(min, mean) over weight matrices of the SQNR in dB of casting them to `dtype`."""
    values = [sqnr_db(p.detach(), p.detach().to(dtype)) for p in model.parameters()
              if p.dim() >= 2 and p.is_floating_point() and p.dtype != dtype]
    if not values:
        return float("inf"), float("inf")
    return min(values), sum(values) / len(values)


@register_feature("dtype", stage="dtype")
def plan_dtype(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    if cfg.dtype == "keep":
        return None
    target, why = resolve_dtype(cfg.dtype, ctx)
    ctx.target_dtype = target
    name = str(target).removeprefix("torch.")
    if target == ctx.dtype:
        return Skip("dtype", f"{why}; the model is already {name}")
    if ctx.placement and ctx.placement.offloaded:
        ctx.target_dtype = ctx.dtype
        return Skip("dtype", f"{why}; not cast: {len(ctx.placement.offloaded)} modules are offloaded and accelerate "
                             f"loads their weights in the stored dtype; load with from_pretrained(dtype={name}) "
                             f"instead")
    if target == torch.float16 and ctx.device.type == "cpu":
        why += " (float16 matmuls are slow on most CPUs)"
    notes = []
    if torch.finfo(target).bits < torch.finfo(ctx.dtype).bits:
        lo, mean = weight_sqnr_db(model, target)
        notes.append(f"dtype {name} is lossy: weight SQNR min {lo:.1f} dB, mean {mean:.1f} dB; measure the "
                     f"perplexity cost with `hfaccel eval ppl` or `hfaccel bench`")
    return Plan("dtype", lambda rw: rw.cast(target, keep_original=cfg.keep_original), why, notes)
