"""Weight-only quantized Linear layers.

Int8Linear: symmetric int8 per output channel, w ~= q * scale[n].
Int4Linear: 4-bit groups of `group_size` input columns, w ~= (q - 8) * scale[g, n] + zero[g, n] (the affine
form the packed CPU/CUDA kernels take; symmetric quantization is the case zero = 0).

Kernels:
- CPU with AVX2 + FMA (the default, where hfaccel's kernels build): hfaccel's own kernels
  (hfaccel/kernels/cpu_woq.cpp, kernel "avx512" / "avx2"), fp32 activations and arithmetic, the codes widened
  in registers; int4 layers on a CPU with AVX-512 BF16 take kernel "avx512bf16" (x rounded to bf16 at decode
  sizes, vdpbf16ps). See that module for the measurements and HFACCEL_CPU_QUANT_KERNEL.
- CPU otherwise (or HFACCEL_CPU_QUANT_KERNEL=aten): aten._weight_int8pack_mm / aten._weight_int4pack_mm_for_cpu.
  Both are fast only with bf16 activations (with fp32 ones they are 3-10x slower than a plain fp32 Linear,
  measured), so the layer casts activations to bf16 around the kernel and the output back: the bf16 rounding
  of activations is part of the quantization's measured cost.
- CUDA: the same int8 op, and tinygemm (aten._weight_int4pack_mm) for int4.
- Anything else (another device, N not a multiple of 16 for the int4 packer): dequantize and matmul,
  correct but not fast; `kernel` says which path a layer takes and the report counts them.

in_features that are not a multiple of the group size are zero-padded up to one (weight columns of zeros,
activations padded per call): the layer always works, `padded` records it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_woq
from ..quality import sqnr_db  # noqa: F401  (re-exported: the quantizers report it)

INT4_GROUPS = (32, 64, 128)


class QuantLinear(nn.Module):
    """Common parts: shape, bias, the kernel choice and a dequantized view for checks and fallbacks."""

    bits = 0

    def __init__(self, in_features: int, out_features: int, bias: torch.Tensor | None):
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) if bias is not None else None
        self.kernel = "dequant"

    # subclasses define dequantize() -> [out, in] float weight, _matmul(x [T, in]) -> [T, out] for aten's and the
    # dequantizing kernels, and _native(x) for hfaccel's (forward sends each layer to its own)

    padded = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        if self.kernel in cpu_woq.NATIVE:
            # hfaccel's kernels take x as it is (fp32 or bf16, any leading dims, narrower than a padded weight):
            # at batch 1 every Python step here is a visible share of a small layer's time
            y = self._native(x)
            return y if self.bias is None else y + self.bias.to(y.dtype)
        if x.dtype is torch.bfloat16 and self.kernel != "dequant" and not self.padded and self.bias is None:
            # the int presets' path (bf16 activations, no bias, no padding): nothing to cast, pad or add, so
            # straight to the kernel. At batch 1 the general path costs a few us more per call, a large share
            # of a small layer's time (576x192 int8, hot, measured: 9.6 us general, 7.4 us direct)
            if x.dim() == 2:
                return self._direct(x.contiguous())
            return self._direct(x.reshape(-1, shape[-1]).contiguous()).view(*shape[:-1], self.out_features)
        y = self._matmul(x.reshape(-1, shape[-1]))
        y = y.reshape(*shape[:-1], self.out_features).to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bits={self.bits}, kernel={self.kernel}"


class Int8Linear(QuantLinear):
    bits = 8

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        n, k = qweight.shape
        super().__init__(k, n, bias)
        device = qweight.device
        if cpu_woq.use_native(device):
            self.kernel = cpu_woq.KERNEL
        else:
            self.kernel = "int8pack" if device.type in ("cpu", "cuda") else "dequant"
        # the packed kernel reads K in steps of 16 (other K crash it): pad with zero columns (hfaccel's kernel
        # does not need them, but the same layout lets fused and unfused layers share their rows)
        self.padded = (-k) % 16 if self.kernel != "dequant" else 0
        self.register_buffer("qweight", F.pad(qweight.to(torch.int8), (0, self.padded)).contiguous())
        self.register_buffer("scales", scales.float().contiguous())
        self.register_buffer("_kscales", scales.to(torch.bfloat16).contiguous(), persistent=False)

    @classmethod
    def from_linear(cls, linear: nn.Module) -> "Int8Linear":
        q, s = quantize_int8_per_channel(linear_weight(linear))
        return cls(q, s, linear.bias)

    def dequantize(self) -> torch.Tensor:
        return self.qweight[:, : self.in_features].float() * self.scales[:, None]

    def _direct(self, x2: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x2, self.qweight, self._kscales)

    def _native(self, x2: torch.Tensor) -> torch.Tensor:
        # the buffers straight from _buffers and the op's overload itself: nn.Module.__getattr__ and torch.ops'
        # overload resolution cost ~1.7 us a call, a tenth of a cold 576x192 layer (measured, 64x16 int8 layer:
        # 3.2 us through cpu_woq.int8_mm(self.qweight, ...), 1.4 us for the bare op)
        b = self._buffers
        return cpu_woq.OPS.int8_mm(x2, b["qweight"], b["scales"])

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int8pack":
            if self.padded:
                x2 = F.pad(x2, (0, self.padded))
            return self._direct(x2.to(torch.bfloat16).contiguous())
        return x2 @ self.dequantize().to(x2.dtype).T


class Int4Linear(QuantLinear):
    bits = 4

    def __init__(self, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                 bias: torch.Tensor | None = None, in_features: int | None = None):
        """q: [N, K_padded] ints in 0..15; scales, zeros: [K_padded // group_size, N]."""
        n, kp = q.shape
        if group_size not in INT4_GROUPS:
            raise ValueError(f"group_size = {group_size} is not allowed; allowed: {', '.join(map(str, INT4_GROUPS))}")
        if kp % group_size:
            raise ValueError(f"q has {kp} columns, not a multiple of group_size {group_size}")
        super().__init__(in_features or kp, n, bias)
        self.group_size = group_size
        self.padded = kp - self.in_features
        device = q.device
        # scale and zero live once, in the bf16 form the kernels read: dequantize() agrees with them exactly.
        # [K/g, N, 2], except for the bf16 kernel, which reads each row's pairs side by side: [N, K/g, 2]
        sz = torch.stack([scales, zeros], dim=-1).to(torch.bfloat16)
        if cpu_woq.use_native(device):
            self.kernel = cpu_woq.int4_kernel()
            packed = cpu_woq.pack_int4(q)
            if self.rows_first:
                sz = sz.transpose(0, 1)
        elif device.type == "cpu" and n % 16 == 0:
            self.kernel = "int4pack_cpu"
            packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 1)
        elif device.type == "cuda" and n % 8 == 0 and kp % 64 == 0:
            self.kernel = "tinygemm"
            u8 = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()
            packed = torch.ops.aten._convert_weight_to_int4pack(u8, 8)
        else:
            self.kernel = "dequant"
            packed = ((q[:, ::2] << 4) | q[:, 1::2]).to(torch.uint8).contiguous()      # [N, K/2], high nibble first
        self.register_buffer("qweight", packed)
        self.register_buffer("scales_zeros", sz.contiguous())

    @property
    def rows_first(self) -> bool:
        """scales_zeros is [N, K/g, 2] (the bf16 kernel's layout) rather than [K/g, N, 2]."""
        return self.kernel == cpu_woq.BF16_KERNEL

    def _pairs(self) -> torch.Tensor:
        """scales_zeros as [K/g, N, 2] whatever the layout the kernel reads."""
        return self.scales_zeros.transpose(0, 1) if self.rows_first else self.scales_zeros

    @property
    def scales(self) -> torch.Tensor:                                   # [K/g, N]
        return self._pairs()[..., 0].float().contiguous()

    @property
    def zeros(self) -> torch.Tensor:
        return self._pairs()[..., 1].float().contiguous()

    @classmethod
    def from_linear(cls, linear: nn.Module, group_size: int, sym: bool = True) -> "Int4Linear":
        w = linear_weight(linear)
        q, scales, zeros = quantize_int4_groups(pad_columns(w, group_size), group_size, sym)
        return cls(q, scales, zeros, group_size, linear.bias, in_features=w.shape[1])

    def codes(self) -> torch.Tensor:
        """[N, K_padded] uint8 codes 0..15, read back from the packed weight (through the kernel itself for
        the kernels' private layouts: an identity matmul gives the dequantized weight, exact in bf16 up to
        far less than half a code step, so rounding recovers every code)."""
        if self.kernel == "dequant":
            p = self.qweight
            return torch.stack([p >> 4, p & 15], dim=-1).reshape(p.shape[0], -1)
        if self.kernel in cpu_woq.NATIVE:
            return cpu_woq.unpack_int4(self.qweight)
        kp = self.in_features + self.padded
        eye = torch.eye(kp, dtype=torch.bfloat16, device=self.qweight.device)
        w = self._kernel(eye).float().T                                                   # [N, K_padded]
        s = self.scales.repeat_interleave(self.group_size, 0).T
        z = self.zeros.repeat_interleave(self.group_size, 0).T
        return torch.round((w - z) / s + 8).clamp_(0, 15).to(torch.uint8)

    def dequantize(self) -> torch.Tensor:
        q = self.codes().float()
        s = self.scales.repeat_interleave(self.group_size, 0).T
        z = self.zeros.repeat_interleave(self.group_size, 0).T
        return ((q - 8) * s + z)[:, : self.in_features]

    def _kernel(self, x2: torch.Tensor) -> torch.Tensor:
        return self._direct(x2.to(torch.bfloat16).contiguous())

    def _native(self, x2: torch.Tensor) -> torch.Tensor:
        b = self._buffers                                               # see Int8Linear._native
        if self.kernel == cpu_woq.BF16_KERNEL:
            return cpu_woq.OPS.int4_bf16_mm(x2, b["qweight"], b["scales_zeros"], self.group_size)
        return cpu_woq.OPS.int4_mm(x2, b["qweight"], b["scales_zeros"], self.group_size)

    def _direct(self, x2: torch.Tensor) -> torch.Tensor:
        if self.kernel == "int4pack_cpu":
            return torch.ops.aten._weight_int4pack_mm_for_cpu(x2, self.qweight, self.group_size, self.scales_zeros)
        return torch.ops.aten._weight_int4pack_mm(x2, self.qweight, self.group_size, self.scales_zeros)

    def _matmul(self, x2: torch.Tensor) -> torch.Tensor:
        if self.padded:
            x2 = F.pad(x2, (0, self.padded))
        if self.kernel != "dequant":
            return self._kernel(x2)
        w = self.dequantize().to(x2.dtype)
        return x2[:, : self.in_features] @ w.T


