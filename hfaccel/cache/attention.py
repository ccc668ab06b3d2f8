"""Paged attention: the "hfaccel_paged" attention implementation, registered through Transformers'
AttentionInterface together with its mask function (sdpa's boolean masks, so padding is honoured).

With a PagedCache in "paged" mode, a layer's cache update only writes the new tokens into the pool; the
attention call then reads K/V through the block table:

- prefill of a fresh prompt: the new tokens are all the keys there are, so dense sdpa on them, no pool
  read at all;
- prefill after a prefix hit, or chunked prefill: the rows' K/V are gathered from the pool, then sdpa;
- decode (one query token): a decode kernel that reads the pool in place —
  * "triton" on CUDA: one program per (row, query head), walking the row's block table with an online
    softmax (int8 K/V are dequantized in registers);
  * "compiled" on CPU: the same computation written as two reductions with indirect loads, compiled by
    Inductor, so the gather is fused into the loops and never materialised;
  * "gather": gather the rows' K/V into a contiguous tensor, then sdpa.
  DEFAULT_DECODE picks per device; benchmarks/paged_attention.py measures the CPU choice (see its docstring
  for the figures that set it).

Any other call (no cache, a DynamicCache, a PagedCache in gather mode) falls through to plain sdpa.
"""

from __future__ import annotations

import functools
import importlib.util

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .paged import PagedCache, take_pending

NAME = "hfaccel_paged"
DECODE_KERNELS = ("gather", "compiled", "triton")
# Measured on the 2-core CPU (benchmarks/paged_attention.py): gather + sdpa wins at every context we serve
# there, so it is the CPU default; the compiled kernel stays selectable.
DEFAULT_DECODE = {"cpu": "gather", "cuda": "triton"}
_decode_override: str | None = None


def set_decode_kernel(name: str | None) -> None:
    """Force a decode kernel (for benchmarks and tests); None restores the per-device default."""
    global _decode_override
    if name is not None and name not in DECODE_KERNELS:
        raise ValueError(f"decode kernel {name!r} is not allowed; allowed: {', '.join(DECODE_KERNELS)}")
    _decode_override = name


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def decode_kernel_for(device: torch.device) -> str:
    if _decode_override is not None:
        return _decode_override
    name = DEFAULT_DECODE.get(device.type, "gather")
    if name == "triton" and not triton_available():
        return "gather"
    return name


def paged_attention_forward(module, query, key, value, attention_mask, dropout: float = 0.0,
                            scaling: float | None = None, **kwargs):
    taken = take_pending(key)
    if taken is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    cache, layer = taken
    length = cache.layers[layer].length
    q_len = query.shape[2]
    if length == q_len and cache.pool.kv_dtype == "model":       # fresh prefill: the new tokens are all keys
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout=dropout,
                                      scaling=scaling, **kwargs)
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    if q_len == 1 and cache.row_views and kwargs.get("softcap") is None and \
            getattr(module, "sliding_window", None) is None:
        return decode_rows(cache, layer, query, scale), None
    if q_len == 1 and kwargs.get("softcap") is None:
        kernel = decode_kernel_for(query.device)
        if kernel != "gather":
            out = paged_decode(cache, layer, query[:, :, 0], attention_mask, scale, kernel)   # [B, Hq, D]
            return out[:, None], None                                                     # [B, 1, Hq, D]
    k, v = cache.read(layer, length)
    return sdpa_attention_forward(module, query, k.to(query.dtype), v.to(query.dtype), attention_mask,
                                  dropout=dropout, scaling=scaling, **kwargs)


ROW_KERNELS = ("auto", "cpp", "sdpa")
_row_kernel = "auto"


def set_row_kernel(name: str) -> None:
    """Choose decode_rows' kernel (for benchmarks and tests): "auto" (hfaccel's C++ op where it applies and
    builds), "cpp" (the same, an error where it cannot run), "sdpa" (one sdpa call per row)."""
    global _row_kernel
    if name not in ROW_KERNELS:
        raise ValueError(f"row decode kernel {name!r} is not allowed; allowed: {', '.join(ROW_KERNELS)}")
    _row_kernel = name


def row_kernel_for(pool, query: torch.Tensor) -> str:
    """"cpp" when hfaccel's C++ row decode applies (CPU, queries and K/V all float32 or all bfloat16) and is
    loaded, else "sdpa"."""
    if _row_kernel == "sdpa":
        return "sdpa"
    fits = query.device.type == "cpu" and query.dtype in (torch.float32, torch.bfloat16) \
        and pool.keys.dtype == query.dtype and pool.kv_dtype == "model"
    if fits:
        from ..kernels import cpu_attention

        ok, why = cpu_attention.status()
        if ok:
            return "cpp"
    else:
        why = (f"it takes float32 or bfloat16 on the CPU, queries of the pool's dtype, not {query.dtype} "
               f"queries on {query.device} over a "
               f"{pool.keys.dtype} pool (K/V dtype {pool.kv_dtype})")
    if _row_kernel == "cpp":
        raise RuntimeError(f"hfaccel's C++ row decode cannot run here: {why}")
    return "sdpa"


