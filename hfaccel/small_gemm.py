"""The small_gemm feature: CPU Linear layers run hfaccel's few-row GEMM when x has 1-16 rows.

A batched decode step (the continuous-batching engine's 16 rows, generate() at batch 4, a verify step) runs
every Linear at M = 2-16, where the BLAS's sgemm reads the weights at a fraction of the memory's rate; the
C++ op in kernels/cpu_gemm.cpp reads each weight once per call and keeps all rows' sums in registers.
Measured on the 2-core Sapphire Rapids here over SmolLM2's 210 layer weights: 51 -> 38 ms at M = 16,
37 -> 22 ms at M = 4, 21 -> 20 ms at M = 1; per layer, `python benchmarks/packed_linear.py --ms 1,4,16`. On a
2-core AVX2-only EPYC (the AVX2 build: blocks of 2 weight rows) the op beat the best of row-major, column-major
and oneDNN by 1.01-1.90x per layer at M = 1 and 1.73-2.69x at M = 4.

- Each fp32 nn.Linear on the CPU that the feature takes gets an instance forward: x with 1..MAX_ROWS rows
  (and no gradient to track) goes to the op, anything else to F.linear, so prefill and training are
  unchanged. Under torch.compile (hfaccel compiles only its decode and verify steps, whose inputs have a
  few rows) the op is always the graph node: a branch on a dynamic row count would guard the graph.
- The op needs the weight row-major: a weight that weight_layout made column-major goes back to row-major
  (same parameter, same memory); revert_model restores the layout and the forward.
- Each distinct weight shape is timed both ways at M = 1 and M = 16 over all of the model's weights of that
  shape, and taken only where the op is at least MIN_GAIN faster at 16 rows and at most SLOWER_OK slower
  (timing noise) at one row, so a CPU without AVX2 + FMA, where the op is a plain loop, keeps F.linear.
- Sums run in another order than the BLAS's: outputs differ at rounding level, so greedy tokens are tested
  on every architecture, not assumed (like weight_layout and packed_weights).
"""

from __future__ import annotations

import time
import types
from collections import defaultdict

import torch
from torch import nn

from . import packed  # noqa: F401  (registers packed_weights first: this feature takes what it left as nn.Linear)
from .kernels.cpu_gemm import MAX_ROWS
from .registry import Plan, register_feature
from .report import Skip

MIN_GAIN = 1.05
SLOWER_OK = 1.05            # at one row the op may measure this much slower (noise) and still be taken
REPS = 4


def _forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    w = self.weight
    k = w.shape[1]
    if x.dtype == torch.float32 and x.device.type == "cpu" and w.is_contiguous() and k > 0 and \
            not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad or
                                              (self.bias is not None and self.bias.requires_grad))):
        # traced (the compiled decode and verify steps, whose inputs have a few rows): always the op, since
        # branching on a dynamic row count (the verify width) would guard the graph to 1-16 rows
        if torch.compiler.is_compiling() or 0 < x.numel() // k <= MAX_ROWS:
            y = torch.ops.hfaccel_cpu_gemm.small_linear(x.reshape(-1, k), w, self.bias)
            return y.reshape(*x.shape[:-1], w.shape[0])
    return torch.nn.functional.linear(x, w, self.bias)


def candidates(model: nn.Module) -> dict[tuple[int, int], list[tuple[str, nn.Linear]]]:
    """fp32 CPU nn.Linear layers with their own forward (not routed to a fused GEMM, not hooked), by shape."""
    from .tp import _is_dtensor

    groups: dict[tuple[int, int], list[tuple[str, nn.Linear]]] = defaultdict(list)
    for path, mod in model.named_modules():
        if type(mod) is not nn.Linear or "forward" in mod.__dict__:
            continue
        w = mod.weight
        if _is_dtensor(w) or not isinstance(w, nn.Parameter) or w.device.type != "cpu" or w.dtype != torch.float32:
            continue
        if mod.bias is not None and (mod.bias.dtype != torch.float32 or mod.bias.device.type != "cpu"):
            continue
        groups[tuple(w.shape)].append((path, mod))
    return groups


def _time(fn, weights: list[torch.Tensor], x: torch.Tensor) -> float:
    best = float("inf")
    with torch.inference_mode():
        for w in weights[:1]:
            fn(x, w)
        for _ in range(REPS):
            t = time.perf_counter()
            for w in weights:
                fn(x, w)
            best = min(best, time.perf_counter() - t)
    return best


def measure(groups) -> dict[tuple[int, int], dict[int, tuple[float, float]]]:
    """shape -> {rows: (seconds F.linear as the weights are stored, seconds with the op)} for rows 1 and 16."""
    from .kernels.cpu_gemm import small_linear

    out = {}
    for shape, mods in groups.items():
        current = [m.weight.detach() for _, m in mods]
        rowmajor = [w.contiguous() for w in current]      # views where they already are row-major
        out[shape] = {}
        for rows in (1, MAX_ROWS):
            x = torch.randn(rows, shape[1])
            out[shape][rows] = (_time(torch.nn.functional.linear, current, x), _time(small_linear, rowmajor, x))
        del rowmajor
    return out


@register_feature("small_gemm", stage="fuse")
def plan_small_gemm(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    if not cfg.fusion.small_gemm:
        return None
    from .kernels import cpu_gemm

    if not candidates(model):
        return Skip("small_gemm", "few-row GEMM: no fp32 nn.Linear layers on the CPU with their own forward")
    ok, why = cpu_gemm.status()
    if not ok:
        return Skip("small_gemm", f"few-row GEMM: the C++ op is not available ({why})")

    def apply(rw) -> None:
        groups = candidates(model)        # again: earlier stages (quantize, fuse, packed_weights) replaced modules
        timing = measure(groups)
        relaid: set[int] = set()
        for shape, mods in groups.items():
            (one_cur, one_op), (many_cur, many_op) = timing[shape][1], timing[shape][MAX_ROWS]
            if many_op * MIN_GAIN > many_cur or one_op > one_cur * SLOWER_OK:
                continue
            undos = []
            for _, m in mods:
                p = m.weight
                if not p.is_contiguous() and id(p) not in relaid:
                    relaid.add(id(p))
                    old = p.data
                    strides = old.stride()
                    p.data = old.contiguous()
                    undos.append(lambda p=p, strides=strides: setattr(
                        p, "data", torch.empty_strided(p.shape, strides, dtype=p.dtype).copy_(p.data)))
                m.forward = types.MethodType(_forward, m)
                undos.append(lambda m=m: m.__dict__.pop("forward", None))

            def undo(undos=undos) -> None:
                for u in reversed(undos):
                    u()

            rw.record(f"{len(mods)} Linear layer(s) {list(shape)}", "F.linear",
                      f"hfaccel few-row GEMM for 1-{MAX_ROWS} rows ({MAX_ROWS} rows: {many_cur * 1e3:.2f} -> "
                      f"{many_op * 1e3:.2f} ms, 1 row: {one_cur * 1e3:.2f} -> {one_op * 1e3:.2f} ms, all layers "
                      f"of the shape)", undo)

    return Plan("small_gemm", apply, "CPU Linear layers with 1-16 rows of input on hfaccel's few-row GEMM where "
                                     "faster (measured per shape)")


__all__ = ["candidates", "measure", "plan_small_gemm"]
