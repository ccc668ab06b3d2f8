"""The kv_cache feature: make an unchanged model.generate() use the paged pool (or a static cache).

type: paged (the default)
- one KVPool per model, allocated here, once: `max_cache_tokens`, else `memory_fraction` of the free
  memory of the model's device (CUDA: free device memory; CPU: MemAvailable; CPU pages are only touched
  as blocks get used), at most MAX_POOL_TOKENS;
- model.generate is rebound on the instance: when the call leaves the cache to generate() (no
  past_key_values, no cache_implementation, use_cache not False) it passes a PagedCache built for the
  prompt (prefix hits already in its tables, padding mapped to the null block) and releases its blocks
  when generate() returns, unless the caller gets the cache back (return_dict_in_generate);
- attention becomes "hfaccel_paged" where the backend is auto or paged and the model supports sdpa
  (otherwise the cache hands gathered K/V to whichever attention the model uses);
- `model.hfaccel_stats`: prefix hits, reused tokens, evictions, free blocks (live counters).
type: static sets generation_config.cache_implementation = "static" (Transformers' own StaticCache).
type: dynamic leaves Transformers' default.

Generate calls on one accelerated model are serialised: they share one pool.
"""

from __future__ import annotations

import functools
import inspect
import math
import threading
import warnings
from pathlib import Path

import torch
from torch import nn

from ..compat import cache_arg, check_prompt, given_cache, output_cache
from ..registry import Plan, register_feature
from ..report import Skip
from . import attention as paged_attention
from .block_pool import CacheFullError
from .paged import KVPool, PagedCache, quantize_int8

MAX_POOL_TOKENS = 1 << 20


def free_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 << 30


def pool_tokens(model: nn.Module, kv, dtype: torch.dtype, device: torch.device) -> tuple[int, str]:
    """(tokens, how they were chosen)."""
    if kv.max_cache_tokens is not None:
        return kv.max_cache_tokens, f"max_cache_tokens = {kv.max_cache_tokens}"
    per_token = KVPool.bytes_per_token(model, dtype, kv.dtype)
    free = free_memory_bytes(device)
    tokens = int(free * kv.memory_fraction) // per_token
    why = f"memory_fraction {kv.memory_fraction} of {free / 2**30:.1f} GiB free"
    if tokens > MAX_POOL_TOKENS:
        tokens, why = MAX_POOL_TOKENS, why + f", capped at {MAX_POOL_TOKENS} tokens"
    return max(tokens, kv.block_size), why


@torch.inference_mode()
def measured_kv_sqnr(model: nn.Module, tokens: int = 128) -> float:
    """SQNR (dB) of int8 per-token-per-head quantization over the K/V the model makes for held-out text."""
    from transformers import DynamicCache

    from ..data import encode, held_out_text

    ids = encode(None, held_out_text()[:tokens], model.config.vocab_size)[:tokens]
    device = next(model.parameters()).device
    cache = DynamicCache(config=model.config)
    model(torch.tensor([ids], device=device), **cache_arg(model, cache), use_cache=True)
    sig = err = 0.0
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            x = t.transpose(1, 2).float()          # [B, T, H, D]: one scale per token and head
            q, s = quantize_int8(x)
            err += (x - q.float() * s.float()[..., None]).pow(2).sum().item()
            sig += x.pow(2).sum().item()
    return float("inf") if err == 0 else 10 * math.log10(sig / err)


def _generation_setting(model, kwargs: dict, name: str):
    if name in kwargs:
        return kwargs[name]
    gc = kwargs.get("generation_config") or model.generation_config
    return getattr(gc, name, None)


def leaves_cache_to_generate(model, kwargs: dict) -> bool:
    """True when this generate() call would get Transformers' default DynamicCache."""
    if given_cache(kwargs) is not None or kwargs.get("custom_generate") is not None:
        return False
    if _generation_setting(model, kwargs, "use_cache") is False:
        return False
    return _generation_setting(model, kwargs, "cache_implementation") is None


