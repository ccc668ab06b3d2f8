"""hfaccel's own weight-only int8 / int4 CPU kernels (cpu_woq.cpp), the CPU int layers' default.

aten's packed int8/int4 kernels are fast only with bf16 activations, and even with them they lost to these
kernels everywhere measured. On a CPU without native bf16 the conversions run in software: at batch 1 aten's
int layers were only 1.3-1.9x (int8) and 1.7-4.5x (int4) an fp32 nn.Linear on an Ice Lake, and 1.2-3.4x (int8)
and 0.9-3.7x (int4) on a Zen 3 EPYC with AVX2 only (both measured, cold). On a Xeon with AVX-512 BF16 and AMX
(benchmarks/quant_layers.py --cold, bf16 in): aten int8 1.18-2.28x, int4 g64 1.64-3.72x (2026-12-02); these
kernels int8 1.55-3.18x, int4 g64 1.61-4.36x (2026-12-03); and in the whole model (benchmarks/decode_table.py) cpu-int8 decoded
at 82.2 tok/s with a 116 ms TTFT against aten's 63.2 tok/s and 167 ms, cpu-int4 (RTN) at 116.5 against 104.1.

int8_mm and int4_mm widen the codes to fp32 in SIMD registers (AVX-512F where the CPU has it, else AVX2 + FMA)
and keep the activations in fp32, rounding nothing but the weights. On a CPU with AVX-512 BF16 the int4 layers
take int4_bf16_mm instead at decode sizes (up to 16 rows): x rounded to bf16, 32 codes turned into bf16 by one
table lookup, vdpbf16ps (cold 1536x576 g64: 36.8 us against int4_mm's 44.0). There, both also run prefill-sized
calls (64+ rows) as one bf16 GEMM per block of dequantized rows (2-2.4x faster than their fp32 path at 100 rows;
see cpu_woq.cpp); `native-fp32` keeps every call in fp32.

The C++ source is built once per torch version and instruction set with torch.utils.cpp_extension (a C++
compiler and ninja, ~15 s) into the hfaccel cache, and registers `torch.ops.hfaccel_cpu.int8_mm`, `int4_mm`,
`int4_bf16_mm` and `coded4_mm`, which torch.compile graphs call like any other op. Without a compiler, without
AVX2 + FMA, or when the build fails, the layers keep aten's kernels and `status()` says why.

HFACCEL_CPU_QUANT_KERNEL chooses: `auto` and `native` (these kernels wherever they build; the default),
`native-fp32` (these kernels, with fp32 activations at every size even where the CPU has AVX-512 BF16), `aten`
(never these kernels).
"""

from __future__ import annotations

import functools
import os
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_woq.cpp")
ENV = "HFACCEL_CPU_QUANT_KERNEL"
CHOICES = ("auto", "native", "native-fp32", "aten")


def _cpu_flags() -> frozenset[str]:
    from ..device import cpu_flags

    return cpu_flags()


# what the layers report as their kernel: the instruction set the source is compiled for on this CPU
KERNEL = "avx512" if "avx512f" in _cpu_flags() else "avx2"
# the int4 kernel with bf16 activations (int4_bf16_mm), on CPUs with AVX-512 BF16
BF16_KERNEL = "avx512bf16"
NATIVE = (KERNEL, BF16_KERNEL)


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
        torch.ops.hfaccel_cpu.set_bf16_prefill(bf16_prefill())
    return ok, why


def bf16_prefill() -> bool:
    """Whether the int8 / int4 kernels run prefill-sized calls (64+ rows) as bf16 GEMMs (see cpu_woq.cpp): where
    the CPU has AVX-512 BF16, unless HFACCEL_CPU_QUANT_KERNEL=native-fp32."""
    return _bf16_dot() and requested() != "native-fp32"


def _register_fakes() -> None:
    """Shapes for torch.compile's tracing (FakeTensor): the ops return [..., N] in x's dtype."""

    @torch.library.register_fake("hfaccel_cpu::int8_mm")
    def _(x, q, scales):
        return x.new_empty(*x.shape[:-1], q.shape[0])

    @torch.library.register_fake("hfaccel_cpu::int4_mm")
    def _(x, packed, scales_zeros, group_size):
        return x.new_empty(*x.shape[:-1], packed.shape[0])

    @torch.library.register_fake("hfaccel_cpu::int4_bf16_mm")
    def _(x, packed, szt, group_size):
        return x.new_empty(*x.shape[:-1], packed.shape[0])

    @torch.library.register_fake("hfaccel_cpu::coded4_mm")
    def _(x, packed, dm, zero):
        return x.new_empty(*x.shape[:-1], packed.shape[0])


def status() -> tuple[bool, str]:
    """(use hfaccel's kernels for CPU int layers, why): the policy above, building on first call."""
    want = requested()
    if want == "aten":
        return False, f"{ENV}=aten"
    return _build()


def describe() -> str:
    """The report's line: which CPU kernels the int layers run, and why."""
    ok, why = status()
    if ok:
        if int4_kernel() == BF16_KERNEL:
            return (f"CPU int kernels: hfaccel's {KERNEL} (int8: fp32 activations at up to 16 rows; int4: "
                    f"{BF16_KERNEL}, activations rounded to bf16; both: prefills of 64+ rows as bf16 GEMMs); {why}")
        return f"CPU int kernels: hfaccel's {KERNEL} (fp32 activations, nothing rounded but the weights); {why}"
    return f"CPU int kernels: aten's packed ones (activations rounded to bf16 around them); {why}"


class _Ops:
    """The ops' default overloads, looked up once: `OPS.int8_mm(...)` is the op itself, with none of torch.ops'
    per-call attribute and overload resolution (layers call these at batch 1, where microseconds count)."""

    def __getattr__(self, name: str):
        op = getattr(torch.ops.hfaccel_cpu, name).default
        setattr(self, name, op)
        return op


OPS = _Ops()


def use_native(device: torch.device) -> bool:
    return device.type == "cpu" and status()[0]


def _bf16_dot() -> bool:
    return {"avx512_bf16", "avx512bw", "avx512vl"} <= _cpu_flags()


def int4_kernel() -> str:
    """The native int4 kernel a new layer takes: the bf16 one where the CPU has AVX-512 BF16 (unless
    native-fp32 is asked for), else the fp32 one."""
    return BF16_KERNEL if _bf16_dot() and requested() != "native-fp32" else KERNEL


def int8_mm(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [..., K] (K <= q's columns) @ (q [N, Kq] int8 * scales [N, 1]).T -> [..., N] in x's dtype."""
    return torch.ops.hfaccel_cpu.int8_mm(x, q, scales)


def int4_bf16_mm(x: torch.Tensor, packed: torch.Tensor, szt: torch.Tensor, group_size: int) -> torch.Tensor:
    """int4_mm with x rounded to bf16 at up to 16 rows (vdpbf16ps; more rows: fp32, a dequantized block at a time
    for sgemm), reading each row's (scale, zero) pairs side by side: szt [N, G, 2] bf16, i.e.
    scales_zeros.transpose(0, 1) (aten's [G, N, 2] spread a row's pairs over G cache lines: cold 1536x576 g64
    took 44.6 us with it, 36.8 with this one)."""
    return torch.ops.hfaccel_cpu.int4_bf16_mm(x, packed, szt, group_size)


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
