"""hfaccel's few-row float32 GEMM for the CPU (cpu_gemm.cpp): y = x W^T + b for M <= 16 rows of x.

Used by the small_gemm feature for batched decode and verify steps, where the BLAS's sgemm reads the weights
at a fraction of the memory's rate (see the .cpp for the figures). The fast path needs AVX-512 (built with
-mavx512f when the CPU has it); elsewhere the op is a plain loop and the feature, which times both, keeps
F.linear. Built once per torch version into the hfaccel cache; `status()` says why when it cannot be.
"""

from __future__ import annotations

import functools
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_gemm.cpp")
MAX_ROWS = 16                  # rows of x the feature routes here; more go to F.linear


def _flags() -> list[str]:
    from ..device import cpu_flags

    flags = ["-O3", "-fopenmp"]
    have = cpu_flags()
    if {"avx2", "fma"} <= have:                  # not -march=native: a cache shared by two CPUs stays valid
        flags += ["-mavx2", "-mfma"]
    if "avx512f" in have:
        flags += ["-mavx512f"]
    return flags


@functools.cache
def status() -> tuple[bool, str]:
    """(the op is loaded, how / why not); builds on the first call."""
    from .cpp_build import build_extension

    ok, why = build_extension("hfaccel_cpu_gemm", SOURCE, _flags())
    if ok:
        @torch.library.register_fake("hfaccel_cpu_gemm::small_linear")
        def _(x, w, bias):
            return x.new_empty(x.shape[0], w.shape[0])
    return ok, why


def fast_path() -> bool:
    """True when the loaded build has the AVX-512 kernel (False: the plain loop)."""
    return bool(status()[0] and torch.ops.hfaccel_cpu_gemm.fast_path())


def small_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [M, K] float32, weight [N, K] float32 contiguous, bias [N] or None -> [M, N] on the CPU."""
    return torch.ops.hfaccel_cpu_gemm.small_linear(x, weight, bias)


__all__ = ["MAX_ROWS", "fast_path", "small_linear", "status"]