def _rows_and_tokens(model, kwargs: dict, prompt: torch.Tensor | None, mask) -> tuple[int, int]:
    """(rows the cache will hold, tokens per row at most) for an early capacity check."""
    batch = prompt.shape[0] if prompt is not None else 1
    length = prompt.shape[1] if prompt is not None else 0
    if mask is not None and prompt is not None:
        length = int(mask.sum(dim=1).max())
    beams = max(_generation_setting(model, kwargs, "num_beams") or 1,
                _generation_setting(model, kwargs, "num_return_sequences") or 1)
    new = _generation_setting(model, kwargs, "max_new_tokens")
    if new is None:
        new = max(0, (_generation_setting(model, kwargs, "max_length") or 20) - length)
    return batch * beams, length + new


def make_generate(model, pool: KVPool, reuse: bool, mode: str):
    original = model.generate                # the bound method as it is now (class or earlier wrapper)
    sig = inspect.signature(original)
    lock = threading.RLock()
    warned = []

    @functools.wraps(original)
    def generate(*args, **kwargs):
        if not leaves_cache_to_generate(model, kwargs):
            return original(*args, **kwargs)
        try:
            given = sig.bind_partial(*args, **kwargs).arguments
        except TypeError:
            return original(*args, **kwargs)        # let generate() report the bad call itself
        prompt = given.get("inputs")
        if prompt is None:
            prompt = kwargs.get("input_ids")
        mask = kwargs.get("attention_mask")
        check_prompt({**kwargs, "inputs": prompt}, pool.keys.device)
        usable = isinstance(prompt, torch.Tensor) and prompt.dim() == 2 and not prompt.is_floating_point()
        rows, per_row = _rows_and_tokens(model, kwargs, prompt if usable else None, mask)
        with lock:
            need = rows * pool.blocks.blocks_for(per_row + 1)
            if need > pool.blocks.num_free:
                pool.stats.fallbacks += 1
                if not warned:
                    warned.append(1)
                    warnings.warn(f"hfaccel: this generate() call needs up to {need} KV blocks, the pool has "
                                  f"{pool.blocks.num_free} free; it runs with Transformers' DynamicCache "
                                  f"(raise kv_cache.max_cache_tokens to page it)", stacklevel=2)
                return original(*args, **kwargs)
            if usable:
                cache = PagedCache.for_prompt(pool, prompt, mask, reuse=reuse, attention=mode)
            else:
                cache = PagedCache(pool, attention=mode)
            cache.expand_rows(max(_generation_setting(model, kwargs, "num_beams") or 1,
                                  _generation_setting(model, kwargs, "num_return_sequences") or 1))
            returned = False
            try:
                out = original(*args, **cache_arg(model, cache), **kwargs)
                returned = output_cache(out) is cache
                return out
            finally:
                if not returned:
                    cache.release()
                pool.snapshot()

    return generate


def new_cache(model, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None):
    """The cache generate() would use on this model: a PagedCache for a paged model, else a DynamicCache.
    For callers that run forward passes themselves (perplexity in chunks, custom loops)."""
    pool = model.__dict__.get("hfaccel_kv_pool")
    if pool is None:
        from transformers import DynamicCache

        return DynamicCache(config=model.config)
    mode = "paged" if paged_attention.is_paged(model.config._attn_implementation) else "gather"
    if input_ids is None:
        return PagedCache(pool, attention=mode)
    return PagedCache.for_prompt(pool, input_ids, attention_mask, reuse=True, attention=mode)


def clear_prefix_cache(model) -> int:
    """Forget the prompt blocks cached on this model's pool (e.g. after its weights changed, or to time
    a cold prefill). Returns how many blocks were dropped; 0 for a model without a paged pool."""
    pool = model.__dict__.get("hfaccel_kv_pool")
    return pool.blocks.drop_cached() if pool is not None else 0


