"""hfaccel's CPU decode attention over paged rows (cpu_attention.cpp), for the continuous-batching engine, and
over a compiled decode step's buffer (`buffer_decode`, and `buffer_verify` for a speculative verify's tokens).

`paged_decode(q, k, v, seg_start, seg_len, row_ptr, scale)` attends one query token per row over that row's
runs of slots in a layer of the KV pool, all rows and KV heads in one call (see the .cpp for the contract).
It replaces one sdpa call per row and layer in `cache.attention.decode_rows`. Plain C++ (the compiler
vectorizes the head_dim loops), built once per torch version into the hfaccel cache; where it cannot be
built the engine keeps the per-row sdpa and `status()` says why.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_attention.cpp")


@functools.cache
def status() -> tuple[bool, str]:
    """(the op is loaded, how / why not); builds on the first call."""
    from .cpp_build import build_ops, portable_flags

    return build_ops("hfaccel_cpu_attention", SOURCE, portable_flags(), {
        "hfaccel_cpu_attn::paged_decode": lambda q, k, v, seg_start, seg_len, row_ptr, scale: q.new_empty(q.shape),
        "hfaccel_cpu_attn::buffer_decode": lambda q, k, v, valid, scale: q.new_empty(q.shape),
        "hfaccel_cpu_attn::buffer_verify": lambda q, k, v, allowed, scale: q.new_empty(q.shape)})


def paged_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, seg_start: torch.Tensor,
                 seg_len: torch.Tensor, row_ptr: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D], k / v [Hkv, S, D] (one layer of the pool), row b over the runs row_ptr[b]:row_ptr[b+1]
    of (seg_start, seg_len) -> [B, Hq, D]. q, k and v all float32 or all bfloat16 (computed in fp32)."""
    return torch.ops.hfaccel_cpu_attn.paged_decode(q, k, v, seg_start, seg_len, row_ptr, scale)


def buffer_decode(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, valid: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, Hq, D], k / v [B, Hkv, T, D] (a compiled decode step's buffer of one layer), valid [B, T] bool ->
    [B, Hq, D]: each row over its valid columns only. float32 or bfloat16, as paged_decode."""
    return torch.ops.hfaccel_cpu_attn.buffer_decode(q, k, v, valid, scale)


def buffer_verify(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, allowed: torch.Tensor, scale: float) -> torch.Tensor:
    """q [B, W, Hq, D] (a speculative verify's W tokens per row), k / v [B, Hkv, T, D], allowed [B, W, T] bool
    (the columns each token may see) -> [B, W, Hq, D]. float32 or bfloat16, as paged_decode."""
    return torch.ops.hfaccel_cpu_attn.buffer_verify(q, k, v, allowed, scale)


def segments_tensors(segments: list[list[tuple[int, int]]], device) -> tuple[torch.Tensor, ...]:
    """Per-row [(first slot, count)] runs -> (seg_start, seg_len, row_ptr) int64 tensors."""
    starts, lens, ptr = [], [], [0]
    for segs in segments:
        for s, n in segs:
            starts.append(s)
            lens.append(n)
        ptr.append(len(starts))
    mk = functools.partial(torch.tensor, dtype=torch.long, device=device)
    return mk(starts), mk(lens), mk(ptr)


__all__ = ["buffer_decode", "buffer_verify", "paged_decode", "segments_tensors", "status"]