# --- quantizers (round to nearest) -------------------------------------------------------------------

def is_linear(module: nn.Module) -> bool:
    """nn.Linear, or GPT-2's Conv1D (a linear layer whose weight is stored [in, out])."""
    from transformers.pytorch_utils import Conv1D

    return type(module) is nn.Linear or type(module) is Conv1D


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The [out, in] weight of an nn.Linear or a Conv1D."""
    w = module.weight.detach()
    return w if isinstance(module, nn.Linear) else w.T

def quantize_int8_per_channel(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 per output row: (q [N, K] int8, scale [N] fp32)."""
    w = w.float()
    scale = (w.abs().amax(dim=1) / 127).clamp(min=1e-12)
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scale


def pad_columns(w: torch.Tensor, group_size: int) -> torch.Tensor:
    k = w.shape[1]
    extra = (-k) % group_size
    return F.pad(w, (0, extra)) if extra else w


def int4_params(w: torch.Tensor, group_size: int, sym: bool, clip: torch.Tensor | float = 1.0):
    """(scale, zero) [K/g, N] of the affine form w ~= (q - 8) * scale + zero for one weight [N, K]."""
    n, k = w.shape
    g = w.float().reshape(n, k // group_size, group_size)
    # scales are rounded to bf16 (what the kernels store) before anything is derived from them, so a
    # checkpoint's fp16 scale and integer zero point rebuild exactly the same layer
    if sym:
        amax = g.abs().amax(dim=-1) * clip
        scale = (amax / 7.5).clamp(min=1e-12).to(torch.bfloat16).float()   # codes 0..15 around 8
        zero = torch.zeros_like(scale)
    else:                                                # integer zero point zc: w ~= (q - zc) * scale, as in
        lo = (g.amin(dim=-1) * clip).clamp(max=0)        # the GPTQ/AWQ formats; zero = (8 - zc) * scale
        hi = (g.amax(dim=-1) * clip).clamp(min=0)
        scale = ((hi - lo) / 15).clamp(min=1e-12).to(torch.bfloat16).float()
        zc = torch.round(-lo / scale).clamp(0, 15)
        zero = (8 - zc) * scale
    return scale.T.contiguous(), zero.T.contiguous()


def quantize_with(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, group_size: int) -> torch.Tensor:
    """Codes [N, K] for given per-group scale/zero [K/g, N]."""
    s = scale.T.repeat_interleave(group_size, 1)
    z = zero.T.repeat_interleave(group_size, 1)
    return torch.round((w.float() - z) / s + 8).clamp_(0, 15).to(torch.uint8)


def quantize_int4_groups(w: torch.Tensor, group_size: int, sym: bool = True):
    """Round-to-nearest 4-bit: (codes [N, K] uint8, scales [K/g, N], zeros [K/g, N])."""
    scale, zero = int4_params(w, group_size, sym)
    return quantize_with(w, scale, zero, group_size), scale, zero
