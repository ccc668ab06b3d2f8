"""The packed_weights feature: CPU Linear layers run on oneDNN with their weights reordered once.

F.linear on CPU hands x @ W.T to the BLAS, which re-packs W into its kernel's blocked layout on every call.
For decode (M = 1) and verify steps (M = 2-11) that packing is a large share of the time, and with M >= 2
the BLAS leaves its GEMV path: on the 2-core CPU measured here a width-2 forward of SmolLM2 costs 1.6x a
width-1 forward. oneDNN can reorder W into its own blocked layout once (`mkldnn._reorder_linear_weight`) and
run `mkldnn._linear_pointwise` on it. Measured per layer, fp32, weights read from memory (`python
benchmarks/packed_linear.py`): 1.2-2.8x faster at M = 1, 1.9-3.3x at M = 4, about 2x at M = 90-512 (prefill).

`PackedLinear` replaces an fp32 or bf16 nn.Linear on the CPU (bf16 only where oneDNN has a bf16 path: AVX-512BW
or AVX-NE-CONVERT; an AVX2-only CPU packs fp32 layers alone):
- it holds the reordered weight instead of the dense one (same bytes, no second copy) and the bias;
- `state_dict()` still gives `weight` as a dense [out, in] tensor under the same key, and loading a state
  dict repacks, so checkpoints and save_pretrained are unchanged; a tied weight (the head sharing the
  embedding) stays shared, the packed copy is then extra memory and the report says how much;
- revert restores the original nn.Linear with its exact weight (the reorder is a permutation).

Sums run in another order than the BLAS's: outputs differ at rounding level, so greedy tokens are tested on
every architecture, not assumed. Under torch.compile the layer calls the custom op `hfaccel::packed_linear`
(the reordered weight is an opaque oneDNN tensor that Inductor cannot take as a graph input; the op looks it
up by a handle). Training is refused: the oneDNN op has no backward.
"""

from __future__ import annotations

import itertools
import time
import weakref

import torch
from torch import nn

from . import fusion  # noqa: F401  (registers the fusions first: this feature packs what they left unfused)
from .dense_state import DenseWeightState
from .placement import offloaded_reason
from .registry import Plan, register_feature
from .report import Skip

MIN_GAIN = 1.05
REPS = 4
DTYPES = (torch.float32, torch.bfloat16)

_PACKED: dict[int, torch.Tensor] = {}          # handle -> reordered weight, for the traced path
_handles = itertools.count(1)


def available(dtype: torch.dtype = torch.float32) -> str | None:
    """None when oneDNN's packed linear runs here for weights of `dtype`, else why not."""
    if not torch.backends.mkldnn.is_available():
        return "this PyTorch build has no oneDNN (torch.backends.mkldnn)"
    if not hasattr(torch.ops.mkldnn, "_reorder_linear_weight"):
        return "this PyTorch build has no mkldnn._reorder_linear_weight"
    if dtype is torch.bfloat16 and not _onednn_bf16():
        # oneDNN refuses to reorder a bf16 weight there (measured on an AVX2-only EPYC: "bf16 path needs the
        # cpu support avx_ne_convert or avx512bw, avx512vl and avx512dq")
        return "oneDNN has no bf16 path on this CPU (it needs AVX-512BW/VL/DQ or AVX-NE-CONVERT)"
    return None


def _onednn_bf16() -> bool:
    return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())


def packable_dtypes() -> tuple[torch.dtype, ...]:
    return tuple(d for d in DTYPES if available(d) is None)


def reorder(weight: torch.Tensor) -> torch.Tensor:
    return torch.ops.mkldnn._reorder_linear_weight(weight.detach().contiguous(), 1)


@torch.library.custom_op("hfaccel::packed_linear", mutates_args=())
def packed_linear(x: torch.Tensor, handle: int, out_features: int, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, _PACKED[handle], bias, "none", [], "")


@packed_linear.register_fake
def _(x, handle, out_features, bias):
    return x.new_empty(*x.shape[:-1], out_features)


class _Backward(torch.autograd.Function):
    """The packed forward with a backward to the input and the bias (oneDNN's op has none): a forward with
    grad enabled (an eval loop without no_grad, input attributions) gets correct gradients."""

    @staticmethod
    def forward(ctx, x, bias, layer):
        ctx.layer = layer
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed, bias, "none", [], "")

    @staticmethod
    def backward(ctx, grad):
        layer = ctx.layer
        gx = grad @ layer.weight if ctx.needs_input_grad[0] else None
        gb = grad.reshape(-1, grad.shape[-1]).sum(0) if ctx.needs_input_grad[1] else None
        return gx, gb, None