def decode_rows(cache: PagedCache, layer: int, query: torch.Tensor, scale: float) -> torch.Tensor:
    """One query token per row, each row over its own K/V without padding: [B, Hq, 1, D] -> [B, 1, Hq, D].

    Each row computes exactly what it would alone, and nobody gathers the padding: for continuous batching,
    whose rows differ in length. Two kernels:
    - "cpp" (CPU, float32 or bfloat16): hfaccel's C++ op walks every row's runs of slots in the pool, all rows and KV
      heads in one call per layer (kernels/cpu_attention.cpp; one sdpa per row costs ~100 us of call overhead);
    - "sdpa": per row, a row in consecutive slots reads its K/V as a view of the pool (no copy), a row in
      several runs concatenates them; its query heads are grouped by KV head ([1, Hkv, G, D]: the G heads
      sharing a KV head become G queries), so GQA needs no repeated K/V.
    """
    pool = cache.pool
    b, hq, _, d = query.shape
    length = cache.layers[layer].length
    if row_kernel_for(pool, query) == "cpp":
        from ..kernels import cpu_attention

        segs = cache.row_segment_tensors(length)
        out = cpu_attention.paged_decode(query[:, :, 0], pool.keys[layer], pool.values[layer], *segs, scale)
        return out[:, None]
    outs = []
    for r, segs in enumerate(cache.row_segments(length)):
        parts = [pool.read_run(layer, start, n) for start, n in segs]
        k = parts[0][0] if len(parts) == 1 else torch.cat([p[0] for p in parts], dim=2)
        v = parts[0][1] if len(parts) == 1 else torch.cat([p[1] for p in parts], dim=2)
        hkv = k.shape[1]
        q = query[r:r + 1, :, 0].reshape(1, hkv, hq // hkv, d)
        o = torch.nn.functional.scaled_dot_product_attention(q, k.to(q.dtype), v.to(q.dtype), scale=scale)
        outs.append(o.reshape(hq, d))
    return torch.stack(outs)[:, None]


def _valid_keys(attention_mask: torch.Tensor | None, length: int) -> torch.Tensor | None:
    """[B, T] bool of the keys a single query may attend to, from sdpa's [B, 1, 1, T] mask."""
    if attention_mask is None:
        return None
    m = attention_mask[:, 0, -1, :length]
    return m if m.dtype == torch.bool else m > torch.finfo(m.dtype).min / 2


def paged_decode(cache: PagedCache, layer: int, q: torch.Tensor, attention_mask, scale: float,
                 kernel: str) -> torch.Tensor:
    """Attention of one query token per row over the row's paged K/V. q: [B, Hq, D] -> [B, Hq, D]."""
    pool = cache.pool
    length = cache.layers[layer].length
    valid = _valid_keys(attention_mask, length)
    k_pool, v_pool, ks, vs = pool.layer_views(layer)
    if kernel == "triton":
        from .triton_decode import paged_decode_triton

        table, offsets = cache.block_table()
        return paged_decode_triton(q, k_pool, v_pool, table, offsets, length, valid, scale, pool.block_size, ks, vs)
    if kernel == "compiled":
        slots = cache.slots(length)
        if valid is None:
            valid = torch.ones(slots.shape, dtype=torch.bool, device=slots.device)
        return _compiled_decode()(q, k_pool, v_pool, slots, valid, scale, ks, vs)
    raise ValueError(f"decode kernel {kernel!r} is not allowed here; allowed: compiled, triton")


def decode_reference(q, k_pool, v_pool, slots, valid, scale: float, k_scale=None, v_scale=None):
    """Block-wise decode attention as plain tensor code (the compiled CPU kernel's source).

    Written as broadcast-multiply + sum so that Inductor emits reductions with indirect loads from the pool
    (no gathered copy), GQA by grouping query heads over their KV head.
    """
    b, hq, d = q.shape
    hkv = k_pool.shape[1]
    g = hq // hkv
    k = k_pool[slots].to(q.dtype)                                   # [B, T, Hkv, D] (fused by Inductor)
    if k_scale is not None:
        k = k * k_scale[slots].to(q.dtype)[..., None]
    qg = q.view(b, 1, hkv, g, d)
    scores = (qg * k[:, :, :, None, :]).sum(-1) * scale              # [B, T, Hkv, G]
    scores = scores.masked_fill(~valid[:, :, None, None], float("-inf"))
    p = torch.softmax(scores.float(), dim=1).to(q.dtype)
    v = v_pool[slots].to(q.dtype)
    if v_scale is not None:
        v = v * v_scale[slots].to(q.dtype)[..., None]
    out = (p[..., None] * v[:, :, :, None, :]).sum(1)               # [B, Hkv, G, D]
    return out.reshape(b, hq, d)


@functools.cache
def _compiled_decode():
    return torch.compile(decode_reference, dynamic=True, fullgraph=True)


def is_paged(attn_implementation: str | None) -> bool:
    """True for "hfaccel_paged" and for a wrapper that hands its non-step calls to it (compile.py)."""
    return attn_implementation is not None and attn_implementation.split("+")[-1] == NAME


def register() -> None:
    """Make "hfaccel_paged" a valid attn_implementation (idempotent)."""
    AttentionInterface.register(NAME, paged_attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
