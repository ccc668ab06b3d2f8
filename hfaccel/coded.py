"""The exact_codes feature: fp32 Linear weights that are exactly 4-bit block codes, held as those codes.

Transformers loads a GGUF file (`from_pretrained(..., gguf_file=...)`, as hfaccel's default model is) by
dequantizing every tensor into a dense float one. A Q4_1 tensor becomes the fp32 values fl(fl(d * q) + m), a
Q4_0 one fl(d * (q - 8)), with codes q in 0..15 and one fp16 pair (d, m) per block of 32 input columns. The
dense model then reads 4 bytes per weight in every decode step where the file held 0.625.

This feature looks for that structure in each fp32 nn.Linear weight on the CPU: every block of 32 columns of
every row must rebuild bit for bit, or the layer stays as it is. A layer that passes becomes a `CodedLinear`
holding the codes (0.5 bytes per weight) and an fp32 (d, m) pair per block (0.25 bytes), and runs
`hfaccel_cpu::coded4_mm` (kernels/cpu_woq.cpp), which rebuilds each weight in registers with the same two
roundings and multiplies it with the fp32 activations. The weights are the model's own, bit for bit: only the
order of the sums changes (as with small_gemm and packed_weights), so greedy tokens are tested on the default
model, not assumed. `state_dict()` still gives the dense weight; revert_model restores the nn.Linear with its
exact weight. Weights that were trained or converted from fp16/bf16 have no such structure (a random fp32
matrix fails in its first block), so the feature finds nothing there and says so.

Measured on the 2-core Sapphire Rapids here, one layer at a time, weights read from memory (M = 1): 576x576
93.5 -> 31.5 us, 576x192 34.2 -> 9.1, 576x1536 332.5 -> 78.4, 1536x576 312.5 -> 73.1 against F.linear; at
16 rows 1.5-2.1x F.linear (the rebuild is per weight and per 4 rows, so many rows make it ALU-bound).
"""

from __future__ import annotations

import time

import torch
from torch import nn

from .dense_state import DenseWeightState
from .registry import Plan, register_feature
from .report import Skip

BLOCK = 32
SLOWER_OK = 1.05        # a shape is taken unless one row through its layers measures this much slower
_STEPS = (0, 1, -1, 2, -2)     # fp16 neighbours of the estimated scale tried, in this order


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.view(torch.int32)