class PackedLinear(DenseWeightState, nn.Module):
    """y = x W^T + b with W held in oneDNN's reordered layout."""

    def __init__(self, linear: nn.Linear, shared: bool = False):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        if self.dtype not in DTYPES:
            raise TypeError(f"PackedLinear takes float32 or bfloat16 weights, got {self.dtype}")
        why = available(self.dtype)
        if why:
            raise RuntimeError(f"PackedLinear cannot pack {self.dtype} weights: {why}")
        self.packed = reorder(linear.weight)
        self.bias = linear.bias
        # a weight another module uses too (tied head): kept, so `weight` costs nothing and stays shared
        self.__dict__["shared_weight"] = linear.weight if shared else None    # not registered a second time
        self.handle = next(_handles)
        _PACKED[self.handle] = self.packed
        weakref.finalize(self, _PACKED.pop, self.handle, None)

    @property
    def weight(self) -> torch.Tensor:
        """The dense [out, in] weight (a copy unless it is shared with another module)."""
        return self.shared_weight if self.shared_weight is not None else self.packed.to_dense()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            raise TypeError(f"PackedLinear holds {self.dtype} weights; got a {x.dtype} input")
        if torch.compiler.is_compiling():
            return packed_linear(x, self.handle, self.out_features, self.bias)
        if torch.is_grad_enabled() and (x.requires_grad or (self.bias is not None and self.bias.requires_grad)):
            return _Backward.apply(x, self.bias, self)
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")

    def __deepcopy__(self, memo):
        import copy

        # the reordered weight is opaque (no storage to copy): rebuild from the dense weight; a tied weight is
        # copied through memo, so the copy stays tied to the copied embedding
        dense = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        shared = self.shared_weight is not None
        dense.weight = copy.deepcopy(self.shared_weight, memo) if shared else nn.Parameter(self.packed.to_dense(),
                                                                                              requires_grad=False)
        dense.bias = copy.deepcopy(self.bias, memo)
        new = PackedLinear(dense, shared=shared)
        new.training = self.training
        memo[id(self)] = new
        return new

    def _load_weight(self, key: str, w: torch.Tensor, error_msgs: list[str]) -> None:
        if tuple(w.shape) != (self.out_features, self.in_features):
            error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(w.shape)}, the "
                              f"shape in current model is {(self.out_features, self.in_features)}.")
            return
        with torch.no_grad():
            if self.shared_weight is not None:
                self.shared_weight.copy_(w)
            self.packed = reorder(w.to(self.dtype))
            _PACKED[self.handle] = self.packed

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, " \
               f"dtype={self.dtype}, oneDNN reordered"


# ---------------------------------------------------------------------------------------------- the feature

def candidates(model: nn.Module) -> tuple[dict[str, nn.Linear], int]:
    """(path -> nn.Linear that can be packed, the number left because they are offloaded). Packable: fp32 or
    bf16 on the CPU, not a tensor-parallel shard, not inside a PEFT adapter layer, not routed to a fused
    GEMM. A resident layer of a device_map model keeps its accelerate hook on the packed layer."""
    from .placement import Placement, adapter_layers
    from .tp import _is_dtensor

    placement = Placement.detect(model)
    adapters = adapter_layers(model)
    dtypes = packable_dtypes()
    out, offloaded = {}, 0
    for path, mod in model.named_modules():
        # a forward on the instance other than accelerate's hook (which moves to the packed layer): e.g. a
        # projection routed to a fused GEMM (qkv / gate_up), which keeps it
        if type(mod) is not nn.Linear or ("forward" in mod.__dict__ and not hasattr(mod, "_hf_hook")):
            continue
        if placement and placement.offloaded and placement.is_offloaded(path):
            offloaded += 1
            continue
        w = mod.weight
        if _is_dtensor(w) or w.device.type != "cpu" or w.dtype not in dtypes:
            continue
        if any(path == a or path.startswith(a + ".") for a in adapters):
            continue
        out[path] = mod
    return out, offloaded


