"""Batch-1 speed of hfaccel's INT8 / INT4 layers against fp32 nn.Linear on SmolLM2-135M's own shapes.

    python benchmarks/quant_layers.py [--threads 2] [--tokens 1] [--cold] [--rounds 5]

Each row times the whole layer forward (activation cast to bf16 and back included), fp32 input [tokens, in].

Hot (the default): one layer called again and again, its weights stay in the CPU caches - this measures the
per-call cost. --cold: as in decoding, where a token reads each of the model's 210 linear layers once and the
others evict it from the caches: every system cycles through copies of the layer whose fp32 weights add up to
at least 3x the last-level cache (the same number of copies for fp32, int8 and int4), so each call reads its
weights from memory.

Each figure is the median of --rounds passes, the systems taking turns within a round: single passes of the
small layers varied by up to 1.5x between runs on a quiet 2-core machine (memory placement, frequency).
The kernel column says what the int layers ran (hfaccel's own "avx512" kernels on a CPU without native bf16,
aten's packed kernels otherwise; see hfaccel/kernels/cpu_woq.py).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from torch import nn

from hfaccel.quant.layers import Int4Linear, Int8Linear

SHAPES = [(576, 576), (576, 192), (576, 1536), (1536, 576), (576, 49152)]     # (in, out)


def timeit(layers: list, x: torch.Tensor, reps: int) -> float:
    """Microseconds per call, cycling through `layers` (one layer: the hot case)."""
    for layer in layers[:5] * 2:
        layer(x)
    calls = max(reps, len(layers))
    start = time.perf_counter()
    for i in range(calls):
        layers[i % len(layers)](x)
    return (time.perf_counter() - start) / calls * 1e6


def last_level_cache_bytes() -> int:
    import glob

    sizes = []
    for f in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        text = open(f).read().strip()
        sizes.append(int(text[:-1]) * {"K": 2**10, "M": 2**20}[text[-1]] if text[-1] in "KM" else int(text))
    return max(sizes, default=32 * 2**20)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--threads", type=int)
    p.add_argument("--tokens", type=int, default=1)
    p.add_argument("--reps", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5, help="passes per system; the median is printed")
    p.add_argument("--cold", action="store_true", help="weights read from memory, as in decoding (see above)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="activation dtype (bfloat16: the quantized layers skip their casts; the baseline is "
                        "still the fp32 Linear)")
    a = p.parse_args()
    if a.threads:
        torch.set_num_threads(a.threads)
    llc = last_level_cache_bytes()
    print(f"{torch.get_num_threads()} threads, {a.tokens} token(s), {a.dtype} activations into the quantized layers, "
          + (f"cold: copies of each layer >= 3 x {llc / 2**20:.0f} MiB last-level cache" if a.cold else "hot"))
    print(f"{'in x out':>12} {'fp32 us':>9} {'int8 us':>9} {'int8 x':>7} {'int4 g64 us':>12} {'int4 x':>7} "
          f"{'int4 g128 us':>13} {'x':>6}  kernels")
    torch.manual_seed(0)
    with torch.inference_mode():
        for k, n in SHAPES:
            copies = -(-3 * llc // (k * n * 4)) if a.cold else 1
            lins = [nn.Linear(k, n, bias=False) for _ in range(copies)]
            x32 = torch.randn(a.tokens, k)
            x = x32.to(getattr(torch, a.dtype))
            reps = max(10, a.reps // (1 + n // 4096))
            systems = [(lins, x32), ([Int8Linear.from_linear(lin) for lin in lins], x),
                       ([Int4Linear.from_linear(lin, 64) for lin in lins], x),
                       ([Int4Linear.from_linear(lin, 128) for lin in lins], x)]
            times = [[] for _ in systems]
            for _ in range(a.rounds):
                for (layers, xs), ts in zip(systems, times):
                    ts.append(timeit(layers, xs, reps))
            base, t8, t4, t4b = (statistics.median(ts) for ts in times)
            kernels = "/".join(dict.fromkeys(layers[0].kernel for layers, _ in systems[1:]))
            print(f"{f'{k}x{n}':>12} {base:9.1f} {t8:9.1f} {base / t8:6.2f}x {t4:12.1f} {base / t4:6.2f}x "
                  f"{t4b:13.1f} {base / t4b:5.2f}x  {kernels}")


if __name__ == "__main__":
    main()
