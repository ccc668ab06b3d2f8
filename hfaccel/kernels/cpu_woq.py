"""hfaccel's own weight-only int8 / int4 CPU kernels (cpu_woq.cpp), for CPUs without native bf16.

aten's packed int8/int4 kernels are fast only with bf16 activations. On a CPU with AVX-512 BF16 or AMX that is
a hardware path, and the int layers keep it. On one without, the bf16 conversions run in software: at batch 1
the int layers were only 1.3-1.9x (int8) and 1.7-4.5x (int4) an fp32 nn.Linear on an Ice Lake, and 1.2-3.4x
(int8) and 0.9-3.7x (int4) on a Zen 3 EPYC with AVX2 only (both measured, cold). The kernels here widen the codes
to fp32 in SIMD registers (AVX-512F where the CPU has it, else AVX2 + FMA) and keep the activations in fp32,
which is faster there and rounds nothing but the weights.

The C++ source is built once per torch version and instruction set with torch.utils.cpp_extension (a C++
compiler and ninja, ~15 s) into the hfaccel cache, and registers `torch.ops.hfaccel_cpu.int8_mm` and
`int4_mm`, which torch.compile graphs call like any other op. Without a compiler, without AVX2 + FMA, or when
the build fails, the layers keep aten's kernels and `status()` says why.

HFACCEL_CPU_QUANT_KERNEL chooses: `auto` (the default: these kernels where the CPU has no native bf16),
`native` (these kernels wherever they build), `aten` (never these kernels).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_woq.cpp")
ENV = "HFACCEL_CPU_QUANT_KERNEL"
CHOICES = ("auto", "native", "aten")


def _cpu_flags() -> frozenset[str]:
    from ..device import cpu_flags

    return cpu_flags()


# what the layers report as their kernel: the instruction set the source is compiled for on this CPU
KERNEL = "avx512" if "avx512f" in _cpu_flags() else "avx2"


def _native_bf16() -> bool:
    from ..device import cpu_has_native_bf16

    return cpu_has_native_bf16()


def requested() -> str:
    value = os.environ.get(ENV, "auto").strip().lower() or "auto"
    if value not in CHOICES:
        raise ValueError(f"{ENV}={value!r} is not allowed; allowed: {', '.join(CHOICES)}")
    return value


@functools.cache
def _build() -> tuple[bool, str]:
    """Build (or load the cached build of) the extension once per process: (loaded, how / why not)."""
    if not {"avx2", "fma"} <= _cpu_flags():
        return False, "this CPU has neither AVX-512F nor AVX2 + FMA"
    from .cpp_build import build_extension, portable_flags

    # -ffp-contract=off: coded4_mm rebuilds exact weights with a separate multiply and add (GCC would fuse
    # them into one FMA, which rounds once, and the weight would no longer be the stored one)
    ok, why = build_extension("hfaccel_cpu_woq", SOURCE, [*portable_flags(avx512=True), "-ffp-contract=off"])
    if ok:
        _register_fakes()
    return ok, why


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (FakeTensor): the ops return [..., N] in x's dtype."""

    @torch.library.register_fake("hfaccel_cpu::int8_mm")
    def _(x, q, scales):
        return x.new_empty(*x.shape[:-1], q.shape[0])

    @torch.library.register_fake("hfaccel_cpu::int4_mm")
    def _(x, packed, scales_zeros, group_size):
        return x.new_empty(*x.shape[:-1], packed.shape[0])

    @torch.library.register_fake("hfaccel_cpu::coded4_mm")
    def _(x, packed, dm, zero):
        return x.new_empty(*x.shape[:-1], packed.shape[0])


def status() -> tuple[bool, str]:
    """(use hfaccel's kernels for CPU int layers, why): the policy above, building on first call."""
    want = requested()
    if want == "aten":
        return False, f"{ENV}=aten"
    if want == "auto" and _native_bf16():
        return False, "this CPU has native bf16, where aten's packed bf16 kernels are the fast path"
    return _build()


def describe() -> str:
    """The report's line: which CPU kernels the int layers run, and why."""
    ok, why = status()
    if ok:
        return f"CPU int kernels: hfaccel's {KERNEL} (fp32 activations, nothing rounded but the weights); {why}"
    return f"CPU int kernels: aten's packed ones (activations rounded to bf16 around them); {why}"


def use_native(device: torch.device) -> bool:
    return device.type == "cpu" and status()[0]


def int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K <= q's columns) @ (q [N, Kq] int8 * scales [N, 1]).T -> [..., N] in x's dtype."""
    return torch.ops.hfaccel_cpu.int8_mm(x, q, scales)


def int4_mm(x: torch.Tensor, packed: torch.Tensor, scales_zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """x [..., K] @ w.T, w[n, k] = (code - 8) * scale[g, n] + zero[g, n], g = k // group_size, codes packed by
    pack_int4 and scales_zeros the bf16 [G, N, 2] pairs aten's int4 kernels read too."""
    return torch.ops.hfaccel_cpu.int4_mm(x, packed, scales_zeros, group_size)


def coded4_mm(x: torch.Tensor, packed: torch.Tensor, dm: torch.Tensor, zero: int) -> torch.Tensor:
    """x [..., K] @ w.T with w[n, k] = (d * (code - zero)) + m in fp32, two roundings, (d, m) = dm[n, k // 32]:
    the weights rebuilt bit for bit (coded.py finds such codes in fp32 weights). codes packed by pack_int4."""
    return torch.ops.hfaccel_cpu.coded4_mm(x, packed, dm, zero)


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes 0..15 (K a multiple of 32) -> [N, K / 2] uint8: in each 32 columns, byte j holds column j
    in its low nibble and column 16 + j in its high one."""
    n, k = codes.shape
    if k % 32:
        raise ValueError(f"pack_int4 needs a multiple of 32 columns, got {k}")
    c = codes.to(torch.uint8).reshape(n, k // 32, 2, 16)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).reshape(n, k // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4: [N, K / 2] uint8 -> [N, K] codes."""
    n, half = packed.shape
    p = packed.reshape(n, half // 16, 16)
    return torch.stack([p & 15, p >> 4], dim=2).reshape(n, half * 2)
