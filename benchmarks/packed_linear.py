"""Per-layer time of one Linear on the CPU: nn.Linear row-major, column-major (fusion.weight_layout), oneDNN
reordered (fusion.packed_weights) and, in float32 for M <= 16, hfaccel's few-row GEMM (fusion.small_gemm), at
M = 1 (decode), 4 (a verify or a small batch), 90 and 512 (prefill), for SmolLM2-135M's shapes. Weights are cycled through copies totalling ~96 MB, 3x this machine's
L3, so each call reads its weights from memory as in decoding.

    python benchmarks/packed_linear.py --threads 2 [--dtype float32|bfloat16] [--ms 1,4,16,90,512]
"""

from __future__ import annotations

import argparse
import time

import torch

SHAPES = [(576, 576), (192, 576), (960, 576), (3072, 576), (1536, 576), (576, 1536), (49152, 576)]


def per_call(fn, weights, x, calls: int) -> float:
    for w in weights[:3]:
        fn(x, w)
    t = time.perf_counter()
    for i in range(calls):
        fn(x, weights[i % len(weights)])
    return (time.perf_counter() - t) / calls


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    ap.add_argument("--ms", default="1,4,90,512")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    ms = [int(m) for m in args.ms.split(",")]
    linear = torch.nn.functional.linear

    def packed(x, p):
        return torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "")

    small = None
    if dtype == torch.float32:
        from hfaccel.kernels import cpu_gemm

        ok, why = cpu_gemm.status()
        small = cpu_gemm.small_linear if ok else None
        if not ok:
            print(f"# hfaccel's few-row GEMM: {why}")
    print(f"# {args.dtype}, {args.threads} threads; microseconds per call: row-major / column-major / oneDNN "
          f"reordered (speed-up of reordered over row-major)" +
          ("; M <= 16: then hfaccel's few-row GEMM on the row-major weight [speed-up over the best of the "
           "others]" if small else ""))
    print("| shape [out, in] | " + " | ".join(f"M={m}" for m in ms) + " |")
    print("|---|" + "---|" * len(ms))
    with torch.inference_mode():
        for n, k in SHAPES:
            copies = max(2, int(96e6 // (n * k * dtype.itemsize)))
            rows = [torch.randn(n, k, dtype=dtype) for _ in range(copies)]
            cols = [w.t().contiguous().t() for w in rows]
            packs = [torch.ops.mkldnn._reorder_linear_weight(w, 1) for w in rows]
            cells = []
            for m in ms:
                x = torch.randn(m, k, dtype=dtype)
                calls = 40 if m < 100 else 6
                a = per_call(linear, rows, x, calls) * 1e6
                b = per_call(linear, cols, x, calls) * 1e6
                c = per_call(packed, packs, x, calls) * 1e6
                cell = f"{a:.0f} / {b:.0f} / {c:.0f} ({a / c:.2f}x)"
                if small is not None and m <= cpu_gemm.MAX_ROWS:
                    d = per_call(small, rows, x, calls) * 1e6
                    cell += f" / {d:.0f} [{min(a, b, c) / d:.2f}x]"
                cells.append(cell)
            print(f"| {n}x{k} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
