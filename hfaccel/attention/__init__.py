"""Attention backend choice, through Transformers' own set_attn_implementation.

auto: flash_attention_2 on CUDA when flash-attn is importable and the weights are fp16/bf16; else sdpa
where the model supports it; else eager. Each is exact attention, so the switch is lossless (greedy
tokens are tested equal to the model as loaded).
"""

from __future__ import annotations

import importlib.util

import torch
from torch import nn

from ..registry import Plan, register_feature
from ..report import Skip


def flash_attn_importable() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def _flash_problem(ctx) -> str | None:
    if ctx.device.type != "cuda":
        return f"flash_attention_2 needs a CUDA device; the model is on {ctx.device}"
    if not flash_attn_importable():
        return "flash_attention_2 needs the flash-attn package, which is not installed (pip install flash-attn)"
    if ctx.target_dtype not in (torch.float16, torch.bfloat16):
        return f"flash_attention_2 needs fp16 or bf16 weights; they are {ctx.target_dtype}"
    return None


def _supported(model: nn.Module, impl: str) -> str | None:
    """None if the model class accepts `impl`, else Transformers' reason."""
    if impl == "sdpa" and not getattr(model, "_supports_sdpa", False):
        return f"{type(model).__name__} does not support sdpa"
    if impl == "flash_attention_2" and not getattr(model, "_supports_flash_attn", False):
        return f"{type(model).__name__} does not support flash_attention_2"
    if not model._can_set_attn_implementation():
        return f"{type(model).__name__} cannot switch attention implementation after loading"
    return None


def choose_backend(model: nn.Module, ctx, wanted: str) -> tuple[str | None, str]:
    """(implementation, why) — implementation None when `wanted` cannot be honoured here."""
    if wanted == "auto":
        if _flash_problem(ctx) is None and _supported(model, "flash_attention_2") is None:
            return "flash_attention_2", "auto: CUDA with flash-attn and half-precision weights"
        if _supported(model, "sdpa") is None:
            return "sdpa", "auto: torch scaled_dot_product_attention"
        return "eager", "auto: sdpa unsupported by this model, eager fallback"
    if wanted == "flash_attention_2":
        problem = _flash_problem(ctx) or _supported(model, wanted)
        return (None, problem) if problem else (wanted, "asked for flash_attention_2")
    problem = _supported(model, wanted) if wanted != "eager" else None
    return (None, problem) if problem else (wanted, f"asked for {wanted}")


@register_feature("attention", stage="attention")
def plan_attention(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    wanted = cfg.attention.backend
    if wanted == "paged":
        if cfg.kv_cache.type != "paged":
            return Skip("attention", f"backend paged reads the paged KV cache; kv_cache.type is {cfg.kv_cache.type}")
        return None          # the kv_cache feature installs hfaccel_paged with the pool
    if wanted == "auto" and cfg.kv_cache.type == "paged" and _supported(model, "sdpa") is None:
        from ..cache.feature import _paged_problem

        if _paged_problem(model) is None:
            return None      # the kv_cache feature installs hfaccel_paged (sdpa plus paged decode)
    impl, why = choose_backend(model, ctx, wanted)
    if impl is None:
        return Skip("attention", why)
    current = model.config._attn_implementation
    if impl == current:
        return Skip("attention", f"{why}; the model already uses {current}")
    return Plan("attention", lambda rw: rw.set_attn_implementation(impl), why)