def _paged_problem(model: nn.Module) -> str | None:
    if model.config.is_encoder_decoder:
        return "encoder-decoder models keep Transformers' cache"
    if not model._supports_default_dynamic_cache():
        return f"{type(model).__name__} does not take a Cache object (it builds its own)"
    layer_types = getattr(model.config.get_text_config(), "layer_types", None) or []
    if any(t != "full_attention" for t in layer_types):
        return f"layer types {sorted(set(layer_types))}: the pool pages full-attention layers only"
    from ..tp import tp_size

    tp = tp_size(model)
    kv = getattr(model.config.get_text_config(), "num_key_value_heads", None)
    if tp > 1 and isinstance(kv, int) and kv % tp:
        return f"{kv} KV heads do not split evenly over {tp} tensor-parallel ranks"
    from ..placement import Placement

    placement = Placement.detect(model)
    if placement and len(placement.execution_devices) > 1:
        return (f"the model's layers run on {', '.join(sorted(placement.execution_devices))} (device_map); the pool "
                f"is one tensor on one device, so Transformers' cache stays")
    return None


@register_feature("kv_cache", stage="kv_cache")
def plan_kv_cache(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    kv = cfg.kv_cache
    if kv.type == "dynamic":
        if kv.dtype == "int8":
            return Skip("kv_cache", "KV dtype int8 needs kv_cache.type: paged")
        return None
    if kv.type == "static":
        if kv.dtype == "int8":
            return Skip("kv_cache", "KV dtype int8 needs kv_cache.type: paged")

        def apply_static(rw) -> None:
            rw.set_attr(model.generation_config, "cache_implementation", "static",
                        target="generation_config.cache_implementation")

        return Plan("kv_cache", apply_static, "Transformers' StaticCache for every generate()")
    problem = _paged_problem(model)
    if problem:
        return Skip("kv_cache", f"paged KV cache: {problem}")
    backend = cfg.attention.backend
    paged_attn = backend in ("auto", "paged") and getattr(model, "_supports_sdpa", False)
    notes = []
    if kv.dtype == "int8":
        sqnr = measured_kv_sqnr(model)
        ratio = KVPool.bytes_per_token(model, ctx.target_dtype) / KVPool.bytes_per_token(model, ctx.target_dtype, "int8")
        notes.append(f"KV int8 is lossy: {ratio:.2f}x less KV memory than {str(ctx.target_dtype)[6:]}, K/V SQNR "
                     f"{sqnr:.1f} dB on 128 held-out tokens; measure the perplexity cost with `hfaccel eval ppl`")

    def apply(rw) -> None:
        tokens, why = pool_tokens(model, kv, ctx.target_dtype, ctx.device)
        pool = KVPool.for_model(model, tokens, kv.block_size, kv.dtype, dtype=ctx.target_dtype)
        pool.snapshot()
        rw.set_attr(model, "hfaccel_kv_pool", pool, target="hfaccel_kv_pool", lossless=kv.dtype == "model",
                    label=f"{pool.blocks.num_blocks} blocks x {kv.block_size} tokens ({pool.bytes / 2**20:.1f} MiB, "
                          f"{'int8' if kv.dtype == 'int8' else str(pool.dtype)[6:]}; {why})")
        if paged_attn:
            paged_attention.register()
            if model.config._attn_implementation != paged_attention.NAME:
                rw.set_attn_implementation(paged_attention.NAME)
        mode = "paged" if model.config._attn_implementation == paged_attention.NAME else "gather"
        rw.set_attr(model, "hfaccel_stats", pool.stats, target="hfaccel_stats", label="prefix hits, reuse, evictions")
        rw.set_attr(model, "generate", make_generate(model, pool, kv.prefix_reuse, mode), target="generate",
                    lossless=kv.dtype == "model", label=f"generate() on a PagedCache ({mode} attention)")

    summary = (f"paged KV cache, blocks of {kv.block_size}, prefix reuse {'on' if kv.prefix_reuse else 'off'}, "
               f"{'int8' if kv.dtype == 'int8' else 'model dtype'}"
               + (", hfaccel_paged attention" if paged_attn else f", gathered K/V for {backend} attention"))
    return Plan("kv_cache", apply, summary, notes)


__all__ = ["CacheFullError", "clear_prefix_cache", "make_generate", "new_cache", "plan_kv_cache"]
