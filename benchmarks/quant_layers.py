"""Batch-1 speed of hfaccel's INT8 / INT4 layers against fp32 nn.Linear on SmolLM2-135M's own shapes.

    python benchmarks/quant_layers.py [--threads 2] [--tokens 1]

Each row times the whole layer forward (activation cast to bf16 and back included), fp32 input [tokens, in].
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from hfaccel.quant.layers import Int4Linear, Int8Linear

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]     # (in, out)


def timeit(fn, reps: int) -> float:
    for _ in range(5):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="activation dtype (bfloat16: the quantized layers skip their casts; the baseline is "
                        "still the fp32 Linear)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    print(f"{torch.get_num_threads()} threads, {a.tokens} token(s), {a.dtype} activations into the quantized layers")
    print(f"{'in x out':>12} {'fp32 us':>9} {'int8 us':>9} {'int8 x':>7} {'int4 g64 us':>12} {'int4 x':>7} "
          f"{'int4 g128 us':>13} {'x':>6}")
    torch.manual_seed(0)
    with torch.inference_mode():
        for k, n in SHAPES:
            lin = nn.Linear(k, n, bias=False)
            x32 = torch.randn(a.tokens, k)
            x = x32.to(getattr(torch, a.dtype))
            reps = max(10, a.reps // (1 + n // 4096))
            base = timeit(lambda: lin(x32), reps)
            i8 = Int8Linear.from_linear(lin)
            t8 = timeit(lambda: i8(x), reps)
            i4 = Int4Linear.from_linear(lin, 64)
            t4 = timeit(lambda: i4(x), reps)
            i4b = Int4Linear.from_linear(lin, 128)
            t4b = timeit(lambda: i4b(x), reps)
            print(f"{f'{k}x{n}':>12} {base:9.1f} {t8:9.1f} {base / t8:6.2f}x {t4:12.1f} {base / t4:6.2f}x "
                  f"{t4b:13.1f} {base / t4b:5.2f}x")


if __name__ == "__main__":
    main()
