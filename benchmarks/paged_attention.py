"""Decode-attention kernels on the paged pool, one layer, SmolLM2-135M geometry (9 query heads, 3 KV heads,
head_dim 64), blocks of 16 scattered through the pool.

    python benchmarks/paged_attention.py [--threads 2] [--contexts 128,512,2048] [--batches 1,4]

Prints, per (batch, context), microseconds per call of:
- gather: index_select the rows' slots into a [B, H, T, D] copy, then torch sdpa (what DynamicCache users
  pay for its torch.cat, plus the index); a batch-1 row in consecutive blocks skips the copy (a view);
- compiled: hfaccel.cache.attention.decode_reference under torch.compile (Inductor C++), the gather fused
  into two reductions that read the pool in place;
- triton: on CUDA only.
The fastest on CPU becomes hfaccel.cache.attention.DEFAULT_DECODE["cpu"].
"""

from __future__ import annotations

import argparse
import time

import torch

from hfaccel.cache import attention as pa


def case(batch: int, length: int, device: str, hq=9, hkv=3, d=64, bs=16):
    g = torch.Generator().manual_seed(0)
    blocks_per_row = -(-length // bs)
    nb = batch * blocks_per_row * 2
    # the pool's layout: [kv_heads, slots, head_dim]; kernels index it [slot, head] through a transposed view
    k_pool = torch.randn(hkv, nb * bs + bs, d, generator=g).to(device).transpose(0, 1)
    v_pool = torch.randn(hkv, nb * bs + bs, d, generator=g).to(device).transpose(0, 1)
    perm = torch.randperm(nb, generator=g)
    table = perm[: batch * blocks_per_row].view(batch, blocks_per_row)
    pos = torch.arange(length)
    slots = (table[:, pos // bs] * bs + pos % bs).to(device)
    valid = torch.ones(batch, length, dtype=torch.bool, device=device)
    q = torch.randn(batch, hq, d, generator=g).to(device)
    return q, k_pool, v_pool, slots, valid, table.to(torch.int32).to(device)


def gather_sdpa(q, k_pool, v_pool, slots, valid, scale):
    b, t = slots.shape
    hkv, d = k_pool.shape[1], k_pool.shape[2]
    n = k_pool.shape[0]
    idx = (slots[:, None, :] + torch.arange(hkv, device=slots.device)[None, :, None] * n).reshape(-1)
    k = k_pool.transpose(0, 1).reshape(hkv * n, d).index_select(0, idx).view(b, hkv, t, d)
    v = v_pool.transpose(0, 1).reshape(hkv * n, d).index_select(0, idx).view(b, hkv, t, d)
    return torch.nn.functional.scaled_dot_product_attention(q[:, :, None], k, v, attn_mask=valid[:, None, None],
                                                            enable_gqa=True, scale=scale)[:, :, 0]


def timeit(fn, device: str, reps: int) -> float:
    for _ in range(3):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int)
    p.add_argument("--contexts", default="128,512,2048")
    p.add_argument("--batches", default="1,4")
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    compiled = pa._compiled_decode()
    start = time.perf_counter()
    compiled(*case(1, 40, a.device)[:5], 0.125, None, None)
    print(f"compile (dynamic shapes, once): {time.perf_counter() - start:.1f} s; device {a.device}, "
          f"{torch.get_num_threads()} threads")
    print(f"{'batch':>5} {'context':>7} {'gather us':>10} {'compiled us':>12} {'triton us':>10}  fastest")
    for b in map(int, a.batches.split(",")):
        for t in map(int, a.contexts.split(",")):
            q, kp, vp, slots, valid, table = case(b, t, a.device)
            ref = gather_sdpa(q, kp, vp, slots, valid, 0.125)
            got = compiled(q, kp, vp, slots, valid, 0.125, None, None)
            torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
            row = {"gather": timeit(lambda: gather_sdpa(q, kp, vp, slots, valid, 0.125), a.device, a.reps),
                   "compiled": timeit(lambda: compiled(q, kp, vp, slots, valid, 0.125, None, None), a.device, a.reps)}
            if a.device == "cuda" and pa.triton_available():
                from hfaccel.cache.triton_decode import paged_decode_triton

                offsets = torch.zeros(b, dtype=torch.int32, device=a.device)
                got = paged_decode_triton(q, kp, vp, table, offsets, t, valid, 0.125, 16)
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-4)
                row["triton"] = timeit(lambda: paged_decode_triton(q, kp, vp, table, offsets, t, valid, 0.125, 16),
                                       a.device, a.reps)
            best = min(row, key=row.get)
            tri = f"{row['triton']:10.1f}" if "triton" in row else f"{'-':>10}"
            print(f"{b:>5} {t:>7} {row['gather']:10.1f} {row['compiled']:12.1f} {tri}  {best}")


if __name__ == "__main__":
    main()