def _time(fn, x) -> float:
    best = float("inf")
    with torch.inference_mode():
        fn(x)
        for _ in range(REPS):
            t = time.perf_counter()
            fn(x)
            best = min(best, time.perf_counter() - t)
    return best


def measure(groups: dict[tuple, list[nn.Linear]]) -> dict[tuple, tuple[float, float]]:
    """(shape, dtype) -> (seconds as it is, seconds packed) for one token through every layer of the group."""
    out = {}
    for (shape, dtype), mods in groups.items():
        x = torch.randn(1, shape[1], dtype=dtype)
        packs = [reorder(m.weight) for m in mods]
        plain = _time(lambda x: [torch.nn.functional.linear(x, m.weight) for m in mods], x)
        fast = _time(lambda x: [torch.ops.mkldnn._linear_pointwise(x, p, None, "none", [], "") for p in packs], x)
        out[(shape, dtype)] = (plain, fast)
        packs.clear()
    return out


def _shared(model: nn.Module) -> set[int]:
    """ids of parameters that more than one module holds (tied weights)."""
    seen: dict[int, int] = {}
    for mod in model.modules():
        for p in mod._parameters.values():
            if p is not None:
                seen[id(p)] = seen.get(id(p), 0) + 1
    return {i for i, n in seen.items() if n > 1}


@register_feature("packed_weights", stage="fuse")
def plan_packed_weights(model: nn.Module, ctx, cfg) -> Plan | Skip | None:
    if not cfg.fusion.packed_weights:
        return None
    why = available()
    if why:
        return Skip("packed_weights", f"oneDNN packed weights: {why}")
    if model.training and torch.is_grad_enabled():
        return Skip("packed_weights", "oneDNN packed weights: the model is in training mode (the packed op has no "
                                      "backward); call model.eval() first")
    mods, offloaded = candidates(model)
    notes = [offloaded_reason(offloaded, "Linear layers")] if offloaded else []
    if not mods:
        kinds = "/".join({torch.float32: "fp32", torch.bfloat16: "bf16"}[d] for d in packable_dtypes())
        unsupported = [why for d in DTYPES if (why := available(d))]
        return Skip("packed_weights", "; ".join([f"oneDNN packed weights: no {kinds} nn.Linear layers on the CPU"]
                                                + unsupported + notes))

    def apply(rw) -> None:
        mods, _ = candidates(model)          # again: earlier stages (shard, quantize, fuse) changed modules
        groups: dict[tuple, list[nn.Linear]] = {}
        for m in mods.values():
            groups.setdefault((tuple(m.weight.shape), m.weight.dtype), []).append(m)
        timing = measure(groups)
        shared = _shared(model)
        for path, mod in mods.items():
            key = (tuple(mod.weight.shape), mod.weight.dtype)
            plain, fast = timing[key]
            if plain < fast * MIN_GAIN:
                continue
            tied = id(mod.weight) in shared
            new = PackedLinear(mod, shared=tied)
            extra = f", +{new.packed.numel() * new.packed.element_size() / 2**20:.0f} MiB (tied weight kept)" \
                if tied else ""
            _swap(rw, model, path, mod, new, tied,
                  f"PackedLinear {list(key[0])} ({plain * 1e3:.2f} -> {fast * 1e3:.2f} ms per token for "
                  f"{len(groups[key])} layer(s)){extra}")

    return Plan("packed_weights", apply, "CPU Linear layers on oneDNN reordered weights where a one-token "
                                         "forward is faster (measured per shape)", notes)


def _swap(rw, model: nn.Module, path: str, old: nn.Linear, new: PackedLinear, tied: bool, label: str) -> None:
    """Put `new` in place of `old`. The original keeps no dense copy while swapped out (unless the weight is
    tied to another module); revert unpacks the current weight back into it."""
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    w = old.weight
    hook = getattr(old, "_hf_hook", None)
    if hook is not None:                     # a resident layer of a device_map model: keep its device alignment
        from accelerate.hooks import add_hook_to_module

        add_hook_to_module(new, hook)
    setattr(parent, name, new)
    if not tied:
        w.data = torch.empty(0, dtype=w.dtype)

    def undo() -> None:
        if not tied:
            w.data = new.packed.to_dense()
        setattr(parent, name, old)

    rw.record(path, "Linear", label, undo)


__all__ = ["PackedLinear", "available", "candidates", "packable_dtypes", "plan_packed_weights"]