def rebuild(codes: torch.Tensor, dm: torch.Tensor, zero: int) -> torch.Tensor:
    """[N, K] codes 0..15, [N, K / 32, 2] fp32 (d, m) -> the [N, K] fp32 weight fl(fl(d * (code - zero)) + m),
    the arithmetic coded4_mm does in registers."""
    n, k = codes.shape
    c = codes.reshape(n, k // BLOCK, BLOCK).float() - zero
    return ((dm[..., :1] * c) + dm[..., 1:]).reshape(n, k)


def find_codes(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(codes uint8 [N, K], dm fp32 [N, K / 32, 2], zero) such that rebuild() gives `w` bit for bit, or None.

    Q4_1 blocks: m is the block's smallest value (code 0) and d an fp16 value near (max - min) / 15. Q4_0
    blocks: the value of largest magnitude is d * -8 exactly, m is -0.0 (adding -0.0 changes no value and keeps
    a -0.0 weight's sign)."""
    if w.dim() != 2 or w.dtype != torch.float32 or w.shape[1] % BLOCK or w.numel() == 0:
        return None
    n, k = w.shape
    g = w.detach().reshape(n, k // BLOCK, BLOCK)
    for zero in (0, 8):
        found = _find_blocks(g, zero)
        if found is not None:
            codes, d, m = found
            return codes.reshape(n, k), torch.stack([d, m], dim=-1).contiguous(), zero
    return None


def _find_blocks(g: torch.Tensor, zero: int):
    lo, hi = g.amin(-1), g.amax(-1)
    if zero == 0:
        m = lo
        est = ((hi - lo) / 15).half()
    else:
        m = torch.full_like(lo, -0.0)
        extreme = torch.where(hi.abs() >= lo.abs(), hi, lo)
        est = (extreme / -8).half()
    d = torch.zeros_like(lo)
    codes = torch.zeros(g.shape, dtype=torch.uint8)
    todo = torch.ones(lo.shape, dtype=torch.bool)
    for step in _STEPS:
        idx = todo.nonzero(as_tuple=True)
        if not idx[0].numel():
            break
        cand = est[idx]
        if step:
            cand = (cand.view(torch.int16) + step).view(torch.float16)
        cd = cand.float()
        gb, mb = g[idx], m[idx][:, None]
        safe = torch.where(cd == 0, torch.ones_like(cd), cd)[:, None]
        q = torch.where(cd[:, None] == 0, torch.full_like(gb, float(zero)),
                        ((gb - torch.where(mb == 0, torch.zeros_like(mb), mb)) / safe).round() + zero)
        q = q.nan_to_num(0.0).clamp(0, 15)
        back = (cd[:, None] * (q - zero)) + mb
        ok = (_bits(back) == _bits(gb)).all(-1)
        if not ok.any():
            if step == 0 and todo.all():
                return None                 # not one block fits: not this format (the common case, cheaply)
            continue
        sel = tuple(i[ok] for i in idx)
        d[sel] = cd[ok]
        codes[sel] = q[ok].to(torch.uint8)
        todo[sel] = False
    if todo.any():
        return None
    return codes, d, m


class CodedLinear(DenseWeightState, nn.Module):
    """y = x W^T + b with W held as 4-bit block codes that rebuild it bit for bit (see the module docs)."""

    def __init__(self, packed: torch.Tensor, dm: torch.Tensor, zero: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = packed.shape[0], packed.shape[1] * 2
        self.zero = zero
        self.register_buffer("packed", packed)
        self.register_buffer("dm", dm)
        self.bias = bias

    @classmethod
    def of(cls, linear: nn.Linear, codes: torch.Tensor, dm: torch.Tensor, zero: int) -> CodedLinear:
        """The layer for `linear`, whose weight find_codes() gave (codes, dm, zero); it keeps the bias."""
        from .kernels.cpu_woq import pack_int4

        return cls(pack_int4(codes), dm, zero, linear.bias)

    @property
    def weight(self) -> torch.Tensor:
        """The dense fp32 [out, in] weight, rebuilt (bit for bit the one the layer was made from)."""
        from .kernels.cpu_woq import unpack_int4

        return rebuild(unpack_int4(self.packed), self.dm, self.zero)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        grad = torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad))
        if x.dtype != torch.float32 or x.device.type != "cpu" or (grad and not torch.compiler.is_compiling()):
            return nn.functional.linear(x, self.weight, self.bias)     # what nn.Linear does, dtype errors too
        y = torch.ops.hfaccel_cpu.coded4_mm(x, self.packed, self.dm, self.zero)
        return y if self.bias is None else y + self.bias

    def _load_weight(self, key: str, w: torch.Tensor, error_msgs: list[str]) -> None:
        from .kernels.cpu_woq import pack_int4

        found = find_codes(w.to(torch.float32)) if tuple(w.shape) == (self.out_features, self.in_features) else None
        if found is None:
            error_msgs.append(f"{key}: a CodedLinear takes only a [{self.out_features}, {self.in_features}] weight "
                              f"made of 4-bit block codes (got {w.dtype} {tuple(w.shape)}, not such codes); "
                              f"revert_model(model) first to load other weights")
            return
        codes, self.dm, self.zero = found
        self.packed = pack_int4(codes)

    def extra_repr(self) -> str:
        kind = "Q4_1" if self.zero == 0 else "Q4_0"
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"exact {kind}-style codes"


# ---------------------------------------------------------------------------------------------- the feature

def candidates(model: nn.Module) -> dict[str, nn.Linear]:
    """path -> fp32 CPU nn.Linear with its own forward, a weight no other module holds (not a tied head), no
    accelerate hook (offload, device_map), not a tensor-parallel shard, not inside a PEFT adapter layer."""
    from .packed import _shared
    from .placement import adapter_layers
    from .tp import _is_dtensor

    shared = _shared(model)
    adapters = adapter_layers(model)
    out = {}
    for path, mod in model.named_modules():
        if type(mod) is not nn.Linear or "forward" in mod.__dict__ or hasattr(mod, "_hf_hook"):
            continue
        w = mod.weight
        if _is_dtensor(w) or w.device.type != "cpu" or w.dtype != torch.float32 or id(w) in shared:
            continue
        if mod.bias is not None and (mod.bias.dtype != torch.float32 or mod.bias.device.type != "cpu"):
            continue
        if any(path == a or path.startswith(a + ".") for a in adapters):
            continue
        out[path] = mod
    return out


@register_feature("exact_codes", stage="fuse")
def plan_exact_codes(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    if not cfg.fusion.exact_codes:
        return None
    if not candidates(model):
        return Skip("exact_codes", "exact 4-bit codes: no fp32 nn.Linear layers on the CPU with their own weight")
    from .kernels import cpu_woq

    ok, why = cpu_woq._build()
    if not ok:
        return Skip("exact_codes", f"exact 4-bit codes: the C++ op is not available ({why})")
    if model.training and torch.is_grad_enabled():
        return Skip("exact_codes", "exact 4-bit codes: the model is in training mode; call model.eval() first")

    def apply(rw) -> None:
        from .small_gemm import _time       # best of a few passes over all layers of a shape, after a warm-up

        found: dict[tuple[int, int], list[tuple[str, nn.Linear, CodedLinear]]] = {}
        start = time.perf_counter()
        for path, mod in candidates(model).items():
            codes = find_codes(mod.weight)
            if codes is not None:
                found.setdefault(tuple(mod.weight.shape), []).append((path, mod, CodedLinear.of(mod, *codes)))
        searched = time.perf_counter() - start
        if not found:
            plan.notes.append(f"exact 4-bit codes: no fp32 Linear weight is made of 4-bit block codes (weights "
                              f"dequantized from a GGUF Q4_0 / Q4_1 file are; searched in {searched:.1f} s)")
            return
        for shape, layers in found.items():
            x = torch.randn(1, shape[1])
            dense = _time(lambda x, m: nn.functional.linear(x, m.weight, m.bias), [m for _, m, _ in layers], x)
            coded = _time(lambda x, m: m(x), [c for _, _, c in layers], x)
            if coded > dense * SLOWER_OK:
                plan.notes.append(f"exact 4-bit codes: {len(layers)} Linear layer(s) {list(shape)} kept dense "
                                  f"(1 row: {dense * 1e3:.2f} ms as they are, {coded * 1e3:.2f} ms coded)")
                continue
            saved = sum(m.weight.numel() * 4 - c.packed.numel() - c.dm.numel() * 4 for _, m, c in layers)
            undos = [_swap(model, path, mod, new) for path, mod, new in layers]
            kinds = "/".join(sorted({"Q4_1" if c.zero == 0 else "Q4_0" for _, _, c in layers}))

            def undo(undos=undos) -> None:
                for u in reversed(undos):
                    u()

            rw.record(f"{len(layers)} Linear layer(s) {list(shape)}", "dense fp32 weight",
                      f"CodedLinear: exact {kinds}-style 4-bit codes, rebuilt bit for bit in the kernel (1 row: "
                      f"{dense * 1e3:.2f} -> {coded * 1e3:.2f} ms, all layers of the shape; -{saved / 2**20:.1f} "
                      f"MiB; codes found in {searched:.1f} s for the model)", undo)

    plan = Plan("exact_codes", apply, "fp32 Linear weights that are exactly 4-bit block codes (dequantized GGUF "
                                      "Q4_0 / Q4_1) held as the codes, rebuilt bit for bit in the kernel")
    return plan


def _swap(model: nn.Module, path: str, old: nn.Linear, new: CodedLinear):
    """Put `new` in place of `old` -> the undo. The original keeps no dense copy while swapped out; the undo
    puts the rebuilt (identical) weight back into it."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    w = old.weight
    setattr(parent, name, new)
    w.data = torch.empty(0, dtype=w.dtype)

    def undo() -> None:
        w.data = new.weight
        setattr(parent, name, old)

    return undo


__all__ = ["CodedLinear", "candidates", "find_codes", "plan_exact_codes", "rebuild"]
