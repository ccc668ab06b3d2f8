"""hfaccel's few-row float32 GEMM for the CPU (cpu_gemm.cpp): y = x W^T + b for M <= 16 rows of x.

Used by the small_gemm feature for batched decode and verify steps, where the BLAS's sgemm reads the weights
at a fraction of the memory's rate (see the .cpp for the figures). The fast path needs AVX-512F (built with
-mavx512f when the CPU has it) or AVX2 + FMA; elsewhere the op is a plain loop and the feature, which times
both, keeps F.linear. Built once per torch version into the hfaccel cache; `status()` says why when it cannot be.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_gemm.cpp")
MAX_ROWS = 16                  # rows of x the feature routes here; more go to F.linear


@functools.cache
def status() -> tuple[bool, str]:
    """(the op is loaded, how / why not); builds on the first call."""
    from .cpp_build import build_ops, portable_flags

    return build_ops("hfaccel_cpu_gemm", SOURCE, portable_flags(avx512=True), {
        "hfaccel_cpu_gemm::small_linear": lambda x, w, bias: x.new_empty(x.shape[0], w.shape[0])})


def fast_path() -> bool:
    """True when the loaded build has the SIMD kernel, AVX-512F or AVX2 (False: the plain loop)."""
    return bool(status()[0] and torch.ops.hfaccel_cpu_gemm.fast_path())


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32, weight [N, K] float32 contiguous, bias [N] or None -> [M, N] on the CPU."""
    return torch.ops.hfaccel_cpu_gemm.small_linear(x, weight, bias)


__all__ = ["MAX_ROWS", "fast_path", "small_linear", "status"]
